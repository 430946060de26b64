"""plot_training_curve.py and collect_results.py on synthetic run folders and an old-format log.

No training: the run folders are written here in train_swin.py's format (config.json, metrics.csv
with its exact header, summary.json), the log in the format of the user's original solver.
"""
import csv
import json
import struct
from pathlib import Path

import pytest

import collect_results
import plot_training_curve
from iqa import results

HEADER = ('round,epoch,lr_backbone,lr_head,train_loss,train_srcc,val_srcc,val_plcc,val_krcc,'
          'test_srcc,test_plcc,test_krcc,spaq_srcc,spaq_plcc,epoch_seconds,train_patches_per_s,'
          'is_best')

BASE_CONFIG = {
    'dataset': 'koniq-10k', 'model_size': 'base', 'batch_size': 32, 'epochs': 3, 'lr': 5e-06,
    'lr_ratio': 10, 'weight_decay': 2e-4, 'drop_path_rate': 0.3, 'dropout_rate': 0.4,
    'ranking_loss_alpha': 0.0, 'attention_fusion': True, 'no_multiscale': False,
    'no_color_jitter': True, 'test_random_crop': True, 'loss_type': 'l1', 'patch_size': 224,
    'train_patch_num': 20, 'test_patch_num': 20, 'seed': 42, 'name': '',
    'output_dir': 'checkpoints', 'log_dir': 'logs', 'code_version': 'abc123',
}

# Old solver output: "Round N", a header, one tab-separated line per epoch (the ranking-loss variant
# carries "(L1:..,Rank:..)"), the learning rates set for the next epoch, and the round's best.
OLD_LOG = (
    'Random seed set to 42 for reproducibility\n'
    'Model Size:                 base\n'
    'Learning Rate:              5e-07\n'
    'Round 1\n'
    'Epoch\tTrain_Loss\tTrain_SRCC\tTest_SRCC\tTest_PLCC\n'
    'Epoch 1/3:  50%|#####     | 110/220\rEpoch 1/3: 100%|##########| 220/220\n'
    '1\t15.893 (L1:15.100,Rank:0.793)\t0.4873\t0.9169\t0.9285\n'
    '  Model saved to: checkpoints/x/checkpoint_epoch_1_srcc_0.9169_plcc_0.9285.pkl\n'
    '  Learning rates: HyperNet=0.000045, Backbone=0.000004\n'
    '2\t9.120 (L1:8.500,Rank:0.620)\t0.8011\t0.9301\t0.9402\n'
    '  Learning rates: HyperNet=0.000030, Backbone=0.000003\n'
    '3\t7.456 (L1:7.000,Rank:0.456)\t0.8800\t0.9288\t0.9410\n'
    'Best test SRCC 0.930100, PLCC 0.940200\n'
    'Round 2\n'
    '1\t14.000\t\t0.5000\t\t0.9200\t\t0.9300\n'
)


def write_run(folder, config, epochs, summary=None):
    """A run folder as train_swin.py writes it; `epochs` are (test_srcc, test_plcc, is_best)."""
    folder.mkdir(parents=True)
    (folder / 'config.json').write_text(json.dumps(dict(config, run_name=folder.name,
                                                        command='train_swin.py ...')))
    lines = [HEADER]
    for epoch, (srcc, plcc, is_best) in enumerate(epochs, start=1):
        lr = 5e-6 / epoch
        lines.append(f'1,{epoch},{lr},{lr * 10},{1.0 / epoch:.4f},{0.5 + 0.1 * epoch:.4f},,,,'
                     f'{srcc},{plcc},{srcc - 0.1:.4f},,,120.5,850.0,{is_best}')
    (folder / 'metrics.csv').write_text('\n'.join(lines) + '\n')
    if summary is not None:
        (folder / 'summary.json').write_text(json.dumps(summary))
    return folder


def finished_summary(name, best_epoch, srcc, plcc):
    return {'run_name': name, 'status': 'finished', 'select_on': 'test', 'best_epoch': best_epoch,
            'best': {'val_srcc': None, 'val_plcc': None, 'test_srcc': srcc, 'test_plcc': plcc,
                     'test_krcc': 0.78, 'test_srcc_ci': [srcc - 0.004, srcc + 0.003],
                     'test_plcc_ci': [plcc - 0.003, plcc + 0.003]},
            'rounds': [{'test_srcc': srcc}], 'median_test_srcc': srcc, 'median_test_plcc': plcc,
            'train_seconds': 5400.0, 'train_patches_per_s': 850.0,
            'best_checkpoint': f'best_model_srcc_{srcc:.4f}_plcc_{plcc:.4f}.pkl'}


@pytest.fixture
def two_runs(tmp_path):
    """A finished baseline and a still-running lr-5e-7 run without attention fusion."""
    ckpt = tmp_path / 'checkpoints'
    base_name = 'koniq-10k-swin_20251223_002226'
    base = write_run(ckpt / base_name, dict(BASE_CONFIG, name='E3'),
                     [(0.9301, 0.9402, 1), (0.9378, 0.9485, 1), (0.9350, 0.9470, 0)],
                     finished_summary(base_name, 2, 0.9378, 0.9485))
    other = write_run(ckpt / 'koniq-10k-swin_20251224_101010',
                      dict(BASE_CONFIG, lr=5e-07, attention_fusion=False, seed=42),
                      [(0.9200, 0.9300, 1), (0.9342, 0.9451, 1)])
    return base, other


def png_size(path):
    """(width, height) from the PNG header; fails unless the file starts with the PNG magic."""
    data = Path(path).read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n', path
    return struct.unpack('>II', data[16:24])


def test_metrics_csv_read_in_train_swin_format(two_runs):
    rows = results.read_metrics_csv(str(two_runs[0] / 'metrics.csv'))
    assert [r['epoch'] for r in rows] == [1, 2, 3]
    assert rows[1]['test_srcc'] == 0.9378 and rows[1]['is_best'] == 1
    assert rows[0]['lr_head'] == pytest.approx(5e-5)
    assert rows[0]['val_srcc'] != rows[0]['val_srcc']  # empty cell -> NaN


def test_run_curves_and_overlay_written_as_png_and_pdf(two_runs, tmp_path):
    out = tmp_path / 'figs'
    assert plot_training_curve.main([str(p) for p in two_runs] + ['--out', str(out)]) == 0
    for stem in ('E3_curves', 'koniq-10k-swin_20251224_101010_curves', 'curves_overlay'):
        width, height = png_size(out / f'{stem}.png')
        # One paper column: 3.5 in at 300 dpi.
        assert width == round(plot_training_curve.COLUMN_WIDTH_IN * plot_training_curve.DPI)
        assert height > 300 and (out / f'{stem}.png').stat().st_size > 10_000
        assert (out / f'{stem}.pdf').read_bytes()[:5] == b'%PDF-'
    assert not list(out.glob('*.tmp*'))  # atomic writes leave no temporaries behind


def test_cross_run_figures(two_runs, tmp_path, monkeypatch):
    out = tmp_path / 'figs'
    runs = [str(p) for p in two_runs]
    monkeypatch.chdir(tmp_path)  # where checkpoints/ is, so the experiment name E3 resolves
    assert results.find_runs(['E3']) == [str(Path('checkpoints') / two_runs[0].name)]
    assert plot_training_curve.main(['--ablation', two_runs[1].name, '--baseline', 'E3',
                                     '--out', str(out)]) == 0
    assert plot_training_curve.main(['--lr_sweep', *runs, '--out', str(out)]) == 0
    assert plot_training_curve.main(['--size_vs_srcc', *runs, '--out', str(out)]) == 0
    for stem in ('ablation', 'lr_sensitivity', 'size_vs_srcc'):
        assert png_size(out / f'{stem}.png')[0] == 1050
        assert (out / f'{stem}.pdf').stat().st_size > 1000


def test_old_log_parsed(tmp_path):
    log = tmp_path / 'logs' / 'batch1_gpu0_lr5e7_20251223_002208.log'
    log.parent.mkdir()
    log.write_text(OLD_LOG, encoding='utf-8')
    parsed = results.parse_old_log(str(log))
    rows = parsed['rows']
    assert [(r['round'], r['epoch']) for r in rows] == [(1, 1), (1, 2), (1, 3), (2, 1)]
    assert [r['test_srcc'] for r in rows[:3]] == [0.9169, 0.9301, 0.9288]
    assert rows[0]['train_loss'] == 15.893 and rows[3]['train_loss'] == 14.0
    assert rows[2]['test_plcc'] == 0.9410 and rows[2]['train_srcc'] == 0.8800
    # Rates printed after epoch 1 are those of epoch 2; epoch 1's are not in the log.
    assert rows[0]['lr_head'] != rows[0]['lr_head']
    assert rows[1]['lr_head'] == 4.5e-5 and rows[1]['lr_backbone'] == 4e-6
    assert [r['is_best'] for r in rows] == [1, 1, 0, 1]
    assert parsed['round_best'] == {1: (0.9301, 0.9402)}
    assert parsed['config'] == {'model_size': 'base', 'lr': 5e-07}
    assert parsed['status'] == 'incomplete'  # round 2 never printed its best

    out = tmp_path / 'figs'
    assert plot_training_curve.main([str(log), '--out', str(out)]) == 0
    assert png_size(out / 'batch1_gpu0_lr5e7_20251223_002208_curves.png')[0] == 1050

    # What `grep "Best test SRCC"` found, the table finds too, even without per-epoch lines.
    short = tmp_path / 'logs' / 'short.log'
    short.write_text('training...\nBest test SRCC 0.9378 PLCC 0.9485 (epoch 8, selected on val)\n')
    result = results.run_result(results.load_run(str(short)))
    assert (result['status'], result['test_srcc'], result['test_plcc']) == ('finished', 0.9378, 0.9485)


def test_results_table_from_two_runs(two_runs, tmp_path, capsys):
    csv_path = tmp_path / 'results.csv'
    parent = str(two_runs[0].parent)
    assert collect_results.main([parent, '--baseline', 'E3', '--csv', str(csv_path)]) == 0
    table = capsys.readouterr().out
    assert '| E3 | (baseline) | finished | 2/3 | test |' in table
    assert '0.9378 [0.934, 0.941]' in table and '1.50 h' in table
    # The running run: flags it changed, its status, and its best epoch so far from metrics.csv.
    assert ('| koniq-10k-swin_20251224_101010 | attention_fusion=False lr=5e-07 | incomplete '
            '| 2/2 |') in table
    with open(csv_path, newline='') as f:
        rows = list(csv.DictReader(f))
    assert [r['run'] for r in rows] == ['E3', 'koniq-10k-swin_20251224_101010']  # by test SRCC
    base, other = rows
    assert base['differs'] == '(baseline)' and base['status'] == 'finished'
    assert (base['test_srcc'], base['test_srcc_lo'], base['test_srcc_hi']) == (
        '0.9378', '0.9338', '0.9408')
    assert base['train_seconds'] == '5400' and base['best_epoch'] == '2'
    assert other['differs'] == 'attention_fusion=False lr=5e-07'
    assert other['status'] == 'incomplete' and other['best_epoch'] == '2'
    assert (other['test_srcc'], other['test_plcc']) == ('0.9342', '0.9451')
    assert other['test_srcc_lo'] == ''  # no interval before the run's summary exists
    assert other['train_seconds'] == '241' and other['train_patches_per_s'] == '850'


def test_crashed_run_found_by_its_log(two_runs, tmp_path, capsys):
    logs = tmp_path / 'logs'
    logs.mkdir()
    (logs / f'{two_runs[1].name}.log').write_text(
        'epoch 2 ...\nTraceback (most recent call last):\n'
        '  File "train_swin.py"\nRuntimeError: CUDA out of memory\n')
    assert collect_results.main([str(two_runs[0].parent), '--csv', '']) == 0
    # No --baseline: each flag is compared with the value most runs share (ties: the first run).
    assert '| attention_fusion=False lr=5e-07 | crashed | 2/2 |' in capsys.readouterr().out
    run = results.load_run(str(two_runs[1]))
    assert run['status'] == 'crashed'
    # Its log stands for its folder (exact CSV numbers), and is not listed twice.
    assert results.find_runs([str(logs), str(two_runs[1])]) == [str(two_runs[1])]


@pytest.mark.parametrize('content, message', [
    ('', 'file is empty'),
    ('round,epoch,train_loss\n1,1,0.5\n', 'header lacks column(s) lr_backbone'),
    (HEADER + '\n1,1,1e-6,1e-5,0.5,0.8,,,,0.91,0.92,0.8,,,10,100,0\n1,2,1e-6\n',
     'line 3: 3 cells, header has 17'),
    (HEADER + '\n1,1,1e-6,1e-5,abc,0.8,,,,0.91,0.92,0.8,,,10,100,0\n',
     "line 2 column 'train_loss': 'abc' is not a number"),
])
def test_malformed_metrics_csv_names_the_file(tmp_path, capsys, content, message):
    run = tmp_path / 'checkpoints' / 'broken_run'
    run.mkdir(parents=True)
    (run / 'metrics.csv').write_text(content)
    with pytest.raises(results.RunReadError) as err:
        results.read_metrics_csv(str(run / 'metrics.csv'))
    assert str(run / 'metrics.csv') in str(err.value) and message in str(err.value)
    # The CLI says the same thing instead of a traceback, and exits non-zero.
    assert plot_training_curve.main([str(run), '--out', str(tmp_path / 'figs')]) == 2
    assert message in capsys.readouterr().err


def test_missing_run_and_empty_log_are_clear_errors(tmp_path, capsys):
    assert plot_training_curve.main([str(tmp_path / 'nope')]) == 2
    assert f'{tmp_path / "nope"}: no run folder' in capsys.readouterr().err
    log = tmp_path / 'empty.log'
    log.write_text('Random seed set to 42\n')
    assert plot_training_curve.main([str(log), '--out', str(tmp_path)]) == 2
    assert f'{log}: no per-epoch lines to plot' in capsys.readouterr().err


# --------------------------------------------------------------------------- CLIP runs

def write_clip_run(folder, epochs, finished=True):
    """A run folder as train_clip.py writes it: metrics.csv with its exact header (one set of
    metrics per head), config.json and summary.json with 'system': 'clip'. `epochs` are
    (test_srcc_q, test_srcc_c, is_best)."""
    import train_clip
    folder.mkdir(parents=True)
    (folder / 'config.json').write_text(json.dumps({'name': folder.name.upper(), 'run_name': folder.name,
                                                    'system': 'clip', 'lr': 1e-3, 'seed': 42,
                                                    'select_on': 'mean'}))
    rows = []
    for epoch, (q, c, is_best) in enumerate(epochs, start=1):
        row = {'round': 1, 'epoch': epoch, 'lr_backbone': 1e-3 / epoch, 'lr_head': 5e-3 / epoch,
               'train_loss': 0.05 / epoch, 'train_loss_q': 0.06 / epoch, 'train_loss_c': 0.04 / epoch,
               'train_loss_exp': 0.0, 'c_base_alpha': 1.0, 'c_base_beta': 0.0, 'epoch_seconds': 10.0,
               'train_images_per_s': 200.0, 'is_best': is_best}
        for split, shift in (('val', 0.01), ('test', 0.0)):
            row.update({f'{split}_srcc_q': q + shift, f'{split}_plcc_q': q + 0.02, f'{split}_krcc_q': q - 0.2,
                        f'{split}_srcc_c': c + shift, f'{split}_plcc_c': c + 0.03, f'{split}_krcc_c': c - 0.2})
        rows.append(row)
    with open(folder / 'metrics.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=train_clip.METRIC_COLUMNS, lineterminator='\n')
        writer.writeheader()
        writer.writerows(rows)
    best = max((r for r in rows if r['is_best']), key=lambda r: r['epoch'])
    summary = {'run_name': folder.name, 'name': folder.name.upper(), 'system': 'clip',
               'status': 'finished' if finished else 'running', 'select_on': 'mean', 'select_split': 'val',
               'best_epoch': best['epoch'],
               'best': {k: best[k] for k in best if k.startswith(('val_', 'test_'))}
               | {'epoch': best['epoch'], 'test_srcc_q_ci': [0.85, 0.93], 'test_srcc_c_ci': [0.61, 0.75]},
               'rounds': [], 'median_test_srcc_q': best['test_srcc_q'], 'median_test_srcc_c': best['test_srcc_c'],
               'train_seconds': 30.0}
    (folder / 'summary.json').write_text(json.dumps(summary))
    return folder


def test_clip_runs_get_both_heads_in_the_table_and_swin_rows_keep_theirs(two_runs, tmp_path, capsys):
    import train_clip
    assert results.CLIP_METRICS_COLUMNS == tuple(train_clip.METRIC_COLUMNS)
    parent = two_runs[0].parent
    write_clip_run(parent / 'clip1', [(0.80, 0.60, 1), (0.89, 0.70, 1), (0.90, 0.65, 0)])
    csv_path = tmp_path / 'results.csv'
    assert collect_results.main([str(parent), '--baseline', 'E3', '--csv', str(csv_path)]) == 0
    table = capsys.readouterr().out
    assert 'test SRCC_Q [95% CI]' in table and 'test SRCC_C [95% CI]' in table
    clip_line = next(line for line in table.splitlines() if line.startswith('| CLIP1 |'))
    assert ('| finished | 2/3 | val mean |' in clip_line and '| 0.9000 / 0.7100 | 0.8900 [0.850, 0.930] | 0.9100 '
            '| 0.7000 [0.610, 0.750] | 0.7300 |' in clip_line)
    assert '| E3 | (baseline) | finished | 2/3 | test |' in table and '0.9378 [0.934, 0.941]' in table
    with open(csv_path, newline='') as f:
        rows = {r['run']: r for r in csv.DictReader(f)}
    clip, swin = rows['CLIP1'], rows['E3']
    assert (clip['test_srcc_q'], clip['test_srcc_q_lo'], clip['test_srcc_c'], clip['test_plcc_c']) == (
        '0.89', '0.85', '0.7', '0.73')
    assert clip['test_srcc'] == '' and clip['status'] == 'finished' and clip['train_images_per_s'] == '200'
    assert swin['test_srcc'] == '0.9378' and swin['test_srcc_q'] == ''
    # A Swin-only table keeps its columns.
    collect_results.main([str(two_runs[0]), '--csv', str(tmp_path / 'swin.csv')])
    assert 'SRCC_Q' not in capsys.readouterr().out


def test_clip_run_curves_show_both_heads(tmp_path):
    run = write_clip_run(tmp_path / 'runs' / 'clip1', [(0.80, 0.60, 1), (0.89, 0.70, 1)], finished=False)
    other = write_clip_run(tmp_path / 'runs' / 'clip2', [(0.70, 0.50, 1), (0.75, 0.66, 1)])
    out = tmp_path / 'figs'
    assert plot_training_curve.main([str(run), str(other), '--out', str(out)]) == 0
    for stem in ('CLIP1_curves', 'CLIP2_curves', 'curves_overlay'):
        assert png_size(out / f'{stem}.png')[1] > 300
    assert plot_training_curve.main(['--ablation', str(run), str(other), '--metric', 'test_srcc_c',
                                     '--out', str(out)]) == 0
    assert png_size(out / 'ablation.png')[1] > 300


def test_clip_curve_panels(tmp_path, monkeypatch):
    run = results.load_run(str(write_clip_run(tmp_path / 'clip1', [(0.8, 0.6, 1), (0.9, 0.7, 1)])))
    drawn = []
    monkeypatch.setattr(plot_training_curve, 'save_figure',
                        lambda fig, out, stem: drawn.append([(ax.get_ylabel(), [t.get_text() for t in ax.get_legend().texts])
                                                             for ax in fig.axes]) or [])
    plot_training_curve.plot_run_curves(run, str(tmp_path))
    panels = dict(drawn[0])
    assert list(panels) == ['train loss', 'quality', 'consistency', 'learning rate']
    assert panels['train loss'] == ['total', 'quality', 'consistency']     # no explanation loss: no line
    assert panels['quality'] == panels['consistency'] == ['val SRCC', 'val PLCC', 'test SRCC', 'test PLCC']


def test_lr_sweep_stars_the_run_best_on_val_and_on_test_only_without_val(tmp_path, monkeypatch):
    """A sweep's best lr is chosen as a trainer chooses its epoch: on val. On test (labelled) only
    when a run has no val split."""
    ckpt = tmp_path / 'checkpoints'
    paths = []
    for lr, val, test in ((1e-6, 0.95, 0.93), (5e-6, 0.90, 0.94), (1e-5, 0.91, 0.92)):
        name = f'koniq-10k-swin_lr{lr:g}'
        summary = finished_summary(name, 2, test, test + 0.01)
        summary['best']['val_srcc'] = val
        paths.append(write_run(ckpt / name, dict(BASE_CONFIG, lr=lr), [(test - 0.01, 0.9, 1), (test, 0.9, 1)],
                               summary))
    runs = plot_training_curve.load_runs([str(p) for p in paths])
    values, metric = plot_training_curve.lr_sweep_selection(runs, 'test_srcc')
    assert metric == 'val_srcc' and values == [0.95, 0.90, 0.91]     # lr 1e-6 starred, not 5e-6 (best test)
    labels = []
    real_save = plot_training_curve.save_figure

    def keep_legend(fig, out_dir, stem):
        labels.extend(t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts())
        return real_save(fig, out_dir, stem)

    monkeypatch.setattr(plot_training_curve, 'save_figure', keep_legend)
    assert plot_training_curve.main(['--lr_sweep', *map(str, paths), '--out', str(tmp_path / 'f')]) == 0
    assert labels == ['best by val SRCC: lr 1e-06, 0.9300']
    # one run without a val split: all are chosen on test, and the legend says so
    summary = json.loads((paths[0] / 'summary.json').read_text())
    summary['best']['val_srcc'] = None
    (paths[0] / 'summary.json').write_text(json.dumps(summary))
    labels.clear()
    assert plot_training_curve.main(['--lr_sweep', *map(str, paths), '--out', str(tmp_path / 'f')]) == 0
    assert labels == ['best by test SRCC, no val split: lr 5e-06, 0.9400']
