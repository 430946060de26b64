"""Reading training runs: the run folders train_swin.py and train_clip.py write
(`checkpoints/<run_name>/` with config.json, metrics.csv, summary.json) and the user's old log
files, turned into one result row per run, and the flags in which two runs differ.

    find_runs(specs)          run folders and logs named by paths, run names or experiment names
    load_run(path)            one run: config, summary, per-epoch rows, status
    run_result(run)           its result row (RESULT_COLUMNS): best epoch, val/test correlations
    best_row(rows)            the epoch the trainer kept, and the split it was selected on
    config_diff(c, base)      'key=value ...' for the flags that differ from a baseline
    pick_baseline(runs, spec) the run a --baseline names

collect_results.py (the table) and plot_training_curve.py (the figures) both read runs here, so
the table and the figures see a run the same way. Reading is strict: a truncated or hand-edited
file fails with its name, row and column.
"""
import csv
import io
import json
import math
import os
import re
import statistics
import sys

from iqa.runs import CLIP_METRIC_COLUMNS, RUN_FILES, SWIN_METRIC_COLUMNS

# The per-epoch CSVs of the two trainers and the files of a run folder: iqa.runs owns them. Reading
# is by name, so a later column added at the end does not break us; a run is read as a CLIP run
# when its metrics.csv has CLIP_METRICS_COLUMNS (one set of metrics per head, _q and _c).
METRICS_COLUMNS = SWIN_METRIC_COLUMNS
CLIP_METRICS_COLUMNS = CLIP_METRIC_COLUMNS

# Config keys that say where or how a run was bookkept, not what was trained; two runs that differ
# only here are the same experiment. Keys ending in these suffixes are paths, ignored likewise.
BOOKKEEPING_KEYS = {'command', 'run_name', 'code_version', 'name', 'resume', 'num_workers'}
PATH_SUFFIXES = ('_dir', '_path', '_root', '_file')

# A run's result row: what collect_results.py's table shows and its CSV holds, in order.
RESULT_COLUMNS = (
    'run', 'differs', 'status', 'best_epoch', 'epochs_done', 'rounds', 'select_on',
    'val_srcc', 'val_plcc', 'test_srcc', 'test_srcc_lo', 'test_srcc_hi',
    'test_plcc', 'test_plcc_lo', 'test_plcc_hi', 'test_krcc', 'spaq_srcc', 'spaq_plcc',
    'median_test_srcc', 'median_test_plcc', 'train_seconds', 'train_patches_per_s',
    # CLIP runs (train_clip.py): both heads; the single-score columns above stay empty for them
    'val_srcc_q', 'val_srcc_c', 'test_srcc_q', 'test_srcc_q_lo', 'test_srcc_q_hi', 'test_plcc_q',
    'test_srcc_c', 'test_srcc_c_lo', 'test_srcc_c_hi', 'test_plcc_c', 'median_test_srcc_q',
    'median_test_srcc_c', 'train_images_per_s',
    'run_name', 'path',
)
CLIP_RESULT_KEYS = RESULT_COLUMNS[RESULT_COLUMNS.index('val_srcc_q'):RESULT_COLUMNS.index('run_name')]

NUMBER = r'[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)'


class RunReadError(Exception):
    """A run folder or log that cannot be read; the message names the file (and row/column)."""


def is_nan(value):
    """None or NaN: a value the run does not have."""
    return value is None or (isinstance(value, float) and math.isnan(value))


# ---------------------------------------------------------------------------------------------
# Reading one run


def read_json(path):
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise RunReadError(f'{path}: not valid JSON ({e})') from None


def read_metrics_csv(path):
    """Rows of a run's metrics.csv (train_swin.py's or train_clip.py's) as dicts of numbers (NaN
    for an empty cell).

    Strict on purpose: a truncated or hand-edited file should fail here with the row and column,
    not turn into a silently wrong curve in a paper figure.
    """
    if not os.path.isfile(path):
        raise RunReadError(f'{path}: no such file')
    with open(path, newline='', encoding='utf-8') as f:
        text = f.read()
    if not text.strip():
        raise RunReadError(f'{path}: file is empty '
                           f'(expected the header {",".join(METRICS_COLUMNS)})')
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader)]
    columns = CLIP_METRICS_COLUMNS if 'test_srcc_q' in header else METRICS_COLUMNS
    missing = [c for c in columns if c not in header]
    if missing:
        raise RunReadError(f'{path}: header lacks column(s) {", ".join(missing)}; '
                           f'got {",".join(header)}')
    rows = []
    for line_no, cells in enumerate(reader, start=2):
        if not cells:  # a blank line, e.g. a trailing newline
            continue
        if len(cells) != len(header):
            raise RunReadError(f'{path} line {line_no}: {len(cells)} cells, '
                               f'header has {len(header)}')
        row = {}
        for name, cell in zip(header, cells):
            cell = cell.strip()
            if name in ('round', 'epoch', 'is_best'):
                if not cell.isdigit() or (name == 'is_best' and cell not in ('0', '1')):
                    expected = '0 or 1' if name == 'is_best' else 'a whole number'
                    raise RunReadError(f'{path} line {line_no} column {name!r}: '
                                       f'{cell!r} is not {expected}')
                row[name] = int(cell)
            elif cell == '':
                row[name] = float('nan')
            else:
                try:
                    row[name] = float(cell)
                except ValueError:
                    raise RunReadError(f'{path} line {line_no} column {name!r}: '
                                       f'{cell!r} is not a number') from None
        rows.append(row)
    return rows


# Lines of the form "Learning Rate:   5e-07" that later versions of the user's train_swin.py
# printed before training; enough to place an old log in an lr sweep or a model-size plot.
OLD_LOG_CONFIG_KEYS = {
    'dataset': 'dataset', 'model size': 'model_size', 'epochs': 'epochs',
    'batch size': 'batch_size', 'learning rate': 'lr', 'weight decay': 'weight_decay',
    'ranking loss alpha': 'ranking_loss_alpha',
    'drop path rate': 'drop_path_rate', 'dropout rate': 'dropout_rate',
    'train patch num': 'train_patch_num', 'test patch num': 'test_patch_num',
    'lr scheduler': 'lr_scheduler', 'attention fusion': 'attention_fusion',
}
_CONFIG_LINE_RE = re.compile(r'^\s*([A-Za-z][A-Za-z ]*?)\s*:\s+(\S+)\s*$')
_ROUND_RE = re.compile(r'^Round (\d+)\s*$')
_LOSS_RE = re.compile(rf'^({NUMBER})\s*(?:\(L1:\s*{NUMBER},\s*Rank:\s*{NUMBER}\))?$')
_LR_RE = re.compile(rf'Learning rates: HyperNet=({NUMBER}), Backbone=({NUMBER})')
_BEST_RE = re.compile(rf'Best test SRCC\s+({NUMBER}),?\s+PLCC\s+({NUMBER})')


def _scalar(text):
    """'5e-07' -> 5e-07, '32' -> 32, 'True'/'ENABLED' -> True, anything else stays a string."""
    low = text.lower()
    if low in ('true', 'yes', 'enabled'):
        return True
    if low in ('false', 'no', 'disabled'):
        return False
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _epoch_line(line):
    """(epoch, loss, train_srcc, test_srcc, test_plcc, spaq_srcc, spaq_plcc) or None.

    The user's solver printed one tab-separated line per epoch: epoch, loss (with
    "(L1:..,Rank:..)" when the ranking loss was on), train SRCC, test SRCC, test PLCC, and the
    SPAQ SRCC/PLCC when SPAQ was tested.
    """
    parts = [p.strip() for p in line.split('\t') if p.strip()]
    if len(parts) not in (5, 7) or not parts[0].isdigit():
        return None
    loss = _LOSS_RE.match(parts[1])
    if not loss:
        return None
    try:
        values = [float(p) for p in parts[2:]]
    except ValueError:
        return None
    values += [float('nan')] * (5 - len(values))
    return (int(parts[0]), float(loss.group(1)), *values)


def parse_old_log(path):
    """Per-epoch rows (same keys as metrics.csv) and what else an old training log tells.

    The learning rates an old log prints after epoch t are those set by the scheduler for epoch
    t+1, so they are stored on the next epoch's row; the first epoch's rates are not in the log.
    Those rates were printed with 6 decimals, so rates below 1e-6 read as 0 and are dropped.
    """
    if not os.path.isfile(path):
        raise RunReadError(f'{path}: no such file')
    rows, config, round_best = [], {}, {}
    round_num, last_epoch, pending_lr = 1, 0, None
    early_stop_rounds, crashed = set(), False
    # Text mode turns tqdm's carriage returns into line ends, so progress bars are separate lines.
    with open(path, encoding='utf-8', errors='replace') as f:
        for line in f:
            line = line.rstrip('\n')
            m = _ROUND_RE.match(line)
            if m:
                round_num, last_epoch, pending_lr = int(m.group(1)), 0, None
                continue
            epoch = _epoch_line(line)
            if epoch:
                if epoch[0] <= last_epoch:  # epochs restarted without a "Round" line
                    round_num, pending_lr = round_num + 1, None
                last_epoch = epoch[0]
                lr_head, lr_backbone = pending_lr or (float('nan'), float('nan'))
                pending_lr = None
                row = {c: float('nan') for c in METRICS_COLUMNS}
                row.update(round=round_num, epoch=epoch[0], lr_head=lr_head,
                           lr_backbone=lr_backbone, train_loss=epoch[1], train_srcc=epoch[2],
                           test_srcc=epoch[3], test_plcc=epoch[4], spaq_srcc=epoch[5],
                           spaq_plcc=epoch[6], is_best=0)
                rows.append(row)
                continue
            m = _LR_RE.search(line)
            if m:
                pending_lr = tuple(float(v) if float(v) > 0 else float('nan') for v in m.groups())
                continue
            m = _BEST_RE.search(line)
            if m:
                round_best[round_num] = (float(m.group(1)), float(m.group(2)))
                continue
            if 'Early stopping triggered' in line:
                early_stop_rounds.add(round_num)
            elif line.startswith('Traceback (most recent call last)'):
                crashed = True
            elif not rows:
                m = _CONFIG_LINE_RE.match(line)
                key = OLD_LOG_CONFIG_KEYS.get(m.group(1).strip().lower()) if m else None
                if key and key not in config:
                    config[key] = _scalar(m.group(2))
    # The user's solver kept the epoch with the highest test SRCC so far (strictly higher).
    best_so_far = {}
    for row in rows:
        if row['test_srcc'] > best_so_far.get(row['round'], -math.inf):
            best_so_far[row['round']] = row['test_srcc']
            row['is_best'] = 1
    last_round = rows[-1]['round'] if rows else round_num
    if crashed:
        status = 'crashed'
    elif last_round in round_best:
        status = 'stopped_early' if last_round in early_stop_rounds else 'finished'
    else:
        status = 'incomplete'
    return {'rows': rows, 'config': config, 'round_best': round_best, 'status': status}


def _sibling_log(run_dir, run_name, config):
    """The run's console log: `<log_dir>/<run_name>.log`, log_dir being relative to where
    train_swin.py was started, which is normally the folder above checkpoints/."""
    log_dir = config.get('log_dir') or 'logs'
    workdir = os.path.dirname(os.path.dirname(os.path.abspath(run_dir)))
    for candidate in (os.path.join(workdir, log_dir, run_name + '.log'),
                      os.path.join(log_dir, run_name + '.log')):
        if os.path.isfile(candidate):
            return candidate
    return None


def _log_shows_crash(log_path):
    with open(log_path, 'rb') as f:
        f.seek(max(0, os.path.getsize(log_path) - 65536))
        return b'Traceback (most recent call last)' in f.read()


def load_run(path):
    """One run as a dict: path, run_name, label, config, summary (or None), rows, source, status.

    `path` is a run folder or an old log file. The label is the experiment's `name` when one was
    given, else the run name, so figures and tables say "E3" rather than a timestamp when they can.
    """
    if os.path.isfile(path):
        log = parse_old_log(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        label = str(log['config'].get('name') or stem)
        return {'path': path, 'run_name': stem, 'label': label, 'config': log['config'],
                'summary': None, 'rows': log['rows'], 'source': 'log', 'status': log['status'],
                'log': log}
    files = {name: os.path.join(path, name) for name in RUN_FILES}
    if not any(os.path.isfile(p) for p in files.values()):
        raise RunReadError(f'{path}: not a run folder (none of {", ".join(RUN_FILES)} in it)')
    config = read_json(files['config.json']) if os.path.isfile(files['config.json']) else {}
    summary = read_json(files['summary.json']) if os.path.isfile(files['summary.json']) else None
    rows = read_metrics_csv(files['metrics.csv']) if os.path.isfile(files['metrics.csv']) else []
    run_name = (config.get('run_name') or (summary or {}).get('run_name')
                or os.path.basename(os.path.normpath(path)))
    status = (summary or {}).get('status') or 'incomplete'
    if status in ('running', 'incomplete'):
        log_path = _sibling_log(path, run_name, config)
        if log_path and _log_shows_crash(log_path):
            status = 'crashed'
        task_path = os.path.join(path, 'slurm_task.json')
        if os.path.isfile(task_path):
            status = slurm_status(read_json(task_path), status)
    return {'path': path, 'run_name': run_name, 'label': str(config.get('name') or run_name),
            'config': config, 'summary': summary, 'rows': rows, 'source': 'metrics.csv',
            'status': status}


def slurm_status(task, status):
    """The status of a run that has not finished, told by the SLURM array task that ran it
    (the slurm_task.json run_experiments.sh --slurm keeps): which task, and why it failed when
    its log says."""
    if not isinstance(task, dict) or not task.get('state'):
        return status
    job, state = task.get('job') or '?', task['state']
    if state == 'failed':
        return f'failed (SLURM task {job}: {task.get("reason") or "exit code " + str(task.get("exit_code"))})'
    if state == 'stopped':
        return f'stopped (SLURM task {job}: cancelled, pre-empted or out of time; resubmit to resume)'
    if state == 'requeued':
        return f'requeued (SLURM task {job}, resumes from last.pkl)'
    if state in ('running', 'submitted'):
        return f'{status} (SLURM task {job})'
    return status


def failed_task_rows(tasks_dir, listed_paths):
    """Rows for SLURM array tasks that failed or were stopped without a run folder in the table
    (a bad flag or missing data stops a run before it writes one), from tasks_dir/NAME.task."""
    rows = []
    if not os.path.isdir(tasks_dir):
        return rows
    listed = {os.path.realpath(p) for p in listed_paths}
    for file_name in sorted(os.listdir(tasks_dir)):
        if not file_name.endswith('.task'):
            continue
        try:
            task = read_json(os.path.join(tasks_dir, file_name))
        except (RunReadError, OSError):
            continue
        if not isinstance(task, dict) or task.get('state') not in ('failed', 'stopped'):
            continue
        run_dir = task.get('run_dir')
        if run_dir and os.path.realpath(run_dir) in listed:
            continue  # its row already says so
        name = task.get('experiment') or file_name[:-len('.task')]
        if os.path.exists(os.path.join(tasks_dir, name + '.done')):
            continue  # finished later (run again, here or on the cluster)
        rows.append({k: float('nan') for k in RESULT_COLUMNS} | {
            'run': name, 'differs': '', 'status': slurm_status(task, 'failed'), 'best_epoch': None,
            'epochs_done': 0, 'rounds': 0, 'select_on': '', 'run_name': '',
            'path': os.path.join(tasks_dir, name + '.log')})
    return rows


def is_run_dir(path):
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in RUN_FILES)


def _log_or_its_run(log_path, default_parent):
    """A log whose run folder exists (`logs/X.log` and `checkpoints/X/`) is read from the folder:
    its CSV is exact where the log is rounded."""
    stem = os.path.splitext(os.path.basename(log_path))[0]
    run_dir = os.path.join(os.path.dirname(os.path.abspath(log_path)), '..', default_parent, stem)
    return os.path.normpath(run_dir) if is_run_dir(run_dir) else log_path


def _run_named(name, default_parent):
    """The run folder under `default_parent` whose config.json has `"name": name` (the newest,
    by run name, if the experiment was run more than once)."""
    matches = []
    if os.path.isdir(default_parent):
        for child in sorted(os.listdir(default_parent)):
            config_path = os.path.join(default_parent, child, 'config.json')
            if os.path.isfile(config_path):
                try:
                    config = read_json(config_path)
                except RunReadError:
                    continue  # reported when that run itself is read
                if isinstance(config, dict) and config.get('name') == name:
                    matches.append(os.path.join(default_parent, child))
    if not matches:
        raise RunReadError(f'{name}: no run folder, folder of runs or log file there, and no run '
                           f'in {default_parent}/ has that name or --name')
    if len(matches) > 1:
        print(f'note: {len(matches)} runs are named {name}; using the newest, {matches[-1]} '
              f'(others: {", ".join(matches[:-1])})', file=sys.stderr)
    return matches[-1]


def find_runs(specs, default_parent='checkpoints'):
    """Paths of runs named by `specs`: run folders, folders holding run folders or *.log files,
    log files, or run names or experiment names (`--name`) of runs under checkpoints/. No specs:
    every run folder in checkpoints/.
    A run named twice (its folder and its log) is listed once.
    """
    paths, skipped = [], []
    for spec in specs or [default_parent]:
        if os.path.isfile(spec):
            paths.append(_log_or_its_run(spec, default_parent))
        elif is_run_dir(spec):
            paths.append(spec)
        elif os.path.isdir(spec):
            for child in sorted(os.listdir(spec)):
                child_path = os.path.join(spec, child)
                if is_run_dir(child_path):
                    paths.append(child_path)
                elif child.endswith('.log') and os.path.isfile(child_path):
                    paths.append(_log_or_its_run(child_path, default_parent))
                elif os.path.isdir(child_path):
                    skipped.append(child_path)
        elif is_run_dir(os.path.join(default_parent, spec)):
            paths.append(os.path.join(default_parent, spec))
        elif not specs:
            raise RunReadError(f'no {default_parent}/ folder in {os.getcwd()}: run this where '
                               'train_swin.py ran, or name run folders or logs')
        else:
            paths.append(_run_named(spec, default_parent))
    if skipped:
        print(f'note: skipped {len(skipped)} folder(s) without {"/".join(RUN_FILES)} '
              f'(old runs? pass their logs/*.log instead): {", ".join(skipped)}', file=sys.stderr)
    if not paths:
        raise RunReadError(f'no runs found in {", ".join(specs or [default_parent])}')
    unique, seen = [], set()
    for path in paths:
        if os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            unique.append(path)
    return unique


# ---------------------------------------------------------------------------------------------
# One run's result


def is_clip_rows(rows):
    return bool(rows) and 'test_srcc_q' in rows[0]


def best_row(rows):
    """(row, select_on) for the epoch the trainer kept: its is_best rows, the one highest on the
    selection metric (val SRCC when the run had a val split, else test SRCC). A CLIP run selects
    on a mix of its heads (its --select_on), so its last is_best row is the one kept."""
    if not rows:
        return None, ''
    if is_clip_rows(rows):
        select_on = 'val' if any(not is_nan(r['val_srcc_q']) for r in rows) else 'test'
        return ([r for r in rows if r['is_best']] or rows)[-1], select_on
    select_on = 'val' if any(not is_nan(r['val_srcc']) for r in rows) else 'test'
    key = select_on + '_srcc'
    candidates = [r for r in rows if r['is_best']] or rows
    scored = [r for r in candidates if not is_nan(r[key])]
    if not scored:
        return candidates[-1], select_on
    return max(scored, key=lambda r: r[key]), select_on


def run_result(run):
    """The table row of one run (numbers as floats, NaN where unknown; 'differs' left empty).

    A finished run is described by its summary.json; one without a summary (running, crashed, an
    old log) by the best epoch so far in its rows.
    """
    if is_clip_rows(run['rows']) or (run['summary'] or {}).get('system') == 'clip':
        return clip_run_result(run)
    summary = run['summary'] or {}
    rows = run['rows']
    row, select_on = best_row(rows)
    best, best_epoch = dict(summary.get('best') or {}), summary.get('best_epoch')
    if not best and row:  # no summary yet, or a diverged run's summary without a best
        best = {k: row[k] for k in ('val_srcc', 'val_plcc', 'test_srcc', 'test_plcc', 'test_krcc')}
        best_epoch = row['epoch']
    if not best and run['source'] == 'log' and run['log']['round_best']:
        # A log without per-epoch lines in the old format may still end in "Best test SRCC".
        round_best = run['log']['round_best']
        best = dict(zip(('test_srcc', 'test_plcc'), round_best[max(round_best)]))
    nan = float('nan')

    def num(value):
        return nan if value is None else float(value)

    result = {'run': run['label'], 'differs': '', 'status': run['status'], 'best_epoch': best_epoch,
              'epochs_done': len(rows), 'select_on': summary.get('select_on') or select_on,
              'run_name': run['run_name'], 'path': run['path']}
    for key in ('val_srcc', 'val_plcc', 'test_srcc', 'test_plcc', 'test_krcc'):
        result[key] = num(best.get(key))
    for key in ('test_srcc', 'test_plcc'):
        lo, hi = best.get(key + '_ci') or (None, None)
        result[key + '_lo'], result[key + '_hi'] = num(lo), num(hi)
    # SPAQ is tested every epoch but not part of the summary's best: take the best epoch's row.
    match = [r for r in rows if r['epoch'] == result['best_epoch']] if rows else []
    source_row = match[-1] if match else row
    for key in ('spaq_srcc', 'spaq_plcc'):
        result[key] = source_row[key] if source_row else nan
    round_nums = sorted({r['round'] for r in rows})
    rounds = summary.get('rounds') or []
    result['rounds'] = len(rounds) or len(round_nums)
    if 'median_test_srcc' in summary:
        result['median_test_srcc'] = num(summary['median_test_srcc'])
        result['median_test_plcc'] = num(summary.get('median_test_plcc'))
    elif len(round_nums) > 1:
        per_round = [best_row([r for r in rows if r['round'] == n])[0] for n in round_nums]
        result['median_test_srcc'] = statistics.median(r['test_srcc'] for r in per_round)
        result['median_test_plcc'] = statistics.median(r['test_plcc'] for r in per_round)
    else:
        result['median_test_srcc'] = result['median_test_plcc'] = nan
    seconds = [r['epoch_seconds'] for r in rows if not is_nan(r['epoch_seconds'])]
    speeds = [r['train_patches_per_s'] for r in rows if not is_nan(r['train_patches_per_s'])]
    train_seconds, speed = summary.get('train_seconds'), summary.get('train_patches_per_s')
    if train_seconds is None and seconds:
        train_seconds = sum(seconds)
    if speed is None and speeds:
        speed = statistics.mean(speeds)
    result['train_seconds'], result['train_patches_per_s'] = num(train_seconds), num(speed)
    for key in CLIP_RESULT_KEYS:
        result[key] = nan
    return result


def clip_run_result(run):
    """The table row of a train_clip.py run: both heads' val SRCC and test SRCC/PLCC (the test
    SRCCs with their 95% intervals) in the _q / _c columns; the single-score columns stay empty.
    select_on is the split that selected (val, or test without one) and the head mix, e.g.
    'val mean'. From summary.json when there is one, else the last is_best epoch so far."""
    nan = float('nan')
    summary, rows = run['summary'] or {}, run['rows']
    row, select_split = best_row(rows)
    best, best_epoch = dict(summary.get('best') or {}), summary.get('best_epoch')
    if not best and row:
        best, best_epoch = dict(row), row['epoch']
    result = {k: nan for k in RESULT_COLUMNS} | {
        'run': run['label'], 'differs': '', 'status': run['status'], 'best_epoch': best_epoch,
        'epochs_done': len(rows), 'run_name': run['run_name'], 'path': run['path']}
    split = summary.get('select_split') or select_split
    mix = summary.get('select_on') or run['config'].get('select_on') or ''
    result['select_on'] = f'{split} {mix}'.strip()

    def num(value):
        return nan if value is None else float(value)

    for key in ('val_srcc_q', 'val_srcc_c', 'test_srcc_q', 'test_plcc_q', 'test_srcc_c', 'test_plcc_c'):
        result[key] = num(best.get(key))
    for key in ('test_srcc_q', 'test_srcc_c'):
        lo, hi = best.get(key + '_ci') or (None, None)
        result[key + '_lo'], result[key + '_hi'] = num(lo), num(hi)
    round_nums = sorted({r['round'] for r in rows})
    result['rounds'] = len(summary.get('rounds') or []) or len(round_nums)
    for head in ('q', 'c'):
        if summary.get(f'median_test_srcc_{head}') is not None:
            result[f'median_test_srcc_{head}'] = num(summary[f'median_test_srcc_{head}'])
    seconds = [r['epoch_seconds'] for r in rows if not is_nan(r['epoch_seconds'])]
    speeds = [r['train_images_per_s'] for r in rows if not is_nan(r['train_images_per_s'])]
    result['train_seconds'] = num(summary.get('train_seconds', sum(seconds) if seconds else None))
    result['train_images_per_s'] = statistics.mean(speeds) if speeds else nan
    return result


# ---------------------------------------------------------------------------------------------
# Comparing configurations


def is_bookkeeping(key):
    return key in BOOKKEEPING_KEYS or key.endswith(PATH_SUFFIXES)


def format_value(value):
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return '%g' % value
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(',', ':'))
    return str(value) if value != '' else "''"


def config_diff(config, baseline, ignore=()):
    """'key=value ...' for the flags whose value in `config` differs from `baseline`.

    Only keys both configs have are compared: a flag missing from one of them (an older code
    version, or an old log that printed only a few settings) says nothing about its value.
    """
    diffs = []
    for key in sorted(config):
        if is_bookkeeping(key) or key in ignore or key not in baseline:
            continue
        if config[key] != baseline[key]:
            diffs.append(f'{key}={format_value(config[key])}')
    return ' '.join(diffs)


def majority_config(configs):
    """Per key, the value most runs share (ties go to the earliest run): a stand-in baseline
    when none is named, so the column shows what each run changed from the common setting."""
    keys = {k for c in configs for k in c}
    baseline = {}
    for key in keys:
        values = [json.dumps(c[key], sort_keys=True) for c in configs if key in c]
        counts = {v: values.count(v) for v in values}
        top = max(counts.values())
        baseline[key] = json.loads(next(v for v in values if counts[v] == top))
    return baseline


def pick_baseline(runs, spec, default_parent='checkpoints'):
    """The run `spec` names: a label, run name or path of one of `runs`, else a run on disk."""
    for run in runs:
        if spec in (run['label'], run['run_name']) or (
                os.path.exists(spec) and os.path.realpath(spec) == os.path.realpath(run['path'])):
            return run
    return load_run(find_runs([spec], default_parent)[0])
