"""benchmarks/gpu_check.py on a machine without CUDA: the CPU checks pass, the GPU-only ones
say SKIP with a reason, and the exit code says whether anything failed."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# one thread: on a shared CI core the OpenMP threads of a 2-thread torch spin against each other
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS='1')


def test_gpu_check_runs_the_cpu_checks_and_names_the_skipped_ones():
    done = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'gpu_check.py'), '--device', 'cpu'],
                          capture_output=True, text=True, timeout=900, cwd=REPO, env=ONE_THREAD)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    for check in ('device', 'fp32', 'bf16', 'adamw', 'clip', 'resume'):
        assert re.search(rf'^PASS  {check} ', out, re.M), (check, out)
    for check in ('syncs', 'compile', 'memory', 'staging', 'ddp'):
        assert re.search(rf'^SKIP  {check} ', out, re.M), (check, out)
    assert 'epochs 2 and 3 equal an uninterrupted run' in out and 'distinct quality and consistency' in out
    assert 'simulated 24 GB card' in out and 'spaq' in out            # the plan is shown
    assert re.search(r'^speed nano +train +[\d.]+ patches/s +eval +[\d.]+ patches/s', out, re.M)
    assert 'speed tiny/small/base skipped: no GPU' in out
    assert re.search(r'^6 passed, 0 failed, 5 skipped \(syncs, compile, memory, staging, ddp\)', out, re.M)


def test_gpu_check_reports_a_failure_with_its_error_and_exit_code(tmp_path):
    """A broken path (here: fused AdamW refused) is FAIL with the error, the others still run."""
    script = tmp_path / 'broken.py'
    script.write_text(f'''
import sys
sys.path.insert(0, {str(REPO / 'benchmarks')!r})
import gpu_check
from iqa import runtime
def refuse(*a, **k):
    raise RuntimeError('fused AdamW refused')
runtime.make_optimizer = refuse
gpu_check.CHECKS = tuple(c for c in gpu_check.CHECKS if c[0] in ('device', 'adamw'))
sys.exit(gpu_check.main(['--device', 'cpu', '--no_speed']))
''')
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=ONE_THREAD)
    assert done.returncode == 1
    assert 'PASS  device' in done.stdout
    assert 'FAIL  adamw    RuntimeError: fused AdamW refused' in done.stdout
    assert '1 passed, 1 failed (adamw)' in done.stdout
