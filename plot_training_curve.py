"""Paper figures from training runs: per-run training curves and the cross-run comparisons.

    python plot_training_curve.py RUN_DIR_OR_LOG [...] [--out figures] [--round 1]
    python plot_training_curve.py --ablation RUN ... [--baseline RUN]
    python plot_training_curve.py --lr_sweep RUN ...
    python plot_training_curve.py --size_vs_srcc RUN ...

A run is a run folder written by train_swin.py (its metrics.csv, config.json, summary.json) or,
for runs of the user's original code, its log file (the per-epoch lines are parsed). Every figure
is one paper column wide (3.5 in) with 8 pt text and is written as PNG (300 dpi) and PDF.
Numbers across runs (bars, sweep, scatter) are those of collect_results.py (both read runs with
iqa/results.py): the summary's best epoch, or the best epoch so far for a run without a summary.
"""
import argparse
import io
import math
import os
import re
import sys

import matplotlib

matplotlib.use('Agg')  # files only; no display on the training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from iqa.files import atomic_write_bytes  # noqa: E402
from iqa.results import (RunReadError, best_row, config_diff, find_runs, is_clip_rows,  # noqa: E402
                         load_run, pick_baseline, run_result)

COLUMN_WIDTH_IN = 3.5  # one column of a two-column paper (IEEE/CVPR)
DPI = 300
PAPER_RC = {
    'font.size': 8, 'axes.titlesize': 8, 'axes.labelsize': 8, 'legend.fontsize': 8,
    'xtick.labelsize': 8, 'ytick.labelsize': 8, 'lines.linewidth': 1.2, 'lines.markersize': 3,
    'axes.grid': True, 'grid.alpha': 0.3, 'legend.frameon': False,
    'pdf.fonttype': 42,  # TrueType in the PDF: text stays text, as publishers ask
    'savefig.dpi': DPI,
}

# Parameter counts (millions) for the size-vs-SRCC plot when summary.json has no 'params' (a
# total count). Swin-T/S/B: the backbones' counts from Liu et al. 2021 (Swin Transformer, Table 1),
# which the user's paper table uses (seeds/003: 28M, 50M, 88M); the HyperNet head adds ~1M.
# resnet50: HyperIQA with its ResNet-50 backbone, ~27M (25.6M backbone + head).
MODEL_PARAMS_M = {'tiny': 28, 'small': 50, 'base': 88, 'resnet50': 27}

SPLIT_COLORS = {'train': 'tab:blue', 'val': 'tab:orange', 'test': 'tab:green', 'spaq': 'tab:red',
                'lr': 'tab:purple'}
METRIC_LABELS = {'test_srcc': 'test SRCC', 'test_plcc': 'test PLCC',
                 'val_srcc': 'val SRCC', 'val_plcc': 'val PLCC'}
# train_clip.py runs: one metric per head (quality _q, consistency _c)
METRIC_LABELS.update({f'{split}_{m}_{head}': f'{split} {m.upper()} ({name})'
                      for split in ('val', 'test') for m in ('srcc', 'plcc')
                      for head, name in (('q', 'quality'), ('c', 'consistency'))})


def save_figure(fig, out_dir, stem):
    """Write `<out_dir>/<stem>.png` and `.pdf` atomically (a half-written figure in a paper
    build is worse than an old one); return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for fmt in ('png', 'pdf'):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=DPI)
        path = os.path.join(out_dir, f'{stem}.{fmt}')
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    plt.close(fig)
    return paths


def slug(label):
    return re.sub(r'[^A-Za-z0-9._-]+', '_', label).strip('_') or 'run'


def round_columns(run, round_num):
    """Columns (numpy arrays) of one training round of a run; the rows must exist."""
    rows = run['rows']
    if not rows:
        if run['source'] == 'log':
            raise RunReadError(f'{run["path"]}: no per-epoch lines to plot (is it a log of the '
                               "user's original train_swin.py?)")
        csv_path = os.path.join(run['path'], 'metrics.csv')
        what = 'only a header, no epoch rows yet' if os.path.isfile(csv_path) else 'no such file'
        raise RunReadError(f'{csv_path}: {what}')
    rounds = sorted({r['round'] for r in rows})
    if round_num not in rounds:
        raise RunReadError(f'{run["path"]}: no round {round_num} (rounds: {rounds})')
    rows = [r for r in rows if r['round'] == round_num]
    return {key: np.array([r[key] for r in rows], dtype=float) for key in rows[0]}


def _has(values):
    return bool(np.isfinite(values).any())


def plot_run_curves(run, out_dir, round_num=1, stem=None):
    """Loss, SRCC, PLCC and learning rates per epoch of one run, one panel each, best epoch
    marked; written as `<stem>.png/.pdf` (default: the run's label + '_curves')."""
    cols = round_columns(run, round_num)
    rows_of_round = [r for r in run['rows'] if r['round'] == round_num]
    best, select_on = best_row(rows_of_round)
    # Panels: (y label, [(column, legend text, line style)]); one colour per split throughout.
    # Train SRCC and SPAQ get panels apart from val/test, whose epoch-to-epoch changes (~0.005)
    # would be flattened on a shared 0.6-1 axis.
    held_out = [(f'{split}_{metric}', f'{split} {metric.upper()}', style)
                for split in ('val', 'test') for metric, style in (('srcc', '-'), ('plcc', '--'))]
    lrs = ('learning rate', [('lr_backbone', 'backbone', '-'), ('lr_head', 'head', ':')])
    if is_clip_rows(rows_of_round):
        # train_clip.py: the loss and its parts, then each head's val/test curves in a panel
        # of its own (quality and consistency sit at different levels).
        panels = [('train loss', [('train_loss', 'total', '-'), ('train_loss_q', 'quality', '--'),
                                  ('train_loss_c', 'consistency', ':'),
                                  ('train_loss_exp', 'explanation', '-.')][:4 if np.nanmax(
                      cols['train_loss_exp']) > 0 else 3]),   # no explanation loss: no line
                  ('quality', [(k + '_q', name, style) for k, name, style in held_out]),
                  ('consistency', [(k + '_c', name, style) for k, name, style in held_out]), lrs]
    else:
        panels = [('train loss', [('train_loss', 'train loss', '-')]),
                  ('SRCC', [('train_srcc', 'train', '-'), ('val_srcc', 'val', '-'),
                            ('test_srcc', 'test', '-')]),
                  ('held-out', held_out),
                  ('SPAQ', [('spaq_srcc', 'SPAQ SRCC', '-'), ('spaq_plcc', 'SPAQ PLCC', '--')]),
                  lrs]
    panels = [(label, [s for s in series if _has(cols[s[0]])]) for label, series in panels]
    panels = [(label, series) for label, series in panels if series]
    with plt.rc_context(PAPER_RC):
        fig, axes = plt.subplots(len(panels), 1, sharex=True, layout='constrained',
                                 figsize=(COLUMN_WIDTH_IN, 0.35 + 1.25 * len(panels)))
        for ax, (ylabel, series) in zip(np.atleast_1d(axes), panels):
            for key, name, style in series:
                ax.plot(cols['epoch'], cols[key], marker='o', linestyle=style, label=name,
                        color=SPLIT_COLORS[key.split('_')[0]])
            if ylabel == 'learning rate' and min(np.nanmin(cols[k]) for k, _, _ in series) > 0:
                ax.set_yscale('log')  # cosine decay spans decades
            if best is not None:
                ax.axvline(best['epoch'], color='0.4', linestyle=':', linewidth=1)
            ax.set_ylabel(ylabel)
            if ylabel == 'train loss' and len(series) > 1 and np.nanmin(
                    [np.nanmin(cols[k]) for k, _, _ in series]) > 0:
                ax.set_yscale('log')  # a CLIP run's loss parts span decades
            if len(series) > 1 or ylabel == 'learning rate':  # old logs may have one rate only
                ax.legend(loc='best', ncol=2 if len(series) > 3 else 1)
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        title = run['label']
        if len({r['round'] for r in run['rows']}) > 1:
            title += f' (round {round_num})'
        if best is not None:
            title += f'; best epoch {best["epoch"]} on {select_on}'
        fig.suptitle(title, fontsize=8)
        return save_figure(fig, out_dir, stem or slug(run['label']) + '_curves')


def plot_overlay(runs, out_dir, metric='test_srcc', round_num=1):
    """`metric` and training loss per epoch of several runs on shared axes. A CLIP run given a
    single-score metric (test_srcc) shows both heads: quality solid, consistency dashed."""
    with plt.rc_context(PAPER_RC):
        fig, (ax_metric, ax_loss) = plt.subplots(2, 1, sharex=True, layout='constrained',
                                                 figsize=(COLUMN_WIDTH_IN, 3.2 + 0.18 * len(runs)))
        for run in runs:
            cols = round_columns(run, round_num)
            if metric in cols:
                series = [(metric, run['label'], '-')]
            elif metric + '_q' in cols:
                series = [(metric + '_q', f'{run["label"]} Q', '-'), (metric + '_c', f'{run["label"]} C', '--')]
            else:
                raise RunReadError(f'{run["path"]}: its metrics.csv has no {metric} column (--metric: '
                                   f'{", ".join(k for k in METRIC_LABELS if k in cols) or "none of its columns"})')
            color = None
            for key, label, style in series:
                line, = ax_metric.plot(cols['epoch'], cols[key], marker='o', label=label, linestyle=style,
                                       color=color)
                color = line.get_color()
            ax_loss.plot(cols['epoch'], cols['train_loss'], marker='o', color=color)
        ax_metric.set_ylabel(METRIC_LABELS[metric])
        ax_loss.set_ylabel('train loss')
        ax_loss.set_xlabel('epoch')
        ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.legend(loc='outside lower center', ncol=1 if len(runs) > 4 else 2)
        return save_figure(fig, out_dir, 'curves_overlay')


def _value_and_ci(run, metric):
    """(value, lo, hi) of a run's best epoch; lo/hi NaN when summary.json has no interval."""
    result = run_result(run)
    value = result.get(metric, float('nan'))
    if math.isnan(value) and not math.isnan(result.get(metric + '_q', float('nan'))):
        raise RunReadError(f'{run["path"]}: a CLIP run has one {METRIC_LABELS[metric]} per head; '
                           f'choose one with --metric {metric}_q (quality) or --metric {metric}_c (consistency)')
    if math.isnan(value):
        raise RunReadError(f'{run["path"]}: no {METRIC_LABELS[metric]} to plot '
                           '(no summary.json best and no such column values)')
    return value, result.get(metric + '_lo', float('nan')), result.get(metric + '_hi', float('nan'))


def _error_bars(values, los, his):
    """matplotlib's xerr/yerr (2, N) from intervals, or None when no run has one. A percentile
    bootstrap interval can miss its point estimate by a hair; that side is then drawn as 0."""
    if all(math.isnan(lo) for lo in los):
        return None
    lower = [max(0.0, v - lo) if not math.isnan(lo) else 0.0 for v, lo in zip(values, los)]
    upper = [max(0.0, hi - v) if not math.isnan(hi) else 0.0 for v, hi in zip(values, his)]
    return np.array([lower, upper])


def plot_ablation(runs, baseline, out_dir, metric='test_srcc'):
    """Horizontal bars of `metric` per run, the baseline first and drawn as a dashed line, each
    bar labelled with its difference to the baseline. The axis starts near the smallest value:
    ablation differences are a few thousandths of SRCC and would be invisible from zero."""
    runs = [baseline] + [r for r in runs
                         if os.path.realpath(r['path']) != os.path.realpath(baseline['path'])]
    stats = [_value_and_ci(r, metric) for r in runs]
    values = [s[0] for s in stats]
    err = _error_bars(values, [s[1] for s in stats], [s[2] for s in stats])
    lows = [s[1] if not math.isnan(s[1]) else s[0] for s in stats]
    highs = [s[2] if not math.isnan(s[2]) else s[0] for s in stats]
    pad = max(0.002, 0.15 * (max(highs) - min(lows)))
    left, right = min(lows) - pad, max(highs) + 3.5 * pad  # room on the right for the labels
    y = np.arange(len(runs))
    with plt.rc_context(PAPER_RC):
        fig, ax = plt.subplots(layout='constrained',
                               figsize=(COLUMN_WIDTH_IN, 0.7 + 0.28 * len(runs)))
        colors = ['0.35'] + ['tab:blue'] * (len(runs) - 1)
        ax.barh(y, [v - left for v in values], left=left, height=0.6, color=colors,
                xerr=err, error_kw={'elinewidth': 0.8, 'capsize': 2})
        ax.axvline(values[0], color='0.35', linestyle='--', linewidth=0.8)
        for yi, value, high in zip(y, values, highs):
            text = 'baseline' if yi == 0 else f'{value - values[0]:+.4f}'
            ax.text(high + 0.3 * pad, yi, text, va='center', fontsize=8)
        ax.set_yticks(y, [r['label'] for r in runs])
        ax.invert_yaxis()  # baseline on top, runs in the order given
        ax.set_xlim(left, right)
        ax.set_xlabel(METRIC_LABELS[metric])
        ax.grid(axis='y', visible=False)
        return save_figure(fig, out_dir, 'ablation')


def lr_sweep_selection(runs, metric):
    """(values, metric) that choose the best run of a sweep, as a trainer chooses its best epoch:
    the val counterpart of `metric` (val_srcc for test_srcc, val_srcc_c for test_srcc_c) at each
    run's selected epoch. Choosing on test would report the maximum of several test numbers, an
    optimistic pick; test is used only when some run has no val value (no validation split), and
    the returned metric then says so."""
    val_metric = 'val_' + metric[len('test_'):] if metric.startswith('test_') else metric
    values = [run_result(run).get(val_metric, float('nan')) for run in runs]
    if all(isinstance(v, (int, float)) and not math.isnan(v) for v in values):
        return [float(v) for v in values], val_metric
    return [_value_and_ci(run, metric)[0] for run in runs], metric


def plot_lr_sweep(runs, out_dir, metric='test_srcc'):
    """`metric` against the learning rate (config `lr`, log x); the starred point is the run best
    on val (lr_sweep_selection), on test only where a run has no val split, as its label says."""
    points = []
    for run in runs:
        lr = run['config'].get('lr')
        if not isinstance(lr, (int, float)) or lr <= 0:
            raise RunReadError(f'{run["path"]}: no positive lr in its config '
                               '(config.json, or a "Learning Rate:" line in an old log)')
        points.append((float(lr), *_value_and_ci(run, metric), run))
    points.sort(key=lambda p: p[0])
    for p in points[1:]:
        other = config_diff(p[4]['config'], points[0][4]['config'], ignore=('lr',))
        if other:
            print(f'warning: {p[4]["label"]} also differs from {points[0][4]["label"]} in: {other}',
                  file=sys.stderr)
    lrs, values = [p[0] for p in points], [p[1] for p in points]
    err = _error_bars(values, [p[2] for p in points], [p[3] for p in points])
    chosen_by, select_metric = lr_sweep_selection([p[4] for p in points], metric)
    best = int(np.argmax(chosen_by))
    how = METRIC_LABELS.get(select_metric, select_metric)
    if select_metric.startswith('test_'):
        how += ', no val split'
    with plt.rc_context(PAPER_RC):
        fig, ax = plt.subplots(layout='constrained', figsize=(COLUMN_WIDTH_IN, 2.4))
        ax.errorbar(lrs, values, yerr=err, marker='o', capsize=2, elinewidth=0.8)
        ax.plot(lrs[best], values[best], marker='*', markersize=10, color='tab:red', zorder=3,
                linestyle='none', label=f'best by {how}: lr {lrs[best]:g}, {values[best]:.4f}')
        ax.set_xscale('log')
        ax.set_xticks(lrs, [f'{lr:g}' for lr in lrs], rotation=30, ha='right')
        ax.minorticks_off()
        ax.set_xlabel('learning rate (backbone)')
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.legend(loc='best')
        return save_figure(fig, out_dir, 'lr_sensitivity')


def run_params_m(run):
    """Parameter count in millions: summary.json 'params' (a count) if there, else the table."""
    params = (run['summary'] or {}).get('params')
    if isinstance(params, (int, float)) and params > 0:
        return params / 1e6
    size = run['config'].get('model_size')
    if size not in MODEL_PARAMS_M:
        raise RunReadError(f'{run["path"]}: no params in summary.json and model_size {size!r} is '
                           f'not one of {", ".join(MODEL_PARAMS_M)}')
    return float(MODEL_PARAMS_M[size])


def plot_size_vs_srcc(runs, out_dir, metric='test_srcc'):
    """`metric` against parameters (M) per run, each point named by the run's `name`, else its
    model size (a run name would not fit next to a point)."""
    points = sorted(((run_params_m(r), *_value_and_ci(r, metric), r) for r in runs),
                    key=lambda p: p[0])
    values = [p[1] for p in points]
    err = _error_bars(values, [p[2] for p in points], [p[3] for p in points])
    with plt.rc_context(PAPER_RC):
        fig, ax = plt.subplots(layout='constrained', figsize=(COLUMN_WIDTH_IN, 2.4))
        ax.errorbar([p[0] for p in points], values, yerr=err, marker='o', linestyle='none',
                    capsize=2, elinewidth=0.8)
        for i, (params, value, _, _, run) in enumerate(points):
            text = run['config'].get('name') or run['config'].get('model_size') or run['label']
            last = i == len(points) - 1 and len(points) > 1  # label the rightmost point leftwards
            ax.annotate(str(text), (params, value), xytext=(-4 if last else 4, 4),
                        textcoords='offset points', ha='right' if last else 'left', fontsize=8)
        ax.margins(x=0.15, y=0.2)
        ax.set_xlabel('parameters (M)')
        ax.set_ylabel(METRIC_LABELS[metric])
        return save_figure(fig, out_dir, 'size_vs_srcc')


def load_runs(specs):
    return [load_run(path) for path in find_runs(specs)]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description='Training curves and paper figures (PNG + PDF, one column wide).',
        epilog='Put the positional runs before --ablation/--lr_sweep/--size_vs_srcc: those take '
               'every path that follows them.')
    parser.add_argument('runs', nargs='*', metavar='RUN_DIR_OR_LOG',
                        help='run folders (checkpoints/<run>/), folders of runs, run names or old '
                             'log files; one curves figure each, plus an overlay for several')
    parser.add_argument('--out', default='figures', metavar='DIR',
                        help='folder the figures are written to (default: figures)')
    parser.add_argument('--round', type=int, default=1, metavar='N',
                        help='training round to plot for multi-round runs (default: 1)')
    parser.add_argument('--metric', default='test_srcc', choices=sorted(METRIC_LABELS),
                        help='number compared across runs and overlaid (default: test_srcc; '
                             'CLIP runs: test_srcc_q, test_srcc_c ..., or test_srcc for both heads '
                             'in the overlay)')
    parser.add_argument('--ablation', nargs='+', metavar='RUN',
                        help='bar chart of these runs against --baseline')
    parser.add_argument('--baseline', metavar='RUN',
                        help='baseline of the ablation chart: a label, run name or path '
                             '(default: the first --ablation run)')
    parser.add_argument('--lr_sweep', nargs='+', metavar='RUN',
                        help='learning-rate sensitivity curve over these runs (log x); the star marks '
                             'the run best on the val counterpart of --metric (on test only when a '
                             'run has no val split, as the legend then says)')
    parser.add_argument('--size_vs_srcc', nargs='+', metavar='RUN',
                        help='parameters vs the metric over these runs')
    args = parser.parse_args(argv)
    if not (args.runs or args.ablation or args.lr_sweep or args.size_vs_srcc):
        parser.error('give run folders / log files, or --ablation, --lr_sweep or --size_vs_srcc')
    if args.baseline and not args.ablation:
        parser.error('--baseline is for --ablation')
    written = []
    try:
        if args.runs:
            runs = load_runs(args.runs)
            stems = []
            for run in runs:
                stem = slug(run['label']) + '_curves'
                if stem in stems:  # two runs with the same name must not overwrite each other
                    stem = f'{stem}-{len(stems) + 1}'
                stems.append(stem)
                rounds = sorted({r['round'] for r in run['rows']})
                if len(rounds) > 1:
                    print(f'note: {run["label"]} has rounds {rounds}; plotting round {args.round}')
                written += plot_run_curves(run, args.out, args.round, stem)
            if len(runs) > 1:
                written += plot_overlay(runs, args.out, args.metric, args.round)
        if args.ablation:
            runs = load_runs(args.ablation)
            baseline = pick_baseline(runs, args.baseline) if args.baseline else runs[0]
            written += plot_ablation(runs, baseline, args.out, args.metric)
        if args.lr_sweep:
            written += plot_lr_sweep(load_runs(args.lr_sweep), args.out, args.metric)
        if args.size_vs_srcc:
            written += plot_size_vs_srcc(load_runs(args.size_vs_srcc), args.out, args.metric)
    except RunReadError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    for path in written:
        print(f'wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
