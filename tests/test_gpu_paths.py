"""The CUDA code paths, exercised on the CPU: device identity, memory plan, precision,
NaN selection, DDP agreement on divergence, resume after an early-stopped round, compile
shapes and per-step host->device copies (issue 10). Each test failed before its fix."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from iqa.ckpt import load_checkpoint
import data_loader
from iqa import runtime
from iqa.data import patches as patch_module
import train_swin
from test_train_swin import (free_port, koniq_root, only_run_dir, read_metrics,  # noqa: F401 (fixture)
                             scripted_evaluation, tiny_args, without_timing)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- device identity

def test_a_bare_cuda_device_is_made_canonical(monkeypatch):
    """'cuda' and 'cuda:0' name the same GPU but compare unequal; the device the run uses
    is the canonical one, so tensors placed on it compare equal to it."""
    assert data_loader.canonical_device('cuda') == torch.device('cuda', 0)
    assert data_loader.canonical_device('cuda:1') == torch.device('cuda', 1)
    assert data_loader.canonical_device('cpu') == torch.device('cpu')
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    assert runtime.setup_distributed('cuda') == (0, 1, torch.device('cuda', 0))


def test_host_images_that_do_not_fit_are_not_pinned_whole(monkeypatch):
    """A whole set pinned at once cost up to twice its size in page-locked memory (and a CUDA
    tensor cannot be pinned at all); batches are staged in small pinned buffers instead."""
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device=None: (1000, 10 ** 10))
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    placed = data_loader.place_images(images, torch.device('cuda'))
    assert placed is images and not placed.is_pinned()


# --------------------------------------------------------------------------- NaN metrics

NAN = float('nan')


def test_a_nan_srcc_in_the_first_epoch_is_logged_never_selected(koniq_root, tmp_path, monkeypatch):
    scripted_evaluation(monkeypatch, val_srccs=[NAN, 0.5, 0.6], test_srccs=[NAN, 0.4, 0.45])
    assert train_swin.main(tiny_args(koniq_root, tmp_path)) == 0
    run_dir = only_run_dir(tmp_path)
    rows = read_metrics(run_dir)
    assert [r['is_best'] for r in rows] == ['0', '1', '1']
    assert rows[0]['val_srcc'] == '' and rows[0]['test_srcc'] == ''
    summary = json.load(open(os.path.join(run_dir, 'summary.json')))
    assert summary['best_epoch'] == 3 and summary['status'] == 'finished'
    assert os.path.basename(summary['best_checkpoint']) == 'best_model_srcc_0.4500_plcc_0.4600.pkl'
    log = open(tmp_path / 'logs' / (os.path.basename(run_dir) + '.log')).read()
    assert 'epoch 1 has a NaN SRCC/PLCC' in log


def test_a_run_whose_every_epoch_is_nan_finishes_without_a_best(koniq_root, tmp_path, monkeypatch):
    scripted_evaluation(monkeypatch, val_srccs=[NAN, NAN], test_srccs=[0.3, NAN])
    assert train_swin.main(tiny_args(koniq_root, tmp_path, epochs=2)) == 0
    run_dir = only_run_dir(tmp_path)
    summary = json.load(open(os.path.join(run_dir, 'summary.json')))
    assert summary['status'] == 'finished' and summary['best'] is None and summary['best_checkpoint'] is None
    assert not [f for f in os.listdir(run_dir) if f.startswith('best_model')]
    assert [r['is_best'] for r in read_metrics(run_dir)] == ['0', '0']


# --------------------------------------------------------------------------- precision

def test_bf16_autocast_keeps_the_target_net_in_fp32():
    """Under bf16 a score near 60 moves in steps of 0.25: eight different images all got a
    handful of values. The generated weights and the target net now run in fp32."""
    from models_swin import build_model
    torch.manual_seed(0)
    model = build_model('nano', pretrained=False, dropout_rate=0, drop_path_rate=0).eval()
    with torch.no_grad():
        model.fc5b_fc.bias.fill_(60.0)   # KonIQ's 0-100 scale
    x = torch.randn(8, 3, 224, 224)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        pred = model(x)
    with torch.no_grad():
        ref = model(x)
    assert pred.dtype == torch.float32
    assert len(set(pred.tolist())) == 8
    assert not all(float(v * 4).is_integer() for v in pred)   # not on bf16's 0.25 grid at 60
    # the spread between images survives (the bf16 backbone moves each score a little)
    assert np.corrcoef(pred.numpy(), ref.numpy())[0, 1] > 0.9


def test_precision_flag_and_no_amp():
    parser = train_swin.build_parser()
    cpu, cuda = torch.device('cpu'), torch.device('cuda', 0)

    def resolved(*argv):
        args = train_swin.check_args(parser.parse_args(list(argv)), lambda m: None)
        return args.precision, runtime.use_bf16(args.precision, cpu), runtime.use_bf16(args.precision, cuda)
    assert resolved() == ('auto', False, True)
    assert resolved('--precision', 'bf16') == ('bf16', True, True)
    assert resolved('--no_amp') == ('fp32', False, False)
    assert resolved('--precision', 'fp32') == ('fp32', False, False)
    with pytest.raises(SystemExit):
        resolved('--no_amp', '--precision', 'bf16')


def test_fused_adamw_is_used_on_the_cpu_too():
    args = train_swin.build_parser().parse_args([])
    p = torch.nn.Parameter(torch.ones(3))
    opt = train_swin.make_optimizer([{'params': [p], 'lr': 0.1}], args, torch.device('cpu'))
    assert opt.defaults['fused'] is True
    p.grad = torch.ones(3)
    opt.step()
    assert torch.all(p < 1)


def test_bf16_training_runs_on_the_cpu(koniq_root, tmp_path):
    assert train_swin.main(tiny_args(koniq_root, tmp_path, '--precision', 'bf16', epochs=1)) == 0
    run_dir = only_run_dir(tmp_path)
    row = read_metrics(run_dir)[0]
    assert row['test_srcc'] != '' and np.isfinite(float(row['train_loss']))
    log = open(tmp_path / 'logs' / (os.path.basename(run_dir) + '.log')).read()
    assert 'precision bf16 autocast (target net fp32)' in log


# --------------------------------------------------------------------------- per-step copies

def count_host_to_device_copies(monkeypatch):
    """Count Tensor.to and torch.tensor calls: on a GPU each one of them in the batch loop is
    a blocking host->device copy (a hidden synchronisation)."""
    calls = []
    real_to, real_tensor = torch.Tensor.to, torch.tensor

    def to(self, *a, **k):
        calls.append('to')
        return real_to(self, *a, **k)

    def tensor(*a, **k):
        calls.append('tensor')
        return real_tensor(*a, **k)
    monkeypatch.setattr(torch.Tensor, 'to', to)
    monkeypatch.setattr(torch, 'tensor', tensor)
    return calls


def test_colour_jitter_makes_no_per_batch_copies(monkeypatch):
    images = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8)
    sampler = data_loader.TrainPatchSampler(images, np.arange(6.0), patch_size=16, patch_num=8, batch_size=4,
                                            color_jitter=True)
    batches = sampler.batches(0)
    next(batches)          # the epoch's set-up (crop positions, jitter maps: one copy each) is done
    calls = count_host_to_device_copies(monkeypatch)
    for _ in range(5):
        next(batches)
    assert calls == []
    # the GPU path's whole-batch normalisation, with and without jitter
    crops = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    maps = patch_module._jitter_maps(patch_module._jitter_factors(torch.Generator().manual_seed(0), 4), 'cpu')
    del calls[:]
    patch_module._normalize_batch(crops, maps)
    patch_module._normalize_batch(crops, None)
    for _ in data_loader.eval_patch_batches(images, patch_size=16, patch_num=2, batch_size=4):
        pass
    assert calls.count('tensor') == 0
    assert calls.count('to') <= 1    # eval: the image index, once for the whole evaluation


# --------------------------------------------------------------------------- resume

def evaluation_by_round_and_epoch(monkeypatch, val, test):
    """Scripted SRCCs keyed by (round, epoch), the same in every process that runs them.
    Needs --test_random_crop and --seed 3: the evaluation seed is then (3 + round - 1) * 1000 + epoch."""
    def fake(model, images, mos, direction, args, device, amp, rank, world, seed, desc):
        round_idx, epoch = seed // 1000 - 2, seed % 1000
        s = (val if desc.startswith('val') else test)[round_idx - 1][epoch]
        return {'srcc': s, 'plcc': s + 0.01, 'krcc': s - 0.1}, None
    monkeypatch.setattr(train_swin, 'evaluate_split', fake)


def test_resume_after_an_early_stopped_round_starts_the_next_round(koniq_root, tmp_path, monkeypatch):
    """Round 1 stops early after epoch 2; the run is killed before round 2's first epoch ends.
    --resume must start round 2, not run round 1 on past its early stop."""
    evaluation_by_round_and_epoch(monkeypatch, val=[[0.5, 0.4, 0.9], [0.3, 0.6, 0.7]],
                                  test=[[0.45, 0.35, 0.95], [0.25, 0.55, 0.65]])
    extra = ('--train_test_num', '2', '--patience', '1', '--test_random_crop')
    full = tmp_path / 'full'
    assert train_swin.main(tiny_args(koniq_root, full, *extra)) == 0
    expected = read_metrics(only_run_dir(full))
    assert [(r['round'], r['epoch']) for r in expected] == [('1', '1'), ('1', '2'), ('2', '1'), ('2', '2'),
                                                            ('2', '3')]

    killed = tmp_path / 'killed'
    real_epoch, calls = train_swin.train_one_epoch, []

    def killed_in_round_two(model, optimizer, sampler, epoch, *rest):
        calls.append(epoch)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_epoch(model, optimizer, sampler, epoch, *rest)
    monkeypatch.setattr(train_swin, 'train_one_epoch', killed_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        train_swin.main(tiny_args(koniq_root, killed, *extra))
    monkeypatch.setattr(train_swin, 'train_one_epoch', real_epoch)
    run_dir = only_run_dir(killed)
    assert load_checkpoint(os.path.join(run_dir, 'round1', 'last.pkl'))['round_complete'] is True
    assert train_swin.main(['--resume', run_dir]) == 0
    assert without_timing(read_metrics(run_dir)) == without_timing(expected)
    assert os.listdir(os.path.join(run_dir, 'round1')).count('best_model_srcc_0.4500_plcc_0.4600.pkl') == 1
    summary = json.load(open(os.path.join(run_dir, 'summary.json')))
    assert [r['test_srcc'] for r in summary['rounds']] == pytest.approx([0.45, 0.65])
    assert summary['status'] == 'finished'


# --------------------------------------------------------------------------- DDP

def test_an_epoch_of_exactly_check_every_steps_ends_cleanly():
    losses = [torch.tensor(1.0)] * train_swin.CHECK_EVERY
    train_swin.check_losses(losses, 0, 0)
    train_swin.check_losses(losses[train_swin.CHECK_EVERY:], train_swin.CHECK_EVERY, 0)  # nothing left


def run_two_ranks(script, argv, tmp_path, timeout=300):
    """Start two gloo ranks directly (no torchrun), so each one's own exit code is seen.
    Returns [(returncode, output)] per rank; kills both after `timeout` seconds (a deadlock)."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', LOCAL_WORLD_SIZE='2',
                   MASTER_ADDR='127.0.0.1', MASTER_PORT=port, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
        out = open(tmp_path / f'rank{rank}.out', 'w+')
        procs.append((subprocess.Popen([sys.executable, str(script), *argv], env=env, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True), out))
    results = []
    for proc, out in procs:
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                os.killpg(p.pid, signal.SIGKILL)
            code = 'deadlock (killed after %d s)' % timeout
        out.seek(0)
        results.append((code, out.read()))
    return results


def test_ddp_divergence_on_one_rank_stops_both_with_one_summary(koniq_root, tmp_path):
    """NaN in one rank's loss only (the other rank's losses stay finite in that epoch): both
    ranks stop at the same check with exit code 3 and rank 0 writes the 'diverged' summary."""
    script = tmp_path / 'nan_on_rank1.py'
    script.write_text(textwrap.dedent(f'''
        import os, sys
        sys.path.insert(0, {ROOT!r})
        import train_swin
        real, calls = train_swin.total_loss, []

        def nan_on_rank1_in_epoch2(pred, mos, args):
            calls.append(1)
            loss = real(pred, mos, args)
            return loss * float('nan') if os.environ['RANK'] == '1' and len(calls) == 2 else loss
        train_swin.total_loss = nan_on_rank1_in_epoch2
        sys.exit(train_swin.main(sys.argv[1:]))
    '''))
    results = run_two_ranks(script, [*tiny_args(koniq_root, tmp_path), '--device', 'cpu'], tmp_path,
                            timeout=240)
    assert [code for code, _ in results] == [3, 3], results[0][1][-3000:] + results[1][1][-3000:]
    run_dir = only_run_dir(tmp_path)
    summary = json.load(open(os.path.join(run_dir, 'summary.json')))
    assert summary['status'] == 'diverged'
    assert load_checkpoint(os.path.join(run_dir, 'last.pkl'))['epoch'] == 1
    log = open(tmp_path / 'logs' / (os.path.basename(run_dir) + '.log')).read()
    assert log.count('STOPPED:') == 1 and 'at epoch 2, step 1' in log


# --------------------------------------------------------------------------- memory plan

GIB = 2 ** 30
IMAGE = 3 * 512 * 384                                   # one decoded image at the default --resize
KONIQ_SPAQ = [('train', 7058 * IMAGE), ('val', 1000 * IMAGE), ('test', 2015 * IMAGE), ('spaq', 11125 * IMAGE)]
# One Swin-B training step at batch 32 in bf16, beyond the weights: ~0.21 GiB of saved activations per
# image (measured on the CPU with saved-tensor hooks under bf16 autocast) x 32 x 1.5 for transient
# peaks, plus gradients and AdamW's state: about 11 GiB. gpu_check.py measures the real figure.
SWIN_B_STEP = 11 * GIB
CARDS = {24: 23.6 * GIB, 40: 39.4 * GIB, 80: 79.1 * GIB}   # what torch.cuda.mem_get_info reports as total
AFTER_MODEL = 0.9 * GIB                                    # CUDA context + Swin-B weights


def plan(card, world=1, images_on='auto', step=SWIN_B_STEP):
    total = CARDS[card]
    return data_loader.plan_image_memory(int(total - AFTER_MODEL), int(total), int(step), KONIQ_SPAQ, world,
                                         images_on)


@pytest.mark.parametrize('world', [1, 2])
def test_memory_plan_for_24_40_and_80_gb_cards(world):
    for card in (24, 40, 80):
        p = plan(card, world)
        on_gpu = sum(size for name, size in KONIQ_SPAQ if p['where'][name] == 'gpu')
        assert p['fits'], (card, p['lines'])
        # everything placed + the step + the reserve stays within the card's free memory
        reserve = max(GIB, 0.1 * CARDS[card]) + (GIB if world > 1 else 0)
        assert on_gpu + SWIN_B_STEP + reserve <= CARDS[card] - AFTER_MODEL
    # 24 GB: the training images (read every step) and val/test on the GPU, SPAQ in host memory
    assert plan(24, world)['where'] == {'train': 'gpu', 'val': 'gpu', 'test': 'gpu', 'spaq': 'host'}
    # 40 and 80 GB: everything on the GPU
    assert set(plan(40, world)['where'].values()) == {'gpu'}
    assert set(plan(80, world)['where'].values()) == {'gpu'}
    text = '\n'.join(plan(24, world)['lines'])
    assert 'spaq' in text and '6.1 GiB' in text and 'host memory' in text
    if world == 2:
        assert 'x 2 processes = 12.2 GiB' in text


def test_memory_plan_choices_and_warnings():
    assert set(plan(80, images_on='cpu')['where'].values()) == {'host'}
    forced = plan(24, images_on='gpu')
    assert set(forced['where'].values()) == {'gpu'} and not forced['fits']
    assert 'WARNING: --images_on gpu places 11.6 GiB' in '\n'.join(forced['lines'])
    # a step that does not fit at all says what to do
    too_big = plan(24, step=30 * GIB)
    assert not too_big['fits'] and set(too_big['where'].values()) == {'host'}
    assert 'lower --batch_size' in '\n'.join(too_big['lines'])
    # a smaller set after one that does not fit still gets its place
    sets = [('train', 8 * GIB), ('spaq', 9 * GIB), ('test', 1 * GIB)]
    p = data_loader.plan_image_memory(20 * GIB, 24 * GIB, 8 * GIB, sets, 1, 'auto')
    assert p['where'] == {'train': 'gpu', 'spaq': 'host', 'test': 'gpu'}
    with pytest.raises(ValueError, match='images_on'):
        data_loader.plan_image_memory(GIB, GIB, 0, sets, 1, 'disk')


# --------------------------------------------------------------------------- compile shapes

def test_compiled_model_sees_one_batch_shape_in_each_mode(koniq_root, tmp_path, monkeypatch):
    """torch.compile recompiles for every new input shape: training (4) and evaluation (8)
    batches made two shapes, and the end-of-round intervals ran the uncompiled model."""
    seen = []

    class Recorder(torch.nn.Module):   # stands in for torch.compile: records what it is given
        def __init__(self, model):
            super().__init__()
            self.inner = model

        def forward(self, x):
            seen.append(('train' if self.training else 'eval', tuple(x.shape)))
            return self.inner(x)

    def fake_compile(model, **options):
        assert options.get('dynamic') is False
        return Recorder(model)
    monkeypatch.setattr(torch, 'compile', fake_compile)
    assert train_swin.main(tiny_args(koniq_root, tmp_path, '--compile', epochs=1)) == 0
    assert set(seen) == {('train', (4, 3, 224, 224)), ('eval', (4, 3, 224, 224))}
    # val: 3 images x 2 crops, test 4 x 2 (each in batches of 4), then the test set again for the
    # bootstrap intervals of the selected epoch: all through the compiled model
    assert [mode for mode, _ in seen].count('eval') == 2 + 2 + 2
    log = open(tmp_path / 'logs' / (os.path.basename(only_run_dir(tmp_path)) + '.log')).read()
    assert 'evaluation runs in batches of --batch_size 4' in log


def test_bf16_and_compile_train_and_evaluate_on_the_cpu(koniq_root, tmp_path):
    """The real torch.compile (inductor) with bf16 autocast, on the CPU: the code path a GPU
    run takes with --compile, minus the device."""
    assert train_swin.main(tiny_args(koniq_root, tmp_path, '--precision', 'bf16', '--compile', epochs=2)) == 0
    rows = read_metrics(only_run_dir(tmp_path))
    assert len(rows) == 2 and all(r['test_srcc'] != '' for r in rows)
    assert all(np.isfinite(float(r['train_loss'])) for r in rows)


def test_ddp_start_up_waits_for_a_slow_cold_cache_without_a_group_timeout(koniq_root, tmp_path):
    """Rank 0 decodes for longer than the process group's timeout (3 s here, NCCL's 10 minutes on
    a GPU box) while rank 1 waits; rank 1 then reads rank 0's cache instead of decoding."""
    script = tmp_path / 'slow_decode.py'
    script.write_text(textwrap.dedent(f'''
        import datetime, os, sys, time
        sys.path.insert(0, {ROOT!r})
        import torch.distributed as dist
        import train_swin
        from iqa.data import image_cache
        real_init, real_decode = dist.init_process_group, image_cache._decode_all

        def short_timeout(*a, **k):
            return real_init(*a, **dict(k, timeout=datetime.timedelta(seconds=3)))

        def slow_decode(*a, **k):
            print('decoding on rank', os.environ['RANK'], flush=True)
            time.sleep(8)
            return real_decode(*a, **k)
        dist.init_process_group = short_timeout
        image_cache._decode_all = slow_decode
        sys.exit(train_swin.main(sys.argv[1:]))
    '''))
    argv = [*tiny_args(koniq_root, tmp_path, epochs=1), '--device', 'cpu', '--cache_dir', str(tmp_path / 'cache')]
    results = run_two_ranks(script, argv, tmp_path, timeout=240)
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert 'decoding on rank 0' in results[0][1] and 'decoding on rank' not in results[1][1]


def test_precision_sets_true_fp32_on_cuda_and_leaves_the_cpu_alone():
    # the flags are plain process-wide switches, so the CUDA branch runs (and is checked) here
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        assert runtime.set_precision('auto', torch.device('cpu')) is False
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32   # CPU: untouched
        assert runtime.set_precision('fp32', torch.device('cuda', 0)) is False
        assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32   # cuDNN convolutions keep TF32, as the original ran them
        torch.backends.cudnn.allow_tf32 = False
        runtime.set_precision('bf16', torch.device('cuda', 0))
        assert not torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert runtime.set_precision('auto', torch.device('cuda', 0)) is True
        assert runtime.set_precision('bf16', torch.device('cpu')) is True
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
