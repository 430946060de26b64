"""KonIQ-10k: 10,073 in-the-wild photos, MOS_zscore 0-100 (or MOS 1-5), official train/val/test sets."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from iqa.data.formats import find_image_folder, parse_number, pick_score, read_csv, read_score_list
from iqa.data.registry import (SCRIPT_DIR, DataError, DatasetRecord, IQADataset, ReadContext, make_dataset,
                               missing_annotation, register)
from iqa.data.splits import announce_split, seeded_split, val_from_train, val_source

KONIQ_SCORES = 'koniq10k_scores_and_distributions.csv'
KONIQ_SETS = 'koniq10k_distributions_sets.csv'
KONIQ_SET_NAMES = {'training': 'train', 'validation': 'val', 'test': 'test'}


def read_koniq(ctx: ReadContext) -> IQADataset:
    """KonIQ-10k: scores CSV (MOS_zscore 0-100 or MOS 1-5) and split, first found wins:
    the official sets CSV, koniq_train/test.json lists, a seeded random split."""
    root = ctx.root
    scores_file, sets_file = root / KONIQ_SCORES, root / KONIQ_SETS
    train_json, test_json = root / 'koniq_train.json', root / 'koniq_test.json'
    has_json = train_json.is_file() and test_json.is_file()
    column = pick_score(ctx, 'MOS_zscore', {'MOS_zscore': 'MOS_zscore', 'mos_zscore': 'MOS_zscore',
                                              'MOS': 'MOS', 'mos': 'MOS'})
    json_lists: dict[str, tuple[str, Path]] = {}   # file name -> (side, image path)

    def read_json_lists():
        # koniq_train/test.json: only read for their split or their train/ test/ image folders.
        if not json_lists:
            for side, file in (('train', train_json), ('test', test_json)):
                for image, _ in read_score_list(file):
                    fname = Path(image).name
                    if json_lists.get(fname, (side,))[0] != side:
                        raise DataError(f'{fname} is listed in both {train_json.name} and {test_json.name}')
                    json_lists[fname] = (side, _koniq_json_image(root, image, side))
        return json_lists

    if scores_file.is_file():
        _, rows = read_csv(scores_file, ['image_name', column])
        names = [r['image_name'] for _, r in rows]
        mos = [parse_number(r[column], f'{scores_file} line {n}, column {column!r}') for n, r in rows]
        score_name = column
        score_range = (0.0, 100.0) if column == 'MOS_zscore' else (1.0, 5.0)
    elif sets_file.is_file():
        if column == 'MOS':
            raise DataError(f"{ctx.name}: score 'MOS' (1-5) needs {scores_file}; {KONIQ_SETS} "
                            f'has MOS on the 0-100 scale only')
        _, rows = read_csv(sets_file, ['image_name', 'MOS', 'set'])
        names = [r['image_name'] for _, r in rows]
        mos = [parse_number(r['MOS'], f'{sets_file} line {n}, column \'MOS\'') for n, r in rows]
        score_name, score_range = 'MOS (0-100)', (0.0, 100.0)
    elif has_json:
        pairs = read_score_list(train_json) + read_score_list(test_json)
        names = [Path(image).name for image, _ in pairs]
        mos = [s for _, s in pairs]
        score_name = 'score'
        score_range = (0.0, 100.0) if max(mos) > 5.0 else (1.0, 5.0)
    else:
        raise missing_annotation(ctx)

    image_dirs = [root / '1024x768', root / '512x384']
    if has_json and not any((d / names[0]).is_file() for d in image_dirs):
        # the JSON lists' layout: images in train/ and test/
        lists = read_json_lists()
        paths = [lists[n][1] if n in lists else root / n for n in names]
    else:
        listed_in = next(f for f in (scores_file, sets_file, train_json) if f.is_file())
        image_dir = find_image_folder(ctx, names, image_dirs, listed_in)
        paths = [image_dir / n for n in names]

    if sets_file.is_file():
        _, set_rows = read_csv(sets_file, ['image_name', 'set'])
        side_of = {}
        for n, r in set_rows:
            value = r['set'].strip().lower()
            if value not in KONIQ_SET_NAMES:
                raise DataError(f"{sets_file} line {n}, column 'set': expected training, validation "
                                f'or test, got {r["set"]!r}')
            side_of[r['image_name']] = KONIQ_SET_NAMES[value]
        missing = [n for n in names if n not in side_of]
        if missing:
            raise DataError(f'{sets_file}: {len(missing)} images of the score file have no row, '
                            f'e.g. {missing[0]}; expected a set for every image')
        sides = np.array([side_of[n] for n in names])
        splits = {k: np.flatnonzero(sides == k) for k in ('train', 'val', 'test')}
        source = ('' if ctx.name == 'demo' else 'official ') + KONIQ_SETS
    elif has_json:
        lists = read_json_lists()
        sides = np.array([lists[n][0] if n in lists else '' for n in names])
        splits = {k: np.flatnonzero(sides == k) for k in ('train', 'test')}
        unassigned = int((sides == '').sum())
        if unassigned:
            print(f'{ctx.name}: {unassigned} scored images are in neither {train_json.name} nor '
                  f'{test_json.name}; they are left out of both splits', flush=True)
        splits = val_from_train(ctx, splits, len(names))
        source = 'koniq_train/test.json' + val_source(ctx, 'image')
        if 'val' in splits:
            announce_split(ctx.name, source, splits, 'no validation split in koniq_train/test.json')
    else:
        splits, source = seeded_split(ctx, len(names))
    return make_dataset(ctx, paths, mos, splits, source, score_name, score_range)


def _koniq_json_image(root: Path, image: str, side: str) -> Path:
    """A KonIQ JSON list says "koniq_train/x.jpg" for an image in train/ (or test/)."""
    fname = Path(image).name
    for candidate in (root / side / fname, root / image, root / fname):
        if candidate.is_file():
            return candidate
    return root / side / fname


RECORD = register(DatasetRecord(
    name='koniq-10k', aliases=('koniq', 'koniq10k'), default_root=SCRIPT_DIR / 'koniq-10k',
    layout=f'{KONIQ_SCORES} and/or {KONIQ_SETS} with images in 1024x768/ (or 512x384/), or '
           'koniq_train.json + koniq_test.json with images in train/ and test/',
    annotation_files=(KONIQ_SCORES, KONIQ_SETS), reader=read_koniq))
