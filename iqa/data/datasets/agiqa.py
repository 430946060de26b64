"""AGIQA-3K: 2,982 AI-generated images with their prompts, perception and alignment MOS 0-5."""
from __future__ import annotations

from iqa.data.datasets.generic import read_json_list
from iqa.data.formats import find_image_folder, parse_number, pick_score, read_csv
from iqa.data.registry import (SCRIPT_DIR, DatasetRecord, IQADataset, ReadContext, make_dataset,
                               missing_annotation, register)
from iqa.data.splits import seeded_split

def read_agiqa(ctx: ReadContext) -> IQADataset:
    """AGIQA-3K: agiqa_test.json (a test-only list), else data.csv (mos_quality by default,
    mos_align selectable), split at random by prompt so a prompt is on one side only."""
    json_file = ctx.root / 'agiqa_test.json'
    if json_file.is_file():
        return read_json_list(ctx, json_file, test_only=True, score_range=(0.0, 5.0))
    csv_file = ctx.root / 'data.csv'
    if not csv_file.is_file():
        raise missing_annotation(ctx)
    column = pick_score(ctx, 'mos_quality', {
        'mos_quality': 'mos_quality', 'quality': 'mos_quality',
        'mos_align': 'mos_align', 'align': 'mos_align', 'alignment': 'mos_align'})
    header, rows = read_csv(csv_file, ['name', column])
    names = [r['name'] for _, r in rows]
    mos = [parse_number(r[column], f'{csv_file} line {n}, column {column!r}') for n, r in rows]
    image_dir = find_image_folder(ctx, names, [ctx.root / 'AGIQA-3K', ctx.root / 'images', ctx.root / 'image',
                                                ctx.root], csv_file)
    paths = [image_dir / n for n in names]
    if 'prompt' in header:
        groups, unit = [r['prompt'] for _, r in rows], 'prompt'
    else:
        groups, unit = None, 'image'
    splits, source = seeded_split(ctx, len(paths), unit, groups)
    return make_dataset(ctx, paths, mos, splits, source, column, (0.0, 5.0))


RECORD = register(DatasetRecord(
    name='agiqa-3k', aliases=('agiqa', 'agiqa3k'), default_root=SCRIPT_DIR / 'agiqa-test',
    layout='agiqa_test.json with the images beside it, or data.csv with the images',
    annotation_files=('data.csv',), reader=read_agiqa))
