"""Smoke test of benchmarks/bench_train.py: the CPU command runs and reports every figure.

No timing thresholds: the machine is shared and a benchmark's numbers are not a test's business.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMOKE = ['--model_size', 'nano', '--batch_size', '4', '--steps', '2', '--warmup', '1', '--images', '8',
         '--cache_images', '4', '--device', 'cpu']


def test_bench_train_cpu_smoke(tmp_path):
    out = tmp_path / 'bench.json'
    # --peak_tflops so the MFU arithmetic runs too (a CPU has no entry in the peak table)
    result = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'bench_train.py'), *SMOKE,
                             '--peak_tflops', '1.5', '--json', str(out)],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(out.read_text())

    assert r['device_type'] == 'cpu' and r['device'].startswith('CPU')
    assert r['model_size'] == 'nano' and r['batch_size'] == 4 and r['eval_batch_size'] == 8
    assert r['bf16'] is False and r['compile'] is False and r['color_jitter'] is True
    assert r['torch'] and r['timm'] and r['date'].startswith('20')
    positive = ['params', 'forward_gflops_per_patch', 'train_patches_per_s_with_data',
                'train_patches_per_s_model_only', 'data_ratio', 'eval_patches_per_s',
                'train_tflops_with_data', 'train_tflops_model_only', 'eval_tflops', 'mfu_train_with_data',
                'mfu_train_model_only', 'mfu_eval', 'host_peak_rss_bytes', 'time_to_first_step_s',
                'model_build_s', 'first_step_s', 'first_eval_s', 'cache_build_s', 'cache_load_s']
    for key in positive:
        assert r[key] > 0, key
    for key in ('train_s', 'eval_s', 'epoch_s', 'cache_build_s', 'startup_s', 'run_s'):
        assert r['projection'][key] > 0, key
    assert r['gpu_peak_memory_bytes'] is None       # no CUDA: reported as n/a, not as 0
    # the figures hang together: ratio, MFU, 3x forward FLOPs for a training step, the run's sum
    assert abs(r['data_ratio'] - r['train_patches_per_s_with_data'] / r['train_patches_per_s_model_only']) < 1e-9
    assert abs(r['mfu_eval'] - r['eval_tflops'] / 1.5) < 1e-12
    assert abs(r['train_tflops_model_only'] - 3e-3 * r['forward_gflops_per_patch']
               * r['train_patches_per_s_model_only']) < 1e-9
    p = r['projection']
    assert abs(p['run_s'] - (p['cache_build_s'] + p['startup_s'] + 10 * p['epoch_s'])) < 1e-6
    assert set(r['targets']) == {'training patches/s (with data)', 'evaluation patches/s',
                                 'data ratio (with data / model only)', '10-epoch run (minutes)'}

    # the printed block carries the same figures, each a positive number
    text = result.stdout
    for label in ('patches/s with data production', 'patches/s model only', 'evaluation ',
                  'time to first step', 'peak host RSS', 'build', 'one KonIQ epoch', '10-epoch run'):
        assert label in text, label
    for pattern in (r'training\s+([\d.]+) patches/s with data', r'\s([\d.]+) patches/s model only',
                    r'evaluation\s+([\d.]+) patches/s', r'time to first step ([\d.]+) s',
                    r'peak host RSS ([\d.]+) GiB', r'build ([\d.]+) s', r'\(([\d.]+)% MFU\)',
                    r'one KonIQ epoch .*: ([\d.]+) min', r'10-epoch run: ([\d.]+) min'):
        match = re.search(pattern, text)
        assert match and float(match.group(1)) > 0, pattern
    assert 'peak GPU n/a (not CUDA)' in text


def test_bench_train_builds_and_compiles_as_the_trainer(monkeypatch):
    """Same precision switches (iqa.runtime.set_precision), optimizer and torch.compile(dynamic=False)."""
    import argparse
    import torch
    sys.path.insert(0, str(REPO / 'benchmarks'))
    import bench_train
    from iqa import engine
    compiled = []
    monkeypatch.setattr(torch, 'compile', lambda model, **kw: compiled.append(kw) or model)
    args = argparse.Namespace(model_size='nano', compile=True)
    train_args = engine.train_settings(model_size='nano', batch_size=4, compile=True)
    model, raw, optimizer = bench_train.build_like_the_trainer(args, train_args, True, False, torch.device('cpu'))
    assert compiled == [{'dynamic': False}] and model is raw
    assert optimizer.defaults.get('fused') is True
    engine.compile_model(raw)
    assert compiled[-1] == compiled[0]   # the trainer's own call
    source = (REPO / 'benchmarks' / 'bench_train.py').read_text()
    assert 'runtime.set_precision(' in source and 'allow_tf32 = True' not in source
    assert 'compile_model(model)' in (REPO / 'train_swin.py').read_text()
