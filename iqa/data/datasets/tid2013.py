"""TID2013: 3,000 distorted images of 25 references, MOS 0-9."""
from __future__ import annotations

from iqa.data.formats import find_image_folder, pick_score, read_name_score_lines
from iqa.data.registry import (SCRIPT_DIR, DatasetRecord, IQADataset, ReadContext, make_dataset,
                               missing_annotation, register)
from iqa.data.splits import seeded_split

def read_tid2013(ctx: ReadContext) -> IQADataset:
    """TID2013 as in HyperIQA: mos_with_names.txt lines '<MOS> <name>' (0-9), split at
    random by reference ('i01_01_1.bmp' belongs to reference 01)."""
    label_file = ctx.root / 'mos_with_names.txt'
    if not label_file.is_file():
        raise missing_annotation(ctx)
    pick_score(ctx, 'MOS', {'mos': 'MOS'})
    pairs = read_name_score_lines(label_file, 1, 0)
    image_dir = find_image_folder(ctx, [name for name, _ in pairs], [ctx.root / 'distorted_images'], label_file)
    paths = [image_dir / name for name, _ in pairs]
    groups = [name.split('_')[0][1:].lower() for name, _ in pairs]
    splits, source = seeded_split(ctx, len(paths), 'reference image', groups)
    return make_dataset(ctx, paths, [s for _, s in pairs], splits, source, 'MOS', (0.0, 9.0))


RECORD = register(DatasetRecord(
    name='tid2013', aliases=('tid',), default_root=SCRIPT_DIR / 'tid2013',
    layout='mos_with_names.txt with images in distorted_images/',
    annotation_files=('mos_with_names.txt',), reader=read_tid2013))
