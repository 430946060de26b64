"""The Python launcher behind run_experiments.sh (iqa/launch.py, iqa/slurm_submit.py): what it
adds to the runner tested in test_run_experiments.py and test_slurm.py. SLURM tasks ask for one
GPU by default, runs that share a GPU are told so (IQA_GPU_SHARED), train_clip.py is put under
torchrun like train_swin.py, and the launcher starts without torch."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from test_run_experiments import ROOT, run_queue, run_script
from test_slurm import sandbox  # noqa: F401  (a fixture, used by box)

STAGE1 = os.path.join(ROOT, 'experiments', 'stage1_core_ablations.txt')

ENV_STUB = r'''
import json, os, sys, time
argv = sys.argv[1:]
time.sleep(0.5)
with open('env.jsonl', 'a') as f:
    f.write(json.dumps({'name': argv[argv.index('--name') + 1],
                        'cuda': os.environ.get('CUDA_VISIBLE_DEVICES'),
                        'shared': os.environ.get('IQA_GPU_SHARED')}) + '\n')
'''


@pytest.fixture
def box(sandbox):
    """test_slurm's sandbox (repo/ with the launcher and a stub trainer, work/ to run in), on a
    machine where sinfo gets no answer from a controller, as on a laptop."""
    set_sinfo(sandbox, 'exit 1\n')
    return sandbox


def set_sinfo(folder, body):
    path = folder / 'bin' / 'sinfo'
    path.write_text('#!/bin/sh\n' + body)
    path.chmod(0o755)


def slurm_dry_run(box, *args, plan='X1 --lr 1e-6\nX2 --lr 2e-6\n'):
    return run_queue(box, plan, '--slurm', *args, '--dry-run')


def test_the_launcher_imports_neither_torch_nor_numpy():
    code = ('import sys, iqa.launch, iqa.plan, iqa.slurm_submit, iqa.slurm_task; '
            'print(sorted(m for m in ("torch", "numpy") if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '[]'


def test_run_experiments_sh_is_a_short_entry():
    with open(os.path.join(ROOT, 'run_experiments.sh'), encoding='utf-8') as f:
        lines = f.read().splitlines()
    assert len(lines) <= 60 and any('-m iqa.launch' in line for line in lines)


def test_slurm_tasks_ask_for_one_gpu_by_default(box):
    out = slurm_dry_run(box)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '#SBATCH --gpus-per-task=1\n' in out.stdout and '\nGPUS=1 ' in out.stdout
    assert 'sbatch --array=0-1 logs/experiments/slurm/exps.sbatch' in out.stdout
    for k, name in enumerate(['X1', 'X2']):
        assert f'task {k}: {name} (line {k + 1}, log logs/experiments/{name}.log), asks for 1 GPU ' \
               '(--gpus-per-task 1' in out.stdout


def test_the_shipped_stage1_plan_asks_for_one_gpu_per_task(box):
    out = run_script([STAGE1, '--slurm', '--dry-run'], cwd=box / 'work', bin_dir=box / 'bin',
                     script=os.path.join(ROOT, 'run_experiments.sh'))
    assert out.returncode == 0, out.stdout + out.stderr
    tasks = [line for line in out.stdout.splitlines() if line.startswith('  task ')]
    assert len(tasks) == 3 and all('asks for 1 GPU (--gpus-per-task 1' in t for t in tasks)
    assert '#SBATCH --gpus-per-task=1\n' in out.stdout


@pytest.mark.parametrize('args, gpus, asks_for', [
    (['--gres', 'gpu:2'], 2, '2 GPU(s) (--gres gpu:2)'),
    (['--gres=gpu:a100:4'], 4, '4 GPU(s) (--gres=gpu:a100:4)'),
    (['--gpus', '2'], 2, '2 GPU(s) (--gpus 2)'),
    (['--gpus-per-task=a100:3'], 3, '3 GPU(s) (--gpus-per-task=a100:3)'),
    (['--gpus-per-node', '1'], 1, '1 GPU(s) (--gpus-per-node 1)'),
])
def test_the_users_gpu_option_replaces_the_default(box, args, gpus, asks_for):
    out = slurm_dry_run(box, *args)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '#SBATCH --gpus-per-task' not in out.stdout
    assert f"sbatch --array=0-1 {' '.join(args)} logs/experiments/slurm/exps.sbatch" in out.stdout
    assert f'\nGPUS={gpus} ' in out.stdout and f'asks for {asks_for}' in out.stdout


def test_gpus_per_task_0_asks_for_no_gpu(box):
    out = slurm_dry_run(box, '-p', 'cpu', '--gpus-per-task', '0')
    assert out.returncode == 0, out.stdout + out.stderr
    assert 'sbatch --array=0-1 -p cpu logs/experiments/slurm/exps.sbatch' in out.stdout  # 0 not passed on
    assert '#SBATCH --gpus-per-task' not in out.stdout and '\nGPUS=0 ' in out.stdout
    assert 'asks for no GPU' in out.stdout


def test_a_cluster_without_gpus_gets_cpu_tasks_by_default(box):
    set_sinfo(box, 'echo "(null)"\n')
    out = slurm_dry_run(box)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '#SBATCH --gpus-per-task' not in out.stdout and '\nGPUS=0 ' in out.stdout
    assert 'asks for no GPU (sinfo lists none' in out.stdout
    set_sinfo(box, 'echo "gpu:h100:8(S:0-1)"\necho "(null)"\n')
    assert '#SBATCH --gpus-per-task=1\n' in slurm_dry_run(box).stdout


@pytest.mark.parametrize('args, gpus, nodes', [(['--gpus-per-task', '2'], 2, 1),
                                                (['--nodes', '2', '--gpus-per-task', '1'], 1, 2),
                                                (['--gres', 'gpu:4'], 4, 1)])
def test_train_clip_is_wrapped_in_torchrun_like_train_swin(box, args, gpus, nodes):
    """Both trainers are data-parallel, so a task with several GPUs or nodes runs either one under
    torchrun: the same batch script, only SCRIPT differs."""
    clip_plan = '# script: train_clip.py\nC1 --lr 1e-5\n'
    (box / 'repo' / 'train_clip.py').write_text('raise SystemExit("a stub: never run here")\n')
    clip = run_queue(box, clip_plan, '--slurm', *args, '--dry-run')
    swin = run_queue(box, 'S1 --lr 1e-5\n', '--slurm', *args, '--dry-run')
    for out, script in ((clip, 'train_clip.py'), (swin, 'train_swin.py')):
        assert out.returncode == 0, out.stdout + out.stderr
        assert 'torch.distributed.run' in out.stdout and 'no DDP' not in out.stdout + out.stderr
        assert f'\nGPUS={gpus} ' in out.stdout and f'\nNODES={nodes} ' in out.stdout
        assert f'\nSCRIPT={box / "repo" / script}\n' in out.stdout
    assert not (box / 'work' / 'logs' / 'experiments' / 'slurm').exists()
    # One GPU per task (the default) still runs train_clip.py without torchrun.
    out = run_queue(box, clip_plan, '--slurm', '--dry-run')
    assert out.returncode == 0 and '\nGPUS=1 ' in out.stdout


def run_env_queue(box, gpus):
    work = box / 'work'
    (box / 'repo' / 'train_swin.py').write_text(ENV_STUB)
    (work / 'env.jsonl').unlink(missing_ok=True)
    shutil.rmtree(work / 'logs', ignore_errors=True)
    out = run_queue(box, 'G1 --lr 1\nG2 --lr 2\n', '--gpus', gpus)
    assert out.returncode == 0, out.stdout + out.stderr
    return out, {r['name']: r for r in map(json.loads, (work / 'env.jsonl').read_text().splitlines())}


def test_runs_that_share_a_gpu_are_told_so(box):
    out, runs = run_env_queue(box, '0,0')
    assert {(r['cuda'], r['shared']) for r in runs.values()} == {('0', '2')}
    assert 'IQA_GPU_SHARED=2' in out.stdout   # the start lines say it too
    dry = run_queue(box, 'G1 --lr 1\nG2 --lr 2\n', '--gpus', '0,0', '--dry-run', '--log_dir', 'fresh')
    assert dry.stdout.count('IQA_GPU_SHARED=2)') == 2

    _, runs = run_env_queue(box, '0,1')
    assert sorted((r['cuda'], r['shared']) for r in runs.values()) == [('0', '1'), ('1', '1')]
    _, runs = run_env_queue(box, 'cpu')
    assert {(r['cuda'], r['shared']) for r in runs.values()} == {('', None)}
