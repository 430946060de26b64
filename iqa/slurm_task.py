"""Bookkeeping of one SLURM array task of run_experiments.sh --slurm (called from its batch
script, iqa/slurm_batch.sh.template; `submitted` is called in-process by iqa/slurm_submit.py).

    python -m iqa.slurm_task submitted TASK_FILE JOB NAME
    python -m iqa.slurm_task start     TASK_FILE JOB NAME OUTPUT_DIR HOST   -> prints the run to resume
    python -m iqa.slurm_task finish    TASK_FILE NAME OUTPUT_DIR STATE EXIT_CODE LOG

A cluster stops a task at its time limit or when it is pre-empted, and starts it again later on
any node. The task has to find the run folder its earlier attempt made (the trainer names run
folders by date, so the experiment's name alone does not say which one) and continue it with
`--resume`. One small JSON file per experiment, logs/experiments/NAME.task, remembers what the
attempts need: the array task (`job`), when its first attempt started (`first_start`: the run
folder is the newest one whose config.json has `"name": NAME` and was written after that), the
attempt count, the run folder once known, and the last state with its reason. A copy goes into the
run folder as slurm_task.json, where collect_results.py reads which task failed and why.

A new submission continues the run of an earlier one only when that one was stopped from outside
(time limit, pre-emption, scancel): a task that failed by itself starts over, as a re-launch of
the local queue does.

Imports neither torch nor numpy: it runs several times per task, on login and compute nodes.
"""
import glob
import json
import os
import re
import sys
import time

from iqa.files import atomic_write_text
from iqa.runs import RUN_FILES

# States a new submission resumes from: the task was stopped, not broken.
RESUMABLE = ('stopped', 'requeued', 'running', 'starting')
TASK_FILE = 'slurm_task.json'   # this module's copy of the task state in the run folder


def read_task(path):
    try:
        with open(path, encoding='utf-8') as f:
            info = json.load(f)
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def write_task(path, info):
    """The task file, and its copy in the run folder once the run folder is known."""
    info['updated'] = time.strftime('%Y-%m-%d %H:%M:%S')
    text = json.dumps(info, indent=2, ensure_ascii=False) + '\n'
    atomic_write_text(path, text)
    run_dir = info.get('run_dir')
    if run_dir and os.path.isdir(run_dir):
        atomic_write_text(os.path.join(run_dir, TASK_FILE), text)


def find_run_dir(output_dir, name, since):
    """The newest run folder of `name` whose config.json was written at or after `since`."""
    found = []
    for config_path in glob.glob(os.path.join(glob.escape(output_dir), '*', 'config.json')):
        try:
            mtime = os.path.getmtime(config_path)
            with open(config_path, encoding='utf-8') as f:
                config = json.load(f)
        except (OSError, ValueError):
            continue
        # 2 s of slack: a shared file system's clock may trail the node's.
        if isinstance(config, dict) and config.get('name') == name and mtime >= since - 2:
            found.append((mtime, os.path.dirname(config_path)))
    return max(found)[1] if found else None


def has_last_checkpoint(run_dir):
    return bool(glob.glob(os.path.join(glob.escape(run_dir), 'last.pkl')) or
                glob.glob(os.path.join(glob.escape(run_dir), 'round*', 'last.pkl')))


def submitted(task_file, job, name):
    old = read_task(task_file)
    info = {'experiment': name, 'job': job, 'state': 'submitted', 'attempt': 0}
    if old.get('state') in RESUMABLE and old.get('first_start'):
        # Stopped from outside last time: this submission continues that run.
        info.update(first_start=old['first_start'], run_dir=old.get('run_dir'), resumes_job=old.get('job'))
    write_task(task_file, info)


def start(task_file, job, name, output_dir, host):
    """Book an attempt; print the run folder to pass to --resume (nothing: start a new run)."""
    info = read_task(task_file)
    if info.get('job') != job:  # the batch script was submitted by hand, not by run_experiments.sh
        info = {'experiment': name, 'job': job, 'attempt': 0}
    info['attempt'] = int(info.get('attempt') or 0) + 1
    if not info.get('first_start'):
        info['first_start'] = time.time()
    info.update(state='running', host=host, exit_code=None, reason=None)
    resume = None
    run_dir = find_run_dir(output_dir, name, info['first_start'])
    if run_dir and has_last_checkpoint(run_dir):
        resume = run_dir
        info['run_dir'] = run_dir
    elif run_dir:
        # An earlier attempt died before its first epoch ended: nothing to resume. Remove the
        # run files it wrote (only those) so the table does not list the experiment twice.
        for file_name in RUN_FILES + (TASK_FILE,):
            try:
                os.remove(os.path.join(run_dir, file_name))
            except FileNotFoundError:
                pass
        try:
            os.rmdir(run_dir)
        except OSError:
            pass
        info['run_dir'] = None
    write_task(task_file, info)
    if resume:
        print(resume)


# Lines that say why a trainer stopped, best first: the exception of a traceback, then the
# trainer's own error lines, then messages of the system around it.
REASON_PATTERNS = (
    re.compile(r'^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*'),
    re.compile(r'^(DATA ERROR|ERROR|STOPPED|error):? .*|^\S+: error: .*'),
    re.compile(r'.*(out of memory|No space left|Killed|CANCELLED|oom-kill|DUE TO TIME LIMIT).*', re.I),
)


def failure_reason(log_path, name, exit_code):
    """Why the last attempt in `log_path` failed, as far as its log says; else from the exit code."""
    try:
        with open(log_path, encoding='utf-8', errors='replace') as f:
            text = f.read().replace('\r', '\n')
    except OSError:
        text = ''
    header = f'===== run_experiments.sh: {name}, '
    attempt = text[text.rfind(header):] if header in text else text
    lines = [line.strip() for line in attempt.splitlines()[1:] if line.strip()]
    for pattern in REASON_PATTERNS:
        hits = [line for line in lines if pattern.match(line)]
        if hits:
            return hits[-1][:300]
    if exit_code > 128:
        return f'killed by signal {exit_code - 128}' + (' (SIGKILL: out of memory?)' if exit_code == 137 else '')
    return f'exit code {exit_code}'


def finish(task_file, name, output_dir, state, exit_code, log_path):
    info = read_task(task_file)
    info.setdefault('experiment', name)
    info.update(state=state, exit_code=exit_code)
    if not info.get('run_dir') and info.get('first_start'):
        info['run_dir'] = find_run_dir(output_dir, name, info['first_start'])
    info['reason'] = failure_reason(log_path, name, exit_code) if state == 'failed' else None
    write_task(task_file, info)
    if info['reason']:
        print(info['reason'])


def main(argv):
    usage = __doc__.split('\n\n')[1]
    if not argv:
        raise SystemExit(f'usage:\n{usage}')
    command, args = argv[0], argv[1:]
    if command == 'submitted' and len(args) == 3:
        submitted(*args)
    elif command == 'start' and len(args) == 5:
        start(*args)
    elif command == 'finish' and len(args) == 6:
        finish(args[0], args[1], args[2], args[3], int(args[4]), args[5])
    else:
        raise SystemExit(f'iqa.slurm_task: bad arguments {argv}\nusage:\n{usage}')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
