"""Training and evaluation speed of the real loop: patches/s, MFU, memory, KonIQ run projection.

A benchmark, not a test: it only measures. Every figure comes from the code a real run uses:
models_swin.build_model, data_loader.TrainPatchSampler / load_images, iqa.engine.train_one_epoch
(loss, backward, clipping, AdamW step, per-step .item()) and iqa.evaluation.predict_scores. The model
has random weights (no download) and the training images are random uint8 tensors of the cached
size (512x384): speed does not depend on either. In order, it measures

  1. the decode-once cache: N synthetic KonIQ-like JPEGs (1024x768) built and loaded again;
  2. time to first step: model build, optimizer, torch.compile wrapper, sampler, first step;
  3. training patches/s with data production included (sampler batches feed each step) and
     excluded (one pre-made batch re-used), after warm-up; their ratio shows a data bottleneck;
  4. evaluation patches/s (predict_scores: fixed crops, per-image averaging);
  5. FLOPs per 224x224 patch (FlopCounterMode; a training step counts 3x a forward), hence
     achieved TFLOP/s and the fraction of the device's peak (MFU);
  6. optionally (--profile DIR) a torch.profiler trace of a few training steps;
and projects one KonIQ-size epoch and the user's 10-epoch run from these figures.

    python benchmarks/bench_train.py                                   # GPU: base, batch 64, bf16
    python benchmarks/bench_train.py --model_size tiny --batch_size 128 --compile
    python benchmarks/bench_train.py --profile prof/ --steps 10        # where does the time go?
    python benchmarks/bench_train.py --model_size nano --batch_size 4 --steps 2 --warmup 1 \\
        --images 8 --cache_images 4 --device cpu                       # CPU smoke run (tests)
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from iqa.files import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402
import data_loader  # noqa: E402
import models_swin  # noqa: E402
from iqa import engine, runtime  # noqa: E402
from iqa.schedule import learning_rates  # noqa: E402
from bench_data import write_jpegs  # noqa: E402  (same synthetic JPEGs as the data benchmark)
from iqa import evaluation  # noqa: E402

# KonIQ-10k as the user trains on it (their koniq_train.json / koniq_test.json): 7,046 training
# and 2,010 test images, 20 crops each; the first run builds the cache of all 10,073 images.
KONIQ_TRAIN_PATCHES = 140_920
KONIQ_EVAL_PATCHES = 40_200
KONIQ_IMAGES = 10_073
USER_EPOCHS = 10
CACHED_HW = (512, 384)   # train_swin --resize default, (height, width)

# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's data sheets: (bf16, tf32).
# With --no_amp train_swin runs matmuls in true fp32 (TF32 off; cuDNN convolutions keep TF32), so
# the TF32 peak is an upper reference for its MFU, not what those matmuls can reach.
# First match of the name wins, so the specific variants come before plain 'H100'.
PEAK_TFLOPS = (
    ('H100 PCIe', 756, 378),
    ('H100 NVL', 835, 418),
    ('H200 NVL', 835, 418),
    ('H100', 989, 495),   # SXM (torch reports 'NVIDIA H100 80GB HBM3')
    ('H200', 989, 495),
    ('A100', 312, 156),
)

# Profiler label around each batch's production (--profile), to tell data time from model time.
DATA_LABEL = 'bench_train: next batch (data production)'

# Issue 6: one H100, Swin-Base, batch >= 32, bf16.
TARGETS = {'train_patches_per_s': 1000, 'eval_patches_per_s': 4000, 'data_ratio': 0.95,
           'run_minutes': 20}


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split('\n')[0], allow_abbrev=False,
        formatter_class=runtime.HelpFormatter)
    g = p.add_argument_group('Model')
    g.add_argument('--model_size', default='base', choices=models_swin.MODEL_SIZES,
                   help='model to train (Swin sizes: multi-scale + attention fusion, the user\'s full model)')
    g.add_argument('--no_attention_fusion', action='store_true',
                   help='leave out the attention fusion net (train_swin.py\'s default model)')
    g = p.add_argument_group('What is timed')
    g.add_argument('--batch_size', type=int, default=64, metavar='N', help='training patches per step')
    g.add_argument('--eval_batch_size', type=int, default=None, metavar='N',
                   help='patches per evaluation forward (default: twice --batch_size)')
    g.add_argument('--steps', type=int, default=20, metavar='N',
                   help='timed training steps per figure (and evaluation batches)')
    g.add_argument('--warmup', type=int, default=5, metavar='N',
                   help='untimed steps (and evaluation batches) after the first step')
    g.add_argument('--images', type=int, default=256, metavar='N',
                   help='random 512x384 uint8 images that training and evaluation cut patches from')
    g.add_argument('--cache_images', type=int, default=128, metavar='N',
                   help='synthetic 1024x768 JPEGs decoded into the cache to time its build and load')
    g.add_argument('--color_jitter', dest='color_jitter', action='store_true', default=True,
                   help='colour jitter on training crops (the default, as in train_swin.py)')
    g.add_argument('--no_color_jitter', dest='color_jitter', action='store_false', default=None,
                   help='no colour jitter (the user\'s lr 5e-7 runs)')
    g = p.add_argument_group('Device and precision')
    g.add_argument('--device', default='auto', metavar='DEV', help='auto, cpu, cuda, cuda:1, ...')
    g.add_argument('--no_amp', action='store_true', help='fp32 instead of bf16 autocast on CUDA (train_swin --no_amp)')
    g.add_argument('--compile', action='store_true', help='torch.compile the model, as train_swin.py --compile')
    g.add_argument('--peak_tflops', type=float, default=None, metavar='X',
                   help='the device\'s peak TFLOP/s for MFU (default: from a table of NVIDIA GPUs)')
    g = p.add_argument_group('Output')
    g.add_argument('--json', default=None, metavar='FILE', help='also write every figure to this JSON file')
    g.add_argument('--profile', default=None, metavar='OUT_DIR',
                   help='record a few training steps with torch.profiler: trace.json (chrome://tracing, '
                        'ui.perfetto.dev) and key_averages*.txt')
    return p


def check_args(args):
    errors = [f'--{name} must be at least {low}, got {getattr(args, name)}'
              for name, low in (('batch_size', 1), ('eval_batch_size', 1), ('steps', 1), ('warmup', 0),
                                ('images', 1), ('cache_images', 1))
              if getattr(args, name) is not None and getattr(args, name) < low]
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        errors.append(f'--peak_tflops must be positive, got {args.peak_tflops}')
    if errors:
        raise SystemExit('bench_train.py: error: ' + '; '.join(errors))
    if args.eval_batch_size is None:
        args.eval_batch_size = 2 * args.batch_size   # no gradients: twice the batch fits


# --------------------------------------------------------------------------- sampler stand-ins
# iqa.engine.train_one_epoch takes any object with batches(epoch) and len(): these two feed it
# a fixed number of steps, so the timed loop is the training loop itself.

class FirstBatches:
    """The first `steps` batches of a TrainPatchSampler from `epoch` on: data production included."""

    def __init__(self, sampler, steps, label_data=False):
        self.sampler, self.steps, self.label_data = sampler, steps, label_data

    def __len__(self):
        return self.steps

    def batches(self, epoch):
        epochs = (self.sampler.batches(e) for e in itertools.count(epoch))
        batches = itertools.islice(itertools.chain.from_iterable(epochs), self.steps)
        return labelled(batches) if self.label_data else batches


def labelled(batches):
    """Mark each batch's production in a profile, so the trace and the table show data time apart."""
    while True:
        with torch.profiler.record_function(DATA_LABEL):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


class RepeatedBatch:
    """One pre-made batch served `steps` times: data production excluded (the model-only figure)."""

    def __init__(self, batch, steps):
        self.batch, self.steps = batch, steps

    def __len__(self):
        return self.steps

    def batches(self, epoch):
        return itertools.repeat(self.batch, self.steps)


# --------------------------------------------------------------------------- measurements

def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_cache(n_images, seed=0):
    """(build seconds, load seconds) of data_loader.load_images on n synthetic 1024x768 JPEGs."""
    with tempfile.TemporaryDirectory(prefix='bench_train_cache_') as tmp:
        tmp = Path(tmp)
        paths = write_jpegs(tmp, n_images, seed)
        seconds = []
        for _ in range(2):   # first call decodes and writes the cache, second reads it back
            start = time.perf_counter()
            data_loader.load_images(paths, CACHED_HW, cache_dir=tmp / 'cache', progress=False)
            seconds.append(time.perf_counter() - start)
    return seconds[0], seconds[1]


def train_patches_per_s(model, optimizer, sampler_like, epoch, train_args, device, amp, label):
    """The real training loop over len(sampler_like) steps; its own patches/s figure."""
    _, _, patches_per_s, _ = engine.train_one_epoch(model, optimizer, sampler_like, epoch, train_args,
                                                        device, amp, 0, 1, label)
    return patches_per_s


def eval_patches_per_s(model, images, n_batches, args, device, amp):
    """(patches/s, seconds) of iqa.evaluation.predict_scores over about n_batches evaluation batches."""
    n = images.shape[0]
    patch_num = max(1, math.ceil(n_batches * args.eval_batch_size / n))
    sync(device)
    start = time.perf_counter()
    evaluation.predict_scores(model, images, patch_num=patch_num, batch_size=args.eval_batch_size,
                              device=device, amp=amp, pad_batches=args.compile)
    sync(device)   # predict_scores already waits for its last batch (.cpu()); this is for clarity
    seconds = time.perf_counter() - start
    return n * patch_num / seconds, seconds


def forward_flops_per_patch(model, device):
    """FLOPs of one 224x224 forward (matmuls and convolutions, 2 per multiply-add)."""
    was_training = model.training
    model.eval()
    flops = engine.count_flops(model, torch.zeros(1, 3, 224, 224, device=device))
    model.train(was_training)
    return flops


def peak_tflops(device, amp, override):
    """(peak TFLOP/s, where it came from) or (None, reason) for MFU."""
    if override is not None:
        return override, '--peak_tflops'
    if device.type != 'cuda':
        return None, 'no peak known for a CPU; pass --peak_tflops'
    name = torch.cuda.get_device_name(device)
    for key, bf16, tf32 in PEAK_TFLOPS:
        if key in name:
            return (bf16, f'{key} bf16 dense') if amp else (tf32, f'{key} TF32 dense')
    return None, f'{name} is not in the peak table; pass --peak_tflops'


def profile_training(model, optimizer, sampler, epoch, steps, train_args, device, amp, out_dir):
    """torch.profiler over `steps` training steps with data production: a chrome trace, the
    operators that take the most time and the share of data production, so a missed target can
    be traced to its cause. Returns (text to print, files written)."""
    from torch.profiler import ProfilerActivity, profile
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    start = time.perf_counter()
    with profile(activities=activities, record_shapes=True) as prof:
        train_patches_per_s(model, optimizer, FirstBatches(sampler, steps, label_data=True), epoch, train_args,
                            device, amp, 'profile')
    wall_ms = (time.perf_counter() - start) * 1000
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:   # export, then write atomically
        prof.export_chrome_trace(os.path.join(tmp, 'trace.json'))
        atomic_write_bytes(out_dir / 'trace.json', Path(tmp, 'trace.json').read_bytes())
    events = prof.key_averages()
    files = [out_dir / 'trace.json']
    sort_keys = ['self_cpu_time_total'] + (['self_device_time_total'] if device.type == 'cuda' else [])
    for key in sort_keys:
        table = events.table(sort_by=key, row_limit=30)
        files.append(out_dir / f'key_averages_{key}.txt')
        atomic_write_text(files[-1], table + '\n')
    data = next((e for e in events if e.key == DATA_LABEL), None)
    data_ms = data.cpu_time_total / 1000 if data is not None else 0.0
    text = (f'profile of {steps} training steps with data production: {wall_ms:.0f} ms wall (profiler on); '
            f'producing the batches took {data_ms:.1f} ms of CPU time ({100 * data_ms / wall_ms:.1f}%) '
            f'[{DATA_LABEL!r} in the trace]\ntop operators by {sort_keys[-1]}:\n{table}')
    return text, files


# --------------------------------------------------------------------------- report

def gib(n_bytes):
    return f'{n_bytes / 2**30:.2f} GiB'


def report_text(r):
    """The figures as a block a person reads (and pastes into BENCHMARKS.md)."""
    def mfu(fraction):
        return f'{100 * fraction:.1f}% MFU' if fraction is not None else 'MFU n/a'

    peak = f'{r["peak_tflops"]:g} TFLOP/s ({r["peak_source"]})' if r['peak_tflops'] else f'n/a ({r["peak_source"]})'
    gpu_mem = (f'{gib(r["gpu_peak_memory_bytes"])} (max_memory_allocated)' if r['gpu_peak_memory_bytes'] is not None
               else 'n/a (not CUDA)')
    run = r['projection']
    lines = [
        'bench_train.py: training and evaluation speed (random weights, synthetic data)',
        f'device        {r["device"]}',
        f'versions      torch {r["torch"]}, timm {r["timm"]}, python {r["python"]}',
        f'date          {r["date"]}',
        f'command       {r["command"]}',
        f'model         {r["model_size"]} ({r["model_variant"]}), {r["params"] / 1e6:.2f} M params, '
        f'{r["forward_gflops_per_patch"]:.2f} GFLOPs per 224x224 forward (training step: 3x)',
        f'settings      batch {r["batch_size"]}, eval batch {r["eval_batch_size"]}, bf16 autocast '
        f'{"on" if r["bf16"] else "off"}, torch.compile {"on" if r["compile"] else "off"}, colour jitter '
        f'{"on" if r["color_jitter"] else "off"}, {r["images"]} images in memory, '
        f'{r["steps"]} timed steps after 1 + {r["warmup"]} untimed',
        f'training      {r["train_patches_per_s_with_data"]:.1f} patches/s with data production (sampler feeds each step)',
        f'              {r["train_patches_per_s_model_only"]:.1f} patches/s model only (one pre-made batch re-used)',
        f'              ratio {r["data_ratio"]:.3f} (with data / model only; target >= {TARGETS["data_ratio"]})',
        f'evaluation    {r["eval_patches_per_s"]:.1f} patches/s (predict_scores, fixed crops)',
        f'compute       training {r["train_tflops_with_data"]:.3g} TFLOP/s ({mfu(r["mfu_train_with_data"])}), '
        f'model only {r["train_tflops_model_only"]:.3g} TFLOP/s ({mfu(r["mfu_train_model_only"])}), '
        f'evaluation {r["eval_tflops"]:.3g} TFLOP/s ({mfu(r["mfu_eval"])}); peak {peak}',
        f'memory        peak GPU {gpu_mem}, peak host RSS {gib(r["host_peak_rss_bytes"])} (ru_maxrss)',
        f'startup       time to first step {r["time_to_first_step_s"]:.2f} s (model, optimizer and sampler '
        f'{r["model_build_s"]:.2f} s + first step {r["first_step_s"]:.2f} s, compile included when on); '
        f'first evaluation call {r["first_eval_s"]:.2f} s',
        f'cache         {r["cache_images"]} JPEGs 1024x768 -> 512x384: build {r["cache_build_s"]:.2f} s '
        f'({r["cache_images"] / r["cache_build_s"]:.1f} images/s), load {r["cache_load_s"]:.3f} s',
        f'projection    one KonIQ epoch ({KONIQ_TRAIN_PATCHES:,} train + {KONIQ_EVAL_PATCHES:,} eval patches): '
        f'{run["epoch_s"] / 60:.1f} min (train {run["train_s"] / 60:.1f} + eval {run["eval_s"] / 60:.1f})',
        f'              {USER_EPOCHS}-epoch run: {run["run_s"] / 60:.1f} min = first cache build of '
        f'{KONIQ_IMAGES:,} images {run["cache_build_s"] / 60:.1f} min + startup {run["startup_s"]:.0f} s + '
        f'{USER_EPOCHS} epochs (checkpoint writes not included)',
        f'targets       issue 6 (Swin-Base, one H100, bf16, batch >= 32); this run: {r["model_size"]} on '
        f'{r["device_type"]}',
    ]
    for name, (value, goal, met) in r['targets'].items():
        lines.append(f'              {name:<34} {value:10.3f}  goal {goal:<12} {"met" if met else "MISSED"}')
    return '\n'.join(lines)


def targets(r):
    run_minutes = r['projection']['run_s'] / 60
    return {
        'training patches/s (with data)': (r['train_patches_per_s_with_data'],
                                           f'>= {TARGETS["train_patches_per_s"]}',
                                           r['train_patches_per_s_with_data'] >= TARGETS['train_patches_per_s']),
        'evaluation patches/s': (r['eval_patches_per_s'], f'>= {TARGETS["eval_patches_per_s"]}',
                                 r['eval_patches_per_s'] >= TARGETS['eval_patches_per_s']),
        'data ratio (with data / model only)': (r['data_ratio'], f'>= {TARGETS["data_ratio"]}',
                                                r['data_ratio'] >= TARGETS['data_ratio']),
        f'{USER_EPOCHS}-epoch run (minutes)': (run_minutes, f'<= {TARGETS["run_minutes"]}',
                                               run_minutes <= TARGETS['run_minutes']),
    }


# --------------------------------------------------------------------------- main

def build_like_the_trainer(args, train_args, full, use_attention, device):
    """(model to run, raw model, optimizer) as train_swin.run_round makes them: channels-last
    ResNet-50 on CUDA, the trainer's (fused) AdamW, its torch.compile (static shapes)."""
    model = models_swin.build_model(args.model_size, use_multiscale=full, use_attention=use_attention,
                                    pretrained=False).to(device)
    models_swin.use_channels_last(model, device)
    lr_backbone, lr_head = learning_rates(0, train_args)
    groups = [{'params': model.backbone_parameters(), 'lr': lr_backbone},
              {'params': model.head_parameters(), 'lr': lr_head}]
    optimizer = runtime.make_optimizer(groups, train_args, device)
    return (engine.compile_model(model) if args.compile else model), model, optimizer


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    check_args(args)
    try:
        device = runtime.resolve_device(args.device)
    except runtime.UsageError as err:
        raise SystemExit(f'bench_train.py: error: {err}') from None
    amp = runtime.set_precision('fp32' if args.no_amp else 'auto', device)   # train_swin's numerics
    # Every training setting a real run would have (loss, clipping at 1.0, lr, weight decay ...)
    # comes from train_swin.py's defaults (iqa.engine.TRAIN_DEFAULTS), only the batch size and model are ours.
    train_args = engine.train_settings(model_size=args.model_size, batch_size=args.batch_size, compile=args.compile)
    full = args.model_size != 'resnet50'   # as cross_dataset_test's complexity table
    use_attention = full and not args.no_attention_fusion
    r = {
        'device': runtime.device_name(device), 'device_type': device.type,
        'torch': torch.__version__, 'timm': timm.__version__, 'python': platform.python_version(),
        'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
        'command': 'python benchmarks/bench_train.py ' + ' '.join(argv),
        'model_size': args.model_size,
        'model_variant': ('multi-scale' if full else 'single-scale') + (' + attention fusion' if use_attention else ''),
        'batch_size': args.batch_size, 'eval_batch_size': args.eval_batch_size, 'bf16': amp,
        'compile': args.compile, 'color_jitter': args.color_jitter, 'images': args.images,
        'steps': args.steps, 'warmup': args.warmup, 'cache_images': args.cache_images,
    }
    print(f'bench_train.py: {args.model_size} on {r["device"]}', file=sys.stderr, flush=True)

    # 1. Cache: decode + resize in threads and write (a run's first start), then read back.
    r['cache_build_s'], r['cache_load_s'] = time_cache(args.cache_images)

    # Random pixels and scores: the sampler's cost does not depend on their values.
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, *CACHED_HW), dtype=torch.uint8, generator=gen)
    mos = np.random.default_rng(0).uniform(0, 100, args.images)

    # 2. Time to first step: what a run does before its first optimizer step, as run_round does it.
    start = time.perf_counter()
    torch.manual_seed(0)
    model, raw_model, optimizer = build_like_the_trainer(args, train_args, full, use_attention, device)
    r['params'] = models_swin.count_parameters(raw_model)
    # One epoch of the sampler is just over the timed steps, so the per-epoch set-up (shuffle,
    # crop positions, jitter maps for every pair) is paid once per timed run, as in a real epoch.
    patch_num = max(1, math.ceil(args.steps * args.batch_size / args.images))
    sampler = data_loader.TrainPatchSampler(images, mos, patch_num=patch_num, batch_size=args.batch_size,
                                            color_jitter=args.color_jitter, seed=0, device=device,
                                            drop_last=True)
    sync(device)
    r['model_build_s'] = time.perf_counter() - start
    train_patches_per_s(model, optimizer, FirstBatches(sampler, 1), 0, train_args, device, amp, 'first step')
    r['time_to_first_step_s'] = time.perf_counter() - start
    r['first_step_s'] = r['time_to_first_step_s'] - r['model_build_s']

    # 3. Training: warm-up, then the same loop fed by the sampler and by one re-used batch.
    if args.warmup:
        train_patches_per_s(model, optimizer, FirstBatches(sampler, args.warmup), 1, train_args, device, amp,
                            'warm-up')
    r['train_patches_per_s_with_data'] = train_patches_per_s(
        model, optimizer, FirstBatches(sampler, args.steps), 2, train_args, device, amp, 'with data')
    batch = next(iter(sampler.batches(3)))
    r['train_patches_per_s_model_only'] = train_patches_per_s(
        model, optimizer, RepeatedBatch(batch, args.steps), 4, train_args, device, amp, 'model only')
    r['data_ratio'] = r['train_patches_per_s_with_data'] / r['train_patches_per_s_model_only']

    # 4. Evaluation: the first call compiles the eval graph (no_grad) when --compile.
    _, r['first_eval_s'] = eval_patches_per_s(model, images, max(1, args.warmup), args, device, amp)
    r['eval_patches_per_s'], _ = eval_patches_per_s(model, images, args.steps, args, device, amp)

    # 5. FLOPs and model-FLOP utilisation.
    flops = forward_flops_per_patch(raw_model, device)
    r['forward_gflops_per_patch'] = flops / 1e9
    r['train_tflops_with_data'] = 3 * flops * r['train_patches_per_s_with_data'] / 1e12
    r['train_tflops_model_only'] = 3 * flops * r['train_patches_per_s_model_only'] / 1e12
    r['eval_tflops'] = flops * r['eval_patches_per_s'] / 1e12
    r['peak_tflops'], r['peak_source'] = peak_tflops(device, amp, args.peak_tflops)
    for key, tflops in (('mfu_train_with_data', 'train_tflops_with_data'),
                        ('mfu_train_model_only', 'train_tflops_model_only'), ('mfu_eval', 'eval_tflops')):
        r[key] = r[tflops] / r['peak_tflops'] if r['peak_tflops'] else None

    # Nothing touched the GPU before the model, so the process's peak is the run's peak.
    r['gpu_peak_memory_bytes'] = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else None
    r['host_peak_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB

    # Projection: a KonIQ-size epoch at these rates; the run adds the first cache build (at the
    # measured images/s; small --cache_images under-states it) and the start-up measured above.
    train_s = KONIQ_TRAIN_PATCHES / r['train_patches_per_s_with_data']
    eval_s = KONIQ_EVAL_PATCHES / r['eval_patches_per_s']
    cache_build_s = KONIQ_IMAGES * r['cache_build_s'] / args.cache_images
    startup_s = r['time_to_first_step_s'] + r['first_eval_s']
    r['projection'] = {'train_s': train_s, 'eval_s': eval_s, 'epoch_s': train_s + eval_s,
                       'cache_build_s': cache_build_s, 'startup_s': startup_s,
                       'run_s': cache_build_s + startup_s + USER_EPOCHS * (train_s + eval_s)}
    r['targets'] = targets(r)
    print(report_text(r), flush=True)

    # 6. Profile after the timed runs, so the profiler's overhead never reaches a figure.
    if args.profile:
        steps = min(args.steps, 8)
        text, files = profile_training(model, optimizer, sampler, 5, steps, train_args, device, amp, args.profile)
        print('\n' + text)
        print('written: ' + ', '.join(str(f) for f in files))
    if args.json:
        atomic_write_json(args.json, {**r, 'targets': {k: {'value': v, 'goal': g, 'met': m}
                                                                   for k, (v, g, m) in r['targets'].items()}})
        print(f'written: {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
