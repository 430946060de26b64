"""Readers of the annotation formats data sets ship in (CSV, XLSX, MATLAB .mat, JSON score
lists, whitespace-separated text), and the search for a data set's image folder.

Every reader raises DataError naming the file and the line, row, entry or column, and what
was expected, so the message can be shown as is.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from iqa.data.registry import GENERIC, DataError, ReadContext

PROBE_IMAGES = 20       # listed images tried in turn when looking for the image folder


def read_csv(path: Path, required: Sequence[str]) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header and (line number, row dict) pairs of a CSV file; blank lines are skipped."""
    with open(path, newline='', encoding='utf-8-sig') as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f'{path}: file is empty; expected a header row with columns '
                            f'{", ".join(required)}')
        header = [h.strip() for h in header]
        require_columns(path, header, required)
        rows = []
        for fields in reader:
            if not any(s.strip() for s in fields):
                continue
            if len(fields) < len(header):
                raise DataError(f'{path} line {reader.line_num}: {len(fields)} fields, expected '
                                f'{len(header)} ({", ".join(header)})')
            rows.append((reader.line_num, {h: s.strip() for h, s in zip(header, fields)}))
    if not rows:
        raise DataError(f'{path}: no data rows below the header')
    return header, rows


def read_xlsx(path: Path, required: Sequence[str] = ()) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header and (Excel row number, row dict) pairs of the first sheet of an .xlsx file."""
    import openpyxl  # only SPAQ and BID need it
    try:
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:  # zip/XML errors of a damaged or mislabelled file
        raise DataError(f'{path}: cannot read it as an .xlsx workbook ({type(e).__name__}: {e})') from e
    try:
        sheet = workbook.worksheets[0]
        rows_iter = sheet.iter_rows(values_only=True)
        first = next(rows_iter, None)
        if first is None:
            raise DataError(f'{path}: the first sheet is empty; expected a header row')
        header = ['' if v is None else str(v).strip() for v in first]
        require_columns(path, header, required)
        rows = []
        for row_no, values in enumerate(rows_iter, start=2):
            if values is None or all(v is None or str(v).strip() == '' for v in values):
                continue
            rows.append((row_no, {h: v for h, v in zip(header, values) if h}))
    finally:
        workbook.close()
    if not rows:
        raise DataError(f'{path}: no data rows below the header')
    return header, rows


def require_columns(path: Path, header: Sequence[str], required: Sequence[str]) -> None:
    for column in required:
        if column not in header:
            raise DataError(f'{path}: column {column!r} missing; expected columns '
                            f'{", ".join(required)}; found {", ".join(map(str, header))}')


def parse_number(value, where: str) -> float:
    """A finite float from a cell/field, or DataError naming where it came from."""
    try:
        number = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise DataError(f'{where}: expected a number, got {value!r}') from None
    if not math.isfinite(number):
        raise DataError(f'{where}: expected a finite number, got {value!r}')
    return number


def read_score_list(path: Path) -> list[tuple[str, float]]:
    """(image, score) pairs of a JSON list [{"image": ..., "score": ...}, ...].

    Also accepts the img_path / gt_score spelling of other IQA repositories (gt_score may be
    a string).
    """
    try:
        data = json.loads(path.read_text(encoding='utf-8'))
    except json.JSONDecodeError as e:
        raise DataError(f'{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})') from None
    except UnicodeDecodeError as e:
        raise DataError(f'{path}: not UTF-8 text ({e})') from None
    if not isinstance(data, list) or not data:
        raise DataError(f'{path}: expected a non-empty JSON list of {{"image": ..., "score": ...}} '
                        f'objects, got {type(data).__name__}{" (empty)" if data == [] else ""}')
    pairs = []
    for i, item in enumerate(data):
        where = f'{path} entry {i} (0-based)'
        if not isinstance(item, dict):
            raise DataError(f'{where}: expected an object with "image" and "score", got {item!r}')
        image = item.get('image', item.get('img_path'))
        value = item.get('score', item.get('gt_score'))
        if not isinstance(image, str) or not image:
            raise DataError(f'{where}: key "image" (or "img_path") missing or not a string; '
                            f'keys: {", ".join(item)}')
        if value is None:
            raise DataError(f'{where}: key "score" (or "gt_score") missing; keys: {", ".join(item)}')
        pairs.append((image, parse_number(value, f'{where}, key "score"')))
    return pairs


def listed_image_path(base: Path, image: str) -> Path:
    """Where a listed image lives: the path as given under `base`, else its file name in `base`.

    Lists written elsewhere may say "koniq_train/x.jpg" for an image beside the list, so the
    file name alone is tried as well; if neither exists the as-given path is returned and
    load_images reports it as absent.
    """
    given = Path(image)
    if given.is_absolute():
        return given
    candidate = base / given
    if candidate.is_file():
        return candidate
    beside = base / given.name
    return beside if beside.is_file() else candidate


def _in_folder(folder: Path, name: str) -> Path:
    return folder / name


def find_image_folder(ctx: ReadContext, names: Sequence[str], expected: Sequence[Path], listed_in: Path,
                      locate: Callable[[Path, str], Path] = _in_folder, hint: str | None = None) -> Path:
    """The folder that holds a data set's images, found from the first listed image.

    Copies of a data set nest their images differently (one AGIQA-3K copy keeps them in
    ACGIQA-3K/), so the folder is found, never guessed: a wrong guess gives one "file not
    found" per image and no hint. The first of `expected` that holds the first
    listed image wins; else the folders one level below the root and below each expected
    folder are searched, and the one used is printed. If the first image is nowhere, the next
    few listed images are tried the same way (one missing file is load_images' to report).
    If none is found, one DataError names the folders searched and the flags that point
    elsewhere (`hint` replaces them for a script with flags of its own, as train_clip.py's
    --image_base_dir). `locate(folder, name)` is where a listed name would be in a folder.
    """
    expected = list(dict.fromkeys(expected))
    if Path(names[0]).is_absolute():
        return expected[0]   # absolute paths in a list: nothing to search, load_images checks them
    for folder in expected:  # the usual case, before any folder is listed
        if locate(folder, names[0]).is_file():
            return folder
    label = listed_in.stem if ctx.name == GENERIC else ctx.name
    # One level down: the data set's own layout inside a subfolder of the root (a zip that
    # unpacks into a folder of its own), the subfolder itself, and folders inside expected ones.
    below = []
    for base in dict.fromkeys([ctx.root, *expected]):
        for sub in _subfolders(base):
            if sub in expected:
                continue
            if base == ctx.root:
                below += [sub / e.relative_to(ctx.root) for e in expected
                          if e != ctx.root and e.is_relative_to(ctx.root)]
            below.append(sub)
    below = [d for d in dict.fromkeys(below) if d.is_dir()]
    for name in names[:PROBE_IMAGES]:
        for folder in expected:
            if locate(folder, name).is_file():
                return folder
        for folder in below:
            if locate(folder, name).is_file():
                print(f'{label}: images found in {folder} (the listed image {name} is not in '
                      f'{_folder_list(expected)}); using that folder', flush=True)
                return folder
    shown = ', '.join(str(d) for d in below[:8]) + (f' and {len(below) - 8} more' if len(below) > 8 else '')
    if hint is None and ctx.name == GENERIC:
        hint = (f'image paths in {listed_in.name} are relative to its folder; '
                f'fix the paths or move the list next to the images')
    elif hint is None:
        hint = ("put the images in one of these folders, or point at the data set's folder "
                '(train_swin.py --data_root PATH, cross_dataset_test.py --datasets NAME=PATH)')
    looked_in = [f'{e}/ (no such folder)' for e in expected if not e.is_dir()]
    if any(e.is_dir() for e in expected):
        looked_in.append(_folder_list([e for e in expected if e.is_dir()]))
    raise DataError(f'{label}: cannot find the images: {names[0]} (the first listed in {listed_in}) is not in '
                    f'{", ".join(looked_in)}, nor in a folder one level below '
                    f'{_folder_list(dict.fromkeys([ctx.root, *expected]))}'
                    f'{f" (searched {shown})" if below else " (there is none)"}; {hint}')


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith('.'))
    except OSError:  # absent or unreadable: nothing below it
        return []


def _folder_list(folders) -> str:
    folders = [f'{f}/' for f in folders]
    return folders[0] if len(folders) == 1 else ', '.join(folders[:-1]) + ' or ' + folders[-1]


def mat_str(value) -> str:
    """A string out of MATLAB cell-array nesting (arrays of arrays of one string)."""
    while isinstance(value, np.ndarray):
        if value.size == 0:
            return ''
        value = value.ravel()[0]
    return str(value)


def load_mat(path: Path, key: str) -> np.ndarray:
    import scipy.io
    if not path.is_file():
        raise DataError(f'{path}: file not found')
    try:
        content = scipy.io.loadmat(str(path))
    except Exception as e:
        raise DataError(f'{path}: cannot read it as a MATLAB .mat file ({type(e).__name__}: {e})') from e
    if key not in content:
        found = ', '.join(k for k in content if not k.startswith('__'))
        raise DataError(f'{path}: variable {key!r} missing; found {found}')
    return content[key]



def pick_score(ctx: ReadContext, default: str, choices: dict[str, str]) -> str:
    """Column for ctx.score: None -> default; an alias or a listed column name."""
    if ctx.score is None:
        return default
    column = choices.get(ctx.score, choices.get(ctx.score.lower()))
    if column is None:
        raise DataError(f'{ctx.name}: score {ctx.score!r} not available; expected one of '
                        f'{", ".join(sorted(set(choices)))}')
    return column



def read_name_score_lines(path: Path, name_col: int, score_col: int) -> list[tuple[str, float]]:
    """Whitespace-separated text lines holding an image name and a score."""
    pairs = []
    with open(path, encoding='utf-8-sig') as f:
        for n, line in enumerate(f, start=1):
            words = line.split()
            if not words:
                continue
            if len(words) < 2:
                raise DataError(f'{path} line {n}: expected an image name and a score, got {line.strip()!r}')
            pairs.append((words[name_col], parse_number(words[score_col], f'{path} line {n}, field {score_col + 1}')))
    if not pairs:
        raise DataError(f'{path}: no lines with an image name and a score')
    return pairs

