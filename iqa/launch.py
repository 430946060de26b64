"""The launcher behind run_experiments.sh: a plan of experiments run one per GPU at a time on this
machine, or submitted to SLURM as one job array (iqa/slurm_submit.py).

    ./run_experiments.sh EXPERIMENT_FILE [--gpus 0,1|cpu] [--dry-run] ...    (see USAGE below)
    python -m iqa.launch EXPERIMENT_FILE ...                                   (the same)

Each experiment runs as `PY TRAINER --name NAME FLAGS...` in the current directory, in its own
process group, with CUDA_VISIBLE_DEVICES set to its GPU (empty on the CPU), output appended to
LOG_DIR/NAME.log. Exit code 0 writes LOG_DIR/NAME.done; a re-launch skips experiments that have
one. A failed experiment is reported and the queue goes on. SIGINT/SIGTERM/SIGHUP stop every
running experiment (its whole process group) and write no .done for it.

Environment of each run: CUDA_VISIBLE_DEVICES, PYTHONUNBUFFERED=1, and on a GPU
IQA_GPU_SHARED=N, the number of runs that share that card at once (N > 1 when --gpus lists a GPU
N times, e.g. 0,0), so a trainer can plan its memory for 1/N of the card; unset on the CPU.

Imports neither torch nor numpy: it starts in a fraction of a second on a login node.
"""
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from iqa.files import atomic_write_text
from iqa.plan import PlanError, quote_words, read_plan

PROG = 'run_experiments.sh'
# How long a running experiment gets to exit after SIGTERM before its process group is killed.
KILL_GRACE_S = 30
GPU_SHARED_ENV = 'IQA_GPU_SHARED'

USAGE = """\
usage: ./run_experiments.sh EXPERIMENT_FILE [--gpus 0,1|cpu] [--dry-run] [--python PY]
                            [--log_dir DIR] [--script FILE]
       ./run_experiments.sh EXPERIMENT_FILE --slurm [--max_running N] [--dry-run] [sbatch options]

Runs the experiments of EXPERIMENT_FILE (one per line: NAME --flag value ...) with
train_swin.py (or the file's '# script: FILE' line), one per GPU at a time; the next starts
when a GPU frees. With --slurm they go to SLURM as one job array instead.

  --gpus LIST     comma-separated GPU ids, one running experiment per entry (0,0 runs two
                  on GPU 0, and tells each so: IQA_GPU_SHARED=2 in its environment); 'cpu'
                  runs one at a time on the CPU. Default: $CUDA_VISIBLE_DEVICES if set, else
                  all GPUs of `nvidia-smi -L`, else the CPU.
  --dry-run       print the GPU assignment (with --slurm: what each task asks for) and the
                  exact commands; run nothing.
  --python PY     interpreter for the trainer. Default: $PYTHON, else .venv/bin/python next
                  to this script, else python.
  --log_dir DIR   where NAME.log and NAME.done go (default: logs/experiments).
  --script FILE   the training script of every line (wins over '# script:'; default
                  train_swin.py).
  --slurm         submit one SLURM job array, a task per unfinished experiment, each running
                  the same command; every later option not listed here goes to sbatch
                  (e.g. -p gpu --time 12:00:00). Each task asks for one GPU
                  (--gpus-per-task 1) unless you pass --gpus-per-task, --gres or --gpus, or
                  sinfo lists no GPU on the cluster; --gpus-per-task 0 asks for none (CPU
                  partitions). More than one GPU per task runs the trainer under torchrun
                  (train_swin.py and train_clip.py are both data-parallel). A task
                  requeues itself before its time limit and resumes its run's last.pkl.
  --max_running N with --slurm: at most N tasks at once (--array=...%N).

A re-launch skips experiments whose DIR/NAME.done exists; delete it to run one again.
Exit status: 0 all done or skipped, 1 any failed, 2 bad usage, 130/143 interrupted.
"""


class UsageError(Exception):
    """Bad command line or plan: exit status 2, nothing started."""


def say(text):
    print(time.strftime('[%H:%M:%S] ') + text)


def duration(seconds):
    s = int(seconds)
    if s >= 3600:
        return f'{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s'
    if s >= 60:
        return f'{s // 60}m{s % 60:02d}s'
    return f'{s}s'


# ---------------------------------------------------------------- command line

class Options:
    exp_file = None
    gpu_spec = None      # --gpus as given; None: not given
    dry_run = False
    python = None
    log_dir = 'logs/experiments'
    script = None
    slurm = False
    max_running = None

    def __init__(self):
        self.sbatch_opts = []   # everything after --slurm that is not one of ours goes to sbatch


def parse_args(argv):
    """Options, or None for --help. An option of ours is read wherever it stands; after --slurm
    every other option goes to sbatch."""
    opts = Options()
    valued = {'--python': 'python', '--log_dir': 'log_dir', '--log-dir': 'log_dir', '--script': 'script',
              '--max_running': 'max_running', '--max-running': 'max_running'}
    k = 0
    while k < len(argv):
        arg = argv[k]
        k += 1
        flag, eq, inline = arg.partition('=')
        if arg in ('-h', '--help'):
            return None
        if arg in ('--dry-run', '--dry_run'):
            opts.dry_run = True
        elif arg == '--slurm':
            opts.slurm = True
        elif flag in valued or (flag == '--gpus' and not opts.slurm):
            if eq:
                value = inline
            elif k < len(argv) and not argv[k].startswith('--'):
                value = argv[k]
                k += 1
            else:
                raise UsageError(f'{arg} needs a value (see --help)')
            setattr(opts, valued.get(flag, 'gpu_spec'), value)
        elif opts.slurm:
            opts.sbatch_opts.append(arg)
        elif arg.startswith('-'):
            raise UsageError(f"unknown option '{arg}' (see --help; sbatch options go after --slurm)")
        elif opts.exp_file is not None:
            raise UsageError(f"one experiment file at a time (got '{opts.exp_file}' and '{arg}')")
        else:
            opts.exp_file = arg
    if opts.exp_file is None:
        return opts
    if not opts.log_dir:
        raise UsageError('--log_dir is empty')
    opts.log_dir = opts.log_dir.rstrip('/') or '/'
    if opts.max_running is not None:
        if not opts.slurm:
            raise UsageError('--max_running is for --slurm (the local queue runs one experiment per GPU)')
        if not re.fullmatch(r'[1-9][0-9]*', opts.max_running):
            raise UsageError(f"--max_running '{opts.max_running}' is not a positive number")
    if opts.slurm and opts.gpu_spec is not None:
        raise UsageError('--gpus picks GPUs of this machine; with --slurm ask SLURM for them '
                         '(--gpus-per-task N after --slurm)')
    return opts


# ---------------------------------------------------------------- GPUs, python, scripts

def gpu_list(spec, source):
    ids = spec.split(',')
    for gpu in ids:
        if not gpu:
            raise UsageError(f"{source} '{spec}' has an empty entry")
        if not re.fullmatch(r'[A-Za-z0-9:._-]+', gpu):
            raise UsageError(f"{source} '{spec}': '{gpu}' is not a GPU id (e.g. --gpus 0,1)")
    return ids


def nvidia_smi_gpus():
    try:
        out = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return re.findall(r'^GPU ([0-9]+):', out, re.M)


def gpu_slots(gpu_spec, env):
    """([GPU id per slot, '' for the CPU], where they came from): one running experiment per slot."""
    if gpu_spec == 'cpu':
        return [''], '--gpus cpu'
    if gpu_spec is not None:
        if not gpu_spec:
            raise UsageError('--gpus is empty (use --gpus cpu to run on the CPU)')
        return gpu_list(gpu_spec, '--gpus'), '--gpus'
    if 'CUDA_VISIBLE_DEVICES' in env:
        if not env['CUDA_VISIBLE_DEVICES']:
            return [''], 'CUDA_VISIBLE_DEVICES is empty'
        return gpu_list(env['CUDA_VISIBLE_DEVICES'], 'CUDA_VISIBLE_DEVICES'), 'from CUDA_VISIBLE_DEVICES'
    found = nvidia_smi_gpus()
    if found:
        return found, 'from nvidia-smi -L'
    return [''], 'no GPU found by nvidia-smi -L'


def slot_label(gpu):
    return f'GPU {gpu}' if gpu else 'CPU'


class Setup:
    """Where things are: the interpreter, the trainer, collect_results.py, the log folder."""

    def __init__(self, opts, plan, script_dir):
        self.opts, self.plan, self.script_dir = opts, plan, script_dir
        self.cwd = os.getcwd()
        here = os.path.realpath(script_dir) == os.path.realpath(self.cwd)
        self.searched = self.cwd if here else f'{self.cwd} or {script_dir}'
        venv = os.path.join(script_dir, '.venv', 'bin', 'python')
        if opts.python:
            self.python = opts.python
        elif os.environ.get('PYTHON'):
            self.python = os.environ['PYTHON']
        elif os.access(venv, os.X_OK):
            # Relative when we run from the repository root, so the printed commands stay short.
            self.python = '.venv/bin/python' if here else venv
        else:
            self.python = 'python'
        if opts.script:
            self.trainer_name, self.trainer_source = opts.script, '--script'
        elif plan.script:
            self.trainer_name = plan.script
            self.trainer_source = f"'# script:' on {plan.path}:{plan.script_line}"
        else:
            self.trainer_name, self.trainer_source = 'train_swin.py', 'the default'
        self.trainer = self.find_script(self.trainer_name)
        self.collect = self.find_script('collect_results.py')

    def find_script(self, name):
        """The copy in the current directory wins over the one next to run_experiments.sh, so a
        checkout's launcher can drive another working copy (and the tests a stub trainer)."""
        if os.path.isfile(name):
            return name
        path = os.path.join(self.script_dir, name)
        return path if os.path.isfile(path) else None

    def problem(self, text):
        """Fatal in a real run, a warning in a dry run."""
        if not self.opts.dry_run:
            raise UsageError(text)
        print(f'{PROG}: warning: {text}', file=sys.stderr)

    def check(self):
        if shutil.which(self.python) is None:
            self.problem(f"python '{self.python}' not found (use --python PATH or PYTHON=...)")
        if self.trainer is None:
            where = '' if os.path.isabs(self.trainer_name) else f' in {self.searched}'
            self.problem(f'training script {self.trainer_name} ({self.trainer_source}) not found{where}')
            self.trainer = self.trainer_name


_held_locks = []


def take_lock(log_dir):
    """Two runners on one log dir would run the same experiments twice; the lock is taken before
    the .done markers are read so the skip list is not stale. The kernel releases it at exit."""
    try:
        os.makedirs(log_dir, exist_ok=True)
    except OSError:
        raise UsageError(f'cannot create log dir {log_dir}') from None
    path = os.path.join(log_dir, '.run_experiments.lock')
    try:
        lock = open(path, 'a+', encoding='utf-8')   # not inherited by the trainers (PEP 446)
    except OSError:
        raise UsageError(f'cannot open {path}') from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        pid = lock.read().strip()
        raise UsageError(f'another {PROG} (pid {pid}) is running with --log_dir {log_dir}; stop it '
                         'first, or use another --log_dir') from None
    lock.seek(0)
    lock.truncate()
    lock.write(f'{os.getpid()}\n')
    lock.flush()
    _held_locks.append(lock)   # held open until this process exits


def pending_experiments(plan, log_dir, outcome):
    """(experiments without a .done marker, the 'skip ...' lines for the others)."""
    pending, skip_lines = [], []
    for exp in plan.experiments:
        done_file = os.path.join(log_dir, exp.name + '.done')
        if not os.path.exists(done_file):
            pending.append(exp)
            continue
        skip_lines.append(f'skip {exp.name} (finished)')
        # A marker records the flags it ran with: an edited line is pointed out, not run silently.
        try:
            with open(done_file, encoding='utf-8', errors='replace') as f:
                recorded = next((line[7:].rstrip('\n') for line in f if line.startswith('flags: ')), '')
        except OSError:
            recorded = ''
        if recorded and recorded != quote_words(exp.flags):
            skip_lines += [f"  note: {exp.name}'s flags in {plan.path} differ from the run recorded in",
                           f'  {done_file}; delete that file to run {exp.name} again']
        outcome[exp.name] = 'skipped'
    return pending, skip_lines


# ---------------------------------------------------------------- the local queue

def write_done(log_dir, exp, plan_path, seconds, device):
    """The marker a re-launch skips by; atomic: a crash leaves no half marker."""
    text = (f'name: {exp.name}\nexperiment_file: {plan_path}:{exp.line}\n'
            f'finished: {time.strftime("%Y-%m-%d %H:%M:%S")}\nseconds: {int(seconds)}\n'
            f'device: {device}\nflags: {quote_words(exp.flags)}\n')
    try:
        atomic_write_text(os.path.join(log_dir, exp.name + '.done'), text)
    except OSError:
        say(f'warning: cannot write {log_dir}/{exp.name}.done')


def end_log(log, text):
    """The runner's closing line, on a line of its own after a progress bar."""
    try:
        with open(log, 'ab+') as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b'\n':
                    f.write(b'\n')
            f.write(f'===== {PROG}: {text} =====\n'.encode('utf-8'))
    except OSError:
        pass


def log_tail(log, name, count=5):
    """The last lines of the latest attempt in `log`, progress bars unrolled."""
    try:
        with open(log, encoding='utf-8', errors='replace') as f:
            lines = f.read().replace('\r', '\n').split('\n')
    except OSError:
        return []
    header = f'===== {PROG}: {name}, '
    starts = [k for k, line in enumerate(lines) if line.startswith(header)]
    if starts:
        lines = lines[starts[-1] + 2:]   # after the header and its command line
    lines = [line[:200] for line in lines if line.strip()]
    return ['    | ' + line for line in lines[-count:]]


class Slot:
    def __init__(self, gpu, shared):
        self.gpu, self.shared = gpu, shared
        self.proc = self.exp = None
        self.t0 = 0.0

    @property
    def label(self):
        return slot_label(self.gpu)

    def env(self):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=self.gpu, PYTHONUNBUFFERED='1')
        env.pop(GPU_SHARED_ENV, None)
        if self.gpu:
            env[GPU_SHARED_ENV] = str(self.shared)
        return env

    def notice(self):
        return f', {GPU_SHARED_ENV}={self.shared}' if self.shared > 1 else ''


class Interrupted(Exception):
    def __init__(self, signame, status):
        super().__init__(signame)
        self.signame, self.status = signame, status


class Queue:
    def __init__(self, setup, slots, pending, outcome):
        self.setup, self.slots, self.pending, self.outcome = setup, slots, pending, outcome
        self.log_dir = setup.opts.log_dir
        self.failed_code = {}
        self.started = 0
        self.force_kill = False

    def command(self, exp):
        return [self.setup.python, self.setup.trainer, '--name', exp.name] + exp.flags

    def command_line(self, slot, exp):
        """The exact command, pasteable into a shell."""
        return f'CUDA_VISIBLE_DEVICES={quote_words([slot.gpu])} {quote_words(self.command(exp))}'

    def start(self, slot, exp):
        log = os.path.join(self.log_dir, exp.name + '.log')
        self.started += 1
        with open(log, 'a', encoding='utf-8') as f:
            f.write(f'===== {PROG}: {exp.name}, {slot.label}, started {time.strftime("%Y-%m-%d %H:%M:%S")} '
                    f'=====\n{self.command_line(slot, exp)}\n')
        with open(log, 'ab') as out:
            # Its own process group (session): a stop reaches its DataLoader workers too, and a
            # Ctrl-C at the terminal reaches only this launcher.
            slot.proc = subprocess.Popen(self.command(exp), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env=slot.env(), start_new_session=True)
        slot.exp, slot.t0 = exp, time.monotonic()
        say(f'start {exp.name} on {slot.label}{slot.notice()} ({self.started}/{len(self.pending)}), log {log}')

    def finish(self, slot):
        exp, rc = slot.exp, slot.proc.returncode
        rc = 128 - rc if rc < 0 else rc   # killed by signal N: 128+N, as a shell reports it
        seconds = time.monotonic() - slot.t0
        log = os.path.join(self.log_dir, exp.name + '.log')
        if rc == 0:
            write_done(self.log_dir, exp, self.setup.plan.path, seconds, slot.label)
            self.outcome[exp.name] = 'done'
            say(f'done {exp.name} on {slot.label} after {duration(seconds)}')
        else:
            self.outcome[exp.name] = 'failed'
            self.failed_code[exp.name] = rc
            say(f'FAILED {exp.name}: exit code {rc} after {duration(seconds)}, log {log}')
            for line in log_tail(log, exp.name):
                print(line)
        end_log(log, f'{exp.name} exit code {rc} after {duration(seconds)}')
        slot.proc = slot.exp = None

    def run(self):
        waiting = list(self.pending)
        while True:
            for slot in self.slots:
                if slot.proc is None and waiting:
                    self.start(slot, waiting.pop(0))
            running = [slot for slot in self.slots if slot.proc is not None]
            if not running:
                return
            time.sleep(0.1)
            for slot in running:
                if slot.proc.poll() is not None:
                    self.finish(slot)

    def stop(self):
        """TERM every running process group; KILL what is left after the grace period (or a
        second signal). Bounded: a zombie under a non-reaping init still 'exists'."""
        running = [slot for slot in self.slots if slot.proc is not None]
        for slot in running:
            signal_group(slot.proc.pid, signal.SIGTERM)
        deadline, killed = time.monotonic() + KILL_GRACE_S, False
        while True:
            for slot in running:
                slot.proc.poll()
            if not any(group_alive(slot.proc.pid) for slot in running):
                break
            if killed:
                if time.monotonic() >= deadline:
                    break
            elif self.force_kill or time.monotonic() >= deadline:
                for slot in running:
                    signal_group(slot.proc.pid, signal.SIGKILL)
                killed, deadline = True, time.monotonic() + 3
            time.sleep(0.1)
        for slot in running:
            try:
                slot.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
            name = slot.exp.name
            # Unless it had finished already and the signal landed while it was being booked.
            self.outcome.setdefault(name, 'interrupted')
            end_log(os.path.join(self.log_dir, name + '.log'),
                    f'{name} interrupted after {duration(time.monotonic() - slot.t0)}')
            slot.proc = None

    def summary(self, plan):
        groups = {key: [] for key in ('done', 'failed', 'skipped', 'interrupted', None)}
        for exp in plan.experiments:
            state = self.outcome.get(exp.name)
            if state == 'failed':
                groups['failed'].append(f'{exp.name} (exit {self.failed_code[exp.name]}, log '
                                        f'{self.log_dir}/{exp.name}.log)')
            else:
                groups[state].append(exp.name)
        counts = (f"{len(groups['done'])} done, {len(groups['failed'])} failed, "
                  f"{len(groups['skipped'])} skipped (finished before)")
        if groups['interrupted'] or groups[None]:
            counts += f", {len(groups['interrupted'])} interrupted, {len(groups[None])} not started"
        print(f'\n==== summary: {counts} ====')
        if groups['done']:
            print('done:        ' + ' '.join(groups['done']))
        for k, text in enumerate(groups['failed']):
            print(('failed:      ' if k == 0 else '             ') + text)
        if groups['skipped']:
            print('skipped:     ' + ' '.join(groups['skipped']))
        if groups['interrupted']:
            print(f"interrupted: {' '.join(groups['interrupted'])} (no .done written; a re-launch runs "
                  'them again)')
        if groups[None]:
            print('not started: ' + ' '.join(groups[None]))


def signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except OSError:
        pass


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except OSError:
        return True


def run_local(setup, plan, pending, skip_lines, outcome, gpu_spec):
    slot_gpus, source = gpu_slots(gpu_spec, os.environ)
    slots = [Slot(gpu, slot_gpus.count(gpu)) for gpu in slot_gpus]
    opts = setup.opts
    if not slot_gpus[0]:
        slots_text = f'CPU, one experiment at a time ({source})'
    else:
        slots_text = f"GPUs {','.join(slot_gpus)} ({source}), one experiment per GPU at a time"
        if any(slot.shared > 1 for slot in slots):
            slots_text += f'; runs that share a GPU get {GPU_SHARED_ENV}=<runs on it>'
    print(f'{PROG}: {plan.path}: {len(plan.experiments)} experiments, {len(pending)} to run, '
          f'{len(plan.experiments) - len(pending)} finished')
    print(f'{PROG}: {slots_text}')
    print(f'{PROG}: python {setup.python}, trainer {setup.trainer} ({setup.trainer_source}), '
          f'logs in {opts.log_dir}/')
    for line in skip_lines:
        print(line)
    queue = Queue(setup, slots, pending, outcome)
    if opts.dry_run:
        print('dry run: nothing is started. GPU shown as if all runs took equally long; in a real run')
        print('each experiment takes the first GPU that frees.')
        for n, exp in enumerate(pending):
            slot = slots[n % len(slots)]
            print(f'[{slot.label}] {exp.name}  (line {exp.line}, log {opts.log_dir}/{exp.name}.log'
                  f'{slot.notice()})')
            print(f'  {queue.command_line(slot, exp)}')
        return 0

    def on_signal(signum, _frame):
        names = {signal.SIGINT: ('INT', 130), signal.SIGTERM: ('TERM', 143), signal.SIGHUP: ('HUP', 129)}
        raise Interrupted(*names[signum])

    def force(_signum, _frame):
        queue.force_kill = True

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for sig in handled:
        signal.signal(sig, on_signal)
    try:
        queue.run()
    except Interrupted as stop:
        for sig in handled:
            signal.signal(sig, force)
        running = sum(slot.proc is not None for slot in slots)
        print()
        say(f'got SIG{stop.signame}: stopping {running} running experiment(s), waiting up to '
            f'{KILL_GRACE_S}s (Ctrl-C again to kill at once)')
        queue.stop()
        queue.summary(plan)
        return stop.status
    for sig in handled:
        signal.signal(sig, signal.SIG_DFL)

    queue.summary(plan)
    if setup.collect is None:
        print(f'note: collect_results.py not found in {setup.searched}; no results table')
    else:
        print(f'\n==== results ({setup.python} {setup.collect}) ====')
        try:
            rc = subprocess.run([setup.python, setup.collect], stdin=subprocess.DEVNULL).returncode
        except OSError:
            rc = 127
        if rc != 0:
            print(f'note: {setup.collect} failed (exit {rc}); no results table')
    return 1 if queue.failed_code else 0


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)
    argv = sys.argv[1:] if argv is None else argv
    # run_experiments.sh says where it lives; `python -m iqa.launch` alone: the folder above iqa/.
    script_dir = os.environ.get('IQA_LAUNCHER_DIR') or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        opts = parse_args(argv)
        if opts is None:
            print(USAGE, end='')
            return 0
        if opts.exp_file is None:
            print(USAGE, end='', file=sys.stderr)
            return 2
        plan = read_plan(opts.exp_file, PROG)
        setup = Setup(opts, plan, script_dir)
        setup.check()
        if not opts.dry_run:
            take_lock(opts.log_dir)
        outcome = {}   # name -> skipped | done | failed | interrupted; none: not started
        pending, skip_lines = pending_experiments(plan, opts.log_dir, outcome)
        if opts.slurm:
            from iqa.slurm_submit import submit
            return submit(setup, plan, pending, skip_lines)
        return run_local(setup, plan, pending, skip_lines, outcome, opts.gpu_spec)
    except (UsageError, PlanError) as e:
        print(f'{PROG}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    # Run the module as imported under its name, so iqa.slurm_submit raises the UsageError that
    # main() catches (under -m this file is also __main__, a second copy with its own classes).
    from iqa.launch import main as launch_main
    sys.exit(launch_main())
