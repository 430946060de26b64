"""CSIQ: 866 distorted images of 30 references, DMOS 0-1 (lower is better)."""
from __future__ import annotations

from iqa.data.formats import find_image_folder, pick_score, read_name_score_lines
from iqa.data.registry import (SCRIPT_DIR, DatasetRecord, IQADataset, ReadContext, make_dataset,
                               missing_annotation, register)
from iqa.data.splits import seeded_split

def read_csiq(ctx: ReadContext) -> IQADataset:
    """CSIQ as in HyperIQA: csiq_label.txt lines '<name> <DMOS>' (0-1, lower = better),
    split at random by reference ('1600.AWGN.1.png' belongs to reference 1600)."""
    label_file = ctx.root / 'csiq_label.txt'
    if not label_file.is_file():
        raise missing_annotation(ctx)
    pick_score(ctx, 'DMOS', {'dmos': 'DMOS'})
    pairs = read_name_score_lines(label_file, 0, 1)
    image_dir = find_image_folder(ctx, [name for name, _ in pairs], [ctx.root / 'dst_imgs_all'], label_file)
    paths = [image_dir / name for name, _ in pairs]
    groups = [name.split('.')[0].lower() for name, _ in pairs]
    splits, source = seeded_split(ctx, len(paths), 'reference image', groups)
    return make_dataset(ctx, paths, [s for _, s in pairs], splits, source, 'DMOS', (0.0, 1.0),
                    higher_is_better=False)


RECORD = register(DatasetRecord(
    name='csiq', default_root=SCRIPT_DIR / 'csiq', layout='csiq_label.txt with images in dst_imgs_all/',
    annotation_files=('csiq_label.txt',), reader=read_csiq))
