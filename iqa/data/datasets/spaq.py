"""SPAQ: 11,125 smartphone photos, MOS 0-100 and image attribute scores."""
from __future__ import annotations

from pathlib import Path

from iqa.data.datasets.generic import read_json_list
from iqa.data.formats import find_image_folder, parse_number, pick_score, read_xlsx, require_columns
from iqa.data.registry import (SCRIPT_DIR, DataError, DatasetRecord, IQADataset, ReadContext, make_dataset,
                               missing_annotation, register)
from iqa.data.splits import seeded_split

SPAQ_XLSX = Path('Annotations') / 'MOS and Image attribute scores.xlsx'


def read_spaq(ctx: ReadContext) -> IQADataset:
    """SPAQ: spaq_test.json (a test-only list), else the official .xlsx (Image name, MOS 0-100)."""
    json_file = ctx.root / 'spaq_test.json'
    if json_file.is_file():
        return read_json_list(ctx, json_file, test_only=True, score_range=(0.0, 100.0))
    xlsx = ctx.root / SPAQ_XLSX
    if not xlsx.is_file():
        raise missing_annotation(ctx)
    header, rows = read_xlsx(xlsx, ['Image name'])
    attribute_columns = {h: h for h in header if h and h != 'Image name'}
    column = pick_score(ctx, 'MOS', {**attribute_columns, 'mos': 'MOS'})
    require_columns(xlsx, header, ['Image name', column])
    names, mos = [], []
    for row_no, r in rows:
        image = r.get('Image name')
        if image is None or str(image).strip() == '':
            raise DataError(f"{xlsx} row {row_no}, column 'Image name': expected a file name, got nothing")
        names.append(str(image).strip())
        mos.append(parse_number(r.get(column), f'{xlsx} row {row_no}, column {column!r}'))
    image_dir = find_image_folder(ctx, names, [ctx.root / 'TestImage'], xlsx)
    paths = [image_dir / n for n in names]
    splits, source = seeded_split(ctx, len(paths))
    score_range = (0.0, 100.0) if column == 'MOS' else (float(min(mos)), float(max(mos)))
    return make_dataset(ctx, paths, mos, splits, source, column, score_range)


RECORD = register(DatasetRecord(
    name='spaq', default_root=SCRIPT_DIR / 'spaq-test',
    layout=f'spaq_test.json with the images beside it, or "{SPAQ_XLSX}" with images in TestImage/',
    annotation_files=(SPAQ_XLSX.name,), reader=read_spaq))
