"""Any data set as an annotation file: a .csv with image and score columns, or a JSON list.

The same reader takes a named data set's root when that root is a file (NAME=path/to/list.json):
such a list is test-only for a named data set, split at random for a generic one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from iqa.data.formats import find_image_folder, listed_image_path, parse_number, read_csv, read_score_list
from iqa.data.registry import (EXPECTED_LAYOUT, GENERIC, DataError, DatasetRecord, IQADataset, ReadContext,
                               make_dataset, register)
from iqa.data.splits import announce_split, seeded_split, val_from_train, val_source


def read_annotation_file(ctx: ReadContext) -> IQADataset:
    """ctx.root is a .json list or a .csv file: read it as one."""
    root = ctx.root
    if root.is_dir():
        raise DataError(f'{root} is a folder; a generic dataset is a .csv or .json file')
    if root.suffix.lower() == '.json':
        return read_json_list(ctx, root, test_only=ctx.name != GENERIC)
    if root.suffix.lower() == '.csv':
        return read_generic_csv(ctx, root)
    raise DataError(f'{ctx.name}: {root} is a file but not a .csv or .json annotation file; '
                    f'expected a folder with {EXPECTED_LAYOUT[ctx.name]}')


def read_json_list(ctx: ReadContext, json_file: Path, *, test_only: bool,
                   score_range: tuple[float, float] | None = None) -> IQADataset:
    """A list [{"image", "score"}] with images beside it: test only for a named data set's
    cross-dataset list (spaq_test.json, ...), a seeded random split for a generic list."""
    if ctx.score not in (None, 'score', 'gt_score'):
        raise DataError(f'{json_file}: a JSON list has one score per image; got score={ctx.score!r}')
    pairs = read_score_list(json_file)
    base = find_image_folder(ctx, [image for image, _ in pairs], [json_file.parent], json_file, listed_image_path)
    paths = [listed_image_path(base, image) for image, _ in pairs]
    mos = np.array([s for _, s in pairs])
    if test_only:
        splits, source = {'test': np.arange(len(paths))}, f'{json_file.name} (test only)'
    else:
        splits, source = seeded_split(ctx, len(paths))
    if score_range is None:
        score_range = (float(mos.min()), float(mos.max()))
    ds = make_dataset(ctx, paths, mos, splits, source, 'score', score_range)
    if ctx.name == GENERIC:
        ds.name = json_file.stem
    return ds


def read_generic_csv(ctx: ReadContext, csv_file: Path) -> IQADataset:
    """Any data set as a CSV: image paths (relative to the CSV's folder) and scores in the named
    columns; a 'split' or 'set' column (train/val/test) is used when present, else a seeded
    random split. Higher scores are taken to be better."""
    image_column, column = ctx.image_column, ctx.score or ctx.score_column
    header, rows = read_csv(csv_file, [image_column, column])
    base = find_image_folder(ctx, [r[image_column] for _, r in rows], [csv_file.parent], csv_file, listed_image_path)
    paths = [listed_image_path(base, r[image_column]) for _, r in rows]
    mos = np.array([parse_number(r[column], f'{csv_file} line {n}, column {column!r}') for n, r in rows])
    split_column = next((c for c in ('split', 'set') if c in header), None)
    if split_column is not None:
        names = {'train': 'train', 'training': 'train', 'val': 'val', 'valid': 'val',
                 'validation': 'val', 'test': 'test', 'testing': 'test'}
        sides = []
        for n, r in rows:
            side = names.get(r[split_column].lower())
            if side is None:
                raise DataError(f'{csv_file} line {n}, column {split_column!r}: expected train, val '
                                f'or test, got {r[split_column]!r}')
            sides.append(side)
        sides = np.array(sides)
        splits = {k: np.flatnonzero(sides == k) for k in ('train', 'val', 'test')}
        source = f'{csv_file.name} column {split_column!r}'
        if not len(splits['val']):
            splits = val_from_train(ctx, splits, len(paths))
            source += val_source(ctx, 'image')
            if 'val' in splits:
                announce_split(csv_file.stem, source, splits, f'no val rows in column {split_column!r}')
    else:
        splits, source = seeded_split(ctx, len(paths), label=csv_file.stem)
    ds = make_dataset(ctx, paths, mos, splits, source, column, (float(mos.min()), float(mos.max())))
    if ctx.name == GENERIC:
        ds.name = csv_file.stem
    return ds


RECORD = register(DatasetRecord(name=GENERIC, layout='a .csv or .json annotation file', reader=read_annotation_file))
