"""BID: 586 blurred photos, MOS 0-5."""
from __future__ import annotations

from iqa.data.formats import find_image_folder, parse_number, pick_score, read_xlsx
from iqa.data.registry import (SCRIPT_DIR, DataError, DatasetRecord, IQADataset, ReadContext, make_dataset,
                               missing_annotation, register)
from iqa.data.splits import seeded_split

def read_bid(ctx: ReadContext) -> IQADataset:
    """BID as in HyperIQA: DatabaseGrades.xlsx, column A the image number, column B the MOS
    (0-5); images DatabaseImage####.JPG in the root."""
    xlsx = ctx.root / 'DatabaseGrades.xlsx'
    if not xlsx.is_file():
        raise missing_annotation(ctx)
    pick_score(ctx, 'MOS', {'mos': 'MOS'})
    header, rows = read_xlsx(xlsx)
    if len(header) < 2:
        raise DataError(f'{xlsx}: expected two columns (image number, MOS); found {len(header)}')
    number_col, mos_col = header[0], header[1]
    names, mos = [], []
    for row_no, r in rows:
        number = parse_number(r.get(number_col), f'{xlsx} row {row_no}, column A (image number)')
        if number != int(number):
            raise DataError(f'{xlsx} row {row_no}, column A (image number): expected a whole number, got {number}')
        names.append(f'DatabaseImage{int(number):04d}.JPG')
        mos.append(parse_number(r.get(mos_col), f'{xlsx} row {row_no}, column B (MOS)'))
    image_dir = find_image_folder(ctx, names, [ctx.root], xlsx)
    paths = [image_dir / n for n in names]
    splits, source = seeded_split(ctx, len(paths))
    return make_dataset(ctx, paths, mos, splits, source, 'MOS', (0.0, 5.0))


RECORD = register(DatasetRecord(
    name='bid', default_root=SCRIPT_DIR / 'bid', layout='DatabaseGrades.xlsx with the DatabaseImage####.JPG files',
    annotation_files=('DatabaseGrades.xlsx',), reader=read_bid))
