"""What cross_dataset_test.py scores (iqa/scoring.py), for Swin and CLIP checkpoints.

A set the run never saw is scored whole, whatever its reader's split would be; the run's own
training set only on the run's own test (or val) split, redrawn from the checkpoint and compared
here, name by name, with the split the trainer's own code draws. Fixtures are in the official
formats (tests/dataset_fixtures.py); models are the random 'nano' ones, 1 crop per image.
"""
import json
import os
import shlex

import pytest
import torch

from iqa import ckpt as iqa_ckpt
import cross_dataset_test as cdt
import data_loader
import models_swin
import train_clip
from dataset_fixtures import make_agiqa, make_csiq, make_kadid, make_koniq, make_spaq
from iqa import scoring
from iqa.clip import data as clip_data

FAST = ['--test_patch_num', '1', '--resize', '232', '240', '--batch_size', '8', '--cache_dir', 'none',
        '--n_boot', '0', '--device', 'cpu']
CSIQ_REFS = ('1600', 'aerial_city', 'boston', 'bridge', 'butter_flower', 'cactus', 'child_swimming',
             'couple', 'elk', 'family')


@pytest.fixture(scope='module')
def swin(tmp_path_factory):
    """A nano Swin checkpoint 'trained' on KonIQ, its weights as one trained on CSIQ (seed 5,
    round 2, val 10%) and as a bare state_dict, and the data sets."""
    base = tmp_path_factory.mktemp('split')
    make_koniq(base / 'koniq', sets=('training',) * 6 + ('test',) * 4)
    make_csiq(base / 'csiq', refs=CSIQ_REFS)
    torch.manual_seed(0)
    model = models_swin.build_model('nano', use_multiscale=False, use_attention=False, pretrained=False)
    config = {'model_size': 'nano', 'no_multiscale': True, 'attention_fusion': False, 'patch_size': 224,
              'test_patch_num': 1, 'resize': [232, 240], 'eval_batch_size': 8, 'dataset': 'koniq-10k',
              'data_root': str(base / 'koniq'), 'higher_is_better': True, 'seed': 0, 'val_ratio': 0.1}
    out = {'base': base}
    for key, extra, round_idx in (('koniq_ckpt', {}, 1),
                                  ('csiq_ckpt', {'dataset': 'csiq', 'data_root': str(base / 'csiq'), 'seed': 5,
                                                 'higher_is_better': False}, 2)):
        out[key] = base / f'{key}.pkl'
        iqa_ckpt.atomic_torch_save({'format': iqa_ckpt.SWIN_FORMAT, 'state_dict': model.state_dict(),
                                       'config': {**config, **extra}, 'epoch': 1, 'round': round_idx,
                                       'metrics': {}}, out[key])
    out['bare'] = base / 'bare.pkl'
    torch.save(model.state_dict(), out['bare'])
    return out


def score(capsys, out_dir, *argv):
    """(exit status, results JSON or None, stdout + stderr) of one cross_dataset_test.py call."""
    rc = cdt.main([str(a) for a in argv] + ['--output_dir', str(out_dir)])
    out, err = capsys.readouterr()
    found = sorted(out_dir.glob('cross_dataset_results_*.json')) if out_dir.exists() else []
    return rc, json.loads(found[0].read_text()) if found else None, out + err


def names(dataset, index):
    folder = dataset.root if dataset.root.is_dir() else dataset.root.parent
    return sorted(os.path.relpath(dataset.paths[i], folder) for i in index)


def test_foreign_subsets_are_scored_whole_whatever_their_readers_split(swin, capsys, tmp_path):
    # KADID references I45-I59 only (all on the training side of the official I01-I65 / I66-I81
    # split), AGIQA-3K images of one prompt, 20 SPAQ images: each a set the reader cannot split.
    make_kadid(tmp_path / 'kadid', refs=(45, 50, 59), per_ref=2)
    make_agiqa(tmp_path / 'agiqa', prompts=1, per_prompt=4)
    make_spaq(tmp_path / 'spaq', n=20)
    for name in ('kadid', 'agiqa'):
        with pytest.raises(data_loader.DataError, match='no test images'):
            data_loader.load_dataset(name, tmp_path / name)
        assert data_loader.load_dataset(name, tmp_path / name, split=False).splits == {}
    rc, saved, text = score(capsys, tmp_path / 'out', '--checkpoint', swin['koniq_ckpt'], '--datasets',
                            f'kadid={tmp_path / "kadid"}', f'agiqa={tmp_path / "agiqa"}',
                            f'spaq={tmp_path / "spaq"}', *FAST)
    assert rc == 0, text
    results = saved['results']
    assert {k: (r['split'], r['images'], r['images_in_dataset']) for k, r in results.items()} == {
        'kadid': ('all', 6, 6), 'agiqa': ('all', 4, 4), 'spaq': ('all', 20, 20)}
    assert all(r['split_source'] == 'not split (every image)' and not r['training_set'] for r in results.values())
    assert sorted(results['kadid']['image_names']) == sorted(f'images/I{r}_0{d}_01.png'
                                                             for r in (45, 50, 59) for d in (1, 2))
    assert 'no test images' not in text and 'ERROR' not in text
    assert 'kadid: 6 of 6 images (all: not the training data set: every image)' in text


def test_swin_training_set_is_scored_on_the_runs_own_splits(swin, capsys, tmp_path):
    # The trainer's own split (train_swin.run_round): load_dataset with seed + round - 1 = 6.
    trainer = data_loader.load_dataset('csiq', swin['base'] / 'csiq', seed=6, val_ratio=0.1)
    seed5 = data_loader.load_dataset('csiq', swin['base'] / 'csiq', seed=5, val_ratio=0.1)
    assert names(trainer, trainer.splits['test']) != names(seed5, seed5.splits['test'])   # the round matters
    for flag, side in (('auto', 'test'), ('test', 'test'), ('val', 'val')):
        rc, saved, text = score(capsys, tmp_path / flag, '--checkpoint', swin['csiq_ckpt'], '--datasets',
                                f'csiq={swin["base"] / "csiq"}', '--split', flag, *FAST)
        assert rc == 0, text
        result = saved['results']['csiq']
        assert result['training_set'] and result['split'] == side
        assert sorted(result['image_names']) == names(trainer, trainer.splits[side])
        assert result['images'] == len(trainer.splits[side]) and result['images_in_dataset'] == 20


def test_a_checkpoint_that_cannot_redraw_its_split_scores_none_of_its_training_set(swin, capsys, tmp_path):
    make_spaq(tmp_path / 'spaq', n=4)
    datasets = ['--datasets', f'koniq={swin["base"] / "koniq"}', f'spaq={tmp_path / "spaq"}']
    rc, saved, text = score(capsys, tmp_path / 'a', '--checkpoint', swin['bare'], '--trained_on', 'koniq',
                            '--model_size', 'nano', '--no_multiscale', *datasets, *FAST)
    assert rc == 1   # spaq scored, koniq refused: one line says why
    assert list(saved['results']) == ['spaq'] and saved['results']['spaq']['split'] == 'all'
    assert 'not scored koniq: koniq is the data set this checkpoint was trained on, but it is a bare ' \
           'state_dict' in text
    rc, saved, text = score(capsys, tmp_path / 'b', '--checkpoint', swin['bare'], '--trained_on', 'koniq',
                            '--model_size', 'nano', '--no_multiscale', *datasets, '--split', 'all', *FAST)
    assert rc == 0, text
    assert saved['results']['koniq']['images'] == 10 and saved['results']['koniq']['training_set']
    assert 'its training images are scored too' in text


# --------------------------------------------------------------------------- CLIP checkpoints

@pytest.fixture(scope='module')
def clip(tmp_path_factory):
    """A nano CLIP run of 2 rounds with seed 7 on an AGIQA-3K data.csv of 10 prompts."""
    base = tmp_path_factory.mktemp('clip')
    make_agiqa(base / 'agiqa', prompts=10, per_prompt=3)
    argv = shlex.split(f'--data_csv_path {base / "agiqa" / "data.csv"} --clip_model nano --no_pretrained '
                       f'--epochs 1 --batch_size 8 --lr 1e-3 --seed 7 --train_test_num 2 '
                       f'--output_dir {base / "runs"} --log_dir {base / "logs"} --cache_dir none --num_workers 1')
    assert train_clip.main(argv) == 0
    run_dir = next((base / 'runs').iterdir())
    ds = clip_data.read_prompt_csv(base / 'agiqa' / 'data.csv')
    return {'base': base, 'data': base / 'agiqa', 'round1': run_dir / 'round1' / 'last.pkl',
            'round2': run_dir / 'round2' / 'last.pkl', 'dataset': ds}


def clip_names(ds, index):
    return sorted(os.path.relpath(ds.paths[i], ds.csv_path.parent) for i in index)


def test_clip_training_set_is_scored_on_the_runs_own_splits(clip, capsys, tmp_path):
    ds = clip['dataset']
    config = torch.load(clip['round1'], weights_only=True)['config']
    assert config['data_csv_file'] == str(clip['data'] / 'data.csv')
    for ckpt, seed in (('round1', 7), ('round2', 8)):
        trainer = clip_data.prompt_split(ds.prompts, seed, 0.1, 0.2)   # train_clip's split of the round
        for flag, side in (('auto', 'test'), ('test', 'test'), ('val', 'val')):
            out = tmp_path / f'{ckpt}_{flag}'
            rc, saved, text = score(capsys, out, '--checkpoint', clip[ckpt], '--datasets', f'agiqa={clip["data"]}',
                                    '--split', flag, '--n_boot', '0', '--cache_dir', 'none', '--device', 'cpu')
            assert rc == 0, text
            result = saved['results']['agiqa']
            assert result['training_set'] and result['split'] == side
            assert result['split_source'] == f'random by prompt (seed {seed})'
            assert sorted(result['image_names']) == clip_names(ds, trainer[side])
            if flag == 'test':   # no training image is scored as unseen
                assert not set(result['image_names']) & set(clip_names(ds, trainer['train']))
    # the old rule (seed 0) would have scored training images of this run
    assert set(clip_names(ds, clip_data.prompt_split(ds.prompts, 0, 0.1, 0.2)['test'])) & \
        set(clip_names(ds, clip_data.prompt_split(ds.prompts, 7, 0.1, 0.2)['train']))


def test_clip_foreign_set_whole_and_unknown_split_refused(clip, capsys, tmp_path):
    make_agiqa(tmp_path / 'one', prompts=1, per_prompt=4)
    flags = ['--n_boot', '0', '--cache_dir', 'none', '--device', 'cpu']
    rc, saved, text = score(capsys, tmp_path / 'a', '--checkpoint', clip['round1'], '--datasets',
                            f'agiqa3k={tmp_path / "one"}', *flags)
    assert rc == 0, text
    result = saved['results']['agiqa3k']
    assert (result['split'], result['images'], result['training_set']) == ('all', 4, False)
    # a CLIP checkpoint without its split settings (as an imported file): nothing of the
    # training set it is told it was trained on, unless --split all
    ckpt = torch.load(clip['round1'], weights_only=True)
    ckpt['config'] = {}
    bare = tmp_path / 'imported.pkl'
    torch.save(ckpt, bare)
    make_spaq(tmp_path / 'spaq', n=4)
    rc, saved, text = score(capsys, tmp_path / 'b', '--checkpoint', bare, '--trained_on', 'agiqa', '--datasets',
                            f'agiqa={clip["data"]}', f'spaq={tmp_path / "spaq"}', *flags)
    assert rc == 1 and list(saved['results']) == ['spaq'] and saved['results']['spaq']['split'] == 'all'
    assert 'not scored agiqa: agiqa is the data set this checkpoint was trained on, but the checkpoint ' \
           'stores no' in text
    rc, saved, text = score(capsys, tmp_path / 'c', '--checkpoint', bare, '--trained_on', 'agiqa', '--datasets',
                            f'agiqa={clip["data"]}', '--split', 'all', *flags)
    assert rc == 0, text
    assert saved['results']['agiqa']['images'] == 30 and 'its training images are scored too' in text
    run = scoring.clip_run(ckpt, None)
    assert run.trained_on is None and run.why_not
