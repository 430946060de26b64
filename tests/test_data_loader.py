"""Tests of data_loader.py: readers on tiny fixtures in the real formats, splits, the image
cache, bad-input messages, patch sampling and the demo data set."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import data_loader as dl  # noqa: E402
from iqa.data import image_cache, patches as patch_module  # noqa: E402
import dataset_fixtures as fx  # noqa: E402

MEAN = torch.tensor(dl.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(dl.IMAGENET_STD).view(1, 3, 1, 1)


def to_unit(patches: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalization -> values in [0, 1]."""
    return patches.cpu() * STD + MEAN


def to_u8(patches: torch.Tensor) -> torch.Tensor:
    return torch.round(to_unit(patches) * 255).to(torch.int64)


def assert_disjoint(splits: dict) -> None:
    keys = list(splits)
    for a in range(len(keys)):
        for b in range(a + 1, len(keys)):
            assert not set(splits[keys[a]].tolist()) & set(splits[keys[b]].tolist())


# ----------------------------------------------------------------------------------------
# names and roots
# ----------------------------------------------------------------------------------------

def test_resolve_aliases_default_roots_and_paths(tmp_path):
    assert dl.resolve_dataset('koniq') == ('koniq-10k', dl.SCRIPT_DIR / 'koniq-10k')
    assert dl.resolve_dataset('KADID') == ('kadid-10k', dl.SCRIPT_DIR / 'kadid-test')
    assert dl.resolve_dataset('agiqa') == ('agiqa-3k', dl.SCRIPT_DIR / 'agiqa-test')
    assert dl.resolve_dataset('spaq') == ('spaq', dl.SCRIPT_DIR / 'spaq-test')
    assert dl.resolve_dataset('koniq', str(tmp_path)) == ('koniq-10k', tmp_path)
    assert dl.resolve_dataset(str(tmp_path / 'my.csv')) == (dl.GENERIC, tmp_path / 'my.csv')
    assert set(dl.DEFAULT_ROOTS) == set(dl.DATASET_NAMES)
    with pytest.raises(dl.DataError, match=r"unknown dataset 'imagenet'.*koniq-10k"):
        dl.resolve_dataset('imagenet')


# ----------------------------------------------------------------------------------------
# readers
# ----------------------------------------------------------------------------------------

def test_koniq_official_split_and_score_columns(tmp_path):
    names = fx.make_koniq(tmp_path)
    ds = dl.load_dataset('koniq', tmp_path)
    assert ds.name == 'koniq-10k' and len(ds) == 11
    assert ds.paths[0] == str(tmp_path / '1024x768' / names[0])
    assert ds.score_name == 'MOS_zscore' and ds.score_range == (0.0, 100.0) and ds.higher_is_better
    assert ds.mos.dtype == np.float64
    assert ds.mos[0] == pytest.approx((1.5 - 1) * 25, abs=1e-3)
    assert {k: len(v) for k, v in ds.splits.items()} == {'train': 6, 'val': 2, 'test': 3}
    assert ds.split_source == 'official koniq10k_distributions_sets.csv'
    assert_disjoint(ds.splits)
    mos15 = dl.load_dataset('koniq', tmp_path, score='MOS')
    assert mos15.score_range == (1.0, 5.0) and mos15.mos[0] == pytest.approx(1.5)
    with pytest.raises(dl.DataError, match="score 'SD' not available"):
        dl.load_dataset('koniq', tmp_path, score='SD')


def test_koniq_sets_file_alone_and_512_folder(tmp_path):
    fx.make_koniq(tmp_path, scores_file=False, image_dir='512x384')
    ds = dl.load_dataset('koniq-10k', tmp_path)
    assert ds.score_range == (0.0, 100.0) and ds.paths[0].startswith(str(tmp_path / '512x384'))
    assert ds.mos[-1] == pytest.approx((1.5 + 3.0 * 10 / 11 - 1) * 25, abs=1e-3)
    with pytest.raises(dl.DataError, match=r"'MOS' \(1-5\) needs"):
        dl.load_dataset('koniq', tmp_path, score='MOS')


def test_koniq_user_json_layout(tmp_path):
    fx.make_koniq_user_json(tmp_path, n_train=5, n_test=3)
    ds = dl.load_dataset('koniq', tmp_path)
    assert ds.split_source.startswith('koniq_train/test.json; val 10% of the training side')
    assert {k: len(v) for k, v in ds.splits.items()} == {'train': 4, 'val': 1, 'test': 3}
    for i in np.concatenate([ds.splits['train'], ds.splits['val']]):
        assert Path(ds.paths[i]).parent == tmp_path / 'train'
    for i in ds.splits['test']:
        assert Path(ds.paths[i]).parent == tmp_path / 'test'
    assert all(Path(p).is_file() for p in ds.paths)


def test_koniq_random_split_is_seeded_and_printed(tmp_path, capsys):
    fx.make_koniq(tmp_path, sets=('training',) * 10, sets_file=False)
    a = dl.load_dataset('koniq', tmp_path, seed=3, val_ratio=0)
    assert 'random 80/20 by image (seed 3); no validation split (val_ratio 0)' in capsys.readouterr().out
    b = dl.load_dataset('koniq', tmp_path, seed=3)
    c = dl.load_dataset('koniq', tmp_path, seed=4, train_ratio=0.5)
    assert {k: len(v) for k, v in a.splits.items()} == {'train': 8, 'test': 2}
    assert {k: len(v) for k, v in b.splits.items()} == {'train': 7, 'val': 1, 'test': 2}
    assert np.array_equal(a.splits['test'], b.splits['test'])
    assert len(c.splits['test']) == 5
    assert_disjoint(a.splits)


def test_spaq_xlsx_and_user_json(tmp_path):
    fx.make_spaq(tmp_path / 'spaq')
    ds = dl.load_dataset('spaq', tmp_path / 'spaq')
    assert len(ds) == 6 and ds.score_name == 'MOS' and ds.score_range == (0.0, 100.0)
    assert ds.paths[2] == str(tmp_path / 'spaq' / 'TestImage' / '00003.jpg') and ds.mos[2] == 30.0
    assert_disjoint(ds.splits)
    sharp = dl.load_dataset('spaq', tmp_path / 'spaq', score='Sharpness')
    assert sharp.mos[1] == 41.0

    fx.make_json_list(tmp_path / 'spaq-test', 'spaq_test.json', n=3, prefix='spaq/')
    ds = dl.load_dataset('spaq', tmp_path / 'spaq-test')
    assert list(ds.splits) == ['test'] and list(ds.splits['test']) == [0, 1, 2]
    assert ds.split_source == 'spaq_test.json (test only)'
    assert all(Path(p).is_file() for p in ds.paths)   # "spaq/img_0.png" resolved beside the JSON


def test_json_list_other_spelling_and_file_as_root(tmp_path):
    path = fx.make_json_list(tmp_path / 'kadid-test', 'kadid_test.json', n=3,
                             spelling=('img_path', 'gt_score'), score_as_str=True)
    ds = dl.load_dataset('kadid', tmp_path / 'kadid-test')
    assert ds.mos.tolist() == [1.0, 2.0, 3.0] and ds.score_range == (1.0, 5.0)
    same = dl.load_dataset('kadid', path)   # NAME=path/to/list.json
    assert same.paths == ds.paths


def test_kadid_split_by_reference(tmp_path):
    fx.make_kadid(tmp_path)
    ds = dl.load_dataset('kadid-10k', tmp_path)
    refs = [int(Path(p).name[1:3]) for p in ds.paths]
    assert sorted({refs[i] for i in ds.splits['train']} | {refs[i] for i in ds.splits['val']}) == [1, 2, 65]
    assert len({refs[i] for i in ds.splits['val']}) == 1
    assert sorted({refs[i] for i in ds.splits['test']}) == [66, 70, 81]
    assert ds.score_name == 'dmos' and ds.higher_is_better and ds.score_range == (1.0, 5.0)
    same = dl.load_dataset('kadid', tmp_path / 'dmos.csv')   # the annotation file names its folder
    assert same.paths == ds.paths


def test_agiqa_quality_align_and_prompt_split(tmp_path):
    fx.make_agiqa(tmp_path)
    ds = dl.load_dataset('agiqa', tmp_path, seed=1)
    assert len(ds) == 10 and ds.score_name == 'mos_quality'
    align = dl.load_dataset('agiqa', tmp_path, seed=1, score='align')
    assert align.score_name == 'mos_align' and not np.allclose(align.mos, ds.mos)
    prompt = [Path(p).stem.split('_')[1] for p in ds.paths]
    train = {prompt[i] for i in ds.splits['train']}
    test = {prompt[i] for i in ds.splits['test']}
    assert train and test and not train & test
    assert 'by prompt' in ds.split_source


def test_livec_skips_first_seven(tmp_path):
    names = fx.make_livec(tmp_path, n=17)
    ds = dl.load_dataset('livec', tmp_path)
    assert len(ds) == 10
    assert Path(ds.paths[0]).name == names[7] and ds.mos[0] == 35.0
    assert {k: len(v) for k, v in ds.splits.items()} == {'train': 7, 'val': 1, 'test': 2}
    assert all(Path(p).is_file() for p in ds.paths)


@pytest.mark.parametrize('name,maker,ref_of,higher', [
    ('live', fx.make_live, None, False),
    ('csiq', fx.make_csiq, lambda p: Path(p).name.split('.')[0], False),
    ('tid2013', fx.make_tid2013, lambda p: Path(p).name.split('_')[0], True),
])
def test_reference_split_datasets(tmp_path, name, maker, ref_of, higher):
    maker(tmp_path)
    for seed in range(4):
        ds = dl.load_dataset(name, tmp_path, seed=seed)
        assert len(ds) == 10 and ds.higher_is_better is higher
        assert all(Path(p).is_file() for p in ds.paths)
        if ref_of is None:   # LIVE: the reference comes from refnames_all.mat; group by dmos pattern
            refs = [int(round(m)) % 10 for m in ds.mos]
        else:
            refs = [ref_of(p) for p in ds.paths]
        train = {refs[i] for i in ds.splits['train']}
        val = {refs[i] for i in ds.splits['val']}
        test = {refs[i] for i in ds.splits['test']}
        assert len(train) == 3 and len(val) == 1 and len(test) == 1
        assert not train & test and not val & test and not train & val


def test_bid_xlsx(tmp_path):
    fx.make_bid(tmp_path)
    ds = dl.load_dataset('bid', tmp_path)
    assert Path(ds.paths[0]).name == 'DatabaseImage0001.JPG' and ds.mos[0] == pytest.approx(1.2)
    assert len(ds) == 6 and all(Path(p).is_file() for p in ds.paths)


def test_generic_csv_and_json(tmp_path):
    for i in range(5):
        fx.write_image(tmp_path / 'imgs' / f'{i}.png', seed=i)
    rows = [[f'imgs/{i}.png', 10 * i, 'test' if i == 4 else 'train'] for i in range(5)]
    csv_path = fx.write_csv(tmp_path / 'mydata.csv', ['file', 'quality', 'split'], rows)
    ds = dl.load_dataset(str(csv_path), csv_image_column='file', csv_score_column='quality')
    assert ds.name == 'mydata' and ds.score_range == (0.0, 40.0)
    assert list(ds.splits['test']) == [4] and ds.split_source.startswith("mydata.csv column 'split'; val 10%")
    assert ds.paths[1] == str(tmp_path / 'imgs' / '1.png')
    with pytest.raises(dl.DataError, match=r"mydata.csv: column 'score' missing"):
        dl.load_dataset(str(csv_path), csv_image_column='file')
    js = fx.make_json_list(tmp_path / 'j', 'list.json', n=5)
    ds = dl.load_dataset(str(js), seed=2)
    assert {k: len(v) for k, v in ds.splits.items()} == {'train': 3, 'val': 1, 'test': 1}


# ----------------------------------------------------------------------------------------
# validation splits: carved from the training side, no content on two sides
# ----------------------------------------------------------------------------------------

def _generic_csv(root: Path, split_column: bool = False) -> Path:
    rows = []
    for i in range(10):
        fx.write_image(root / 'imgs' / f'{i}.png', seed=i)
        rows.append([f'imgs/{i}.png', i] + (['test' if i >= 8 else 'train'] if split_column else []))
    return fx.write_csv(root / 'list.csv', ['image', 'score'] + (['split'] if split_column else []), rows)


def _name_group(pattern):
    return lambda ds, i: re.search(pattern, Path(ds.paths[i]).name).group(1)


def _image_group(ds, i):
    return ds.paths[i]


# case -> (writer of the real format, data set name (None: load the written file), group of image i)
READER_SPLITS = {
    'koniq-10k without sets file': (lambda r: fx.make_koniq(r, sets=('training',) * 10, sets_file=False),
                                    'koniq', _image_group),
    'koniq-10k user json': (lambda r: fx.make_koniq_user_json(r, n_train=8, n_test=3), 'koniq', _image_group),
    'spaq': (lambda r: fx.make_spaq(r, n=10), 'spaq', _image_group),
    'kadid-10k': (fx.make_kadid, 'kadid', _name_group(r'^I(\d+)_')),
    'agiqa-3k': (fx.make_agiqa, 'agiqa', _name_group(r'_prompt(\d+)')),
    'livec': (lambda r: fx.make_livec(r, n=17), 'livec', _image_group),
    'live': (fx.make_live, 'live', lambda ds, i: int(round(ds.mos[i])) % 10),   # dmos = 20 + 10 d + ref
    'csiq': (fx.make_csiq, 'csiq', _name_group(r'^(.*?)\.')),
    'tid2013': (fx.make_tid2013, 'tid2013', _name_group(r'^i(\d+)_')),
    'bid': (lambda r: fx.make_bid(r, n=10), 'bid', _image_group),
    'csv': (_generic_csv, None, _image_group),
    'csv with a train/test column': (lambda r: _generic_csv(r, split_column=True), None, _image_group),
    'json': (lambda r: fx.make_json_list(r, 'list.json', n=10), None, _image_group),
}


@pytest.mark.parametrize('case', list(READER_SPLITS))
def test_every_reader_splits_train_val_test_by_group(tmp_path, case):
    make, name, group_of = READER_SPLITS[case]
    made = make(tmp_path)
    target = (name, tmp_path) if name else (str(made), None)
    for seed in (0, 1, 2):
        ds = dl.load_dataset(*target, seed=seed)
        assert list(ds.splits) == ['train', 'val', 'test'], ds.split_source
        sides = {k: {group_of(ds, i) for i in idx} for k, idx in ds.splits.items()}
        assert all(sides.values())
        assert not sides['train'] & sides['val'] and not sides['train'] & sides['test']
        assert not sides['val'] & sides['test']
        assert 'val 10% of the training side' in ds.split_source
        # val comes out of the training side only: the test split is that of --val_ratio 0
        before = dl.load_dataset(*target, seed=seed, val_ratio=0)
        assert list(before.splits) == ['train', 'test']
        assert before.split_source.endswith('no validation split (val_ratio 0)')
        assert np.array_equal(before.splits['test'], ds.splits['test'])
        assert np.array_equal(np.sort(np.concatenate([ds.splits['train'], ds.splits['val']])),
                              before.splits['train'])
        again = dl.load_dataset(*target, seed=seed)
        assert all(np.array_equal(again.splits[k], ds.splits[k]) for k in ds.splits)


def test_split_by_groups_sizes_seed_and_old_split():
    groups = [f'prompt {i // 6}' for i in range(600)]       # 100 prompts of 6 images
    splits = dl.split_by_groups(600, seed=7, train_ratio=0.8, val_ratio=0.1, groups=groups)
    units = {k: {groups[i] for i in idx} for k, idx in splits.items()}
    assert {k: len(v) for k, v in units.items()} == {'train': 72, 'val': 8, 'test': 20}
    assert {k: len(v) for k, v in splits.items()} == {'train': 432, 'val': 48, 'test': 120}
    assert not units['train'] & units['val'] and not (units['train'] | units['val']) & units['test']
    other = dl.split_by_groups(600, seed=8, train_ratio=0.8, val_ratio=0.1, groups=groups)
    assert not np.array_equal(other['val'], splits['val'])
    # --val_ratio 0 is the split of earlier versions, image for image (frozen from them)
    assert dl.split_by_groups(10, seed=3, train_ratio=0.8, val_ratio=0)['test'].tolist() == [3, 8]
    with pytest.raises(dl.DataError, match='val_ratio must be at least 0 and below 1'):
        dl.split_by_groups(10, seed=3, val_ratio=1.0)


# ----------------------------------------------------------------------------------------
# image folders: found from the first listed image, not guessed
# ----------------------------------------------------------------------------------------

def test_agiqa_images_in_another_folder_are_found_and_named(tmp_path, capsys):
    # The AGIQA-3K copy in the user's second project keeps its images in ACGIQA-3K/.
    fx.make_agiqa(tmp_path)
    (tmp_path / 'ACGIQA-3K').mkdir()
    for image in tmp_path.glob('*.jpg'):
        image.rename(tmp_path / 'ACGIQA-3K' / image.name)
    ds = dl.load_dataset('agiqa', tmp_path)
    assert all(Path(p).parent == tmp_path / 'ACGIQA-3K' and Path(p).is_file() for p in ds.paths)
    out = capsys.readouterr().out
    assert f'agiqa-3k: images found in {tmp_path / "ACGIQA-3K"}' in out and 'using that folder' in out
    dl.load_images(ds.paths, (40, 48), cache_dir=None, progress=False)


def test_images_nowhere_give_one_message_naming_folders_and_flag(tmp_path):
    fx.make_agiqa(tmp_path, prompts=15)
    (tmp_path / 'elsewhere' / 'deeper').mkdir(parents=True)
    for image in tmp_path.glob('*.jpg'):
        image.rename(tmp_path / 'elsewhere' / 'deeper' / image.name)
    with pytest.raises(dl.DataError) as e:
        dl.load_dataset('agiqa', tmp_path)
    msg = str(e.value)
    assert msg.startswith('agiqa-3k: cannot find the images: model0_prompt0.jpg (the first listed in '
                          f'{tmp_path / "data.csv"}) is not in {tmp_path / "AGIQA-3K"}/ (no such folder), ')
    assert f'searched {tmp_path / "elsewhere"})' in msg and '--data_root PATH' in msg
    assert len(msg.splitlines()) == 1 and msg.count('.jpg') == 1


def test_a_missing_first_image_keeps_the_folder_and_is_reported_alone(tmp_path):
    fx.make_csiq(tmp_path)
    first = sorted((tmp_path / 'dst_imgs_all').iterdir())[0]
    listed_first = (tmp_path / 'csiq_label.txt').read_text().split()[0]
    (tmp_path / 'dst_imgs_all' / listed_first).unlink()
    ds = dl.load_dataset('csiq', tmp_path)
    assert Path(ds.paths[0]).parent == tmp_path / 'dst_imgs_all' and first.parent == Path(ds.paths[0]).parent
    with pytest.raises(dl.DataError, match=r'1 of 10 images cannot be used:\n  .*1600.AWGN.1.png: file not found'):
        dl.load_images(ds.paths, (40, 48), cache_dir=None, progress=False)


FOLDER_CASES = [c for c in READER_SPLITS if c != 'koniq-10k user json']


def _move_images(root: Path, paths, to: Path) -> None:
    for p in map(Path, paths):
        target = to / p.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        p.rename(target)


@pytest.mark.parametrize('case', FOLDER_CASES)
def test_every_reader_finds_its_images_one_level_down(tmp_path, case, capsys):
    make, name, _ = READER_SPLITS[case]
    made = make(tmp_path)
    target = (name, tmp_path) if name else (str(made), None)
    ds = dl.load_dataset(*target)
    _move_images(tmp_path, ds.paths, tmp_path / 'copy')   # the same layout, one folder down
    capsys.readouterr()
    moved = dl.load_dataset(*target)
    assert [str(Path(p).relative_to(tmp_path / 'copy')) for p in moved.paths] == \
        [str(Path(p).relative_to(tmp_path)) for p in ds.paths]
    assert all(Path(p).is_file() for p in moved.paths)
    assert 'images found in ' + str(tmp_path / 'copy') in capsys.readouterr().out


@pytest.mark.parametrize('case', FOLDER_CASES)
def test_every_reader_says_once_where_it_looked(tmp_path, case):
    make, name, _ = READER_SPLITS[case]
    made = make(tmp_path)
    target = (name, tmp_path) if name else (str(made), None)
    ds = dl.load_dataset(*target)
    _move_images(tmp_path, ds.paths, tmp_path / 'a' / 'b')   # two levels down: not searched
    with pytest.raises(dl.DataError) as e:
        dl.load_dataset(*target)
    msg = str(e.value)
    assert 'cannot find the images' in msg and str(tmp_path / 'a') in msg and len(msg.splitlines()) == 1
    assert ('--data_root PATH' in msg) if name else ('relative to its folder' in msg)


# ----------------------------------------------------------------------------------------
# bad annotation input
# ----------------------------------------------------------------------------------------

def test_missing_root_and_missing_annotation(tmp_path):
    with pytest.raises(dl.DataError) as e:
        dl.load_dataset('koniq', tmp_path / 'nowhere')
    assert str(tmp_path / 'nowhere') in str(e.value) and 'does not exist' in str(e.value)
    assert 'koniq10k_scores_and_distributions.csv' in str(e.value) and '--data_root' in str(e.value)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(dl.DataError, match=r'koniq-10k: no annotation file in .*empty: expected koniq10k_scores'):
        dl.load_dataset('koniq', tmp_path / 'empty')
    with pytest.raises(dl.DataError, match=r'livec: no annotation file .*AllImages_release.mat'):
        dl.load_dataset('livec', tmp_path / 'empty')


def test_missing_column_and_bad_score(tmp_path):
    fx.write_csv(tmp_path / 'koniq10k_scores_and_distributions.csv', ['image_name', 'MOS'], [['a.jpg', 3.0]])
    with pytest.raises(dl.DataError) as e:
        dl.load_dataset('koniq', tmp_path)
    msg = str(e.value)
    assert "koniq10k_scores_and_distributions.csv: column 'MOS_zscore' missing" in msg
    assert 'found image_name, MOS' in msg

    fx.make_kadid(tmp_path / 'k')
    lines = (tmp_path / 'k' / 'dmos.csv').read_text().splitlines()
    lines[3] = lines[3].replace(lines[3].split(',')[2], 'n/a')
    (tmp_path / 'k' / 'dmos.csv').write_text('\n'.join(lines) + '\n')
    with pytest.raises(dl.DataError, match=r"dmos.csv line 4, column 'dmos': expected a number, got 'n/a'"):
        dl.load_dataset('kadid', tmp_path / 'k')

    js = fx.make_json_list(tmp_path / 'j', 'spaq_test.json', n=3)
    data = json.loads(js.read_text())
    data[2]['score'] = 'good'
    js.write_text(json.dumps(data))
    with pytest.raises(dl.DataError, match=r'spaq_test.json entry 2 \(0-based\), key "score": expected a number'):
        dl.load_dataset('spaq', tmp_path / 'j')

    fx.make_spaq(tmp_path / 's', n=3)
    import openpyxl
    xlsx = tmp_path / 's' / 'Annotations' / 'MOS and Image attribute scores.xlsx'
    wb = openpyxl.load_workbook(xlsx)
    wb.active['B3'] = 'x'
    wb.save(xlsx)
    with pytest.raises(dl.DataError, match=r"scores.xlsx row 3, column 'MOS': expected a number, got 'x'"):
        dl.load_dataset('spaq', tmp_path / 's')


def test_bad_set_value_and_unknown_score_column(tmp_path):
    fx.make_koniq(tmp_path, sets=('training', 'train', 'test'))
    with pytest.raises(dl.DataError,
                       match=r"sets.csv line 3, column 'set': expected training, validation or test, got 'train'"):
        dl.load_dataset('koniq', tmp_path)


# ----------------------------------------------------------------------------------------
# load_images: decoding, modes, cache, bad images
# ----------------------------------------------------------------------------------------

def test_resize_matches_torchvision_and_cache_off(tmp_path):
    from torchvision import transforms
    path = fx.write_image(tmp_path / 'a.jpg', hw=(60, 80), seed=1, fmt='JPEG')
    images, kept = dl.load_images([path], (20, 16), cache_dir=None, progress=False)
    assert images.shape == (1, 3, 20, 16) and images.dtype == torch.uint8 and kept.tolist() == [0]
    with Image.open(path) as im:
        expected = np.asarray(transforms.Resize((20, 16))(im.convert('RGB')))
    assert np.array_equal(images[0].permute(1, 2, 0).numpy(), expected)
    assert not (tmp_path / '.cache').exists()


def test_colour_modes_convert_to_rgb(tmp_path):
    paths = {}
    paths['gray'] = fx.write_image(tmp_path / 'gray.png', mode='L')
    cmyk = Image.new('CMYK', (8, 8), (0, 255, 255, 0))           # pure red in CMYK
    cmyk.save(tmp_path / 'cmyk.jpg', quality=100)
    paths['cmyk'] = tmp_path / 'cmyk.jpg'
    rgba = Image.new('RGBA', (8, 8), (10, 20, 30, 0))             # fully transparent
    rgba.putpixel((0, 0), (10, 20, 30, 255))                       # one opaque pixel
    rgba.save(tmp_path / 'rgba.png')
    paths['rgba'] = tmp_path / 'rgba.png'
    pal = Image.new('P', (8, 8), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info['transparency'] = 1
    pal.save(tmp_path / 'pal.png', transparency=1)
    paths['pal'] = tmp_path / 'pal.png'
    gray16 = np.full((8, 8), 257 * 200, dtype=np.uint16)
    paths['gray16'] = fx.write_png16(tmp_path / 'gray16.png', gray16)
    rgb16 = np.zeros((8, 8, 3), dtype=np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 65535, 257 * 128, 257 * 10
    paths['rgb16'] = fx.write_png16(tmp_path / 'rgb16.png', rgb16)
    paths['bilevel'] = tmp_path / 'bw.png'
    Image.new('1', (8, 8), 1).save(paths['bilevel'])
    # sizes differ (gray.png is 40x48): decode each on its own at native size
    got = {}
    for n in paths:
        img, _ = dl.load_images([paths[n]], None, cache_dir=None, progress=False)
        got[n] = img[0, :, 0, 0].tolist(), img[0, :, -1, -1].tolist()
    with Image.open(paths['gray']) as im:
        g = im.getpixel((0, 0))
    assert got['gray'][0] == [g, g, g]
    assert got['cmyk'][0][0] > 240 and got['cmyk'][0][1] < 15 and got['cmyk'][0][2] < 15
    assert got['rgba'][0] == [10, 20, 30] and got['rgba'][1] == [255, 255, 255]   # composited on white
    assert got['pal'][0] == [255, 255, 255]
    assert got['gray16'][0] == [200, 200, 200]   # scaled, not clipped to 255
    assert got['rgb16'][0] == [255, 128, 10]
    assert got['bilevel'][0] == [255, 255, 255]


def test_cache_hit_and_invalidation(tmp_path, monkeypatch, capsys):
    paths = [fx.write_image(tmp_path / f'{i}.png', seed=i) for i in range(4)]
    cache = tmp_path / 'cache'
    first, _ = dl.load_images(paths, (24, 16), cache_dir=cache, progress=False)
    assert len(list(cache.glob('*.npy'))) == 1 and len(list(cache.glob('*.json'))) == 1
    assert not list(cache.glob('.*tmp'))   # no temporary files left behind

    def no_decode(*args, **kwargs):
        raise AssertionError('decoded although the cache should have been used')
    real_decode = image_cache._decode
    monkeypatch.setattr(image_cache, '_decode', no_decode)
    capsys.readouterr()
    second, kept = dl.load_images(paths, (24, 16), cache_dir=cache, progress=False)
    assert torch.equal(first, second) and kept.tolist() == [0, 1, 2, 3]
    assert 'image cache hit' in capsys.readouterr().out

    calls = []
    monkeypatch.setattr(image_cache, '_decode', lambda *a: calls.append(a) or real_decode(*a))
    time.sleep(0.01)
    fx.write_image(paths[2], seed=99)              # the file changes: new size/mtime, new key
    third, _ = dl.load_images(paths, (24, 16), cache_dir=cache, progress=False)
    assert len(calls) == 4 and not torch.equal(third[2], first[2]) and torch.equal(third[0], first[0])
    calls.clear()
    dl.load_images(paths, (20, 16), cache_dir=cache, progress=False)   # another resize: another entry
    assert len(calls) == 4


def test_unreadable_cache_is_rebuilt(tmp_path, capsys):
    paths = [fx.write_image(tmp_path / f'{i}.png', seed=i) for i in range(2)]
    cache = tmp_path / 'cache'
    first, _ = dl.load_images(paths, (8, 8), cache_dir=cache, progress=False)
    npy = next(cache.glob('*.npy'))
    truncated = npy.read_bytes()[:100]
    # a new, truncated file in its place (replaced, as every writer of the cache replaces files):
    # `first` maps the old file, which must not be changed in place under a process reading it
    npy.unlink()
    npy.write_bytes(truncated)
    again, _ = dl.load_images(paths, (8, 8), cache_dir=cache, progress=False)
    assert torch.equal(first, again) and 'ignoring unreadable image cache' in capsys.readouterr().err


def test_bad_images_reported_together_or_skipped(tmp_path, capsys):
    good = [fx.write_image(tmp_path / f'good{i}.jpg', seed=i, fmt='JPEG') for i in range(3)]
    truncated = tmp_path / 'truncated.jpg'
    data = fx.write_image(tmp_path / 'full.jpg', hw=(64, 64), fmt='JPEG').read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    corrupt = tmp_path / 'corrupt.jpg'
    corrupt.write_bytes(b'this is not an image' * 10)
    absent = tmp_path / 'absent.jpg'
    paths = [good[0], truncated, good[1], absent, corrupt, good[2]]
    with pytest.raises(dl.DataError) as e:
        dl.load_images(paths, (16, 16), cache_dir=None, progress=False)
    msg = str(e.value)
    assert msg.startswith('3 of 6 images cannot be used')
    assert f'{absent}: file not found' in msg
    assert f'{truncated}: cannot decode image' in msg and 'truncated' in msg
    assert f'{corrupt}: cannot decode image' in msg
    assert 'skip_bad=True' in msg and '--skip_bad_images' in msg and str(good[0]) not in msg

    images, kept = dl.load_images(paths, (16, 16), cache_dir=None, progress=False, skip_bad=True)
    assert kept.tolist() == [0, 2, 5] and images.shape[0] == 3
    single, _ = dl.load_images([good[1]], (16, 16), cache_dir=None, progress=False)
    assert torch.equal(images[1], single[0])   # compaction kept the right pixels
    assert 'skipping 3 of 6 images' in capsys.readouterr().err


def test_more_than_twenty_bad_images_are_counted(tmp_path):
    paths = [tmp_path / f'missing{i:02d}.jpg' for i in range(23)] + [fx.write_image(tmp_path / 'ok.png')]
    with pytest.raises(dl.DataError) as e:
        dl.load_images(paths, (8, 8), cache_dir=None, progress=False)
    msg = str(e.value)
    assert '23 of 24 images cannot be used' in msg and '... and 3 more' in msg
    assert 'missing19.jpg' in msg and 'missing20.jpg' not in msg
    with pytest.raises(dl.DataError, match='none of the 23 images can be used'):
        dl.load_images(paths[:23], (8, 8), cache_dir=None, progress=False, skip_bad=True)


def test_native_size_and_too_small_images(tmp_path):
    same = [fx.write_image(tmp_path / f's{i}.png', hw=(30, 20), seed=i) for i in range(3)]
    images, _ = dl.load_images(same, None, cache_dir=None, progress=False)
    assert images.shape == (3, 3, 30, 20)
    odd = fx.write_image(tmp_path / 'odd.png', hw=(31, 20))
    with pytest.raises(dl.DataError, match=r'odd.png: image is 31x20 \(HxW\) but most images are 30x20'):
        dl.load_images(same + [odd], None, cache_dir=None, progress=False)
    small = [fx.write_image(tmp_path / f'small{i}.png', hw=(10, 12), seed=i) for i in range(2)]
    with pytest.raises(dl.DataError, match=r'small0.png: image is 10x12 \(HxW\), smaller than the 16x16 patch'):
        dl.load_images(small, None, cache_dir=None, progress=False, min_hw=(16, 16))
    with pytest.raises(dl.DataError, match='none of the 2 images can be used'):
        dl.load_images(small, None, cache_dir=None, progress=False, min_hw=(16, 16), skip_bad=True)
    # resized, a small file is scaled up like torchvision Resize did in the user's pipeline
    images, kept = dl.load_images(same + small, (32, 32), cache_dir=None, progress=False, min_hw=(16, 16))
    assert kept.tolist() == [0, 1, 2, 3, 4] and images.shape == (5, 3, 32, 32)
    with pytest.raises(dl.DataError, match=r'resize_hw 20x20 \(HxW\) is smaller than the 24x24 patches'):
        dl.load_images(same, (20, 20), cache_dir=None, progress=False, min_hw=(24, 24))


# ----------------------------------------------------------------------------------------
# patch sampling
# ----------------------------------------------------------------------------------------

def position_images(n=6, h=40, w=48) -> torch.Tensor:
    """Channel 0 = row, channel 1 = column, channel 2 = 10 * image index: a patch tells where it came from."""
    images = torch.empty((n, 3, h, w), dtype=torch.uint8)
    images[:, 0] = torch.arange(h).view(1, h, 1)
    images[:, 1] = torch.arange(w).view(1, 1, w)
    images[:, 2] = (10 * torch.arange(n)).view(n, 1, 1)
    return images


def locate(patch_u8: torch.Tensor, p: int) -> tuple[int, int, int, bool]:
    """(image, top, left, flipped) of a patch cut from position_images, checking it is an exact crop."""
    rows, cols, tag = patch_u8[0], patch_u8[1], patch_u8[2]
    assert (tag == tag[0, 0]).all()
    top = int(rows[0, 0])
    assert torch.equal(rows, (top + torch.arange(p)).view(p, 1).expand(p, p))
    flipped = bool(cols[0, 0] > cols[0, -1])
    left = int(cols[0, -1] if flipped else cols[0, 0])
    expected = left + torch.arange(p)
    assert torch.equal(cols, (expected.flip(0) if flipped else expected).view(1, p).expand(p, p))
    return int(tag[0, 0]) // 10, top, left, flipped


def test_train_crops_in_bounds_exact_flipped_and_shuffled():
    images, p = position_images(), 16
    mos = np.arange(6) * 10.0
    sampler = dl.TrainPatchSampler(images, mos, patch_size=p, patch_num=20, batch_size=32, color_jitter=False)
    assert len(sampler) == 4   # 120 pairs / 32, last batch partial
    seen, tops, lefts, flips = Counter(), [], [], []
    for patches, batch_mos, index in sampler.batches(0):
        assert patches.dtype == torch.float32 and batch_mos.dtype == torch.float32 and index.dtype == torch.int64
        for k in range(len(index)):
            image, top, left, flipped = locate(to_u8(patches[k:k + 1])[0], p)
            assert image == int(index[k]) and batch_mos[k] == mos[image]
            assert 0 <= top <= 40 - p and 0 <= left <= 48 - p
            seen[image] += 1
            tops.append(top), lefts.append(left), flips.append(flipped)
    assert seen == {i: 20 for i in range(6)}                  # every (image, patch) pair once
    assert min(tops) == 0 and max(tops) == 40 - p and min(lefts) == 0 and max(lefts) == 48 - p
    assert 0.3 < np.mean(flips) < 0.7
    first_batch = next(iter(sampler.batches(0)))[2].tolist()
    assert first_batch != sorted(first_batch)                 # pairs are shuffled across images


def test_train_batches_are_deterministic_per_seed_epoch():
    images = position_images()
    make = lambda seed: dl.TrainPatchSampler(images, np.zeros(6), patch_size=16, patch_num=5, batch_size=8,
                                             seed=seed)
    a = [torch.cat([b[0].flatten(), b[2].float()]) for b in make(0).batches(3)]
    b = [torch.cat([b[0].flatten(), b[2].float()]) for b in make(0).batches(3)]
    c = [torch.cat([b[0].flatten(), b[2].float()]) for b in make(0).batches(4)]
    d = [torch.cat([b[0].flatten(), b[2].float()]) for b in make(1).batches(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert not all(torch.equal(x, y) for x, y in zip(a, d))


def test_color_jitter_range():
    # constant images: gray, and a colour that stays inside [0, 1] under the strongest jitter
    n = 2
    images = torch.empty((n, 3, 20, 20), dtype=torch.uint8)
    images[0] = 128
    images[1, 0], images[1, 1], images[1, 2] = 150, 110, 80
    sampler = dl.TrainPatchSampler(images, np.zeros(n), patch_size=8, patch_num=300, batch_size=100, seed=5)
    yiq = torch.tensor(patch_module._RGB_TO_YIQ, dtype=torch.float64)
    ratios, y_ratios, chroma_ratios, angles = [], [], [], []
    base = {i: images[i, :, 0, 0].double() / 255 for i in range(n)}
    for patches, _, index in sampler.batches(0):
        unit = to_unit(patches).double()
        assert (unit.amax(dim=(2, 3)) - unit.amin(dim=(2, 3))).max() < 1e-5   # still constant
        for k, i in enumerate(index.tolist()):
            colour = unit[k, :, 0, 0]
            if i == 0:
                ratios.append(float(colour.mean() / base[0].mean()))
                assert float(colour.max() - colour.min()) < 1e-5   # gray stays gray
            else:
                a, b = yiq @ colour, yiq @ base[1]
                y_ratios.append(float(a[0] / b[0]))
                chroma_ratios.append(float(a[1:].norm() / b[1:].norm()))
                angles.append(float(torch.atan2(a[2], a[1]) - torch.atan2(b[2], b[1])) * 180 / np.pi)
    for values, lo, hi in ((ratios, 0.9, 1.1), (y_ratios, 0.9, 1.1), (chroma_ratios, 0.9 ** 3, 1.1 ** 3),
                           (angles, -18.0, 18.0)):
        assert lo - 1e-3 <= min(values) and max(values) <= hi + 1e-3
        span = hi - lo
        assert min(values) < lo + 0.15 * span and max(values) > hi - 0.15 * span   # the range is used


def test_jitter_off_is_plain_normalization():
    images = position_images()
    sampler = dl.TrainPatchSampler(images, np.zeros(6), patch_size=16, patch_num=2, batch_size=4,
                                   color_jitter=False)
    patches, _, _ = next(iter(sampler.batches(0)))
    unit = to_unit(patches) * 255
    assert torch.allclose(unit, torch.round(unit), atol=1e-3)   # exactly the pixel values


def test_ddp_shards_disjoint_with_equal_batch_counts():
    images = position_images(n=10)
    samplers = [dl.TrainPatchSampler(images, np.zeros(10), patch_size=16, patch_num=4, batch_size=5, rank=r,
                                     world_size=3, color_jitter=False) for r in range(3)]
    for epoch in (0, 1):
        shares, counts = [], []
        for s in samplers:
            batches = list(s.batches(epoch))
            counts.append(len(batches))
            assert len(batches) == len(s) == 4 and sum(len(b[2]) for b in batches) == 16
            shares.append({int(i) for b in batches for i in b[2]})
        assert counts == [4, 4, 4]
        assert sum(len(x) for x in shares) == 10 and set().union(*shares) == set(range(10))
        if epoch == 0:
            first = shares
    assert first != shares   # images are dealt out afresh each epoch
    with pytest.raises(dl.DataError, match='rank 3 is not in 0..2'):
        dl.TrainPatchSampler(images, np.zeros(10), patch_size=16, rank=3, world_size=3)


def test_drop_last_and_small_images():
    images = position_images()
    s = dl.TrainPatchSampler(images, np.zeros(6), patch_size=16, patch_num=5, batch_size=8, drop_last=True)
    assert len(s) == 3 and all(len(b[2]) == 8 for b in s.batches(0))
    with pytest.raises(dl.DataError, match=r'images are 40x48 \(HxW\), smaller than patch_size 64'):
        dl.TrainPatchSampler(images, np.zeros(6), patch_size=64)
    with pytest.raises(dl.DataError, match='6 images but 5 scores'):
        dl.TrainPatchSampler(images, np.zeros(5), patch_size=16)


def test_eval_crops_fixed_ordered_unflipped():
    images, p = position_images(), 16
    run = lambda **kw: list(dl.eval_patch_batches(images, patch_size=p, patch_num=7, batch_size=10, **kw))
    a, b = run(), run()
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    index = torch.cat([x[1] for x in a])
    assert index.tolist() == [i for i in range(6) for _ in range(7)]   # image after image
    patches = torch.cat([x[0] for x in a])
    positions = set()
    for k in range(len(index)):
        image, top, left, flipped = locate(to_u8(patches[k:k + 1])[0], p)
        assert image == int(index[k]) and not flipped and 0 <= top <= 40 - p and 0 <= left <= 48 - p
        positions.add((image, top, left))
    assert len(positions) > 30   # distinct crops, not 7 copies of the centre
    # a subset keeps the crops of its first images; another batch size changes nothing
    sub = torch.cat([x[0] for x in dl.eval_patch_batches(images[:2], patch_size=p, patch_num=7, batch_size=3)])
    assert torch.equal(sub, patches[:14])
    # a view that starts further into the storage (images[2:4], storage_offset > 0) is cut from
    # its own images, exactly as a copy of them is, not from the storage's first ones
    view = torch.cat([x[0] for x in dl.eval_patch_batches(images[2:4], patch_size=p, patch_num=7, batch_size=3)])
    copy = torch.cat([x[0] for x in dl.eval_patch_batches(images[2:4].clone(), patch_size=p, patch_num=7,
                                                          batch_size=3)])
    assert torch.equal(view, copy) and not torch.equal(view, sub)
    # a process's share (DDP): same indices and crops as in the full run
    share = list(dl.eval_patch_batches(images, patch_size=p, patch_num=7, batch_size=10, image_ids=[1, 4]))
    assert torch.cat([x[1] for x in share]).tolist() == [1] * 7 + [4] * 7
    assert torch.equal(torch.cat([x[0] for x in share]), torch.cat([patches[7:14], patches[28:35]]))
    r1, r2, r1b = run(random_crop=True, seed=1), run(random_crop=True, seed=2), run(random_crop=True, seed=1)
    cat = lambda r: torch.cat([x[0] for x in r])
    assert torch.equal(cat(r1), cat(r1b)) and not torch.equal(cat(r1), cat(r2))


def test_eval_center_crop_is_torchvision_centercrop_and_cut_once():
    import torchvision.transforms.functional as TF
    for h, w, p in ((40, 48, 16), (41, 50, 16), (43, 45, 16)):   # odd margins: round() as torchvision
        images = position_images(n=3, h=h, w=w)
        batches = list(dl.eval_patch_batches(images, patch_size=p, patch_num=20, batch_size=2, crop='center'))
        index = torch.cat([x[1] for x in batches])
        assert index.tolist() == [0, 1, 2]   # 20 identical crops have the mean of one: one is cut
        patches = to_u8(torch.cat([x[0] for x in batches]))
        expected = TF.center_crop(images, [p, p]).to(torch.int64)
        assert torch.equal(patches, expected), (h, w)
    # the other modes keep their names: crop='random' is random_crop=True, the default is 'fixed'
    images = position_images()
    cat = lambda **kw: torch.cat([x[0] for x in dl.eval_patch_batches(images, patch_size=16, patch_num=7, **kw)])
    assert torch.equal(cat(crop='random', seed=4), cat(random_crop=True, seed=4))
    assert torch.equal(cat(crop='fixed'), cat())
    with pytest.raises(dl.DataError, match='crop must be one of fixed, center, random'):
        cat(crop='middle')


# ----------------------------------------------------------------------------------------
# the demo data set
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    return dl.ensure_demo_dataset(tmp_path_factory.mktemp('demo') / 'demo-koniq')


def test_demo_dataset_through_koniq_reader(demo_root):
    ds = dl.load_dataset('demo', demo_root)
    assert len(ds) == 256 and ds.score_name == 'MOS_zscore'
    assert {k: len(v) for k, v in ds.splits.items()} == {'train': 160, 'val': 48, 'test': 48}
    assert all(Path(p).is_file() for p in ds.paths)
    ref = [Path(p).name.split('_')[0] for p in ds.paths]
    sides = {k: {ref[i] for i in v} for k, v in ds.splits.items()}
    assert not sides['train'] & sides['val'] and not sides['train'] & sides['test']
    assert not sides['val'] & sides['test']
    # the same reader gives the same data set when pointed at it as KonIQ
    assert dl.load_dataset('koniq', demo_root).paths == ds.paths
    # one scale for all kinds: the score falls with the level of every distortion
    level = np.array([0 if 'pristine' in p else int(Path(p).stem[-1]) for p in ds.paths])
    means = [ds.mos[level == k].mean() for k in range(6)]
    assert all(a > b + 5 for a, b in zip(means, means[1:]))
    info = json.loads((demo_root / 'demo_info.json').read_text())
    assert sum(r['origin'].startswith('skimage') for r in info['references']) >= 10   # photos, no download
    images, _ = dl.load_images(ds.paths[:3], None, cache_dir=None, progress=False)
    assert images.shape == (3, 3, 384, 512)


def test_demo_is_generated_once(demo_root):
    stamp = (demo_root / 'demo_info.json').stat().st_mtime_ns
    assert dl.ensure_demo_dataset(demo_root) == demo_root
    assert (demo_root / 'demo_info.json').stat().st_mtime_ns == stamp
    assert not list(demo_root.parent.glob('.demo-koniq.tmp-*'))


def test_demo_refuses_a_foreign_folder(tmp_path):
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'thesis.tex').write_text('precious')
    with pytest.raises(dl.DataError, match='exists but is not a demo data set'):
        dl.ensure_demo_dataset(tmp_path / 'mine')
    assert (tmp_path / 'mine' / 'thesis.tex').read_text() == 'precious'


# ----------------------------------------------------------------------------------------
# the benchmark runs (smoke)
# ----------------------------------------------------------------------------------------

def test_bench_data_smoke():
    result = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'bench_data.py'), '--images', '8',
                             '--patches', '64', '--repeats', '1'],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r'data pipeline speedup: \d+\.\dx \(no jitter\), \d+\.\dx \(jitter\)', last), last


def test_gpu_path_arithmetic_matches_cpu_path():
    """The whole-batch path (used on a GPU) and the per-patch CPU path give the same patches."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 40, 48), dtype=torch.uint8, generator=g)
    index, top, left, flip = [0, 3, 1, 2, 3] * 2, [0, 24, 5, 9, 1] * 2, [0, 32, 7, 3, 30] * 2, [True, False] * 5
    maps = patch_module._jitter_maps(patch_module._jitter_factors(g, 10), torch.device('cpu'))
    for f in (None, maps):
        cpu = patch_module._cut_normalized_cpu(images, index, top, left, flip, 16, f)
        batch = patch_module._normalize_batch(patch_module._cut_uint8(images, index, top, left, flip, 16), f)
        assert cpu.shape == batch.shape == (10, 3, 16, 16)
        assert torch.allclose(cpu, batch, atol=1e-5)
