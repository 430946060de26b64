"""cross_dataset_test.py end to end on the nano model and tiny data sets in the real file formats.

Everything runs in-process through cross_dataset_test.main() (one import of torch/timm for the
whole file). The data sets come from tests/dataset_fixtures.py (40x48 images, resized to 232x240
here) and every image is scored with 2 crops, so the file needs a few seconds of model time on a
shared 2-core machine.
"""
import csv
import json
import os
import re

import numpy as np
import pytest
import torch

from iqa.ckpt import BARE_FORMAT, CHECKPOINT_FORMAT, atomic_torch_save, load_checkpoint
import cross_dataset_test as cdt
import data_loader
import models_swin
from dataset_fixtures import (make_agiqa, make_csiq, make_json_list, make_kadid, make_koniq, make_spaq,
                              write_csv, write_image, write_png16)
from iqa import evaluation
from iqa import metrics as iqa_metrics

FAST = ['--test_patch_num', '2', '--resize', '232', '240', '--batch_size', '8', '--cache_dir', 'none',
        '--n_boot', '200', '--device', 'cpu']


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """Data sets, a project checkpoint and the same weights as a bare state_dict."""
    base = tmp_path_factory.mktemp('cross')
    make_koniq(base / 'koniq-10k', sets=('training',) * 3 + ('validation',) + ('test',) * 6)
    make_json_list(base / 'spaq-test', 'spaq_test.json', n=5, prefix='spaq_test/')  # the user's layout
    make_csiq(base / 'csiq')

    torch.manual_seed(0)
    model = models_swin.build_model('nano', use_multiscale=True, use_attention=True, pretrained=False)
    config = {'model_size': 'nano', 'no_multiscale': False, 'attention_fusion': True, 'patch_size': 224,
              'test_patch_num': 2, 'resize': [232, 240], 'eval_batch_size': 8, 'dataset': 'koniq-10k',
              'higher_is_better': True, 'seed': 0, 'drop_path_rate': 0.2, 'dropout_rate': 0.3,
              'run_name': 'koniq-10k-swin_20251223_002226'}
    run_dir = base / 'checkpoints' / config['run_name']
    os.makedirs(run_dir)
    project = run_dir / 'best_model_srcc_0.9378_plcc_0.9485.pkl'
    atomic_torch_save({'format': CHECKPOINT_FORMAT, 'state_dict': model.state_dict(),
                                   'config': config, 'epoch': 3, 'round': 1, 'metrics': {}}, project)
    bare = base / 'old' / 'best_model_srcc_0.9249_plcc_0.9360.pkl'
    os.makedirs(bare.parent)
    torch.save(model.state_dict(), bare)
    return {'base': base, 'project': project, 'bare': bare, 'n_koniq': 6, 'n_spaq': 5,
            'koniq': base / 'koniq-10k', 'spaq': base / 'spaq-test', 'csiq': base / 'csiq'}


def run(capsys, *argv):
    rc = cdt.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------- cross-dataset

def test_project_and_bare_checkpoints_agree_and_json_matches_metrics(world, capsys, tmp_path):
    datasets = ['--datasets', f'koniq={world["koniq"]}', f'spaq={world["spaq"]}']
    rc, out, err = run(capsys, '--checkpoint', world['project'], *datasets, '--output_dir', tmp_path / 'a', *FAST)
    assert rc == 0, err
    # bare state_dict: architecture inferred from the weights, and the override flags accepted
    rc, out_bare, err = run(capsys, '--checkpoint', world['bare'], *datasets, '--output_dir', tmp_path / 'b',
                            '--model_size', 'nano', '--attention_fusion', '--seed', '0', *FAST)
    assert rc == 0, err

    a = json.loads((tmp_path / 'a' / 'cross_dataset_results_nano_best_model_srcc_0.9378_plcc_0.9485.json')
                   .read_text())
    b = json.loads((tmp_path / 'b' / 'cross_dataset_results_nano_best_model_srcc_0.9249_plcc_0.9360.json')
                   .read_text())
    # the same numbers; only what is known of the training set differs (bare: nothing), and with it
    # how the split was drawn (spaq: the project's is read whole, the bare one's reader's test list)
    why = ('split', 'split_reason', 'split_source', 'training_set')
    assert {k: {m: v for m, v in r.items() if m not in why} for k, r in a['results'].items()} == \
        {k: {m: v for m, v in r.items() if m not in why} for k, r in b['results'].items()}
    assert b['results']['koniq']['split_reason'] == 'training set unknown (give --trained_on): test split'
    assert a['results']['spaq']['split'] == 'all' and b['results']['spaq']['split'] == 'test'
    assert a['checkpoint'] == str(world['project']) and b['checkpoint'] == str(world['bare'])
    assert a['model']['source'] == 'checkpoint config'
    assert b['model']['source'].startswith('inferred from the weights, overridden by --model_size nano')
    assert a['checkpoint_format'] == CHECKPOINT_FORMAT
    assert b['checkpoint_format'] == BARE_FORMAT
    for key in ('model_size', 'use_multiscale', 'use_attention'):
        assert a['model'][key] == b['model'][key]
    assert (a['model']['model_size'], a['model']['use_attention']) == ('nano', True)
    assert a['trained_on'] == 'koniq-10k' and b['trained_on'] is None
    assert a['test_patch_num'] == 2 and a['resize'] == [232, 240]

    koniq = a['results']['koniq']
    assert set(koniq) >= {'images', 'srcc', 'plcc', 'krcc', 'srcc_ci', 'plcc_ci', 'root', 'split'}
    assert koniq['images'] == world['n_koniq'] and koniq['split'] == 'test'
    assert a['results']['spaq']['images'] == world['n_spaq']
    assert koniq['root'] == str(world['koniq'])
    # the in-domain set is left out of the cross-domain mean
    assert a['in_domain'] == ['koniq'] and b['in_domain'] == []
    assert a['cross_domain_mean']['datasets'] == ['spaq']
    assert b['cross_domain_mean'] is None

    # the numbers are iqa_metrics on predict_scores' predictions for the same images
    model, ckpt, _, _ = cdt.load_model(str(world['project']), cdt.build_parser().parse_args([]),
                                       torch.device('cpu'))
    dataset = data_loader.load_dataset('koniq', world['koniq'])
    test = dataset.splits['test']
    images, kept = data_loader.load_images([dataset.paths[i] for i in test], (232, 240), cache_dir=None)
    pred = evaluation.predict_scores(model, images, patch_size=224, patch_num=2, batch_size=8, seed=0)
    mos = dataset.mos[test]
    expected = iqa_metrics.correlations(pred, mos)
    for metric in ('srcc', 'plcc', 'krcc'):
        assert koniq[metric] == pytest.approx(expected[metric], abs=1e-12)
    assert koniq['srcc_ci'] == pytest.approx(list(iqa_metrics.bootstrap_ci(pred, mos, 'srcc', 200, seed=0)))
    assert koniq['plcc_ci'][0] <= koniq['plcc'] <= koniq['plcc_ci'][1]

    # the same model twice: identical weights, identical scores
    bare_args = cdt.build_parser().parse_args(['--model_size', 'nano', '--attention_fusion'])
    model_b, _, _, _ = cdt.load_model(str(world['bare']), bare_args, torch.device('cpu'))
    pred_b = evaluation.predict_scores(model_b, images, patch_size=224, patch_num=2, batch_size=8, seed=0)
    np.testing.assert_array_equal(pred, pred_b)

    # the printed table has the numbers, with intervals
    row = next(line for line in out.splitlines() if line.startswith('| koniq |'))
    assert f'{koniq["srcc"]:.4f} [{koniq["srcc_ci"][0]:.4f}, {koniq["srcc_ci"][1]:.4f}]' in row
    assert f'| {world["n_koniq"]} |' in row


def test_test_crop_follows_the_checkpoint_and_is_recorded(world, capsys, tmp_path):
    settings = lambda config, *flags: cdt.eval_settings({'config': config}, cdt.build_parser().parse_args(list(flags)))
    assert settings({})['test_crop'] == 'fixed'                               # bare state_dict
    assert settings({'test_random_crop': True})['test_crop'] == 'random'     # a run from before --test_crop
    assert settings({'test_crop': 'center'})['test_crop'] == 'center'
    assert settings({'test_crop': 'center'}, '--test_random_crop')['test_crop'] == 'random'
    assert settings({'test_crop': 'random'}, '--test_crop', 'fixed')['test_crop'] == 'fixed'
    with pytest.raises(cdt.UsageError, match='contradicts --test_crop center'):
        settings({}, '--test_random_crop', '--test_crop', 'center')

    rc, out, err = run(capsys, '--checkpoint', world['project'], '--datasets', f'spaq={world["spaq"]}',
                       '--test_crop', 'center', '--output_dir', tmp_path, *FAST)
    assert rc == 0, err
    assert '(--test_crop center)' in out
    saved = json.loads(next(tmp_path.glob('cross_dataset_results_*.json')).read_text())
    assert saved['test_crop'] == 'center' and saved['test_random_crop'] is False
    assert saved['results']['spaq']['test_crop'] == 'center'
    model, _, _, _ = cdt.load_model(str(world['project']), cdt.build_parser().parse_args([]), torch.device('cpu'))
    dataset = data_loader.load_dataset('spaq', world['spaq'])
    images, _ = data_loader.load_images(dataset.paths, (232, 240), cache_dir=None)
    pred = evaluation.predict_scores(model, images, patch_size=224, patch_num=2, crop='center')
    assert saved['results']['spaq']['srcc'] == pytest.approx(iqa_metrics.srcc(pred, dataset.mos), abs=1e-12)


def checkpoint_with(world, path, **config):
    """The world's weights saved as a train_swin checkpoint with `config` changed."""
    ckpt = load_checkpoint(str(world['project']))
    ckpt['config'] = {**ckpt['config'], **config}
    os.makedirs(path.parent, exist_ok=True)
    atomic_torch_save(ckpt, path)
    return path


def test_other_data_sets_are_scored_whole_and_the_training_set_on_its_test_split(world, capsys, tmp_path):
    # the official annotation files: SPAQ's xlsx, KADID's dmos.csv, AGIQA-3K's data.csv
    make_spaq(tmp_path / 'spaq', n=10)
    make_kadid(tmp_path / 'kadid', refs=(1, 2, 65, 66, 70, 81), per_ref=2)   # 12 images, 6 of them I66-I81
    make_agiqa(tmp_path / 'agiqa', prompts=5, per_prompt=2)                  # 10 images
    datasets = ['--datasets', f'koniq={world["koniq"]}', f'spaq={tmp_path / "spaq"}',
                f'kadid={tmp_path / "kadid"}', f'agiqa={tmp_path / "agiqa"}']
    rc, out, err = run(capsys, '--checkpoint', world['project'], *datasets, '--output_dir', tmp_path / 'out',
                       '--n_boot', '0', *FAST[:-4], '--device', 'cpu')
    assert rc == 0, err
    saved = json.loads(next((tmp_path / 'out').glob('cross_dataset_results_*.json')).read_text())
    images = {k: r['images'] for k, r in saved['results'].items()}
    assert images == {'koniq': world['n_koniq'], 'spaq': 10, 'kadid': 12, 'agiqa': 10}
    assert {k: r['split'] for k, r in saved['results'].items()} == {
        'koniq': 'test', 'spaq': 'all', 'kadid': 'all', 'agiqa': 'all'}
    assert saved['results']['koniq']['images_in_dataset'] == 10 and saved['results']['koniq']['training_set']
    assert saved['cross_domain_mean']['images'] == {'spaq': 10, 'kadid': 12, 'agiqa': 10}
    # the count is printed with every number: per data set, in the table and with the mean
    assert 'spaq: 10 of 10 images (all: not the training data set: every image)' in out
    assert f'koniq: {world["n_koniq"]} of 10 images (test: the training data set: held-out test split)' in out
    assert re.search(r'^\| kadid \| 12 \| all \| ', out, re.M)
    assert '(spaq: 10 images, kadid: 12 images, agiqa: 10 images)' in out

    # --split test is the old behaviour, for every data set
    rc, out, err = run(capsys, '--checkpoint', world['project'], *datasets, '--split', 'test',
                       '--output_dir', tmp_path / 'old', '--n_boot', '0', *FAST[:-4], '--device', 'cpu')
    assert rc == 0, err
    saved = json.loads(next((tmp_path / 'old').glob('cross_dataset_results_*.json')).read_text())
    # KADID's dmos.csv test split is references I66-I81; SPAQ's xlsx and AGIQA's data.csv a random 20%
    assert {k: r['images'] for k, r in saved['results'].items()} == {
        'koniq': world['n_koniq'], 'spaq': 2, 'kadid': 6, 'agiqa': 2}


def test_training_data_settings_come_from_the_checkpoint(world, capsys, tmp_path):
    # a run trained on KonIQ's 1-5 'MOS' is tested against 'MOS', not the default MOS_zscore
    mos_ckpt = checkpoint_with(world, tmp_path / 'mos' / 'best.pkl', score='MOS')
    rc, out, err = run(capsys, '--checkpoint', mos_ckpt, '--datasets', f'koniq={world["koniq"]}',
                       '--output_dir', tmp_path / 'mos', '--n_boot', '0', *FAST[:-4], '--device', 'cpu')
    assert rc == 0, err
    result = json.loads(next((tmp_path / 'mos').glob('cross_dataset_results_*.json')).read_text())
    assert result['results']['koniq']['score'] == 'MOS' and result['results']['koniq']['images'] == 6
    assert result['training_data_settings']['score'] == 'MOS'

    # a CSV with its own column names (the run's --csv_image_column/--csv_score_column)
    folder = tmp_path / 'mine'
    rows = []
    for i in range(8):
        write_image(folder / f'p{i}.jpg', seed=40 + i, fmt='JPEG')
        rows.append([f'p{i}.jpg', 10.0 + 3 * i, 'test' if i >= 5 else 'train'])
    csv_file = write_csv(folder / 'scores.csv', ['file', 'quality', 'split'], rows)
    csv_ckpt = checkpoint_with(world, tmp_path / 'csv' / 'best.pkl', dataset=str(csv_file),
                               csv_image_column='file', csv_score_column='quality')
    rc, out, err = run(capsys, '--checkpoint', csv_ckpt, '--datasets', f'mine={csv_file}',
                       '--output_dir', tmp_path / 'csv', '--n_boot', '0', *FAST[:-4], '--device', 'cpu')
    assert rc == 0, err
    result = json.loads(next((tmp_path / 'csv').glob('cross_dataset_results_*.json')).read_text())['results']
    assert result['mine']['images'] == 3 and result['mine']['split'] == 'test'   # its 3 held-out rows
    assert result['mine']['score'] == 'quality'
    # overridable: the flag wins over the stored column
    rc, out, err = run(capsys, '--checkpoint', csv_ckpt, '--datasets', f'mine={csv_file}', '--csv_score_column',
                       'nosuch', '--output_dir', tmp_path / 'csv2', '--n_boot', '0', *FAST[:-4], '--device', 'cpu')
    assert rc == 2 and 'nosuch' in err


def test_lower_is_better_dataset_is_flipped(world, capsys, tmp_path):
    rc, out, err = run(capsys, '--checkpoint', world['project'], '--datasets', f'csiq={world["csiq"]}',
                       '--split', 'all', '--output_dir', tmp_path, *FAST)
    assert rc == 0, err
    result = json.loads(next(tmp_path.glob('cross_dataset_results_*.json')).read_text())['results']['csiq']
    assert result['mos_flipped'] is True and result['higher_is_better'] is False
    assert result['images'] == 10 and result['split'] == 'all'
    assert 'scored against -MOS' in out

    model, _, _, _ = cdt.load_model(str(world['project']), cdt.build_parser().parse_args([]), torch.device('cpu'))
    dataset = data_loader.load_dataset('csiq', world['csiq'])
    images, _ = data_loader.load_images(dataset.paths, (232, 240), cache_dir=None)
    pred = evaluation.predict_scores(model, images, patch_size=224, patch_num=2, batch_size=8, seed=0)
    assert result['srcc'] == pytest.approx(iqa_metrics.srcc(pred, -dataset.mos), abs=1e-12)


def test_split_val_scores_the_runs_validation_split(world, capsys, tmp_path):
    # A run with --val_ratio 0.1 and seed 5: --split val is the val split it selected on.
    ckpt = load_checkpoint(str(world['project']))
    config = dict(ckpt['config'], dataset='csiq', higher_is_better=False, seed=5, val_ratio=0.1)
    with_val = tmp_path / 'with_val.pkl'
    atomic_torch_save({'format': CHECKPOINT_FORMAT, 'state_dict': ckpt['state_dict'],
                                   'config': config, 'epoch': 1, 'round': 1, 'metrics': {}}, with_val)
    rc, out, err = run(capsys, '--checkpoint', with_val, '--datasets', f'csiq={world["csiq"]}', '--split', 'val',
                       '--output_dir', tmp_path / 'a', *FAST, '--n_boot', '0')
    assert rc == 0, err
    result = json.loads(next((tmp_path / 'a').glob('cross_dataset_results_*.json')).read_text())['results']['csiq']
    val = data_loader.load_dataset('csiq', world['csiq'], seed=5, val_ratio=0.1).splits['val']
    assert result['split'] == 'val' and result['images'] == len(val) == 2
    # A checkpoint from before validation splits (no val_ratio in its config) had none.
    rc, out, err = run(capsys, '--checkpoint', world['project'], '--datasets', f'csiq={world["csiq"]}',
                       '--split', 'val', '--output_dir', tmp_path / 'b', *FAST)
    assert rc == 2 and 'csiq: no validation split (random 80/20 by reference image (seed 0); ' \
                       'no validation split (val_ratio 0))' in out + err


def test_missing_dataset_is_skipped_and_all_missing_exits_2(world, capsys, tmp_path):
    nowhere = tmp_path / 'no-such-folder'
    rc, out, err = run(capsys, '--checkpoint', world['project'], '--datasets', f'spaq={world["spaq"]}',
                       f'kadid={nowhere}', '--output_dir', tmp_path, *FAST)
    assert rc == 0, err
    assert f'kadid: not found at {nowhere}; skipped' in out
    saved = json.loads(next(tmp_path.glob('cross_dataset_results_*.json')).read_text())
    assert list(saved['results']) == ['spaq'] and saved['missing'] == {'kadid': str(nowhere)}

    out_dir = tmp_path / 'none'
    rc, out, err = run(capsys, '--checkpoint', world['project'], '--datasets', f'kadid={nowhere}',
                       f'agiqa={nowhere}2', '--output_dir', out_dir, *FAST)
    assert rc == 2
    assert 'No data set could be scored' in err
    assert f'kadid at {nowhere}' in err and f'agiqa at {nowhere}2' in err
    assert '--datasets NAME=PATH' in err
    assert not out_dir.exists() or not list(out_dir.iterdir())


def test_default_datasets_name_their_default_roots(world, capsys, monkeypatch, tmp_path):
    # nothing at the default roots: every default data set is reported with the folder looked at
    for k, v in list(data_loader.DEFAULT_ROOTS.items()):   # the registry's table, changed in place
        monkeypatch.setitem(data_loader.DEFAULT_ROOTS, k, tmp_path / 'empty' / os.path.basename(v))
    rc, out, err = run(capsys, '--checkpoint', world['project'], '--output_dir', tmp_path, *FAST)
    assert rc == 2
    for label, folder in (('koniq', 'koniq-10k'), ('spaq', 'spaq-test'), ('kadid', 'kadid-test'),
                          ('agiqa', 'agiqa-test')):
        assert f'{label} at {tmp_path / "empty" / folder}' in err


def test_checkpoint_errors_name_the_file_and_flag(world, capsys, tmp_path):
    rc, out, err = run(capsys, '--checkpoint', tmp_path / 'nope.pkl', *FAST)
    assert rc == 2 and '--checkpoint' in err and 'nope.pkl' in err
    # an override that contradicts the weights: strict loading refuses, naming the file
    rc, out, err = run(capsys, '--checkpoint', world['bare'], '--no_multiscale', '--datasets',
                       f'spaq={world["spaq"]}', '--output_dir', tmp_path, *FAST)
    assert rc == 2
    assert str(world['bare']) in err and 'single-scale' in err and '--no_multiscale' in err
    rc, out, err = run(capsys, '--datasets', 'spaq')
    assert rc == 2 and '--checkpoint FILE is required' in err
    rc, out, err = run(capsys, '--checkpoint', world['project'], '--datasets', 'nosuchset', *FAST)
    assert rc == 2 and '--datasets nosuchset: unknown dataset' in err


# --------------------------------------------------------------------------- --images

def test_images_folder_with_a_broken_image(world, capsys, tmp_path):
    folder = tmp_path / 'photos'
    write_image(folder / 'big.jpg', (600, 800), seed=1, fmt='JPEG')          # larger than the resize
    write_image(folder / 'small.png', (60, 90), seed=2)                      # smaller than one crop
    write_image(folder / 'sub' / 'gray.tif', (240, 256), seed=3, mode='L')   # grayscale, another format
    write_image(folder / 'alpha.webp', (240, 256), seed=4, mode='RGBA', fmt='WEBP')
    write_png16(folder / 'deep.png', np.random.default_rng(5).integers(0, 65536, (50, 70, 3)))  # 16 bit
    (folder / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a JPEG')
    (folder / 'notes.txt').write_text('not an image, not listed')
    (folder / '._big.jpg').write_bytes(b'macOS metadata')

    out_csv = tmp_path / 'out' / 'scores.csv'
    rc, out, err = run(capsys, '--checkpoint', world['project'], '--images', folder, '--output', out_csv, *FAST)
    assert rc == 0, err
    with open(out_csv, newline='') as f:
        rows = list(csv.DictReader(f))
    by_name = {os.path.relpath(r['path'], folder): r for r in rows}
    assert set(by_name) == {'alpha.webp', 'big.jpg', 'broken.jpg', 'deep.png', 'small.png',
                            os.path.join('sub', 'gray.tif')}
    for name, r in by_name.items():
        if name == 'broken.jpg':
            assert r['score'] == '' and 'cannot decode image' in r['error']
        else:
            assert r['error'] == '' and np.isfinite(float(r['score']))
    assert '5 of 6 images scored' in out
    # every file is scored from its own pixels: five different images, five different scores
    # (images are scored one at a time from views into one decoded tensor; a crop cut at the
    # wrong offset gave every file the score of the first one)
    scores = {name: float(r['score']) for name, r in by_name.items() if name != 'broken.jpg'}
    assert len(set(scores.values())) == 5, scores
    assert re.search(r'1 unreadable image\(s\).*\n\s+\S*broken\.jpg: cannot decode image', out)

    # the same scores through a list file and a glob (another first image, other neighbours);
    # a list's relative paths are relative to it
    (tmp_path / 'list.txt').write_text('# images\nphotos/big.jpg\n\nphotos/small.png\n')
    out2 = tmp_path / 'scores2.csv'
    rc, out, err = run(capsys, '--checkpoint', world['project'], '--images', tmp_path / 'list.txt',
                       str(folder / '*.webp'), '--output', out2, *FAST)
    assert rc == 0, err
    with open(out2, newline='') as f:
        rows2 = {os.path.basename(r['path']): r['score'] for r in csv.DictReader(f)}
    assert rows2 == {k: by_name[k]['score'] for k in ('big.jpg', 'small.png', 'alpha.webp')}

    rc, out, err = run(capsys, '--checkpoint', world['project'], '--images', str(tmp_path / '*.nothing'),
                       '--output', tmp_path / 'x.csv', *FAST)
    assert rc == 2 and '--images' in err and '*.nothing' in err and 'matches nothing' in err


# --------------------------------------------------------------------------- --complexity

def test_complexity_table_for_nano(capsys, tmp_path):
    md = tmp_path / 'complexity.md'
    rc, out, err = run(capsys, '--complexity', '--sizes', 'nano', '--batch_size', '2', '--runs', '3',
                       '--device', 'cpu', '--output', md)
    assert rc == 0, err
    header = next(line for line in out.splitlines() if line.startswith('| model |'))
    assert 'GMACs' in header and 'GFLOPs' in header and 'throughput bs2' in header
    row = next(line for line in out.splitlines() if line.startswith('| nano |'))
    cells = [c.strip() for c in row.strip('|').split('|')]
    params, gmacs, gflops, latency, throughput = map(float, cells[2:7])
    nano = models_swin.build_model('nano', True, True, pretrained=False)
    assert params == pytest.approx(models_swin.count_parameters(nano) / 1e6, abs=0.005)
    assert gflops == pytest.approx(2 * gmacs, abs=0.011) and gflops > 0.1
    assert latency > 0 and throughput > 0
    assert 'FlopCounterMode' in out and f'torch {torch.__version__}' in out
    assert md.read_text().startswith('| model |')


def test_dataset_specs(tmp_path):
    specs = cdt.parse_dataset_specs(['koniq', 'kadid=/data/kadid10k', f'mine={tmp_path}/list.csv',
                                     f'{tmp_path}/other.json'])
    assert [(label, name) for label, name, _ in specs] == [
        ('koniq', 'koniq-10k'), ('kadid', 'kadid-10k'), ('mine', 'generic'), ('other', 'generic')]
    assert specs[0][2] == data_loader.DEFAULT_ROOTS['koniq-10k']
    assert str(specs[1][2]) == '/data/kadid10k' and specs[2][2] == tmp_path / 'list.csv'
    with pytest.raises(cdt.UsageError, match='names .koniq. twice'):
        cdt.parse_dataset_specs(['koniq', 'koniq=/elsewhere'])
    with pytest.raises(cdt.UsageError, match='expected NAME=PATH'):
        cdt.parse_dataset_specs(['spaq='])
    # the training set is recognised by name for known sets, by path for annotation files
    assert cdt.is_training_set('koniq-10k', tmp_path, 'koniq')
    assert not cdt.is_training_set('generic', tmp_path / 'a.csv', str(tmp_path / 'b.csv'))
    assert cdt.is_training_set('generic', tmp_path / 'a.csv', str(tmp_path / 'a.csv'))
    # the user's file names; last.pkl gets its run folder so two runs do not overwrite each other
    assert cdt.results_path('out', 'ckpt/run1/best_model_srcc_0.9378_plcc_0.9485.pkl', 'base') == \
        os.path.join('out', 'cross_dataset_results_base_best_model_srcc_0.9378_plcc_0.9485.json')
    assert cdt.results_path('out', 'ckpt/run1/last.pkl', 'tiny') == \
        os.path.join('out', 'cross_dataset_results_tiny_run1_last.json')
