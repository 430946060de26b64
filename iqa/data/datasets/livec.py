"""LIVE Challenge: 1,162 in-the-wild photos, MOS 0-100."""
from __future__ import annotations

import numpy as np

from iqa.data.formats import find_image_folder, load_mat, mat_str, pick_score
from iqa.data.registry import (SCRIPT_DIR, DataError, DatasetRecord, IQADataset, ReadContext, make_dataset,
                               missing_annotation, register)
from iqa.data.splits import seeded_split

LIVEC_SKIP = 7          # AllImages_release.mat starts with the 7 images used to train raters


def read_livec(ctx: ReadContext) -> IQADataset:
    """LIVE Challenge: names and MOS (0-100) from the two .mat files, skipping the first 7."""
    data = ctx.root / 'Data'
    images_mat, mos_mat = data / 'AllImages_release.mat', data / 'AllMOS_release.mat'
    if not images_mat.is_file() and not mos_mat.is_file():
        raise missing_annotation(ctx)
    pick_score(ctx, 'MOS', {'mos': 'MOS'})
    names = [mat_str(v) for v in load_mat(images_mat, 'AllImages_release').ravel()]
    mos = np.asarray(load_mat(mos_mat, 'AllMOS_release'), dtype=np.float64).ravel()
    if len(names) != len(mos):
        raise DataError(f'{images_mat} lists {len(names)} images but {mos_mat} has {len(mos)} scores')
    if len(names) <= LIVEC_SKIP:
        raise DataError(f'{images_mat}: {len(names)} images; expected more than the {LIVEC_SKIP} '
                        f'training images it starts with')
    names, mos = names[LIVEC_SKIP:], mos[LIVEC_SKIP:]
    image_dir = find_image_folder(ctx, names, [ctx.root / 'Images'], images_mat)
    paths = [image_dir / n for n in names]
    splits, source = seeded_split(ctx, len(paths))
    return make_dataset(ctx, paths, mos, splits, source, 'MOS', (0.0, 100.0))


RECORD = register(DatasetRecord(
    name='livec', aliases=('live-c', 'clive', 'livechallenge'), default_root=SCRIPT_DIR / 'livec',
    layout='Data/AllImages_release.mat, Data/AllMOS_release.mat and Images/', reader=read_livec))
