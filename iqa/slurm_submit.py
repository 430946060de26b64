"""run_experiments.sh --slurm: the unfinished experiments of a plan as one SLURM job array.

One batch script (LOG_DIR/slurm/STEM.sbatch, filled in from iqa/slurm_batch.sh.template) whose
array task k runs the k-th unfinished experiment with the local queue's command, log and .done
marker; it is submitted with `sbatch --array=0-(n-1)[%N] [sbatch options]`. The task stops and
requeues itself on SIGUSR1 (sent SIGNAL_BEFORE_S before the time limit) and its next attempt
resumes the run's last.pkl (iqa/slurm_task.py finds the run folder).

GPUs: each task asks for one GPU (--gpus-per-task 1) unless the sbatch options ask for GPUs
themselves (--gpus-per-task, --gres gpu..., --gpus, --gpus-per-node) or sinfo lists no GPU on
the cluster (the partition of -p); `--gpus-per-task 0` asks for none (a CPU partition) and is not
passed on. More than one GPU per node, or more than one node, runs the trainer (train_swin.py or
train_clip.py, both data-parallel) under torchrun.
"""
import os
import re
import shutil
import string
import subprocess
import sys

from iqa import slurm_task
from iqa.files import atomic_write_text
from iqa.launch import KILL_GRACE_S, PROG, UsageError
from iqa.plan import quote_word, quote_words

# Seconds before the time limit at which SLURM sends SIGUSR1 to the batch script (unless the
# sbatch options set --signal): enough to stop the trainer and requeue, not to finish an epoch.
SIGNAL_BEFORE_S = 300
TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'slurm_batch.sh.template')
IQA_HOME = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_GPUS = 1


class BatchTemplate(string.Template):
    """`@@{name}` placeholders: the batch script is bash, full of `$` and single `@`."""
    delimiter = '@@'


class Request:
    """What the sbatch options ask for, per task."""

    def __init__(self):
        self.gpus = None         # GPUs per node; None: not asked, the default applies
        self.gpu_option = None   # the user's option that set it, as typed
        self.nodes = '1'
        self.signal_set = False
        self.partition = None
        self.passed = []         # the options sbatch gets


def _gpu_count(value, option):
    """The count of '[type:]N' (--gpus-per-task a100:2 -> 2)."""
    count = value.rsplit(':', 1)[-1]
    if not re.fullmatch(r'[0-9]+', count):
        raise UsageError(f"{option} '{value}' is not a GPU count")
    return int(count)


def _gres_gpus(value):
    """GPUs per node of a --gres list (gpu, gpu:2, gpu:a100:2, ...), None if it names no GPU."""
    counts = [(int(item.rsplit(':', 1)[1]) if re.search(r':[0-9]+$', item) else 1)
              for item in value.split(',') if item == 'gpu' or item.startswith('gpu:')]
    return sum(counts) if counts else None


def read_sbatch_options(options):
    request = Request()
    k = 0
    while k < len(options):
        option = options[k]
        name, eq, inline = option.partition('=')
        takes_value = not eq and name in ('--gpus-per-task', '--gpus-per-node', '--gpus', '-G', '--gres',
                                          '--nodes', '-N', '--partition', '-p')
        value = inline if eq else (options[k + 1] if takes_value and k + 1 < len(options) else '')
        step = 2 if takes_value else 1
        if name in ('--array', '-a') or (option.startswith('-a') and not option.startswith('--')):
            raise UsageError(f'{option}: {PROG} builds the job array itself (one task per experiment); '
                             'cap the tasks that run at once with --max_running N')
        if name == '--signal':
            request.signal_set = True
        elif name in ('--nodes', '-N') or re.fullmatch(r'-N.+', option):
            request.nodes = value if name in ('--nodes', '-N') else option[2:]
        elif name in ('--partition', '-p'):
            request.partition = value
        elif name in ('--gpus-per-task', '--gpus-per-node', '--gpus', '-G', '--gres'):
            gpus = _gres_gpus(value) if name == '--gres' else _gpu_count(value, name)
            if gpus is not None:
                request.gpus, request.gpu_option = gpus, ' '.join(options[k:k + step])
                if name == '--gpus-per-task' and gpus == 0:
                    k += step   # no GPU: said by not asking (sbatch may refuse a count of 0)
                    continue
        request.passed += options[k:k + step]
        k += step
    if not re.fullmatch(r'[1-9][0-9]*', request.nodes):
        raise UsageError(f"--nodes '{request.nodes}': each experiment needs a fixed number of nodes "
                         '(e.g. --nodes 2)')
    return request


def cluster_has_gpus(partition):
    """False when sinfo answers and lists no GPU (GRES) on the partition's nodes; True otherwise
    (no sinfo here, no answer: a dry run on a laptop shows the default for a GPU cluster)."""
    sinfo = shutil.which('sinfo')
    if not sinfo:
        return True
    command = [sinfo, '-h', '-o', '%G'] + (['-p', partition] if partition else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return True
    if done.returncode != 0 or not done.stdout.strip():
        return True
    return 'gpu' in done.stdout


def resolve_gpus(request):
    """GPUs per node of each task, the #SBATCH line that asks for them, and a text for the user."""
    nodes = int(request.nodes)
    line = ''
    if request.gpus is not None:
        gpus = request.gpus
        if request.gpu_option.startswith(('--gpus ', '--gpus=', '-G')):
            gpus //= nodes   # --gpus counts over the whole job
        text = f'{gpus * nodes} GPU(s) ({request.gpu_option})' if gpus else 'no GPU (--gpus-per-task 0)'
    elif nodes > 1:
        raise UsageError(f'--nodes {nodes}: a multi-node experiment runs torchrun on each node; give '
                         '--gpus-per-task N')
    elif cluster_has_gpus(request.partition):
        gpus = DEFAULT_GPUS
        line = f'#SBATCH --gpus-per-task={gpus}\n'
        text = f'{gpus} GPU (--gpus-per-task {gpus}, the default; --gpus-per-task 0 for none)'
    else:
        gpus = 0
        text = ('no GPU (sinfo lists none on this cluster' + (f"'s partition {request.partition}"
                if request.partition else '') + '; --gpus-per-task N asks anyway)')
    if nodes > 1 and gpus == 0:
        raise UsageError(f'--nodes {nodes}: a multi-node experiment runs torchrun on each node; give '
                         '--gpus-per-task N')
    if nodes > 1:
        text += f' on {nodes} nodes'
    return gpus, line, text


def queued_in_slurm(job):
    try:
        out = subprocess.run(['squeue', '-h', '-j', job, '-o', '%T'], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return bool(out.strip())


def to_submit(pending, log_dir):
    """(experiments to submit, lines about earlier submissions): those still in the SLURM queue
    from an earlier submission are not submitted twice."""
    submit, lines = [], []
    for exp in pending:
        task = slurm_task.read_task(os.path.join(log_dir, exp.name + '.task'))
        state, job = task.get('state'), task.get('job')
        if state in ('submitted', 'running', 'requeued') and job and queued_in_slurm(job):
            lines.append(f'skip {exp.name} (in the SLURM queue as {job}, {state})')
            continue
        if state == 'failed':
            lines.append(f"  {exp.name} failed last time ({job}): {task.get('reason') or ''}")
        if state in ('stopped', 'requeued', 'running'):
            lines.append(f'  {exp.name} was stopped last time ({job}): this task resumes its run')
        submit.append(exp)
    return submit, lines


def batch_script(setup, plan, submit, request, gpus, gpu_line, stem):
    log_dir, trainer = setup.opts.log_dir, setup.trainer
    default_output = os.path.join(os.path.dirname(trainer) or '.', 'checkpoints')
    tasks = []
    for k, exp in enumerate(submit):
        output_dir = exp.flag_value('--output_dir', default_output)
        # One case branch per array task: data (words quoted as bash's printf %q quotes them).
        tasks.append(f'    {k}) NAME={exp.name}; LINE={exp.line}; OUTPUT_DIR={quote_word(output_dir)}\n'
                     f'       FLAGS=({quote_words(exp.flags)}) ;;')
    # --ntasks as well as --ntasks-per-node: SLURM >= 23.11 refuses --gpus-per-task without a
    # task count (the trainer runs in the batch step, one per node).
    signal_line = '' if request.signal_set else f'#SBATCH --signal=B:USR1@{SIGNAL_BEFORE_S}\n'
    with open(TEMPLATE, encoding='utf-8') as f:
        template = BatchTemplate(f.read())
    return template.substitute(
        prog=PROG, plan_comment=' '.join(plan.path.split()), job_name=stem, log_dir_raw=log_dir,
        sbatch_lines=signal_line + gpu_line, plan=quote_word(plan.path), workdir=quote_word(os.getcwd()),
        python=quote_word(setup.python), script=quote_word(trainer), log_dir=quote_word(log_dir),
        task_python=quote_word(sys.executable), iqa_home=quote_word(IQA_HOME), gpus=gpus,
        nodes=request.nodes, kill_grace_s=KILL_GRACE_S, tasks='\n'.join(tasks))


def submit(setup, plan, pending, skip_lines):
    """Submit the job array (or print it with --dry-run); the launcher's exit status."""
    opts = setup.opts
    log_dir = opts.log_dir
    request = read_sbatch_options(opts.sbatch_opts)
    if re.search(r'\s', log_dir):
        raise UsageError(f"--log_dir '{log_dir}': no spaces with --slurm (#SBATCH lines)")
    gpus, gpu_line, asks_for = resolve_gpus(request)
    submit_list, queued_lines = to_submit(pending, log_dir)

    stem = os.path.basename(plan.path)
    stem = stem.rsplit('.', 1)[0] if '.' in stem else stem
    stem = re.sub(r'[^A-Za-z0-9_.+-]', '_', stem)
    hint = f"{setup.python} {setup.collect or 'collect_results.py'}"
    if log_dir != 'logs/experiments':
        hint += f' --tasks_dir {log_dir}'
    print(f'{PROG}: {plan.path}: {len(plan.experiments)} experiments, {len(submit_list)} to submit, '
          f'{len(plan.experiments) - len(pending)} finished')
    print(f'{PROG}: python {setup.python}, trainer {setup.trainer} ({setup.trainer_source}), logs in {log_dir}/')
    for line in skip_lines + queued_lines:
        print(line)
    if not submit_list:
        print(f'nothing to submit; the results table: {hint}')
        return 0
    print(f'{PROG}: each task asks for {asks_for}')
    script_text = batch_script(setup, plan, submit_list, request, gpus, gpu_line, stem)
    array = f'0-{len(submit_list) - 1}' + (f'%{opts.max_running}' if opts.max_running else '')
    script_file = f'{log_dir}/slurm/{stem}.sbatch'
    if opts.dry_run:
        print('dry run: nothing is submitted. The command, then the batch script:')
        print('  ' + quote_words(['sbatch', f'--array={array}'] + request.passed + [script_file]))
        for k, exp in enumerate(submit_list):
            print(f'  task {k}: {exp.name} (line {exp.line}, log {log_dir}/{exp.name}.log), asks for {asks_for}')
        print(f'----- {script_file} -----')
        print(script_text, end='')
        return 0
    if shutil.which('sbatch') is None:
        raise UsageError("sbatch not found: --slurm needs SLURM's commands on PATH")
    try:
        os.makedirs(os.path.dirname(script_file), exist_ok=True)
        atomic_write_text(script_file, script_text)
    except OSError:
        raise UsageError(f'cannot write {script_file}') from None
    done = subprocess.run(['sbatch', '--parsable', f'--array={array}'] + request.passed + [script_file],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = done.stdout.strip()
    if done.returncode != 0:
        print(out, file=sys.stderr)
        raise UsageError(f'sbatch refused the job array (exit {done.returncode}); the batch script is '
                         f'{script_file}')
    job_id = out.splitlines()[-1].split(';')[0] if out else ''
    if not re.fullmatch(r'[0-9]+', job_id):
        raise UsageError(f"sbatch printed '{out}', not a job id")
    for k, exp in enumerate(submit_list):
        try:
            slurm_task.submitted(os.path.join(log_dir, exp.name + '.task'), f'{job_id}_{k}', exp.name)
        except OSError:
            print(f'{PROG}: warning: cannot write {log_dir}/{exp.name}.task', file=sys.stderr)
        print(f'task {job_id}_{k}: {exp.name} (log {log_dir}/{exp.name}.log)')
    print(f'submitted job array {job_id} ({array}) from {script_file}')
    print(f'watch: squeue -j {job_id}; when it is done: {hint}  (and run this again to')
    print('submit what did not finish; finished experiments are skipped)')
    return 0
