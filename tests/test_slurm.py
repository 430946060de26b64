"""run_experiments.sh --slurm: a plan as one SLURM job array, and the '# script:' line.

The generated batch script is run by hand (bash, SLURM's variables set, a stub trainer) to check
what each task does in about a second; then a real one-node cluster (tests/slurm_cluster.py) runs
a tiny CPU plan end to end: the array, a task stopped before its "time limit" and requeued, which
resumes to the metrics of an uninterrupted twin, a failing task named in the results table, and a
resubmission that skips what finished. Without slurm-wlm (or root) that test is skipped with the
reason.
"""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

import collect_results
from iqa import slurm_task
from iqa.results import read_metrics_csv
from slurm_cluster import one_node_cluster, unavailable, wait_until
from test_run_experiments import (STUB_TRAINER, calls, copy_launcher, fake_nvidia_smi, process_alive, run_queue,
                                  run_script, script_env, write_stub)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'run_experiments.sh')


@pytest.fixture
def sandbox(tmp_path):
    """repo/ holds the scripts (stub trainer, the real launcher and iqa/slurm_task.py); work/ is
    where it runs."""
    repo, work = tmp_path / 'repo', tmp_path / 'work'
    repo.mkdir()
    work.mkdir()
    shutil.copy(os.path.join(ROOT, 'run_experiments.sh'), repo / 'run_experiments.sh')
    copy_launcher(repo)
    write_stub(repo, 'script_dir')
    fake_nvidia_smi(tmp_path, 'exit 6\n')
    return tmp_path


def batch_script(stdout):
    """The batch script a --slurm --dry-run prints after its '----- PATH -----' line."""
    head, _, script = stdout.partition('.sbatch -----\n')
    assert script.startswith('#!/bin/bash'), stdout
    return script


def fake_commands(bin_dir, **bodies):
    for name, body in bodies.items():
        path = bin_dir / name
        path.write_text('#!/bin/sh\n' + body)
        path.chmod(0o755)


def run_task(sandbox, script_text, task_id, array_id='41', **env):
    """Run the batch script the way slurmd would start array task `task_id`."""
    work = sandbox / 'work'
    (work / 'task.sbatch').write_text(script_text)
    variables = {'SLURM_ARRAY_JOB_ID': array_id, 'SLURM_ARRAY_TASK_ID': str(task_id),
                 'SLURM_JOB_ID': str(int(array_id) + 1 + task_id), **env}
    return subprocess.run(['bash', 'task.sbatch'], cwd=work, capture_output=True, text=True, timeout=60,
                          env=script_env(sandbox / 'bin', **variables))


PLAN = '''# script: train_swin.py
S1 --lr 5e-6 --data_root "dir with space"
S2 --lr 1e-5 \\
   --epochs 3
S3
'''


def test_dry_run_prints_the_array_and_each_task_runs_the_local_command(sandbox):
    work = sandbox / 'work'
    (work / 'S2.fail').touch()
    out = run_queue(sandbox, PLAN, '--slurm', '-p', 'gpu', '--time', '4:00:00', '--max_running', '2',
                    '--dry-run')
    assert out.returncode == 0, out.stdout + out.stderr
    assert 'sbatch --array=0-2%2 -p gpu --time 4:00:00 logs/experiments/slurm/exps.sbatch' in out.stdout
    assert 'task 1: S2 (line 3, log logs/experiments/S2.log)' in out.stdout
    script = batch_script(out.stdout)
    assert '#SBATCH --requeue' in script and '#SBATCH --signal=B:USR1@300' in script
    assert '#SBATCH --output=logs/experiments/slurm/%A_%a.out' in script
    assert not (work / 'logs').exists(), 'a dry run must not create anything'

    # Task 0 runs exactly the local queue's command line, with its log and .done marker.
    local = run_queue(sandbox, PLAN, '--dry-run', '--gpus', 'cpu')
    local_words = shlex.split(local.stdout.split('[CPU] S1  (line 2')[1].splitlines()[1])[1:]
    done = run_task(sandbox, script, 0)
    assert done.returncode == 0, done.stdout + done.stderr
    assert calls(work)[0]['argv'] == local_words[2:] == [
        '--name', 'S1', '--lr', '5e-6', '--data_root', 'dir with space']
    logs = work / 'logs' / 'experiments'
    assert 'device: SLURM task 41_0 on' in (logs / 'S1.done').read_text()
    assert r'flags: --lr 5e-6 --data_root dir\ with\ space' in (logs / 'S1.done').read_text()
    log = (logs / 'S1.log').read_text()
    assert log.startswith('===== run_experiments.sh: S1, SLURM task 41_0 on ')
    assert 'Best test SRCC 0.9000' in log
    assert re.search(r'\n===== run_experiments.sh: S1 exit code 0 after \d+s =====\n$', log)
    task = json.loads((logs / 'S1.task').read_text())
    assert (task['job'], task['state'], task['attempt'], task['exit_code']) == ('41_0', 'done', 1, 0)

    # A failing task: no .done, its state says why (the last error line of its log).
    failed = run_task(sandbox, script, 1)
    assert failed.returncode == 3
    assert not (logs / 'S2.done').exists()
    task = json.loads((logs / 'S2.task').read_text())
    assert (task['state'], task['exit_code']) == ('failed', 3)
    assert task['reason'] == 'boom: No space left on device'
    assert 'S2 FAILED (exit 3): boom: No space left on device' in failed.stderr

    # Resubmitting: S1 is finished and skipped; the array holds S2 and S3 only, renumbered.
    out = run_queue(sandbox, PLAN, '--slurm', '--dry-run')
    assert 'skip S1 (finished)' in out.stdout
    assert 'S2 failed last time (41_1): boom: No space left on device' in out.stdout
    assert 'sbatch --array=0-1 logs/experiments/slurm/exps.sbatch' in out.stdout
    script = batch_script(out.stdout)
    assert re.search(r'0\) NAME=S2; LINE=3;.*\n +FLAGS=\(--lr 1e-5 --epochs 3\)', script)
    assert re.search(r'1\) NAME=S3; LINE=5;.*\n +FLAGS=\(\)', script)
    assert '#SBATCH --signal' not in batch_script(
        run_queue(sandbox, PLAN, '--slurm', '--signal=B:USR1@900', '--dry-run').stdout)


def test_multi_gpu_tasks_use_torchrun_and_multi_node_tasks_srun_with_a_rendezvous(sandbox):
    work = sandbox / 'work'
    bin_dir = sandbox / 'bin'
    # A python that runs iqa/slurm_task.py but only records a training command (no torchrun here).
    fake_commands(bin_dir, srun='echo "srun $*" >> srun.calls\n',
                  scontrol='[ "$1 $2" = "show hostnames" ] && printf "node7\\nnode8\\n"\n',
                  fakepy=f'case "$1" in *slurm_task.py) exec {shlex.quote(sys.executable)} "$@";; esac\n'
                         'echo "$*" >> py.calls\n')
    py = str(bin_dir / 'fakepy')
    out = run_queue(sandbox, 'M1 --lr 1e-5\n', '--slurm', '--gpus-per-task', '4', '--dry-run', '--python', py)
    assert 'GPUS=4' in out.stdout and 'NODES=1' in out.stdout
    assert run_task(sandbox, batch_script(out.stdout), 0).returncode == 0
    trainer = str(sandbox / 'repo' / 'train_swin.py')
    assert (work / 'py.calls').read_text().split() == [
        '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=4', trainer,
        '--name', 'M1', '--lr', '1e-5']
    assert 'device: SLURM task 41_0 on ' in (work / 'logs' / 'experiments' / 'M1.done').read_text()

    out = run_queue(sandbox, 'M2 --lr 1e-5\n', '--slurm', '--nodes=2', '--gpus-per-task=a100:4', '--dry-run',
                    '--python', py)
    assert out.returncode == 0, out.stderr
    assert run_task(sandbox, batch_script(out.stdout), 0, array_id='500').returncode == 0
    srun = (work / 'srun.calls').read_text().split()
    assert srun[:5] == ['srun', '--nodes=2', '--ntasks-per-node=1', '--kill-on-bad-exit=1', py]
    assert srun[5:11] == ['-m', 'torch.distributed.run', '--nnodes=2', '--nproc_per_node=4',
                          '--rdzv_backend=c10d', f'--rdzv_endpoint=node7:{29500 + 501}']
    assert srun[11] == '--rdzv_id=500_0' and srun[13:] == ['--name', 'M2', '--lr', '1e-5']

    out = run_queue(sandbox, 'M3\n', '--slurm', '--nodes', '2', '--dry-run')
    assert out.returncode == 2 and 'give --gpus-per-task N' in out.stderr


@pytest.mark.parametrize('sig', ['USR1', 'TERM'])
def test_a_stopped_task_resumes_its_run_folder(sandbox, sig):
    """SIGUSR1 (the time limit is near): the task stops the trainer and requeues itself, and the
    requeued attempt passes --resume with the run folder. SIGTERM (scancel, pre-emption): the task
    stops; the next submission resumes the run the same way."""
    work = sandbox / 'work'
    bin_dir = sandbox / 'bin'
    fake_commands(bin_dir, scontrol='echo "$*" >> scontrol.calls\n', sbatch='echo 77\n', squeue='')
    (work / 'R1.slow').touch()
    out = run_queue(sandbox, 'R1 --output_dir ckpt\n', '--slurm', '--dry-run')
    (work / 'task.sbatch').write_text(batch_script(out.stdout))
    env = script_env(bin_dir, SLURM_ARRAY_JOB_ID='41', SLURM_ARRAY_TASK_ID='0', SLURM_JOB_ID='42')
    task = subprocess.Popen(['bash', 'task.sbatch'], cwd=work, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        pids = wait_until(lambda: (work / 'R1.pids').exists() and (work / 'R1.pids').read_text().split(),
                          30, 'the stub trainer', interval=0.05)
        run_dir = work / 'ckpt' / 'koniq-10k-swin_20250101_000000'  # what the trainer has written
        run_dir.mkdir(parents=True)
        (run_dir / 'config.json').write_text(json.dumps({'name': 'R1'}))
        (run_dir / 'last.pkl').write_bytes(b'')
        task.send_signal(getattr(signal, 'SIG' + sig))
        task.communicate(timeout=30)
    finally:
        if task.poll() is None:
            task.kill()
    assert task.returncode == (0 if sig == 'USR1' else 143)
    wait_until(lambda: not any(process_alive(int(p)) for p in pids), 5, 'the trainer to stop', interval=0.05)
    logs = work / 'logs' / 'experiments'
    state = json.loads((logs / 'R1.task').read_text())
    assert not (logs / 'R1.done').exists()
    assert json.loads((run_dir / 'slurm_task.json').read_text())['state'] == state['state']
    if sig == 'USR1':
        assert (work / 'scontrol.calls').read_text() == 'requeue 41_0\n'
        assert (state['state'], state['attempt']) == ('requeued', 1)
        assert 'R1 stopped before the time limit' in (logs / 'R1.log').read_text()
        next_job = '41'
    else:
        assert (state['state'], state['exit_code']) == ('stopped', 143)
        out = run_queue(sandbox, 'R1 --output_dir ckpt\n', '--slurm')
        assert out.returncode == 0, out.stdout + out.stderr
        assert 'R1 was stopped last time (41_0): this task resumes its run' in out.stdout
        assert 'task 77_0: R1' in out.stdout
        next_job = '77'

    (work / 'R1.slow').unlink()
    done = run_task(sandbox, (work / 'task.sbatch').read_text() if sig == 'USR1'
                    else (logs / 'slurm' / 'exps.sbatch').read_text(), 0, array_id=next_job)
    assert done.returncode == 0, done.stdout + done.stderr
    assert calls(work)[-1]['argv'] == ['--name', 'R1', '--output_dir', 'ckpt',
                                       '--resume', 'ckpt/koniq-10k-swin_20250101_000000']
    state = json.loads((logs / 'R1.task').read_text())
    assert (state['state'], state['job'], state['run_dir']) == (
        'done', f'{next_job}_0', 'ckpt/koniq-10k-swin_20250101_000000')
    assert json.loads((run_dir / 'slurm_task.json').read_text())['state'] == 'done'
    assert (logs / 'R1.done').exists()


def test_an_attempt_that_died_before_its_first_epoch_leaves_no_second_folder(sandbox):
    work = sandbox / 'work'
    out = run_queue(sandbox, 'R2 --output_dir ckpt\n', '--slurm', '--dry-run')
    script = batch_script(out.stdout)
    logs = work / 'logs' / 'experiments'
    logs.mkdir(parents=True)
    (logs / 'R2.task').write_text(json.dumps({'job': '41_0', 'state': 'requeued', 'attempt': 1,
                                              'first_start': time.time() - 60}))
    orphan = work / 'ckpt' / 'koniq-10k-swin_20250101_000000'
    orphan.mkdir(parents=True)
    (orphan / 'config.json').write_text(json.dumps({'name': 'R2'}))
    assert run_task(sandbox, script, 0).returncode == 0
    assert calls(work)[-1]['argv'] == ['--name', 'R2', '--output_dir', 'ckpt']  # a new run
    assert not orphan.exists()


@pytest.mark.parametrize('args, message', [
    (['--slurm', '--array=0-3'], 'builds the job array itself'),
    (['--gpus', '0,1', '--slurm'], '--gpus picks GPUs of this machine'),
    (['--max_running', '2'], '--max_running is for --slurm'),
    (['--slurm', '--max_running', '0'], "--max_running '0' is not a positive number"),
    (['--slurm', '--nodes', '1-2', '--gpus-per-task', '1'], 'a fixed number of nodes'),
])
def test_bad_slurm_options_are_refused(sandbox, args, message):
    out = run_queue(sandbox, 'X1 --lr 1e-6\n', *args, '--dry-run')
    assert out.returncode == 2 and message in out.stderr, out.stdout + out.stderr


def test_script_line_and_script_flag_pick_the_training_script(sandbox):
    work = sandbox / 'work'
    (work / 'train_clip.py').write_text("WHO = 'clip'\n" + STUB_TRAINER)
    plan = '# CLIP plan\n\n#   script:  train_clip.py  \nC1 --lr 1e-5\n'
    out = run_queue(sandbox, plan, '--gpus', 'cpu')
    assert out.returncode == 0, out.stdout + out.stderr
    assert [(r['who'], r['argv']) for r in calls(work)] == [('clip', ['--name', 'C1', '--lr', '1e-5'])]
    assert "trainer train_clip.py ('# script:' on exps.txt:3)" in out.stdout
    # --script wins over the line; the SLURM tasks run the same script.
    out = run_queue(sandbox, plan, '--dry-run', '--script', 'train_swin.py')
    assert str(sandbox / 'repo' / 'train_swin.py') in out.stdout
    out = run_queue(sandbox, plan, '--slurm', '--dry-run', '--log_dir', 'other')
    assert 'SCRIPT=train_clip.py' in out.stdout
    out = run_queue(sandbox, plan, '--script', 'missing.py')
    assert out.returncode == 2 and 'training script missing.py (--script) not found' in out.stderr


@pytest.mark.parametrize('plan, message', [
    ('A1 --lr 1e-6\n# script: train_clip.py\n', "exps.txt:2: '# script:' must come before the first"),
    ('# script: a.py\n# script: b.py\nA1\n', "exps.txt:2: a second '# script:' line (the first is on line 1)"),
    ('# script: my script.py\nA1\n', "exps.txt:1: '# script:' takes one file name"),
])
def test_bad_script_lines_are_refused(sandbox, plan, message):
    out = run_queue(sandbox, plan, '--dry-run')
    assert out.returncode == 2 and message in out.stderr


def test_failure_reason_is_the_last_error_line_of_the_last_attempt(tmp_path):
    log = tmp_path / 'E1.log'
    log.write_text('===== run_experiments.sh: E1, SLURM task 3_0 on n1, started x =====\ncmd\n'
                   'ValueError: from the first attempt\n'
                   '===== run_experiments.sh: E1, SLURM task 3_0 on n2, started y =====\ncmd\n'
                   'epoch 1\rTraceback (most recent call last):\n  File "x.py", line 1\n'
                   'torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n')
    assert slurm_task.failure_reason(str(log), 'E1', 1) == \
        'torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB'
    log.write_text('===== run_experiments.sh: E1, SLURM task 3_0 on n1, started x =====\ncmd\nepoch 1\n')
    assert slurm_task.failure_reason(str(log), 'E1', 137) == 'killed by signal 9 (SIGKILL: out of memory?)'
    assert slurm_task.failure_reason(str(tmp_path / 'none.log'), 'E1', 2) == 'exit code 2'


def test_results_table_names_failed_and_stopped_array_tasks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / 'checkpoints' / 'koniq-10k-swin_20250101_000000'
    run.mkdir(parents=True)
    (run / 'config.json').write_text(json.dumps({'name': 'R1', 'lr': 1e-5}))
    (run / 'summary.json').write_text(json.dumps({'status': 'running', 'best': None}))
    (run / 'slurm_task.json').write_text(json.dumps({'job': '9_0', 'state': 'failed', 'exit_code': 1,
                                                     'reason': 'RuntimeError: CUDA out of memory'}))
    tasks = tmp_path / 'logs' / 'experiments'
    tasks.mkdir(parents=True)
    (tasks / 'R1.task').write_text(json.dumps({'experiment': 'R1', 'job': '9_0', 'state': 'failed',
                                               'run_dir': str(run), 'reason': 'x'}))
    (tasks / 'R2.task').write_text(json.dumps({'experiment': 'R2', 'job': '9_1', 'state': 'failed',
                                               'exit_code': 2, 'reason': 'error: unrecognized arguments: --x'}))
    (tasks / 'R3.task').write_text(json.dumps({'experiment': 'R3', 'job': '9_2', 'state': 'done'}))
    (tasks / 'R4.task').write_text(json.dumps({'experiment': 'R4', 'job': '9_3', 'state': 'stopped'}))
    (tasks / 'R5.task').write_text(json.dumps({'experiment': 'R5', 'job': '9_4', 'state': 'failed'}))
    (tasks / 'R5.done').write_text('name: R5\n')  # failed on the cluster, finished in a later run
    results, _ = collect_results.collect([], tasks_dir='logs/experiments')
    status = {r['run']: r['status'] for r in results}
    assert status == {
        'R1': 'failed (SLURM task 9_0: RuntimeError: CUDA out of memory)',
        'R2': 'failed (SLURM task 9_1: error: unrecognized arguments: --x)',
        'R4': 'stopped (SLURM task 9_3: cancelled, pre-empted or out of time; resubmit to resume)'}
    assert '| R2 | - | failed (SLURM task 9_1: error: unrecognized arguments: --x) |' in \
        collect_results.markdown_table(results)


# ------------------------------------------------------------------ a real one-node cluster

@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
    reason = unavailable()
    if reason:
        pytest.skip(f'no SLURM cluster for the --slurm end-to-end test: {reason}')
    cluster = one_node_cluster(tmp_path_factory.mktemp('slurm'))
    try:
        env = cluster.__enter__()
    except RuntimeError as e:  # installed but cannot run here (no loopback, a locked-down container)
        pytest.skip(f'the one-node SLURM cluster did not start: {e}')
    try:
        yield env
    finally:
        cluster.__exit__(None, None, None)


def squeue(env):
    """{array task 'A_T': (job id, state)} of every job in the queue."""
    out = subprocess.run(['squeue', '-h', '-r', '-o', '%A %i %T'], env=env, capture_output=True, text=True,
                         timeout=30).stdout
    return {task: (job, state) for job, task, state in (line.split() for line in out.splitlines())}


def metrics_rows(run_dir):
    import csv
    with open(os.path.join(run_dir, 'metrics.csv'), newline='') as f:
        return [{k: v for k, v in row.items() if k not in ('epoch_seconds', 'train_patches_per_s')}
                for row in csv.DictReader(f)]


def test_tiny_cpu_plan_on_a_real_slurm_cluster(cluster, tmp_path):
    """Three tiny trainings as one array on a one-node cluster (2 CPUs, two tasks at a time).
    T1 is stopped with the signal SLURM sends before a time limit, requeues itself and resumes
    its run; T3 has T1's flags and runs uninterrupted, so the two end with the same metrics."""
    from dataset_fixtures import make_koniq
    make_koniq(tmp_path / 'koniq', sets=('training',) * 6 + ('validation',) * 2 + ('test',) * 3, hw=(64, 64))
    common = ('--dataset koniq-10k --data_root koniq --model_size nano --no_pretrained --epochs 5 '
              '--batch_size 4 --train_patch_num 1 --test_patch_num 1 --resize 224 224 --cache_dir none '
              '--num_workers 1 --no_spaq --output_dir checkpoints --log_dir logs')
    (tmp_path / 'plan.txt').write_text(f'T1 {common}\nT2 {common} --lr 1e-4\nT3 {common}\n')
    (tmp_path / 'broken.txt').write_text(f'F1 {common} --no_such_flag\n')
    env = dict(cluster, OMP_NUM_THREADS='1')
    submit = ['bash', SCRIPT, 'plan.txt', '--python', sys.executable, '--slurm', '-c', '1']

    def run(cmd, timeout=120):
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)

    out = run(submit)
    assert out.returncode == 0, out.stdout + out.stderr
    array = re.search(r'submitted job array (\d+) \(0-2\)', out.stdout).group(1)
    out = run(['bash', SCRIPT, 'broken.txt', '--python', sys.executable, '--slurm', '-c', '1'])
    assert out.returncode == 0, out.stdout + out.stderr
    logs = tmp_path / 'logs' / 'experiments'

    def t1_run_with_a_checkpoint():
        for config in (tmp_path / 'checkpoints').glob('*/config.json'):
            if json.loads(config.read_text())['name'] == 'T1' and (config.parent / 'last.pkl').exists():
                return config.parent
        return None

    # T1 has finished an epoch (last.pkl) and is still training: the "time limit" signal.
    t1_dir = wait_until(t1_run_with_a_checkpoint, 240, "T1's first last.pkl", interval=0.1)
    job, state = squeue(env)[f'{array}_0']
    assert state == 'RUNNING' and job != array  # (the array's own id would signal every task)
    subprocess.run(['scancel', '--batch', '--signal=USR1', job], env=env, check=True, timeout=30)
    # It requeues itself; SLURM holds a requeued job for about two minutes: let it go at once.
    wait_until(lambda: squeue(env).get(f'{array}_0', ('', ''))[1] == 'PENDING', 60, 'T1 requeued')
    subprocess.run(['scontrol', 'update', f'JobId={job}', 'StartTime=now'], env=env, check=True, timeout=30)
    wait_until(lambda: not squeue(env), 420, 'the array to finish', interval=1)

    for name in ('T1', 'T2', 'T3'):
        assert (logs / f'{name}.done').exists(), (logs / f'{name}.log').read_text()[-3000:]
    t1_log = (logs / 'T1.log').read_text()
    assert t1_log.count(f'T1, SLURM task {array}_0 on') == 2, t1_log
    assert 'T1 stopped before the time limit' in t1_log
    assert f'resuming {t1_dir.relative_to(tmp_path)} (its last.pkl)' in t1_log
    assert json.loads((logs / 'T1.task').read_text())['attempt'] == 2
    t1_runs = [c.parent for c in (tmp_path / 'checkpoints').glob('*/config.json')
               if json.loads(c.read_text())['name'] == 'T1']
    assert t1_runs == [t1_dir]  # the requeued task continued T1's run, no second folder
    t3_dir = next(c.parent for c in (tmp_path / 'checkpoints').glob('*/config.json')
                  if json.loads(c.read_text())['name'] == 'T3')
    resumed, uninterrupted = metrics_rows(t1_dir), metrics_rows(t3_dir)
    assert len(resumed) == 5 and resumed == uninterrupted
    assert json.loads((t1_dir / 'summary.json').read_text())['status'] == 'finished'
    assert json.loads((t1_dir / 'slurm_task.json').read_text())['state'] == 'done'

    # The failing task: no .done, and the table says which task and why.
    assert not (logs / 'F1.done').exists()
    table = run([sys.executable, os.path.join(ROOT, 'collect_results.py'), '--sort', 'run'])
    assert table.returncode == 0, table.stderr
    for name in ('T1', 'T2', 'T3'):
        assert re.search(rf'^\| {name} \| [^|]* \| finished \| \d/5 \|', table.stdout, re.M), table.stdout
    f1_job = json.loads((logs / 'F1.task').read_text())['job']
    assert re.search(rf'^\| F1 \| - \| failed \(SLURM task {f1_job}: train_swin.py: error: '
                     r'unknown flag --no_such_flag\)', table.stdout, re.M), table.stdout
    plot = run([sys.executable, os.path.join(ROOT, 'plot_training_curve.py'), 'T1', '--out', 'figures'])
    assert plot.returncode == 0, plot.stderr
    assert list((tmp_path / 'figures').glob('*.png'))

    # Resubmission: everything finished, nothing is submitted.
    again = run(submit)
    assert again.returncode == 0, again.stdout + again.stderr
    for name in ('T1', 'T2', 'T3'):
        assert f'skip {name} (finished)' in again.stdout
    assert 'nothing to submit' in again.stdout and not squeue(env)


def test_a_clip_plan_runs_in_the_local_queue_and_a_stopped_clip_task_resumes_its_run(sandbox):
    """A '# script: train_clip.py' plan with the real trainer (nano CLIP, 27 tiny images): the
    local queue runs it to the end; as a SLURM task it is stopped (SIGUSR1) after its first
    epoch, and the requeued attempt finds the run folder by its --name in config.json and
    continues it with --resume RUN_DIR to the last epoch, in the same folder."""
    from pathlib import Path

    import train_clip
    from test_train_clip import make_prompt_csv
    work, bin_dir = sandbox / 'work', sandbox / 'bin'
    csv_path = make_prompt_csv(work / 'data')
    common = (f'--data_csv_path {csv_path} --clip_model nano --no_pretrained --batch_size 8 --lr 1e-3 '
              f'--log_dir runlogs --cache_dir cache --num_workers 1 --output_dir ckpt')
    plan = f'# script: train_clip.py\nC1 {common} --epochs 1\n'
    (work / 'exps.txt').write_text(plan)
    out = run_script(['exps.txt', '--python', sys.executable, '--gpus', 'cpu'], work, bin_dir, SCRIPT, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (work / 'logs' / 'experiments' / 'C1.done').exists()
    run_dir = slurm_task.find_run_dir(str(work / 'ckpt'), 'C1', 0)   # what a SLURM task would resume
    assert run_dir and slurm_task.has_last_checkpoint(run_dir)
    [row], _ = collect_results.collect([str(run_dir)])
    assert row['run'] == 'C1' and row['status'] == 'finished' and row['test_srcc_q'] == row['test_srcc_q']

    # Without --output_dir a task looks where train_clip.py writes by default.
    (work / 'exps.txt').write_text('# script: train_clip.py\nC0 --epochs 1\n')
    out = run_script(['exps.txt', '--python', sys.executable, '--slurm', '--dry-run'], work, bin_dir, SCRIPT)
    default_dir = train_clip.build_parser().get_default('output_dir')
    assert f'OUTPUT_DIR={shlex.quote(default_dir)}' in out.stdout, out.stdout

    fake_commands(bin_dir, scontrol='echo "$*" >> scontrol.calls\n')
    (work / 'exps.txt').write_text(f'# script: train_clip.py\nC2 {common} --epochs 8\n')
    out = run_script(['exps.txt', '--python', sys.executable, '--slurm', '--dry-run'], work, bin_dir, SCRIPT)
    assert out.returncode == 0 and f"SCRIPT={shlex.quote(os.path.join(ROOT, 'train_clip.py'))}" in out.stdout
    (work / 'task.sbatch').write_text(batch_script(out.stdout))
    env = script_env(bin_dir, SLURM_ARRAY_JOB_ID='41', SLURM_ARRAY_TASK_ID='0', SLURM_JOB_ID='42')
    task = subprocess.Popen(['bash', 'task.sbatch'], cwd=work, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def first_epoch_saved():
            found = slurm_task.find_run_dir(str(work / 'ckpt'), 'C2', 0)
            return found if found and slurm_task.has_last_checkpoint(found) else None
        run_dir = Path(wait_until(first_epoch_saved, 60, 'the first last.pkl', interval=0.05))
        task.send_signal(signal.SIGUSR1)
        task.communicate(timeout=60)
    finally:
        if task.poll() is None:
            task.kill()
    assert task.returncode == 0 and (work / 'scontrol.calls').read_text() == 'requeue 41_0\n'
    logs = work / 'logs' / 'experiments'
    # killed after its first last.pkl: metrics.csv (written just after it) may hold one row less
    stopped = read_metrics_csv(str(run_dir / 'metrics.csv')) if (run_dir / 'metrics.csv').exists() else []
    assert len(stopped) < 8 and not (logs / 'C2.done').exists()

    done = run_task(sandbox, (work / 'task.sbatch').read_text(), 0)
    assert done.returncode == 0, done.stdout + done.stderr
    log = (logs / 'C2.log').read_text()
    assert f'--resume ckpt/{run_dir.name}' in log and f'resuming ckpt/{run_dir.name} (its last.pkl)' in log
    rows = read_metrics_csv(str(run_dir / 'metrics.csv'))
    assert [r['epoch'] for r in rows] == list(range(1, 9))     # continued, not started over
    assert [(r['epoch'], r['test_srcc_q'], r['train_loss']) for r in rows[:len(stopped)]] == [
        (r['epoch'], r['test_srcc_q'], r['train_loss']) for r in stopped]
    assert json.loads((run_dir / 'summary.json').read_text())['status'] == 'finished'
    assert json.loads((logs / 'C2.task').read_text())['state'] == 'done' and (logs / 'C2.done').exists()
    assert len([d for d in (work / 'ckpt').iterdir() if json.loads((d / 'config.json').read_text())['name'] == 'C2']) == 1
