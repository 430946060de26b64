"""The run folder, written by this module only: its name, config.json, metrics.csv, summary.json,
and finding it again for --resume.

A run folder <output_dir>/<run name>/ holds RUN_FILES plus the checkpoints (iqa.ckpt) and, in a
multi-round run, round<k>/ folders of checkpoints. It is created only once the run's data passed
its check (`make_run_dir`), so a run that fails before its first epoch leaves nothing behind.
No torch and no numpy here: the SLURM launcher imports this module on login nodes.
"""
import csv
import datetime
import glob
import math
import os
import statistics
import subprocess
import time

from iqa.files import atomic_write_csv, atomic_write_json

RUN_FILES = ('config.json', 'metrics.csv', 'summary.json')
METRICS_NAME = 'metrics.csv'
CLIP_HEAD_METRICS = ('srcc_q', 'plcc_q', 'krcc_q', 'srcc_c', 'plcc_c', 'krcc_c')


def swin_metric_columns(cross_tests=('spaq',)):
    """metrics.csv columns of train_swin.py: a cross-test set adds <name>_srcc, <name>_plcc."""
    return (['round', 'epoch', 'lr_backbone', 'lr_head', 'train_loss', 'train_srcc',
             'val_srcc', 'val_plcc', 'val_krcc', 'test_srcc', 'test_plcc', 'test_krcc']
            + [f'{name}_{m}' for name in cross_tests for m in ('srcc', 'plcc')]
            + ['epoch_seconds', 'train_patches_per_s', 'is_best'])


# metrics.csv columns: train_clip.py has one set of metrics per head (_q quality, _c consistency)
SWIN_METRIC_COLUMNS = tuple(swin_metric_columns())
CLIP_METRIC_COLUMNS = (
    ('round', 'epoch', 'lr_backbone', 'lr_head', 'train_loss', 'train_loss_q', 'train_loss_c', 'train_loss_exp')
    + tuple(f'val_{m}' for m in CLIP_HEAD_METRICS) + tuple(f'test_{m}' for m in CLIP_HEAD_METRICS)
    + ('c_base_alpha', 'c_base_beta', 'epoch_seconds', 'train_images_per_s', 'is_best'))


def new_row(columns):
    """An empty metrics.csv row: every column present (None = empty cell), in the file's order."""
    return dict.fromkeys(columns)


def row_columns(rows):
    """The columns of `rows`: every key, in the order of first appearance."""
    return list(dict.fromkeys(k for row in rows for k in row))


def write_metrics(run_dir, rows, name=METRICS_NAME):
    """metrics.csv (or another per-epoch CSV) of the run, whole, with columns from the rows' keys."""
    atomic_write_csv(os.path.join(run_dir, name), row_columns(rows), rows)


def read_metrics(run_dir, upto):
    """metrics.csv rows of the epochs up to and including `upto` = (round, epoch), for --resume:
    the epochs a last.pkl saw, not those of a later, unsaved epoch."""
    path = os.path.join(run_dir, METRICS_NAME)
    if not os.path.exists(path):
        return []
    with open(path, newline='') as f:
        return [row for row in csv.DictReader(f) if (int(row['round']), int(row['epoch'])) <= tuple(upto)]


def write_config(run_dir, config):
    atomic_write_json(os.path.join(run_dir, 'config.json'), config)


def write_summary(run_dir, head, state, best, status, median_of, tail=()):
    """summary.json: `head` (the trainer's fields), the best epoch and the rounds, the median over
    the rounds of each test metric in `median_of` (median_test_<m>), the training time, `tail`
    and the best checkpoint. A running round's best counts as a round."""
    rounds = list(state['rounds']) + ([best] if status == 'running' and best else [])
    summary = dict(head)
    summary.update(status=status, best_epoch=best['epoch'] if best else None, best=best, rounds=state['rounds'])
    for m in median_of:
        values = [r[f'test_{m}'] for r in rounds if r and r.get(f'test_{m}') is not None]
        summary[f'median_test_{m}'] = float(statistics.median(values)) if values else None
    summary['train_seconds'] = round(time.time() - state['start_time'] + state.get('seconds_before', 0.0), 1)
    summary.update(tail)
    summary['best_checkpoint'] = best.get('checkpoint') if best else None
    atomic_write_json(os.path.join(run_dir, 'summary.json'), summary)


# --------------------------------------------------------------------------- names

def run_name(dataset, ranking_loss_alpha, when):
    """'<dataset>-swin[-ranking-alpha<A>]_<YYYYmmdd_HHMMSS>', the user's run-folder names.

    The alpha part only appears when alpha > 0 and uses '%g' (0.3 -> '0.3', 1.0 -> '1'), so
    the folders of old and new runs sort and grep the same way.
    """
    if not dataset or not isinstance(dataset, str) or os.sep in dataset or '/' in dataset:
        raise ValueError(f'dataset must be a non-empty name without "/", got {dataset!r}')
    alpha = float(ranking_loss_alpha)
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f'ranking_loss_alpha must be a finite number >= 0, got {ranking_loss_alpha!r}')
    if not isinstance(when, datetime.datetime):
        raise ValueError(f'when must be a datetime.datetime, got {type(when).__name__}')
    name = f'{dataset}-swin'
    if alpha > 0:
        name += '-ranking-alpha%g' % alpha
    return name + when.strftime('_%Y%m%d_%H%M%S')


def code_version(folder=None):
    """`git describe --always --dirty` of the scripts' folder, or 'unknown'.

    Saved in config.json and every checkpoint so a result can be traced to the code that made it;
    '-dirty' flags uncommitted changes. 'unknown' when git is missing, the folder is not a repo,
    or the repo has no commit yet; it never fails a run.
    """
    folder = folder or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=folder,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return 'unknown'
    version = out.stdout.strip()
    if out.returncode != 0 or not version:
        return 'unknown'
    return version


def make_run_dir(output_dir, run_name):
    """Create the run's folder and return (run_dir, run_name); a name already taken (two runs
    started in the same second, one per GPU) gets a _2, _3 ... suffix instead of sharing it.
    Call it once the data check passed: a run that stops earlier leaves no folder."""
    base, suffix = run_name, 1
    while True:
        run_dir = os.path.join(output_dir, run_name)
        try:
            os.makedirs(run_dir)
            return run_dir, run_name
        except FileExistsError:
            suffix += 1
            run_name = f'{base}_{suffix}'


# --------------------------------------------------------------------------- resume

def find_resume_file(path, flag='--resume'):
    """The last.pkl to resume from: `path` itself, or in a run folder its last.pkl (a
    multi-round run keeps one per round in round<k>/: the newest). Stops with a message that
    names `flag` when there is none (a run folder holds last.pkl after its first epoch)."""
    ckpt_path = path
    if os.path.isdir(path):
        candidates = glob.glob(os.path.join(path, 'last.pkl')) + glob.glob(os.path.join(path, 'round*', 'last.pkl'))
        ckpt_path = max(candidates, key=os.path.getmtime) if candidates else os.path.join(path, 'last.pkl')
    if not os.path.exists(ckpt_path):
        raise SystemExit(f'{flag} {path}: {ckpt_path} does not exist (a run folder holds last.pkl '
                         'after its first epoch)')
    return ckpt_path


def resume_args(args, parser, stored, machine_flags, resume_flag):
    """Turn `args` into the resumed run's: its stored configuration, except the flags that describe
    the machine (`machine_flags`), which may change between attempts. Returns the experiment
    flags given now that differ from the run's: they are ignored, and the caller says so."""
    given = {k: v for k, v in vars(args).items() if k in machine_flags and v != parser.get_default(k)}
    ignored = sorted(k for k, v in vars(args).items() if k not in machine_flags and k != resume_flag
                     and v != parser.get_default(k) and stored.get(k) != v)
    for key in list(vars(args)):
        if key in stored:
            setattr(args, key, stored[key])
    for key, value in given.items():
        setattr(args, key, value)
    return ignored


def resumed_run_dir(ckpt_path, train_test_num):
    """The run folder a last.pkl belongs to (round<k>/last.pkl of a multi-round run: its parent)."""
    run_dir = os.path.dirname(os.path.abspath(ckpt_path))
    if os.path.basename(run_dir).startswith('round') and train_test_num > 1:
        run_dir = os.path.dirname(run_dir)
    return run_dir


def resumed_run(ckpt_path, train_test_num):
    """(run folder, run name) of the run a last.pkl belongs to."""
    run_dir = resumed_run_dir(ckpt_path, train_test_num)
    return run_dir, os.path.basename(run_dir)


def resume_rounds(resume, state, log):
    """Set up `state` for a resumed run from its last.pkl; returns the first round to run.

    A round that had ended (early stop or its last epoch: 'round_complete') is counted as done and
    the run goes on with the next one; otherwise the round continues after the saved epoch
    (state['resume_checkpoint']). The rows of metrics.csv up to the saved epoch are kept."""
    state['rounds'] = list(resume.get('rounds') or [])
    first_round = resume['round']
    if resume.get('round_complete'):
        state['rounds'].append(resume['best'])
        first_round += 1
        log(f'Round {resume["round"]} had ended at epoch {resume["epoch"]}; resuming with round {first_round}')
    else:
        state['resume_checkpoint'] = resume
    state['seconds_before'] = float(resume.get('train_seconds') or 0.0)
    return first_round
