"""Results table over training runs: one row per run, markdown on stdout, the same rows in a CSV.

    python collect_results.py [RUN_DIR_OR_PARENT_OR_LOG ...] [--baseline RUN] [--csv results.csv]
                              [--sort test_srcc]

Replaces `grep "Best test SRCC" logs/*.log`: it reads the run folders train_swin.py and
train_clip.py write (`checkpoints/<run_name>/` with config.json, metrics.csv, summary.json; a CLIP
run's row has both heads in the _q / _c columns) and the user's old log
files, and shows for each run the flags that differ from a baseline run, where it stopped, its best
epoch and the val/test correlations with their 95% bootstrap intervals. Runs that are still going or
crashed have no final summary; they are listed with their status and the best epoch so far, never
dropped, so a dead run cannot hide in the table.

Runs are read by iqa/results.py, as plot_training_curve.py reads them, so the table and the
figures see a run the same way.
"""
import argparse
import csv
import io
import sys

from iqa.files import atomic_write_bytes
from iqa.results import (RESULT_COLUMNS, RunReadError, config_diff, failed_task_rows, find_runs, is_nan,
                         load_run, majority_config, pick_baseline, run_result)


# ---------------------------------------------------------------------------------------------
# Output


def _fmt(value, digits=4):
    return '-' if is_nan(value) else f'{value:.{digits}f}'


def _fmt_ci(result, key):
    value, lo, hi = result[key], result[key + '_lo'], result[key + '_hi']
    if is_nan(lo) or is_nan(hi):
        return _fmt(value)
    return f'{_fmt(value)} [{lo:.3f}, {hi:.3f}]'


def _fmt_seconds(seconds):
    if is_nan(seconds):
        return '-'
    if seconds >= 3600:
        return f'{seconds / 3600:.2f} h'
    if seconds >= 60:
        return f'{seconds / 60:.1f} min'
    return f'{seconds:.0f} s'


def markdown_table(results):
    """The table; with CLIP runs among the results it gains both heads' columns (quality _Q,
    consistency _C), so a table of Swin runs alone looks as it always did."""
    header = ['run', 'differs from baseline', 'status', 'best ep/done', 'select', 'val SRCC',
              'val PLCC', 'test SRCC [95% CI]', 'test PLCC [95% CI]', 'train time', 'patches/s']
    clip = any(not is_nan(r.get('test_srcc_q')) or not is_nan(r.get('val_srcc_q')) for r in results)
    if clip:
        header += ['val SRCC_Q / _C', 'test SRCC_Q [95% CI]', 'test PLCC_Q', 'test SRCC_C [95% CI]',
                   'test PLCC_C']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for r in results:
        best_epoch = '-' if r['best_epoch'] is None else str(r['best_epoch'])
        cells = [r['run'], r['differs'] or '-', r['status'], f'{best_epoch}/{r["epochs_done"]}',
                 r['select_on'] or '-', _fmt(r['val_srcc']), _fmt(r['val_plcc']),
                 _fmt_ci(r, 'test_srcc'), _fmt_ci(r, 'test_plcc'),
                 _fmt_seconds(r['train_seconds']), _fmt(r['train_patches_per_s'], 0)]
        if clip:
            cells += [f'{_fmt(r["val_srcc_q"])} / {_fmt(r["val_srcc_c"])}', _fmt_ci(r, 'test_srcc_q'),
                      _fmt(r['test_plcc_q']), _fmt_ci(r, 'test_srcc_c'), _fmt(r['test_plcc_c'])]
        lines.append('| ' + ' | '.join(c.replace('|', '\\|') for c in cells) + ' |')
    return '\n'.join(lines)


def csv_bytes(results):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator='\n')
    writer.writerow(RESULT_COLUMNS)
    for r in results:
        cells = []
        for key in RESULT_COLUMNS:
            value = r[key]
            if is_nan(value):
                cells.append('')
            elif isinstance(value, float):
                cells.append(f'{value:.6g}')
            else:
                cells.append(str(value))
        writer.writerow(cells)
    return out.getvalue().encode('utf-8')


def sort_results(results, key):
    """Numbers high to low (best SRCC first), unknown last; text A to Z."""
    if key == 'none':
        return list(results)
    if all(isinstance(r[key], (int, float)) or r[key] is None for r in results):
        known = [r for r in results if not is_nan(r[key])]
        return sorted(known, key=lambda r: -r[key]) + [r for r in results if is_nan(r[key])]
    return sorted(results, key=lambda r: str(r[key]))


def collect(specs, baseline_spec=None, default_parent='checkpoints', tasks_dir=None):
    """(results, baseline description) for the runs named by `specs`; unreadable runs become rows
    with status 'error' (and the reason on stderr) instead of stopping the whole table. With
    `tasks_dir`, SLURM array tasks that failed before writing a run folder get a row too."""
    runs, results = [], []
    try:
        paths = find_runs(specs, default_parent)
    except RunReadError:
        if not (tasks_dir and failed_task_rows(tasks_dir, [])):
            raise
        paths = []  # every task failed before it wrote a run folder: the table says which and why
    if tasks_dir:
        results.extend(failed_task_rows(tasks_dir, paths))
    for path in paths:
        try:
            runs.append(load_run(path))
        except RunReadError as e:
            print(f'error: {e}', file=sys.stderr)
            results.append({k: float('nan') for k in RESULT_COLUMNS} | {
                'run': os.path.basename(os.path.normpath(path)), 'differs': '', 'status': 'error',
                'best_epoch': None, 'epochs_done': 0, 'rounds': 0, 'select_on': '',
                'run_name': os.path.basename(os.path.normpath(path)), 'path': path})
    if baseline_spec:
        baseline_run = pick_baseline(runs, baseline_spec, default_parent)
        baseline, described = baseline_run['config'], f'baseline: {baseline_run["label"]}'
    else:
        baseline_run = None
        baseline = majority_config([r['config'] for r in runs])
        described = (f'baseline: the value most of the {len(runs)} runs share, per flag '
                     '(--baseline RUN to name one)')
    for run in runs:
        result = run_result(run)
        if run is baseline_run:
            result['differs'] = '(baseline)'
        else:
            result['differs'] = config_diff(run['config'], baseline)
        results.append(result)
    return results, described


def main(argv=None):
    parser = argparse.ArgumentParser(
        description='Markdown table and CSV of training runs (replaces grep "Best test SRCC").')
    parser.add_argument('runs', nargs='*', metavar='RUN_DIR_OR_PARENT',
                        help='run folders, folders of run folders, old log files or run names '
                             '(default: every run folder under checkpoints/)')
    parser.add_argument('--baseline', metavar='RUN',
                        help='run (label, run name or path) whose config the "differs" column '
                             'compares against (default: per flag, the value most runs share)')
    parser.add_argument('--csv', default='results.csv', metavar='PATH',
                        help="CSV written with every column ('' to skip; default: results.csv)")
    parser.add_argument('--sort', default='test_srcc', choices=RESULT_COLUMNS + ('none',),
                        metavar='COLUMN',
                        help='column to sort on, numbers high to low; none keeps folder order '
                             '(default: test_srcc)')
    parser.add_argument('--tasks_dir', default='logs/experiments', metavar='DIR',
                        help='where run_experiments.sh --slurm keeps its NAME.task files: SLURM '
                             'array tasks that failed before writing a run folder are listed '
                             "from there ('' to skip; default: logs/experiments)")
    args = parser.parse_args(argv)
    try:
        results, described = collect(args.runs, args.baseline, tasks_dir=args.tasks_dir)
    except RunReadError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    results = sort_results(results, args.sort)
    print(markdown_table(results))
    print(f'\n{len(results)} run(s); {described}')
    if args.csv:
        atomic_write_bytes(args.csv, csv_bytes(results))
        print(f'wrote {args.csv}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
