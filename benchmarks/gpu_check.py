"""Self-check of every CUDA code path, for the first minutes on a GPU box.

    python benchmarks/gpu_check.py            # about 2 minutes on one GPU; no download
    python benchmarks/gpu_check.py --device cpu

Each check prints PASS, FAIL (with the error) or SKIP (with the reason); the exit code is 1 when
any check failed, so the script is a gate. Models have random weights and the images are synthetic
(random pixels of KonIQ's cached size, 512x384), so nothing is downloaded. In order:

  device      'cuda' is made canonical (cuda:<index>) and tensors made there compare equal to it
  fp32        --precision fp32: forward + backward in true fp32 (TF32 matmuls off), finite
  bf16        --precision bf16: autocast forward + backward, finite; the target net stays fp32
              (distinct scores near 60, not bf16's 0.25 steps) and agrees with fp32
  adamw       fused AdamW (iqa.runtime.make_optimizer) takes a step
  syncs       training steps of every --loss_type (with the ranking term) under
              torch.cuda.set_sync_debug_mode('error'): no host sync inside a step; an evaluation
              makes as many syncs in 8 batches as in 1 (it reads back once per split)
  clip        a train_clip.py epoch of the nano CLIP in bf16 (its own process): finite losses,
              fp32 heads, distinct quality and consistency scores
  compile     torch.compile(dynamic=False) of the nano model: at least one graph, one training and
              one evaluation shape compiled once each (a second pass compiles nothing), scores
              close to eager
  memory      one Swin-B training step at batch 32 measured (iqa.engine.measure_step_bytes), the
              memory plan for KonIQ + SPAQ made from it, the planned sets allocated on the GPU and
              training steps run with them there; the measured peak must stay within MEMORY_SLACK
              of weights + placed images + measured step
  staging     --images_on cpu: host images cut and copied through pinned memory give the same
              patches and scores as images placed on the GPU, and a training epoch runs from them
  resume      train_swin.py on a tiny synthetic data set, interrupted in epoch 2 of 3, then
              --resume: epochs 2 and 3 equal an uninterrupted run's (bit-equal on a CPU)
  ddp         torchrun with 2 processes over NCCL (needs 2 visible GPUs): the run finishes and its
              test SRCC equals one process scoring the saved weights; at its time limit the whole
              process group is killed
  speed       training and evaluation patches/s of tiny, small and base at batch 32; base against
              BENCHMARKS.md's targets (PASS / BELOW TARGET: printed, not a failure)

Without CUDA the CPU versions of device, fp32, bf16, adamw, clip and resume run (nano models), the
memory plan is shown for a simulated 24 GB card, and the checks that need a GPU say SKIP; compile
runs on the CPU only with --cpu_compile (inductor compiles for a minute or more on a small CPU).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import data_loader  # noqa: E402
import models_swin  # noqa: E402
from iqa import engine, evaluation, runtime  # noqa: E402
from iqa.losses import total_loss  # noqa: E402

GIB = 2 ** 30
# BENCHMARKS.md's targets (issue 6: Swin-B, bf16, batch 32, one H100); bench_train.py's TARGETS
SPEED_TARGETS = {'train_patches_per_s': 1000, 'eval_patches_per_s': 4000}
MEMORY_SLACK = 1.15   # a measured peak may exceed the plan's sum by 15% before the check fails
KONIQ_HW = (512, 384)
KONIQ_SETS = (('train', 7058), ('val', 1000), ('test', 2015), ('spaq', 11125))


class Skip(Exception):
    """A check that cannot run here (no GPU, one GPU ...): reported as SKIP with the reason."""


def train_args(**changes):
    """train_swin.py's defaults (loss, clipping, lr ...: iqa.engine.TRAIN_DEFAULTS) with a few changes."""
    return engine.train_settings(**changes)


def small_model(device, size):
    torch.manual_seed(0)
    return models_swin.build_model(size, pretrained=False, dropout_rate=0, drop_path_rate=0).to(device)


def one_step(model, x, mos, args, device, amp):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        pred = model(x).float()
    loss = total_loss(pred, mos, args)
    loss.backward()
    return pred.detach(), loss.detach()


# --------------------------------------------------------------------------- checks

def check_device(ctx):
    device = ctx['device']
    x = torch.zeros(1, device=device)
    assert x.device == device, f'a tensor made on {device} is on {x.device}'
    if device.type == 'cuda':
        assert data_loader.canonical_device('cuda') == torch.device('cuda', torch.cuda.current_device())
    return f'{device}'


def check_fp32(ctx):
    device = ctx['device']
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    model = small_model(device, ctx['size'])
    x = torch.randn(4, 3, 224, 224, device=device, generator=None)
    pred, loss = one_step(model, x, torch.rand(4, device=device) * 100, train_args(), device, amp=False)
    assert torch.isfinite(loss), f'loss {loss.item()}'
    assert pred.dtype == torch.float32
    return f'loss {loss.item():.3f}'


def check_bf16(ctx):
    device = ctx['device']
    model = small_model(device, ctx['size']).eval()
    with torch.no_grad():
        model.fc5b_fc.bias.fill_(60.0)   # KonIQ's 0-100 scale, where bf16's step is 0.25
    # eight clearly different inputs (contrast and brightness), so that their scores differ by
    # more than the bf16 backbone's rounding
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 3, 224, 224, generator=gen) * torch.linspace(0.2, 2, 8).view(8, 1, 1, 1)
         + torch.linspace(-1, 1, 8).view(8, 1, 1, 1)).to(device)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = model(x)
    assert pred.dtype == torch.float32, f'scores come out as {pred.dtype}'
    assert len(set(pred.tolist())) == 8, f'tied scores under bf16: {pred.tolist()}'
    corr = float(np.corrcoef(pred.cpu().numpy(), ref.cpu().numpy())[0, 1])
    assert corr > 0.9, f'bf16 and fp32 scores correlate only {corr:.3f}'
    model.train()
    _, loss = one_step(model, x, torch.rand(8, device=device) * 100, train_args(), device, amp=True)
    assert torch.isfinite(loss), f'loss {loss.item()}'
    return f'bf16 vs fp32 score correlation {corr:.4f}'


def check_adamw(ctx):
    device = ctx['device']
    model = small_model(device, ctx['size'])
    args = train_args()
    groups = [{'params': model.backbone_parameters(), 'lr': 1e-4}, {'params': model.head_parameters(), 'lr': 1e-3}]
    opt = runtime.make_optimizer(groups, args, device)
    assert opt.defaults.get('fused') is True, 'AdamW is not fused'
    before = model.fc5b_fc.bias.detach().clone()
    one_step(model, torch.randn(4, 3, 224, 224, device=device), torch.rand(4, device=device) * 100, args, device,
             amp=device.type == 'cuda')
    opt.step()
    assert not torch.equal(before, model.fc5b_fc.bias.detach()), 'the step changed nothing'
    assert all(torch.isfinite(p).all() for p in model.parameters()), 'non-finite weights after the step'
    return 'fused'


class DeviceBatches:
    """A sampler over ready device batches that turns CUDA's sync debug mode to 'error' while
    the training loop runs a step (between two batches), and back while the next is fetched."""

    def __init__(self, batches):
        self.list = batches

    def __len__(self):
        return len(self.list)

    def batches(self, epoch):
        for batch in self.list:
            torch.cuda.set_sync_debug_mode('error')
            try:
                yield batch
            finally:
                torch.cuda.set_sync_debug_mode('default')


def check_syncs(ctx):
    """Training steps of every loss (and the ranking term), then one evaluation: no host sync."""
    device = ctx['device']
    if device.type != 'cuda':
        raise Skip('no GPU: CUDA\'s sync debug mode needs one (tests/test_host_syncs.py counts the calls '
                   'on the CPU)')
    import warnings
    from iqa.losses import LOSS_TYPES
    model = small_model(device, ctx['size'])
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [(torch.randn(8, 3, 224, 224, device=device, generator=gen),
                torch.rand(8, device=device, generator=gen) * 100, torch.arange(8, device=device))
               for _ in range(2)]
    for loss_type in LOSS_TYPES:
        args = train_args(batch_size=8, loss_type=loss_type, ranking_loss_alpha=0.3)
        opt = runtime.make_optimizer(list(model.parameters()), args, device)
        engine.train_one_epoch(model, opt, DeviceBatches(batches), 0, args, device, True, 0, 1, loss_type)
    # evaluation: the syncs of a split (its start and its one read-back) do not grow with its batches
    images = torch.randint(0, 256, (4, 3, 256, 256), dtype=torch.uint8, device=device)

    def evaluation_syncs(batch_size):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            torch.cuda.set_sync_debug_mode('warn')
            try:
                evaluation.predict_scores(model, images, patch_num=4, batch_size=batch_size, device=device, amp=True)
            finally:
                torch.cuda.set_sync_debug_mode('default')
        return len([w for w in caught if 'synchroniz' in str(w.message)])
    evaluation_syncs(16)   # first call: one-time library and allocator set-up synchronises too
    one, many = evaluation_syncs(16), evaluation_syncs(2)
    assert many <= one, f'evaluation synchronises per batch: {one} syncs in 1 batch, {many} in 8'
    return f'{len(LOSS_TYPES)} losses x 2 steps with no sync; evaluation {one} sync(s) per split'


def check_staging(ctx):
    """--images_on cpu: patches cut on the host, copied through pinned memory; equal to placed images."""
    device = ctx['device']
    if device.type != 'cuda':
        raise Skip('no GPU: host staging copies host images to a GPU')
    images = torch.randint(0, 256, (6, 3, *KONIQ_HW), dtype=torch.uint8)
    mos = np.linspace(0, 100, 6)
    out = {}
    for where, imgs in (('host', images), ('gpu', images.to(device))):
        sampler = data_loader.TrainPatchSampler(imgs, mos, patch_num=4, batch_size=8, seed=0, device=device,
                                                place=False)
        out[where] = [p for p, _, _ in sampler.batches(0)]
        assert all(p.device == device for p in out[where]), f'{where} images: patches not on {device}'
    assert all(torch.equal(a, b) for a, b in zip(out['host'], out['gpu'])), 'host-staged and placed patches differ'
    model = small_model(device, ctx['size'])
    args = train_args(batch_size=8)
    sampler = data_loader.TrainPatchSampler(images, mos, patch_num=4, batch_size=8, seed=0, device=device,
                                            place=False)
    loss, *_ = engine.train_one_epoch(model, runtime.make_optimizer(list(model.parameters()), args, device),
                                      sampler, 0, args, device, True, 0, 1, 'staging')
    host = evaluation.predict_scores(model, images, patch_num=2, batch_size=8, device=device, amp=True, place=False)
    placed = evaluation.predict_scores(model, images.to(device), patch_num=2, batch_size=8, device=device, amp=True)
    assert np.isfinite(loss) and np.allclose(host, placed), 'host-staged and placed evaluation differ'
    return f'{len(sampler)} training steps from host images; patches and scores equal to placed images'


# a train_clip.py epoch of the nano CLIP in bf16, in its own process (nothing here imports an entry script)
CLIP_STEP = """
import sys
import numpy as np
import torch
import train_clip
from iqa.clip import evaluation as clip_eval, models as models_clip
device = torch.device(sys.argv[1])
torch.manual_seed(0)
model = models_clip.ClipQualityModel('nano', pretrained=False).to(device)
args = train_clip.check_args(train_clip.build_parser().parse_args(['--batch_size', '4']), lambda m: None)
rng = np.random.default_rng(0)
n, size = 8, model.image_size
images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
prompt_ids = model.tokenizer(['a cat', 'a dog', 'a red car'])
prompt_index = rng.integers(0, 3, n)
data = {'train': np.arange(n), 'train_images': images, 'prompt_ids': prompt_ids, 'prompt_index': prompt_index,
        'mos_q': rng.uniform(1, 5, n), 'mos_c': rng.uniform(1, 5, n), 'scale_q': 5.0, 'scale_c': 5.0,
        'text_cache': None, 'explanation_cache': None}
opt = torch.optim.AdamW([{'params': list(model.parameters()), 'lr': 1e-4, 'initial_lr': 1e-4}])
means, _, _ = train_clip.train_one_epoch(model, opt, data, 0, 1, args, device, True, {'step': 0, 'total_steps': 10})
assert all(np.isfinite(means)), means
heads = [p for p in model.head_parameters()]
assert heads and all(p.dtype == torch.float32 for p in heads), 'a head is not fp32'
q, c, _ = clip_eval.predict(model, images, prompt_ids, prompt_index, device=device, amp=True)
assert len(set(q.tolist())) == n and len(set(c.tolist())) == n, f'tied bf16 scores: {q} {c}'
print(f'loss {means[0]:.4f}, {n} distinct quality and consistency scores')
"""


def check_clip(ctx):
    device = ctx['device']
    done = subprocess.run([sys.executable, '-c', CLIP_STEP, str(device)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    return 'train_clip.py nano epoch in bf16: ' + done.stdout.strip().splitlines()[-1]


def check_compile(ctx):
    device = ctx['device']
    if device.type != 'cuda' and not ctx['cpu_compile']:
        raise Skip('no GPU (--cpu_compile runs it on the CPU, slowly)')
    import torch._dynamo
    amp = device.type == 'cuda'
    model = small_model(device, 'nano')   # the same compiler paths as a large model, in seconds
    compiled = torch.compile(model, dynamic=False)
    args = train_args(batch_size=8)
    counts = torch._dynamo.utils.counters
    counts.clear()
    images = torch.randint(0, 256, (6, 3, 256, 256), dtype=torch.uint8)

    def train_then_eval(steps):
        for _ in range(steps):
            one_step(compiled, torch.randn(8, 3, 224, 224, device=device), torch.rand(8, device=device) * 100,
                     args, device, amp)
        return evaluation.predict_scores(compiled, images, patch_num=3, batch_size=8, device=device, amp=amp,
                                         pad_batches=True)
    first = train_then_eval(1)                 # compiles the training and the evaluation graphs
    graphs = counts['stats'].get('unique_graphs', 0)
    assert graphs >= 1, 'torch.compile compiled no graph: the model ran eagerly'
    again = train_then_eval(2)                 # must reuse them
    recompiled = counts['stats'].get('unique_graphs', 0) - graphs
    assert recompiled == 0, f'{recompiled} more graph(s) compiled for the same shapes'
    eager = evaluation.predict_scores(model, images, patch_num=3, batch_size=8, device=device, amp=amp)
    corr = float(np.corrcoef(again, eager)[0, 1])
    assert np.all(np.isfinite(first)) and corr > 0.99, f'compiled and eager scores correlate only {corr:.4f}'
    return f'{graphs} graph(s) compiled for train + eval, none after; compiled vs eager correlation {corr:.4f}'


def check_memory(ctx):
    device = ctx['device']
    sets = [(name, n * 3 * KONIQ_HW[0] * KONIQ_HW[1]) for name, n in KONIQ_SETS]
    if device.type != 'cuda':
        total = 23.6 * GIB   # a simulated 24 GB card, Swin-B at batch 32 (about 11 GiB a step)
        plan = data_loader.plan_image_memory(int(total - 0.9 * GIB), int(total), 11 * GIB, sets, 1, 'auto')
        for line in plan['lines']:
            print('    ' + line)
        raise Skip('no GPU: the plan above is for a simulated 24 GB card; nothing was allocated')
    args = train_args(batch_size=32, model_size='base')
    model = small_model(device, 'base')
    step = engine.measure_step_bytes(model, args, device, amp=True)
    base_bytes = torch.cuda.memory_allocated(device)   # the weights (AdamW's state is in `step`)
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    plan = data_loader.plan_image_memory(free, total, step, sets, 1, 'auto', str(device))
    for line in plan['lines']:
        print('    ' + line)
    assert plan['fits'], 'the plan does not fit this card'
    # Allocate what the plan puts on the GPU (zeros: speed and memory do not depend on pixels) and
    # train with the training images there or on the host, as a run would.
    placed = {name: torch.zeros((n, 3, *KONIQ_HW), dtype=torch.uint8,
                                device=device if plan['where'][name] == 'gpu' else 'cpu')
              for name, n in KONIQ_SETS}
    sampler = data_loader.TrainPatchSampler(placed['train'], np.zeros(len(placed['train'])), patch_num=1,
                                            batch_size=32, seed=0, device=device, drop_last=True, place=False)
    opt = runtime.make_optimizer(list(model.parameters()), args, device)
    batches = sampler.batches(0)
    for _ in range(3):
        patches, mos, _ = next(batches)
        one_step(model, patches, mos, args, device, amp=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    on_gpu = sum(t.numel() for t in placed.values() if t.device.type == 'cuda')
    del placed, sampler
    # what the plan counted on: weights and optimizer state (allocated now), the placed images and
    # one measured step; MEMORY_SLACK covers the allocator's rounding and the sampler's batch
    expected = base_bytes + on_gpu + step
    assert peak <= expected * MEMORY_SLACK, (
        f'peak {peak / GIB:.2f} GiB is more than {MEMORY_SLACK:.2f} x the planned {expected / GIB:.2f} GiB '
        '(weights + placed images + measured step): the memory plan under-counts')
    return (f'measured step {step / GIB:.1f} GiB; peak with the planned images {peak / GIB:.1f} GiB, '
            f'planned {expected / GIB:.1f} GiB (slack {MEMORY_SLACK}), card {total / GIB:.1f} GiB')


def write_tiny_dataset(folder, n=16):
    """n random 224x224 PNGs with scores and a train/val/test column (a generic CSV data set)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    (folder / 'img').mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(folder / 'img' / f'{i}.png')
        rows.append([f'img/{i}.png', float(rng.uniform(0, 100)), 'train' if i < 10 else ('val' if i < 13 else 'test')])
    with open(folder / 'scores.csv', 'w', newline='') as f:
        csv.writer(f).writerows([['image', 'score', 'split'], *rows])
    return folder / 'scores.csv'


# train_swin.py with its second epoch interrupted (KeyboardInterrupt, as a Ctrl-C would)
INTERRUPTED_RUN = """
import contextlib, sys
import train_swin
real_epoch = train_swin.train_one_epoch
def interrupted_in_epoch_two(model, optimizer, sampler, epoch, *rest):
    if epoch == 1:
        raise KeyboardInterrupt
    return real_epoch(model, optimizer, sampler, epoch, *rest)
train_swin.train_one_epoch = interrupted_in_epoch_two
with contextlib.suppress(KeyboardInterrupt):
    train_swin.main(sys.argv[1:])
"""


def check_resume(ctx):
    device = ctx['device']
    with tempfile.TemporaryDirectory(prefix='gpu_check_') as tmp:
        tmp = Path(tmp)
        data = write_tiny_dataset(tmp / 'data')

        def argv(out):
            return ['--dataset', str(data), '--model_size', ctx['size'], '--no_pretrained', '--resize', '224',
                    '224', '--batch_size', '4', '--train_patch_num', '1', '--test_patch_num', '2',
                    '--eval_batch_size', '4', '--epochs', '3', '--cache_dir', 'none', '--num_workers', '1',
                    '--output_dir', str(tmp / out), '--log_dir', str(tmp / 'logs'), '--no_spaq',
                    '--device', str(device)]
        # the entry script runs in its own process (nothing here imports it), its epoch 2 interrupted
        done = subprocess.run([sys.executable, '-c', INTERRUPTED_RUN, *argv('runs')], capture_output=True,
                              text=True, cwd=REPO, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
        run_dir = next((tmp / 'runs').iterdir())
        done = subprocess.run([sys.executable, str(REPO / 'train_swin.py'), '--resume', str(run_dir)],
                              capture_output=True, text=True, cwd=REPO, timeout=600)
        assert done.returncode == 0, f'--resume exited with {done.returncode}: {(done.stdout + done.stderr)[-2000:]}'
        assert '"status": "finished"' in (run_dir / 'summary.json').read_text()
        done = subprocess.run([sys.executable, str(REPO / 'train_swin.py'), *argv('whole')], capture_output=True,
                              text=True, cwd=REPO, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
        resumed, whole = (metric_rows(next((tmp / out).iterdir())) for out in ('runs', 'whole'))
        assert len(resumed) == 3, f'metrics after resume: {resumed}'
        # bit-equal on the CPU; CUDA's atomics in some backward kernels make the last digits vary
        tol = 0.0 if device.type == 'cpu' else 0.01
        assert rows_close(resumed, whole, tol), f'resumed {resumed} != uninterrupted {whole}'
    return 'interrupted in epoch 2, resumed: epochs 2 and 3 equal an uninterrupted run'


def rows_close(a, b, tol):
    """Same rows and columns; numbers within `tol`, everything else equal."""
    def close(x, y):
        try:
            return abs(float(x) - float(y)) <= tol or x == y
        except ValueError:
            return x == y
    return len(a) == len(b) and all(r.keys() == q.keys() and all(close(r[k], q[k]) for k in r)
                                    for r, q in zip(a, b))


def metric_rows(run_dir):
    """metrics.csv's rows without the timing columns (the only ones a resume may change)."""
    with open(run_dir / 'metrics.csv', newline='') as f:
        return [{k: v for k, v in row.items() if not k.endswith(('_seconds', '_per_s'))}
                for row in csv.DictReader(f)]


def check_ddp(ctx):
    device = ctx['device']
    if device.type != 'cuda' or torch.cuda.device_count() < 2:
        raise Skip(f'needs 2 visible GPUs, this machine has {torch.cuda.device_count()}')
    with tempfile.TemporaryDirectory(prefix='gpu_check_ddp_') as tmp:
        tmp = Path(tmp)
        argv = ['--dataset', str(write_tiny_dataset(tmp / 'data')), '--model_size', 'tiny', '--no_pretrained',
                '--resize', '224', '224', '--batch_size', '4', '--train_patch_num', '1', '--test_patch_num', '2',
                '--epochs', '2', '--cache_dir', str(tmp / 'cache'), '--output_dir', str(tmp / 'runs'),
                '--log_dir', str(tmp / 'logs'), '--no_spaq']
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
               str(REPO / 'train_swin.py'), *argv]
        code, out = run_group(cmd, timeout=300)
        assert code == 0, out[-2000:]
        summary = json.loads((next((tmp / 'runs').iterdir()) / 'summary.json').read_text())
        assert summary['status'] == 'finished', summary['status']
        # the 2-process evaluation equals one process scoring the saved weights on the same images
        from iqa.ckpt import load_checkpoint
        from iqa.metrics import srcc
        model = small_model(device, 'tiny')
        model.load_state_dict(load_checkpoint(summary['best_checkpoint'])['state_dict'])
        dataset = data_loader.load_dataset(str(tmp / 'data' / 'scores.csv'), None, seed=42)
        images, _ = data_loader.load_images(dataset.paths, resize_hw=(224, 224), cache_dir=None, num_workers=1)
        test = dataset.splits['test']
        pred = evaluation.predict_scores(model, images[test], patch_size=224, patch_num=2, batch_size=64, seed=42,
                                         device=device, amp=True)
        one = srcc(pred, dataset.mos[test])
        assert abs(summary['best']['test_srcc'] - one) < 1e-3, (
            f'2-process test SRCC {summary["best"]["test_srcc"]:.4f}, one process {one:.4f}')
    return f'2 processes, NCCL, 2 epochs; test SRCC {one:.4f} equal to one process'


def run_group(cmd, timeout):
    """(exit code, output) of `cmd` run in its own process group; at `timeout` the whole group is
    killed (torchrun and every worker), so no process is left holding a GPU."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f'no result after {timeout} s; its processes were killed: {out[-1500:]}') from None
    return proc.returncode, out


def speed(ctx):
    """Training and evaluation patches/s (not a pass/fail check; figures only)."""
    device = ctx['device']
    sizes = ('tiny', 'small', 'base') if device.type == 'cuda' else ('nano',)
    batch, steps = (32, 10) if device.type == 'cuda' else (4, 2)
    amp = device.type == 'cuda'
    lines = []
    images = torch.randint(0, 256, (64, 3, *KONIQ_HW), dtype=torch.uint8)
    for size in sizes:
        model = small_model(device, size)
        args = train_args(batch_size=batch)
        opt = runtime.make_optimizer(list(model.parameters()), args, device)
        sampler = data_loader.TrainPatchSampler(images, np.zeros(64), patch_num=8, batch_size=batch, seed=0,
                                                device=device, drop_last=True)
        batches = sampler.batches(0)
        for i in range(steps + 2):   # two warm-up steps
            if i == 2:
                sync(device)
                start = time.perf_counter()
            patches, mos, _ = next(batches)
            one_step(model, patches, mos, args, device, amp)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        train = steps * batch / (time.perf_counter() - start)
        start = time.perf_counter()
        evaluation.predict_scores(model, images[:16], patch_num=steps * 2 if amp else 2, batch_size=2 * batch,
                                  device=device, amp=amp)
        n = 16 * (steps * 2 if amp else 2)
        evaluated = n / (time.perf_counter() - start)
        lines.append(f'{size:<6} train {train:8.1f} patches/s   eval {evaluated:8.1f} '
                     f'patches/s   (batch {batch}, {"bf16" if amp else "fp32"})')
        if size == 'base':   # BENCHMARKS.md's targets are Swin-B's: printed, not a correctness failure
            for what, got, goal in (('train', train, SPEED_TARGETS['train_patches_per_s']),
                                    ('eval', evaluated, SPEED_TARGETS['eval_patches_per_s'])):
                lines.append(f'target base {what} >= {goal} patches/s: {"PASS" if got >= goal else "BELOW TARGET"}'
                             f' ({got:.0f})')
        del model, opt
    return lines


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


CHECKS = (('device', check_device), ('fp32', check_fp32), ('bf16', check_bf16), ('adamw', check_adamw),
          ('syncs', check_syncs), ('clip', check_clip), ('compile', check_compile), ('memory', check_memory),
          ('staging', check_staging), ('resume', check_resume), ('ddp', check_ddp))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument('--device', default='auto', help='auto (CUDA when there is one), cuda, cuda:1, cpu')
    p.add_argument('--cpu_compile', action='store_true', help='run the compile check on a CPU too (slow)')
    p.add_argument('--no_speed', action='store_true', help='skip the patches/s figures')
    args = p.parse_args(argv)
    flag = ('cuda' if torch.cuda.is_available() else 'cpu') if args.device == 'auto' else args.device
    device = data_loader.canonical_device(flag)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f'gpu_check.py: --device {args.device}: this machine has no usable CUDA GPU')
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
    print(f'gpu_check.py: {name} ({device}), torch {torch.__version__}', flush=True)
    ctx = {'device': device, 'size': 'tiny' if device.type == 'cuda' else 'nano', 'cpu_compile': args.cpu_compile}
    results = {}
    start = time.perf_counter()
    for label, check in CHECKS:
        t0 = time.perf_counter()
        try:
            detail = check(ctx)
            results[label] = 'PASS'
            print(f'PASS  {label:<8} {detail}  ({time.perf_counter() - t0:.0f} s)', flush=True)
        except Skip as why:
            results[label] = 'SKIP'
            print(f'SKIP  {label:<8} {why}', flush=True)
        except Exception as err:   # every failure is reported, and the other checks still run
            results[label] = 'FAIL'
            print(f'FAIL  {label:<8} {type(err).__name__}: {err}', flush=True)
            print('      ' + traceback.format_exc().strip().replace('\n', '\n      ')[-2000:], flush=True)
        finally:
            if device.type == 'cuda':
                torch.cuda.empty_cache()
    if not args.no_speed:
        try:
            for line in speed(ctx):
                print(f'speed {line}', flush=True)
            if device.type != 'cuda':
                print('speed tiny/small/base skipped: no GPU (nano only)', flush=True)
        except Exception as err:
            results['speed'] = 'FAIL'
            print(f'FAIL  speed    {type(err).__name__}: {err}', flush=True)
    failed = [k for k, v in results.items() if v == 'FAIL']
    skipped = [k for k, v in results.items() if v == 'SKIP']
    print(f'{len(results) - len(failed) - len(skipped)} passed, {len(failed)} failed'
          + (f' ({", ".join(failed)})' if failed else '')
          + (f', {len(skipped)} skipped ({", ".join(skipped)})' if skipped else '')
          + f' in {time.perf_counter() - start:.0f} s', flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
