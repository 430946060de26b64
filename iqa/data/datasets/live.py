"""LIVE (release 2): 779 distorted images of 29 references, DMOS (lower is better)."""
from __future__ import annotations

import numpy as np

from iqa.data.formats import find_image_folder, load_mat, mat_str, pick_score
from iqa.data.registry import (SCRIPT_DIR, DataError, DatasetRecord, IQADataset, ReadContext, make_dataset,
                               missing_annotation, register)
from iqa.data.splits import seeded_split

# LIVE (release 2): the images of each distortion folder, in the order of dmos_realigned.mat.
LIVE_FOLDERS = (('jp2k', 227), ('jpeg', 233), ('wn', 174), ('gblur', 174), ('fastfading', 174))


def read_live(ctx: ReadContext) -> IQADataset:
    """LIVE (release 2) as in HyperIQA: DMOS (lower = better) of the 779 distorted images,
    split at random by reference image."""
    dmos_mat, ref_mat = ctx.root / 'dmos_realigned.mat', ctx.root / 'refnames_all.mat'
    if not dmos_mat.is_file():
        raise missing_annotation(ctx)
    pick_score(ctx, 'DMOS', {'dmos': 'DMOS'})
    dmos = np.asarray(load_mat(dmos_mat, 'dmos_new'), dtype=np.float64).ravel()
    orgs = np.asarray(load_mat(dmos_mat, 'orgs')).ravel().astype(bool)
    refs = [mat_str(v) for v in load_mat(ref_mat, 'refnames_all').ravel()]
    files = [f'{folder}/img{k}.bmp' for folder, count in LIVE_FOLDERS for k in range(1, count + 1)]
    for what, arr in (('dmos_new', dmos), ('orgs', orgs), ('refnames_all', refs)):
        if len(arr) != len(files):
            counts = ' + '.join(f'{folder} {count}' for folder, count in LIVE_FOLDERS)
            raise DataError(f'{ref_mat if what == "refnames_all" else dmos_mat}: {what} has '
                            f'{len(arr)} entries; expected {len(files)} ({counts})')
    keep = np.flatnonzero(~orgs)  # orgs marks the undistorted copies of the references
    names = [files[i] for i in keep]
    image_dir = find_image_folder(ctx, names, [ctx.root], dmos_mat)
    paths = [image_dir / n for n in names]
    groups = [refs[i] for i in keep]
    splits, source = seeded_split(ctx, len(paths), 'reference image', groups)
    return make_dataset(ctx, paths, dmos[keep], splits, source, 'DMOS', (0.0, 100.0),
                    higher_is_better=False)


RECORD = register(DatasetRecord(
    name='live', default_root=SCRIPT_DIR / 'live',
    layout='dmos_realigned.mat, refnames_all.mat and the folders jp2k/ jpeg/ wn/ gblur/ fastfading/',
    annotation_files=('dmos_realigned.mat',), reader=read_live))
