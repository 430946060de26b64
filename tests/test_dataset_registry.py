"""A data set is declared in one place: its module under iqa/data/datasets/ registers one record
(names, default root, expected layout, annotation files, reader), and every table, help text
and error message is derived from the records."""
import importlib
import sys
import textwrap

import numpy as np
import pytest

import data_loader
from dataset_fixtures import write_image
from iqa.data import datasets, registry

# A new data set in a format of its own: 'scores.tsv' lines '<file>\t<score>', images in pics/.
TOY_MODULE = '''
"""Toy-IQA: scores.tsv with images in pics/, split at random by image."""
from pathlib import Path

from iqa.data.formats import find_image_folder, parse_number
from iqa.data.registry import DatasetRecord, ReadContext, make_dataset, missing_annotation, register
from iqa.data.splits import random_source, random_split


def read_toy(ctx: ReadContext):
    table = ctx.root / 'scores.tsv'
    if not table.is_file():
        raise missing_annotation(ctx)
    rows = [line.split('\\t') for line in table.read_text().splitlines() if line.strip()]
    names = [name for name, _ in rows]
    mos = [parse_number(score, f'{table} line {n}') for n, (_, score) in enumerate(rows, start=1)]
    folder = find_image_folder(ctx, names, [ctx.root / 'pics'], table)
    splits = random_split(ctx, len(names))
    return make_dataset(ctx, [folder / n for n in names], mos, splits, random_source(ctx, 'image'),
                        'score', (0.0, 10.0))


RECORD = register(DatasetRecord(
    name='toy-iqa', aliases=('toy', 'toyiqa'), default_root=Path(DEFAULT_ROOT),
    layout='scores.tsv with images in pics/', annotation_files=('scores.tsv',), reader=read_toy))
'''


@pytest.fixture
def toy_module(tmp_path):
    """Drop toyiqa.py into the data-set package's path, as a new file in iqa/data/datasets/ would be."""
    folder = tmp_path / 'more_datasets'
    folder.mkdir()
    (folder / 'toyiqa.py').write_text(TOY_MODULE.replace('DEFAULT_ROOT', repr(str(tmp_path / 'toy-default'))))
    datasets.__path__.append(str(folder))
    try:
        yield folder
    finally:
        datasets.__path__.remove(str(folder))
        sys.modules.pop('iqa.data.datasets.toyiqa', None)
        if 'toy-iqa' in registry.RECORDS:
            registry.unregister('toy-iqa')


def make_toy(root, n=10):
    lines = []
    for i in range(n):
        write_image(root / 'pics' / f'p{i}.png', seed=i)
        lines.append(f'p{i}.png\t{i * 0.5:g}')
    (root / 'scores.tsv').write_text('\n'.join(lines) + '\n')


def test_a_new_data_set_is_one_module(toy_module, tmp_path):
    assert 'toyiqa' in datasets.import_all()
    # every table is derived from the record, and the face sees the same tables
    assert 'toy-iqa' in data_loader.DATASET_NAMES
    assert data_loader.DATASET_ALIASES['toy'] == data_loader.DATASET_ALIASES['toyiqa'] == 'toy-iqa'
    assert data_loader.DEFAULT_ROOTS['toy-iqa'] == tmp_path / 'toy-default'
    assert data_loader.EXPECTED_LAYOUT['toy-iqa'] == 'scores.tsv with images in pics/'
    assert data_loader.ANNOTATION_FILES['toy-iqa'] == ('scores.tsv',)
    assert data_loader.resolve_dataset('TOY') == ('toy-iqa', tmp_path / 'toy-default')

    # its default root is empty: the message quotes the layout the record declares
    with pytest.raises(data_loader.DataError, match=r'toy-iqa: dataset root .*toy-default does not exist; '
                                                    r'expected scores.tsv with images in pics/'):
        data_loader.load_dataset('toy')
    with pytest.raises(data_loader.DataError, match=r'toy-iqa: no annotation file in .*: expected scores.tsv'):
        data_loader.load_dataset('toy-iqa', tmp_path)

    root = tmp_path / 'toy'
    make_toy(root)
    by_name = data_loader.load_dataset('toy-iqa', root, seed=4)
    by_alias = data_loader.load_dataset('toyiqa', root / 'scores.tsv', seed=4)   # its annotation file: its folder
    assert by_name.name == by_alias.name == 'toy-iqa' and len(by_name) == 10
    assert by_name.paths == by_alias.paths and by_name.paths[3] == str(root / 'pics' / 'p3.png')
    assert np.array_equal(by_name.mos, np.arange(10) * 0.5)
    assert set(by_name.splits) == {'train', 'val', 'test'}
    for key in by_name.splits:
        assert np.array_equal(by_name.splits[key], by_alias.splits[key])
        assert np.array_equal(by_name.splits[key], data_loader.split_by_groups(10, 4)[key])
    images, kept = data_loader.load_images(by_name.paths, (32, 32), cache_dir=None, progress=False)
    assert images.shape == (10, 3, 32, 32) and kept.tolist() == list(range(10))


def test_a_name_or_alias_is_registered_once(toy_module):
    datasets.import_all()
    record = registry.RECORDS['toy-iqa']
    for clash in (dict(name='toy-iqa'), dict(name='other', aliases=('toy',)), dict(name='other', aliases=('koniq',))):
        with pytest.raises(ValueError, match='already registered'):
            registry.register(registry.DatasetRecord(**{**dict(reader=record.reader, layout='x'), **clash}))
    with pytest.raises(ValueError, match='lower case'):
        registry.register(registry.DatasetRecord(name='Other', reader=record.reader, layout='x'))
    registry.unregister('toy-iqa')
    assert 'toy-iqa' not in data_loader.DATASET_NAMES and 'toy' not in data_loader.DATASET_ALIASES
    assert 'toy-iqa' not in data_loader.DEFAULT_ROOTS and 'toy-iqa' not in data_loader.EXPECTED_LAYOUT


def test_every_built_in_data_set_is_one_module_with_one_record():
    names = datasets.import_all()
    assert {'koniq', 'spaq', 'kadid', 'agiqa', 'livec', 'live', 'csiq', 'tid2013', 'bid', 'generic',
            'demo'} <= set(names)
    records = [importlib.import_module(f'iqa.data.datasets.{n}').RECORD for n in names]
    assert sorted(r.name for r in records) == sorted(registry.RECORDS)
    for r in records:
        assert registry.RECORDS[r.name] is r
        assert data_loader.EXPECTED_LAYOUT[r.name] == r.layout
        assert all(data_loader.DATASET_ALIASES[a] == r.name for a in r.aliases)
        assert data_loader.ANNOTATION_FILES.get(r.name, ()) == r.annotation_files
        if r.default_root is None:      # the generic annotation file: a path, no default folder
            assert r.name == data_loader.GENERIC and r.name not in data_loader.DATASET_NAMES
        else:
            assert data_loader.DEFAULT_ROOTS[r.name] == r.default_root
            assert data_loader.resolve_dataset(r.name) == (r.name, r.default_root)
    assert set(data_loader.DEFAULT_ROOTS) == set(data_loader.DATASET_NAMES)
    assert len(data_loader.DATASET_NAMES) == len(set(data_loader.DATASET_NAMES)) == len(records) - 1
    # the unknown-name message lists the registered names
    with pytest.raises(data_loader.DataError, match='unknown dataset') as err:
        data_loader.resolve_dataset('nosuchset')
    assert all(name in str(err.value) for name in data_loader.DATASET_NAMES)
