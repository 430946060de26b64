"""KADID-10k: 81 references x 25 distortions x 5 levels, DMOS 1-5 (higher is better)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from iqa.data.datasets.generic import read_json_list
from iqa.data.formats import find_image_folder, parse_number, pick_score, read_csv
from iqa.data.registry import (SCRIPT_DIR, DataError, DatasetRecord, IQADataset, ReadContext, make_dataset,
                               missing_annotation, register)
from iqa.data.splits import announce_split, val_from_train, val_source

KADID_TRAIN_REFS = 65   # the common protocol: references I01-I65 train, I66-I81 test


def read_kadid(ctx: ReadContext) -> IQADataset:
    """KADID-10k: kadid_test.json (a test-only list), else dmos.csv split by reference image
    (I01-I65 train, I66-I81 test). Despite its name, higher dmos = better (1-5)."""
    json_file = ctx.root / 'kadid_test.json'
    if json_file.is_file():
        return read_json_list(ctx, json_file, test_only=True, score_range=(1.0, 5.0))
    csv_file = ctx.root / 'dmos.csv'
    if not csv_file.is_file():
        raise missing_annotation(ctx)
    pick_score(ctx, 'dmos', {'dmos': 'dmos'})
    _, rows = read_csv(csv_file, ['dist_img', 'ref_img', 'dmos'])
    image_dir = find_image_folder(ctx, [r['dist_img'] for _, r in rows], [ctx.root / 'images', ctx.root], csv_file)
    paths, mos, ref_ids = [], [], []
    for n, r in rows:
        match = re.match(r'[Ii](\d+)', Path(r['ref_img']).stem)
        if match is None:
            raise DataError(f"{csv_file} line {n}, column 'ref_img': expected a reference name like "
                            f'I01.png, got {r["ref_img"]!r}')
        ref_ids.append(int(match.group(1)))
        paths.append(image_dir / r['dist_img'])
        mos.append(parse_number(r['dmos'], f"{csv_file} line {n}, column 'dmos'"))
    ref_ids = np.array(ref_ids)
    splits = {'train': np.flatnonzero(ref_ids <= KADID_TRAIN_REFS),
              'test': np.flatnonzero(ref_ids > KADID_TRAIN_REFS)}
    splits = val_from_train(ctx, splits, len(paths), ref_ids)
    source = (f'by reference image (I01-I{KADID_TRAIN_REFS:02d} train, I{KADID_TRAIN_REFS + 1:02d}-I81 test)'
              + val_source(ctx, 'reference image'))
    if 'val' in splits:
        announce_split(ctx.name, source, splits, 'no official validation split')
    return make_dataset(ctx, paths, mos, splits, source, 'dmos', (1.0, 5.0))


RECORD = register(DatasetRecord(
    name='kadid-10k', aliases=('kadid', 'kadid10k'), default_root=SCRIPT_DIR / 'kadid-test',
    layout='kadid_test.json with the images beside it, or dmos.csv with images in images/',
    annotation_files=('dmos.csv',), reader=read_kadid))
