"""Image-quality data sets, a decode-once image cache and batched patch sampling.

Data flows one way through this module:

    annotation files -> IQADataset (paths, mos, splits)          load_dataset()
    image files      -> uint8 tensor (N, 3, H, W), cached on disk  load_images()
    uint8 tensor     -> normalized patch batches on the device     TrainPatchSampler, eval_patch_batches()

Why decode once: the user's pipeline decoded and resized every image again for each of
its `patch_num` patches, every epoch, with PIL in the training process (num_workers=0; their
own note says ColorJitter alone slowed training 3x). Here each image is decoded and resized
a single time (exactly as torchvision.transforms.Resize((512, 384)) did in the user's code),
kept as uint8, and patches are cut from it in batches with per-sample random parameters.

Every problem with the input raises DataError with the file, line/row/entry or column and
what was expected. Problems with individual images are collected and reported together
(the first 20 and a count) before training starts, or skipped with a warning on request.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from iqa.files import atomic_write

__all__ = [
    'IMAGENET_MEAN', 'IMAGENET_STD', 'DATASET_NAMES', 'DATASET_ALIASES', 'DEFAULT_ROOTS',
    'GENERIC', 'DataError', 'IQADataset', 'resolve_dataset', 'load_dataset', 'load_images',
    'TrainPatchSampler', 'eval_patch_batches', 'place_images', 'ensure_demo_dataset', 'canonical_device',
    'plan_image_memory', 'DEFAULT_VAL_RATIO', 'split_by_groups',
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The scripts' folder: default data set roots and the demo data set live next to them.
SCRIPT_DIR = Path(__file__).resolve().parent

DATASET_NAMES = ('koniq-10k', 'spaq', 'kadid-10k', 'agiqa-3k', 'livec', 'live', 'csiq',
                 'tid2013', 'bid', 'demo')
DATASET_ALIASES = {
    'koniq': 'koniq-10k', 'koniq10k': 'koniq-10k',
    'kadid': 'kadid-10k', 'kadid10k': 'kadid-10k',
    'agiqa': 'agiqa-3k', 'agiqa3k': 'agiqa-3k',
    'live-c': 'livec', 'clive': 'livec', 'livechallenge': 'livec',
    'tid': 'tid2013',
}
# Name returned by resolve_dataset for a path to a .csv/.json annotation file.
GENERIC = 'generic'

# The user's layout: each data set in a folder next to the scripts.
DEFAULT_ROOTS = {
    'koniq-10k': SCRIPT_DIR / 'koniq-10k',
    'spaq': SCRIPT_DIR / 'spaq-test',
    'kadid-10k': SCRIPT_DIR / 'kadid-test',
    'agiqa-3k': SCRIPT_DIR / 'agiqa-test',
    'livec': SCRIPT_DIR / 'livec',
    'live': SCRIPT_DIR / 'live',
    'csiq': SCRIPT_DIR / 'csiq',
    'tid2013': SCRIPT_DIR / 'tid2013',
    'bid': SCRIPT_DIR / 'bid',
    'demo': SCRIPT_DIR / '.cache' / 'demo-koniq',
}

# What each reader looks for, quoted in "not found" messages.
EXPECTED_LAYOUT = {
    'koniq-10k': 'koniq10k_scores_and_distributions.csv and/or koniq10k_distributions_sets.csv '
                 'with images in 1024x768/ (or 512x384/), or koniq_train.json + koniq_test.json '
                 'with images in train/ and test/',
    'spaq': 'spaq_test.json with the images beside it, or '
            '"Annotations/MOS and Image attribute scores.xlsx" with images in TestImage/',
    'kadid-10k': 'kadid_test.json with the images beside it, or dmos.csv with images in images/',
    'agiqa-3k': 'agiqa_test.json with the images beside it, or data.csv with the images',
    'livec': 'Data/AllImages_release.mat, Data/AllMOS_release.mat and Images/',
    'live': 'dmos_realigned.mat, refnames_all.mat and the folders jp2k/ jpeg/ wn/ gblur/ fastfading/',
    'csiq': 'csiq_label.txt with images in dst_imgs_all/',
    'tid2013': 'mos_with_names.txt with images in distorted_images/',
    'bid': 'DatabaseGrades.xlsx with the DatabaseImage####.JPG files',
    'demo': 'the generated demo data set (ensure_demo_dataset)',
    GENERIC: 'a .csv or .json annotation file',
}
# A named data set's own annotation files: given as its root, their folder is the root.
ANNOTATION_FILES = {
    'koniq-10k': ('koniq10k_scores_and_distributions.csv', 'koniq10k_distributions_sets.csv'),
    'spaq': ('MOS and Image attribute scores.xlsx',), 'kadid-10k': ('dmos.csv',),
    'agiqa-3k': ('data.csv',), 'csiq': ('csiq_label.txt',), 'tid2013': ('mos_with_names.txt',),
    'live': ('dmos_realigned.mat',), 'bid': ('DatabaseGrades.xlsx',),
}
ROOT_HINT = ('put the data there or pass its folder '
             '(train_swin.py --data_root PATH, cross_dataset_test.py --datasets NAME=PATH)')

KONIQ_SCORES = 'koniq10k_scores_and_distributions.csv'
KONIQ_SETS = 'koniq10k_distributions_sets.csv'
KONIQ_SET_NAMES = {'training': 'train', 'validation': 'val', 'test': 'test'}
SPAQ_XLSX = Path('Annotations') / 'MOS and Image attribute scores.xlsx'
# LIVE (release 2): the images of each distortion folder, in the order of dmos_realigned.mat.
LIVE_FOLDERS = (('jp2k', 227), ('jpeg', 233), ('wn', 174), ('gblur', 174), ('fastfading', 174))
LIVEC_SKIP = 7          # AllImages_release.mat starts with the 7 images used to train raters
KADID_TRAIN_REFS = 65   # the common protocol: references I01-I65 train, I66-I81 test
PROBE_IMAGES = 20       # listed images tried in turn when looking for the image folder
# Share of the training side held out for validation (selection, early stopping) where a
# data set has no official validation split: selecting on test would bias the test numbers.
DEFAULT_VAL_RATIO = 0.1


class DataError(ValueError):
    """A data set, annotation file or image that cannot be used as given.

    The message names the file (and line, row, entry or column) and what was expected,
    so it can be shown to the user as is.
    """


@dataclass
class IQADataset:
    """Image paths with their scores and splits, as read from a data set's own files."""
    name: str
    root: Path
    paths: list[str]                # image file paths
    mos: np.ndarray                 # float64 scores as in the annotation file
    splits: dict[str, np.ndarray]   # 'train' / 'val' / 'test' -> int64 indices into paths
    split_source: str               # where the split came from, for the log
    score_name: str                 # the annotation column the scores came from
    score_range: tuple[float, float]
    higher_is_better: bool

    def __len__(self) -> int:
        return len(self.paths)

    def summary(self) -> str:
        """One line for the log: size, score, direction and split sizes."""
        lo, hi = self.score_range
        direction = 'higher is better' if self.higher_is_better else 'lower is better'
        parts = ' / '.join(f'{k} {len(v)}' for k, v in self.splits.items())
        return (f'{self.name}: {len(self)} images in {self.root}; {self.score_name} {lo:g}-{hi:g} '
                f'({direction}); split {self.split_source}: {parts}')


# ----------------------------------------------------------------------------------------
# Data set names and roots
# ----------------------------------------------------------------------------------------

def resolve_dataset(name_or_path: str, root: str | os.PathLike | None = None) -> tuple[str, Path]:
    """Canonical data set name and absolute root folder (or annotation file).

    A known name or alias (koniq, kadid, agiqa, ...) gets DEFAULT_ROOTS[name] unless `root`
    is given; a path ending in .csv or .json is a generic annotation file (name GENERIC).
    """
    text = str(name_or_path).strip()
    key = text.lower()
    name = DATASET_ALIASES.get(key, key)
    if name in DATASET_NAMES or name == GENERIC:
        if root is None:
            if name == GENERIC:
                raise DataError("dataset 'generic' needs a path to its .csv or .json annotation file")
            return name, DEFAULT_ROOTS[name]
        return name, Path(root).expanduser().absolute()
    if Path(text).suffix.lower() in ('.csv', '.json'):
        if root is not None:
            raise DataError(f'dataset {text!r} is already a path to an annotation file; '
                            f'do not also give a root ({root})')
        return GENERIC, Path(text).expanduser().absolute()
    aliases = ', '.join(f'{a}->{n}' for a, n in DATASET_ALIASES.items())
    raise DataError(f'unknown dataset {text!r}: expected one of {", ".join(DATASET_NAMES)} '
                    f'(aliases {aliases}) or a path to a .csv/.json annotation file')


def load_dataset(name: str, root: str | os.PathLike | None = None, *, seed: int = 0,
                 score: str | None = None, train_ratio: float = 0.8, val_ratio: float = DEFAULT_VAL_RATIO,
                 csv_image_column: str = 'image', csv_score_column: str = 'score') -> IQADataset:
    """Read a data set's annotation files into an IQADataset (images are not opened here).

    `seed` and `train_ratio` choose the random split of data sets that have no official one
    (by reference image or prompt where several images share content, so no content is on
    both sides). Where a data set has no official validation split, `val_ratio` of its
    training side (same grouping, same seed) becomes the 'val' split (0: none, the behaviour
    of earlier versions); the test side does not depend on val_ratio. `score` picks another
    score column where a data set has several (KonIQ 'MOS' for the 1-5 scale, AGIQA-3K
    'mos_align', ...). The image folder is found from the first listed image
    (_find_image_folder); the image files themselves are checked later, all together, by
    load_images.
    """
    name, root = resolve_dataset(name, root)
    _check_ratios(train_ratio, val_ratio)
    if name == 'demo':
        root = ensure_demo_dataset(root)
    if not root.exists():
        raise DataError(f'{name}: dataset root {root} does not exist; expected '
                        f'{EXPECTED_LAYOUT[name]} there; {ROOT_HINT}')
    if root.is_file() and root.name in ANNOTATION_FILES.get(name, ()):
        root = root.parent   # NAME=path/to/dmos.csv means that data set's folder
    ctx = _ReadContext(name=name, root=root, seed=seed, score=score, train_ratio=train_ratio,
                       val_ratio=val_ratio)
    if root.is_file():
        # NAME=path/to/list.json or a generic annotation file.
        if root.suffix.lower() == '.json':
            dataset = _read_json_dataset(ctx, root, test_only=name != GENERIC)
        elif root.suffix.lower() == '.csv':
            dataset = _read_generic_csv(ctx, root, csv_image_column, csv_score_column)
        else:
            raise DataError(f'{name}: {root} is a file but not a .csv or .json annotation file; '
                            f'expected a folder with {EXPECTED_LAYOUT[name]}')
    else:
        if name == GENERIC:
            raise DataError(f'{root} is a folder; a generic dataset is a .csv or .json file')
        dataset = READERS[name](ctx)
    _check_dataset(dataset)
    return dataset


@dataclass
class _ReadContext:
    name: str
    root: Path
    seed: int
    score: str | None
    train_ratio: float
    val_ratio: float = DEFAULT_VAL_RATIO


# ----------------------------------------------------------------------------------------
# Annotation file helpers
# ----------------------------------------------------------------------------------------

def _read_csv(path: Path, required: Sequence[str]) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header and (line number, row dict) pairs of a CSV file; blank lines are skipped."""
    with open(path, newline='', encoding='utf-8-sig') as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f'{path}: file is empty; expected a header row with columns '
                            f'{", ".join(required)}')
        header = [h.strip() for h in header]
        _require_columns(path, header, required)
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


def _read_xlsx(path: Path, required: Sequence[str] = ()) -> tuple[list[str], list[tuple[int, dict]]]:
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
        _require_columns(path, header, required)
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


def _require_columns(path: Path, header: Sequence[str], required: Sequence[str]) -> None:
    for column in required:
        if column not in header:
            raise DataError(f'{path}: column {column!r} missing; expected columns '
                            f'{", ".join(required)}; found {", ".join(map(str, header))}')


def _number(value, where: str) -> float:
    """A finite float from a cell/field, or DataError naming where it came from."""
    try:
        number = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise DataError(f'{where}: expected a number, got {value!r}') from None
    if not math.isfinite(number):
        raise DataError(f'{where}: expected a finite number, got {value!r}')
    return number


def _read_score_list(path: Path) -> list[tuple[str, float]]:
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
        pairs.append((image, _number(value, f'{where}, key "score"')))
    return pairs


def _image_path(base: Path, image: str) -> Path:
    """Where a listed image lives: the path as given under `base`, else its file name in `base`.

    The user's JSON lists say "koniq_train/x.jpg" while the images sit beside the JSON, so the
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


def _find_image_folder(ctx: _ReadContext, names: Sequence[str], expected: Sequence[Path], listed_in: Path,
                       locate: Callable[[Path, str], Path] = _in_folder, hint: str | None = None) -> Path:
    """The folder that holds a data set's images, found from the first listed image.

    Why: copies of a data set nest their images differently (the AGIQA-3K inside the user's
    second project keeps them in ACGIQA-3K/), and a guessed folder turned that into one "file
    not found" line per image with no hint. The first of `expected` that holds the first
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


def _mat_str(value) -> str:
    """A string out of MATLAB cell-array nesting (arrays of arrays of one string)."""
    while isinstance(value, np.ndarray):
        if value.size == 0:
            return ''
        value = value.ravel()[0]
    return str(value)


def _load_mat(path: Path, key: str) -> np.ndarray:
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


def split_by_groups(n: int, seed: int, train_ratio: float = 0.8, val_ratio: float = DEFAULT_VAL_RATIO,
                    groups: Sequence | None = None) -> dict[str, np.ndarray]:
    """Seeded random train/val/test split of n images; with `groups`, whole groups go to one side.

    `groups` holds one key per image (its reference image, its prompt): images that share
    content must not be trained on and tested on. Like HyperIQA, the units (images or
    groups) are shuffled and round(train_ratio * count) go to the training side; test is the
    rest, exactly the split of earlier versions for the same seed and train_ratio. The
    validation split is then carved out of the training side with the same grouping:
    round(val_ratio * training units), at least one unit when val_ratio > 0 and the training
    side has two or more (val_ratio 0: no 'val' key). Returns 'train' / 'val' / 'test' ->
    sorted int64 indices.
    """
    _check_ratios(train_ratio, val_ratio)
    keys = _unit_keys(n, groups)
    units = np.unique(keys)  # sorted, so the split depends only on the seed
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(units))
    n_train = int(round(train_ratio * len(units)))
    if len(units) >= 2:
        n_train = min(max(n_train, 1), len(units) - 1)
    in_train = np.isin(keys, units[order[:n_train]])
    splits = {'train': np.flatnonzero(in_train), 'test': np.flatnonzero(~in_train)}
    # Continuing the same generator: the validation split is seeded by the split's seed.
    return _carve_val(splits, keys, rng, val_ratio)


def _check_ratios(train_ratio: float, val_ratio: float) -> None:
    if not 0.0 < train_ratio < 1.0:
        raise DataError(f'train_ratio must be between 0 and 1 (exclusive), got {train_ratio}')
    if not 0.0 <= val_ratio < 1.0:
        raise DataError(f'val_ratio must be at least 0 and below 1, got {val_ratio} '
                        f'(train_swin.py --val_ratio; 0 = no validation split)')


def _unit_keys(n: int, groups: Sequence | None) -> np.ndarray:
    if groups is None:
        return np.arange(n)
    if len(groups) != n:
        raise ValueError(f'{len(groups)} group keys for {n} images')
    return np.asarray([str(g) for g in groups])


def _carve_val(splits: dict, keys: np.ndarray, rng: np.random.Generator, val_ratio: float) -> dict:
    """Move round(val_ratio * units) whole units of the training side to a 'val' split."""
    train = np.asarray(splits['train'], dtype=np.int64)
    units = np.unique(keys[train])
    n_val = int(round(val_ratio * len(units)))
    if val_ratio > 0 and len(units) >= 2:
        n_val = min(max(n_val, 1), len(units) - 1)
    else:
        n_val = 0
    if n_val == 0:
        return {'train': train, 'test': np.asarray(splits['test'], dtype=np.int64)}
    in_val = np.isin(keys[train], units[rng.permutation(len(units))[:n_val]])
    return {'train': train[~in_val], 'val': train[in_val], 'test': np.asarray(splits['test'], dtype=np.int64)}


def _random_split(ctx: _ReadContext, n: int, groups: Sequence | None = None) -> dict:
    return split_by_groups(n, ctx.seed, ctx.train_ratio, ctx.val_ratio, groups)


def _val_from_train(ctx: _ReadContext, splits: dict, n: int, groups: Sequence | None = None) -> dict:
    """A fixed train/test split without validation images: carve val out of its training side
    (same grouping, seeded by ctx.seed); the official or the user's own test side stays as it is."""
    if len(splits.get('val', ())):
        return splits
    return _carve_val(splits, _unit_keys(n, groups), np.random.default_rng(ctx.seed), ctx.val_ratio)


def _random_source(ctx: _ReadContext, unit: str) -> str:
    pct = int(round(ctx.train_ratio * 100))
    return f'random {pct}/{100 - pct} by {unit} (seed {ctx.seed})' + _val_source(ctx, unit)


def _val_source(ctx: _ReadContext, unit: str) -> str:
    if ctx.val_ratio == 0:
        return '; no validation split (val_ratio 0)'
    return f'; val {ctx.val_ratio * 100:g}% of the training side by {unit} (seed {ctx.seed})'


def _announce_random(name: str, source: str, splits: dict, why: str = 'no official split') -> None:
    # The issue asks for the fallback split to be printed: results depend on it.
    sizes = ' / '.join(f'{k} {len(v)}' for k, v in splits.items())
    print(f'{name}: {why}; using {source}: {sizes} images', flush=True)


def _pick_score(ctx: _ReadContext, default: str, choices: dict[str, str]) -> str:
    """Column for ctx.score: None -> default; an alias or a listed column name."""
    if ctx.score is None:
        return default
    column = choices.get(ctx.score, choices.get(ctx.score.lower()))
    if column is None:
        raise DataError(f'{ctx.name}: score {ctx.score!r} not available; expected one of '
                        f'{", ".join(sorted(set(choices)))}')
    return column


def _check_dataset(ds: IQADataset) -> None:
    """Invariants every reader must give: aligned arrays, disjoint in-range splits, no duplicates."""
    ds.mos = np.asarray(ds.mos, dtype=np.float64)
    if len(ds.paths) == 0:
        raise DataError(f'{ds.name}: no images listed in {ds.root}')
    if len(ds.mos) != len(ds.paths):
        raise DataError(f'{ds.name}: {len(ds.paths)} images but {len(ds.mos)} scores')
    counts = Counter(ds.paths)
    dup = next((p for p, c in counts.items() if c > 1), None)
    if dup is not None:
        raise DataError(f'{ds.name}: image {dup} is listed {counts[dup]} times in the annotation')
    seen = np.zeros(len(ds.paths), dtype=bool)
    for key, idx in ds.splits.items():
        idx = np.asarray(idx, dtype=np.int64)
        if key not in ('train', 'val', 'test'):
            raise DataError(f'{ds.name}: unknown split {key!r}')
        if idx.size and (idx.min() < 0 or idx.max() >= len(ds.paths)):
            raise DataError(f'{ds.name}: split {key!r} indexes outside the {len(ds.paths)} images')
        if seen[idx].any():
            raise DataError(f'{ds.name}: an image is in split {key!r} and in another split')
        seen[idx] = True
        ds.splits[key] = np.sort(idx)
    ds.splits = {k: v for k, v in ds.splits.items() if len(v)}
    if 'test' not in ds.splits:
        raise DataError(f'{ds.name}: no test images in split {ds.split_source}')


def _dataset(ctx: _ReadContext, paths, mos, splits, source, score_name, score_range,
             higher_is_better=True) -> IQADataset:
    return IQADataset(name=ctx.name, root=ctx.root, paths=[str(p) for p in paths],
                      mos=np.asarray(mos, dtype=np.float64), splits=splits, split_source=source,
                      score_name=score_name, score_range=tuple(float(v) for v in score_range),
                      higher_is_better=higher_is_better)


def _missing_annotation(ctx: _ReadContext) -> DataError:
    return DataError(f'{ctx.name}: no annotation file in {ctx.root}: expected '
                     f'{EXPECTED_LAYOUT[ctx.name]}')


# ----------------------------------------------------------------------------------------
# Readers, one per data set
# ----------------------------------------------------------------------------------------

def _read_koniq(ctx: _ReadContext) -> IQADataset:
    """KonIQ-10k: scores CSV (MOS_zscore 0-100 or MOS 1-5) and split, first found wins:
    the official sets CSV, the user's koniq_train/test.json, a seeded random split."""
    root = ctx.root
    scores_file, sets_file = root / KONIQ_SCORES, root / KONIQ_SETS
    train_json, test_json = root / 'koniq_train.json', root / 'koniq_test.json'
    has_json = train_json.is_file() and test_json.is_file()
    column = _pick_score(ctx, 'MOS_zscore', {'MOS_zscore': 'MOS_zscore', 'mos_zscore': 'MOS_zscore',
                                              'MOS': 'MOS', 'mos': 'MOS'})
    json_lists: dict[str, tuple[str, Path]] = {}   # file name -> (side, image path)

    def read_json_lists():
        # The user's koniq_train/test.json: only needed for their split or their train/ test/ folders.
        if not json_lists:
            for side, file in (('train', train_json), ('test', test_json)):
                for image, _ in _read_score_list(file):
                    fname = Path(image).name
                    if json_lists.get(fname, (side,))[0] != side:
                        raise DataError(f'{fname} is listed in both {train_json.name} and {test_json.name}')
                    json_lists[fname] = (side, _koniq_json_image(root, image, side))
        return json_lists

    if scores_file.is_file():
        _, rows = _read_csv(scores_file, ['image_name', column])
        names = [r['image_name'] for _, r in rows]
        mos = [_number(r[column], f'{scores_file} line {n}, column {column!r}') for n, r in rows]
        score_name = column
        score_range = (0.0, 100.0) if column == 'MOS_zscore' else (1.0, 5.0)
    elif sets_file.is_file():
        if column == 'MOS':
            raise DataError(f"{ctx.name}: score 'MOS' (1-5) needs {scores_file}; {KONIQ_SETS} "
                            f'has MOS on the 0-100 scale only')
        _, rows = _read_csv(sets_file, ['image_name', 'MOS', 'set'])
        names = [r['image_name'] for _, r in rows]
        mos = [_number(r['MOS'], f'{sets_file} line {n}, column \'MOS\'') for n, r in rows]
        score_name, score_range = 'MOS (0-100)', (0.0, 100.0)
    elif has_json:
        pairs = _read_score_list(train_json) + _read_score_list(test_json)
        names = [Path(image).name for image, _ in pairs]
        mos = [s for _, s in pairs]
        score_name = 'score'
        score_range = (0.0, 100.0) if max(mos) > 5.0 else (1.0, 5.0)
    else:
        raise _missing_annotation(ctx)

    image_dirs = [root / '1024x768', root / '512x384']
    if has_json and not any((d / names[0]).is_file() for d in image_dirs):
        # the user's layout: images in train/ and test/ as their JSON lists say
        lists = read_json_lists()
        paths = [lists[n][1] if n in lists else root / n for n in names]
    else:
        listed_in = next(f for f in (scores_file, sets_file, train_json) if f.is_file())
        image_dir = _find_image_folder(ctx, names, image_dirs, listed_in)
        paths = [image_dir / n for n in names]

    if sets_file.is_file():
        _, set_rows = _read_csv(sets_file, ['image_name', 'set'])
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
        splits = _val_from_train(ctx, splits, len(names))
        source = 'koniq_train/test.json' + _val_source(ctx, 'image')
        if 'val' in splits:
            _announce_random(ctx.name, source, splits, 'no validation split in koniq_train/test.json')
    else:
        source = _random_source(ctx, 'image')
        splits = _random_split(ctx, len(names))
        _announce_random(ctx.name, source, splits)
    return _dataset(ctx, paths, mos, splits, source, score_name, score_range)


def _koniq_json_image(root: Path, image: str, side: str) -> Path:
    """The user's KonIQ JSON says "koniq_train/x.jpg"; their images sit in train/ or test/."""
    fname = Path(image).name
    for candidate in (root / side / fname, root / image, root / fname):
        if candidate.is_file():
            return candidate
    return root / side / fname


def _read_json_dataset(ctx: _ReadContext, json_file: Path, *, test_only: bool,
                       score_range: tuple[float, float] | None = None) -> IQADataset:
    """A list [{"image", "score"}] with images beside it: test only for the user's
    cross-dataset lists, a seeded random split for a generic list."""
    if ctx.score not in (None, 'score', 'gt_score'):
        raise DataError(f'{json_file}: a JSON list has one score per image; got score={ctx.score!r}')
    pairs = _read_score_list(json_file)
    base = _find_image_folder(ctx, [image for image, _ in pairs], [json_file.parent], json_file, _image_path)
    paths = [_image_path(base, image) for image, _ in pairs]
    mos = np.array([s for _, s in pairs])
    if test_only:
        splits, source = {'test': np.arange(len(paths))}, f'{json_file.name} (test only)'
    else:
        source = _random_source(ctx, 'image')
        splits = _random_split(ctx, len(paths))
        _announce_random(ctx.name, source, splits)
    if score_range is None:
        score_range = (float(mos.min()), float(mos.max()))
    ds = _dataset(ctx, paths, mos, splits, source, 'score', score_range)
    if ctx.name == GENERIC:
        ds.name = json_file.stem
    return ds


def _read_spaq(ctx: _ReadContext) -> IQADataset:
    """SPAQ: the user's spaq_test.json, else the official .xlsx (Image name, MOS 0-100)."""
    json_file = ctx.root / 'spaq_test.json'
    if json_file.is_file():
        return _read_json_dataset(ctx, json_file, test_only=True, score_range=(0.0, 100.0))
    xlsx = ctx.root / SPAQ_XLSX
    if not xlsx.is_file():
        raise _missing_annotation(ctx)
    header, rows = _read_xlsx(xlsx, ['Image name'])
    attribute_columns = {h: h for h in header if h and h != 'Image name'}
    column = _pick_score(ctx, 'MOS', {**attribute_columns, 'mos': 'MOS'})
    _require_columns(xlsx, header, ['Image name', column])
    names, mos = [], []
    for row_no, r in rows:
        image = r.get('Image name')
        if image is None or str(image).strip() == '':
            raise DataError(f"{xlsx} row {row_no}, column 'Image name': expected a file name, got nothing")
        names.append(str(image).strip())
        mos.append(_number(r.get(column), f'{xlsx} row {row_no}, column {column!r}'))
    image_dir = _find_image_folder(ctx, names, [ctx.root / 'TestImage'], xlsx)
    paths = [image_dir / n for n in names]
    source = _random_source(ctx, 'image')
    splits = _random_split(ctx, len(paths))
    _announce_random(ctx.name, source, splits)
    score_range = (0.0, 100.0) if column == 'MOS' else (float(min(mos)), float(max(mos)))
    return _dataset(ctx, paths, mos, splits, source, column, score_range)


def _read_kadid(ctx: _ReadContext) -> IQADataset:
    """KADID-10k: the user's kadid_test.json, else dmos.csv split by reference image
    (I01-I65 train, I66-I81 test). Despite its name, higher dmos = better (1-5)."""
    json_file = ctx.root / 'kadid_test.json'
    if json_file.is_file():
        return _read_json_dataset(ctx, json_file, test_only=True, score_range=(1.0, 5.0))
    csv_file = ctx.root / 'dmos.csv'
    if not csv_file.is_file():
        raise _missing_annotation(ctx)
    _pick_score(ctx, 'dmos', {'dmos': 'dmos'})
    _, rows = _read_csv(csv_file, ['dist_img', 'ref_img', 'dmos'])
    image_dir = _find_image_folder(ctx, [r['dist_img'] for _, r in rows], [ctx.root / 'images', ctx.root], csv_file)
    paths, mos, ref_ids = [], [], []
    for n, r in rows:
        match = re.match(r'[Ii](\d+)', Path(r['ref_img']).stem)
        if match is None:
            raise DataError(f"{csv_file} line {n}, column 'ref_img': expected a reference name like "
                            f'I01.png, got {r["ref_img"]!r}')
        ref_ids.append(int(match.group(1)))
        paths.append(image_dir / r['dist_img'])
        mos.append(_number(r['dmos'], f"{csv_file} line {n}, column 'dmos'"))
    ref_ids = np.array(ref_ids)
    splits = {'train': np.flatnonzero(ref_ids <= KADID_TRAIN_REFS),
              'test': np.flatnonzero(ref_ids > KADID_TRAIN_REFS)}
    splits = _val_from_train(ctx, splits, len(paths), ref_ids)
    source = (f'by reference image (I01-I{KADID_TRAIN_REFS:02d} train, I{KADID_TRAIN_REFS + 1:02d}-I81 test)'
              + _val_source(ctx, 'reference image'))
    if 'val' in splits:
        _announce_random(ctx.name, source, splits, 'no official validation split')
    return _dataset(ctx, paths, mos, splits, source, 'dmos', (1.0, 5.0))


def _read_agiqa(ctx: _ReadContext) -> IQADataset:
    """AGIQA-3K: the user's agiqa_test.json, else data.csv (mos_quality by default,
    mos_align selectable), split at random by prompt so a prompt is on one side only."""
    json_file = ctx.root / 'agiqa_test.json'
    if json_file.is_file():
        return _read_json_dataset(ctx, json_file, test_only=True, score_range=(0.0, 5.0))
    csv_file = ctx.root / 'data.csv'
    if not csv_file.is_file():
        raise _missing_annotation(ctx)
    column = _pick_score(ctx, 'mos_quality', {
        'mos_quality': 'mos_quality', 'quality': 'mos_quality',
        'mos_align': 'mos_align', 'align': 'mos_align', 'alignment': 'mos_align'})
    header, rows = _read_csv(csv_file, ['name', column])
    names = [r['name'] for _, r in rows]
    mos = [_number(r[column], f'{csv_file} line {n}, column {column!r}') for n, r in rows]
    image_dir = _find_image_folder(ctx, names, [ctx.root / 'AGIQA-3K', ctx.root / 'images', ctx.root / 'image',
                                                ctx.root], csv_file)
    paths = [image_dir / n for n in names]
    if 'prompt' in header:
        groups, unit = [r['prompt'] for _, r in rows], 'prompt'
    else:
        groups, unit = None, 'image'
    source = _random_source(ctx, unit)
    splits = _random_split(ctx, len(paths), groups)
    _announce_random(ctx.name, source, splits)
    return _dataset(ctx, paths, mos, splits, source, column, (0.0, 5.0))


def _read_livec(ctx: _ReadContext) -> IQADataset:
    """LIVE Challenge: names and MOS (0-100) from the two .mat files, skipping the first 7."""
    data = ctx.root / 'Data'
    images_mat, mos_mat = data / 'AllImages_release.mat', data / 'AllMOS_release.mat'
    if not images_mat.is_file() and not mos_mat.is_file():
        raise _missing_annotation(ctx)
    _pick_score(ctx, 'MOS', {'mos': 'MOS'})
    names = [_mat_str(v) for v in _load_mat(images_mat, 'AllImages_release').ravel()]
    mos = np.asarray(_load_mat(mos_mat, 'AllMOS_release'), dtype=np.float64).ravel()
    if len(names) != len(mos):
        raise DataError(f'{images_mat} lists {len(names)} images but {mos_mat} has {len(mos)} scores')
    if len(names) <= LIVEC_SKIP:
        raise DataError(f'{images_mat}: {len(names)} images; expected more than the {LIVEC_SKIP} '
                        f'training images it starts with')
    names, mos = names[LIVEC_SKIP:], mos[LIVEC_SKIP:]
    image_dir = _find_image_folder(ctx, names, [ctx.root / 'Images'], images_mat)
    paths = [image_dir / n for n in names]
    source = _random_source(ctx, 'image')
    splits = _random_split(ctx, len(paths))
    _announce_random(ctx.name, source, splits)
    return _dataset(ctx, paths, mos, splits, source, 'MOS', (0.0, 100.0))


def _read_live(ctx: _ReadContext) -> IQADataset:
    """LIVE (release 2) as in HyperIQA: DMOS (lower = better) of the 779 distorted images,
    split at random by reference image."""
    dmos_mat, ref_mat = ctx.root / 'dmos_realigned.mat', ctx.root / 'refnames_all.mat'
    if not dmos_mat.is_file():
        raise _missing_annotation(ctx)
    _pick_score(ctx, 'DMOS', {'dmos': 'DMOS'})
    dmos = np.asarray(_load_mat(dmos_mat, 'dmos_new'), dtype=np.float64).ravel()
    orgs = np.asarray(_load_mat(dmos_mat, 'orgs')).ravel().astype(bool)
    refs = [_mat_str(v) for v in _load_mat(ref_mat, 'refnames_all').ravel()]
    files = [f'{folder}/img{k}.bmp' for folder, count in LIVE_FOLDERS for k in range(1, count + 1)]
    for what, arr in (('dmos_new', dmos), ('orgs', orgs), ('refnames_all', refs)):
        if len(arr) != len(files):
            counts = ' + '.join(f'{folder} {count}' for folder, count in LIVE_FOLDERS)
            raise DataError(f'{ref_mat if what == "refnames_all" else dmos_mat}: {what} has '
                            f'{len(arr)} entries; expected {len(files)} ({counts})')
    keep = np.flatnonzero(~orgs)  # orgs marks the undistorted copies of the references
    names = [files[i] for i in keep]
    image_dir = _find_image_folder(ctx, names, [ctx.root], dmos_mat)
    paths = [image_dir / n for n in names]
    groups = [refs[i] for i in keep]
    source = _random_source(ctx, 'reference image')
    splits = _random_split(ctx, len(paths), groups)
    _announce_random(ctx.name, source, splits)
    return _dataset(ctx, paths, dmos[keep], splits, source, 'DMOS', (0.0, 100.0),
                    higher_is_better=False)


def _read_name_score_lines(path: Path, name_col: int, score_col: int) -> list[tuple[str, float]]:
    """Whitespace-separated text lines holding an image name and a score."""
    pairs = []
    with open(path, encoding='utf-8-sig') as f:
        for n, line in enumerate(f, start=1):
            words = line.split()
            if not words:
                continue
            if len(words) < 2:
                raise DataError(f'{path} line {n}: expected an image name and a score, got {line.strip()!r}')
            pairs.append((words[name_col], _number(words[score_col], f'{path} line {n}, field {score_col + 1}')))
    if not pairs:
        raise DataError(f'{path}: no lines with an image name and a score')
    return pairs


def _read_csiq(ctx: _ReadContext) -> IQADataset:
    """CSIQ as in HyperIQA: csiq_label.txt lines '<name> <DMOS>' (0-1, lower = better),
    split at random by reference ('1600.AWGN.1.png' belongs to reference 1600)."""
    label_file = ctx.root / 'csiq_label.txt'
    if not label_file.is_file():
        raise _missing_annotation(ctx)
    _pick_score(ctx, 'DMOS', {'dmos': 'DMOS'})
    pairs = _read_name_score_lines(label_file, 0, 1)
    image_dir = _find_image_folder(ctx, [name for name, _ in pairs], [ctx.root / 'dst_imgs_all'], label_file)
    paths = [image_dir / name for name, _ in pairs]
    groups = [name.split('.')[0].lower() for name, _ in pairs]
    source = _random_source(ctx, 'reference image')
    splits = _random_split(ctx, len(paths), groups)
    _announce_random(ctx.name, source, splits)
    return _dataset(ctx, paths, [s for _, s in pairs], splits, source, 'DMOS', (0.0, 1.0),
                    higher_is_better=False)


def _read_tid2013(ctx: _ReadContext) -> IQADataset:
    """TID2013 as in HyperIQA: mos_with_names.txt lines '<MOS> <name>' (0-9), split at
    random by reference ('i01_01_1.bmp' belongs to reference 01)."""
    label_file = ctx.root / 'mos_with_names.txt'
    if not label_file.is_file():
        raise _missing_annotation(ctx)
    _pick_score(ctx, 'MOS', {'mos': 'MOS'})
    pairs = _read_name_score_lines(label_file, 1, 0)
    image_dir = _find_image_folder(ctx, [name for name, _ in pairs], [ctx.root / 'distorted_images'], label_file)
    paths = [image_dir / name for name, _ in pairs]
    groups = [name.split('_')[0][1:].lower() for name, _ in pairs]
    source = _random_source(ctx, 'reference image')
    splits = _random_split(ctx, len(paths), groups)
    _announce_random(ctx.name, source, splits)
    return _dataset(ctx, paths, [s for _, s in pairs], splits, source, 'MOS', (0.0, 9.0))


def _read_bid(ctx: _ReadContext) -> IQADataset:
    """BID as in HyperIQA: DatabaseGrades.xlsx, column A the image number, column B the MOS
    (0-5); images DatabaseImage####.JPG in the root."""
    xlsx = ctx.root / 'DatabaseGrades.xlsx'
    if not xlsx.is_file():
        raise _missing_annotation(ctx)
    _pick_score(ctx, 'MOS', {'mos': 'MOS'})
    header, rows = _read_xlsx(xlsx)
    if len(header) < 2:
        raise DataError(f'{xlsx}: expected two columns (image number, MOS); found {len(header)}')
    number_col, mos_col = header[0], header[1]
    names, mos = [], []
    for row_no, r in rows:
        number = _number(r.get(number_col), f'{xlsx} row {row_no}, column A (image number)')
        if number != int(number):
            raise DataError(f'{xlsx} row {row_no}, column A (image number): expected a whole number, got {number}')
        names.append(f'DatabaseImage{int(number):04d}.JPG')
        mos.append(_number(r.get(mos_col), f'{xlsx} row {row_no}, column B (MOS)'))
    image_dir = _find_image_folder(ctx, names, [ctx.root], xlsx)
    paths = [image_dir / n for n in names]
    source = _random_source(ctx, 'image')
    splits = _random_split(ctx, len(paths))
    _announce_random(ctx.name, source, splits)
    return _dataset(ctx, paths, mos, splits, source, 'MOS', (0.0, 5.0))


def _read_generic_csv(ctx: _ReadContext, csv_file: Path, image_column: str, score_column: str) -> IQADataset:
    """Any data set as a CSV: image paths (relative to the CSV's folder) and scores in the named
    columns; a 'split' or 'set' column (train/val/test) is used when present, else a seeded
    random split. Higher scores are taken to be better."""
    column = ctx.score or score_column
    header, rows = _read_csv(csv_file, [image_column, column])
    base = _find_image_folder(ctx, [r[image_column] for _, r in rows], [csv_file.parent], csv_file, _image_path)
    paths = [_image_path(base, r[image_column]) for _, r in rows]
    mos = np.array([_number(r[column], f'{csv_file} line {n}, column {column!r}') for n, r in rows])
    split_column = next((c for c in ('split', 'set') if c in header), None)
    if split_column is not None:
        names = {'train': 'train', 'training': 'train', 'val': 'val', 'valid': 'val',
                 'validation': 'val', 'test': 'test', 'testing': 'test'}
        sides = []
        for n, r in rows:
            side = names.get(r[split_column].lower())
            if side is None:
                raise DataError(f'{csv_file} line {n}, column {split_column!r}: expected train, val '
                                f'or test, got {r[split_column]!r}')
            sides.append(side)
        sides = np.array(sides)
        splits = {k: np.flatnonzero(sides == k) for k in ('train', 'val', 'test')}
        source = f'{csv_file.name} column {split_column!r}'
        if not len(splits['val']):
            splits = _val_from_train(ctx, splits, len(paths))
            source += _val_source(ctx, 'image')
            if 'val' in splits:
                _announce_random(csv_file.stem, source, splits, f'no val rows in column {split_column!r}')
    else:
        source = _random_source(ctx, 'image')
        splits = _random_split(ctx, len(paths))
        _announce_random(csv_file.stem, source, splits)
    ds = _dataset(ctx, paths, mos, splits, source, column, (float(mos.min()), float(mos.max())))
    if ctx.name == GENERIC:
        ds.name = csv_file.stem
    return ds


READERS: dict[str, Callable[[_ReadContext], IQADataset]] = {
    'koniq-10k': _read_koniq, 'demo': _read_koniq, 'spaq': _read_spaq, 'kadid-10k': _read_kadid,
    'agiqa-3k': _read_agiqa, 'livec': _read_livec, 'live': _read_live, 'csiq': _read_csiq,
    'tid2013': _read_tid2013, 'bid': _read_bid,
}


# ----------------------------------------------------------------------------------------
# Decode once: images -> uint8 tensor, with an on-disk cache
# ----------------------------------------------------------------------------------------

CACHE_VERSION = 1
MAX_LISTED_PROBLEMS = 20


def load_images(paths: Sequence[str | os.PathLike], resize_hw: tuple[int, int] | None = (512, 384), *,
                cache_dir: str | os.PathLike | None = '.cache/images', num_workers: int | None = None,
                skip_bad: bool = False, min_hw: tuple[int, int] | None = None,
                progress: bool = True) -> tuple[torch.Tensor, np.ndarray]:
    """Decode and resize every image once -> (uint8 tensor (N, 3, H, W) on CPU, kept indices).

    resize_hw is (height, width) as in torchvision Resize((512, 384)) of the user's code
    (PIL bilinear with antialiasing, so the pixels match theirs); None keeps the native size,
    which must then be the same for all images. Decoding runs in `num_workers` threads (PIL
    releases the GIL while decoding and resizing) with a progress bar, and the result is
    stored in `cache_dir` under a key made of the file list, the resize and every file's size
    and mtime: a second call over unchanged files reads the tensor back instead of decoding
    (cache_dir=None turns the disk cache off; a relative cache_dir is relative to the current
    working directory).

    `min_hw` is the smallest stored size the caller can use (the patch size): a resize_hw below
    it is an error; at native size, each image below it is a bad image. Images that are
    absent, unreadable, truncated, of another size than most (resize_hw=None) or too small are
    all collected first: by default DataError lists the first 20 and the count; with
    skip_bad=True they are dropped with a printed warning, and the returned kept indices
    (into `paths`) say which images the tensor holds.
    """
    paths = [os.fspath(p) for p in paths]
    n = len(paths)
    if n == 0:
        raise DataError('load_images: no image paths given')
    resize_hw = _check_hw(resize_hw, 'resize_hw')
    min_hw = _check_hw(min_hw, 'min_hw')
    if resize_hw is not None and min_hw is not None and (resize_hw[0] < min_hw[0] or resize_hw[1] < min_hw[1]):
        raise DataError(f'resize_hw {resize_hw[0]}x{resize_hw[1]} (HxW) is smaller than the '
                        f'{min_hw[0]}x{min_hw[1]} patches to cut from it: resize larger or use smaller patches')
    stats = [_file_stat(p) for p in paths]
    key = _cache_key(paths, stats, resize_hw)
    cache = Path(cache_dir) if cache_dir is not None else None

    decoded = _cache_read(cache, key) if cache is not None else None
    if decoded is None:
        decoded = _decode_all(paths, stats, resize_hw, num_workers, progress)
        if cache is not None:
            _cache_write(cache, key, decoded, paths, resize_hw)
    images, kept, problems, orig_hw = decoded

    if min_hw is not None and resize_hw is None:
        # At native size an image smaller than the patch cannot give one; resized images are
        # all resize_hw, checked against min_hw above (small files are scaled up, as torchvision
        # Resize did in the user's pipeline).
        small = [(int(i), f'image is {h}x{w} (HxW), smaller than the {min_hw[0]}x{min_hw[1]} patch')
                 for i, (h, w) in zip(kept, orig_hw[kept]) if h < min_hw[0] or w < min_hw[1]]
        if small:
            problems = sorted(problems + small)
            drop = {i for i, _ in small}
            keep_rows = [j for j, i in enumerate(kept) if int(i) not in drop]
            images, kept = images[keep_rows], kept[keep_rows]
    if problems:
        report = _problem_report(problems, paths)
        if not skip_bad:
            raise DataError(report + '\nFix or remove these files, or pass skip_bad=True '
                                     '(train_swin.py --skip_bad_images) to leave them out.')
        print(f'warning: skipping {len(problems)} of {n} images (skip_bad): {report}',
              file=sys.stderr, flush=True)
    if len(kept) == 0:
        raise DataError(f'none of the {n} images can be used')
    return images, kept


def _check_hw(hw, what: str) -> tuple[int, int] | None:
    if hw is None:
        return None
    try:
        h, w = (int(v) for v in hw)
    except (TypeError, ValueError):
        raise DataError(f'{what} must be (height, width), got {hw!r}') from None
    if h <= 0 or w <= 0:
        raise DataError(f'{what} must be positive (height, width), got {hw!r}')
    return h, w


def _file_stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _cache_key(paths: Sequence[str], stats, resize_hw) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({'version': CACHE_VERSION, 'resize_hw': resize_hw}).encode())
    for p, st in zip(paths, stats):
        h.update(f'\n{os.path.abspath(p)}\t{st}'.encode())
    return h.hexdigest()[:32]


def _problem_report(problems: list[tuple[int, str]], paths: Sequence[str]) -> str:
    lines = [f'{len(problems)} of {len(paths)} images cannot be used:']
    lines += [f'  {paths[i]}: {reason}' for i, reason in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f'  ... and {len(problems) - MAX_LISTED_PROBLEMS} more')
    return '\n'.join(lines)


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode.

    16-bit grayscale is scaled (PIL's own conversion clips it to white); transparent images
    are composited on white, how they look on a page, rather than exposing whatever colour
    the transparent pixels happen to hold; CMYK, palette, 1-bit, YCbCr and LAB go through PIL.
    """
    mode = im.mode
    if mode == 'RGB' and 'transparency' not in im.info:
        return im
    if mode.startswith('I') or mode == 'F':
        a = np.asarray(im, dtype=np.float64)
        if mode.startswith('I;16') or (mode == 'I' and a.max(initial=0) > 255):
            a = a / 257.0
        elif mode == 'F' and a.max(initial=0) <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), 'L').convert('RGB')
    if mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in im.info:
        rgba = im.convert('RGBA')
        white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert('RGB')
    return im.convert('RGB')


def _decode(path: str, resize_hw: tuple[int, int] | None) -> tuple[np.ndarray, tuple[int, int]]:
    """(H, W, 3) uint8 array, resized like torchvision Resize on a PIL image, and the file's size."""
    with Image.open(path) as im:
        im.load()  # decode now: a truncated file fails here, not later
        orig_hw = (im.height, im.width)
        rgb = _to_rgb(im)
    if resize_hw is not None and (rgb.height, rgb.width) != resize_hw:
        rgb = rgb.resize((resize_hw[1], resize_hw[0]), Image.Resampling.BILINEAR)
    return np.asarray(rgb), orig_hw


def _default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 32))


def _decode_all(paths, stats, resize_hw, num_workers, progress):
    """Decode all images in threads straight into one preallocated tensor."""
    from tqdm import tqdm
    n = len(paths)
    workers = max(1, min(num_workers or _default_workers(), n))
    problems: list[tuple[int, str]] = [(i, 'file not found') for i, st in enumerate(stats) if st is None]
    todo = [i for i, st in enumerate(stats) if st is not None]
    orig_hw = np.zeros((n, 2), dtype=np.int64)
    started = time.perf_counter()

    if resize_hw is None:
        # Native size: read the headers first and keep the size most images share.
        def probe(i):
            with Image.open(paths[i]) as im:
                return im.height, im.width
        sizes = {}
        with ThreadPoolExecutor(workers) as pool:
            futures = {pool.submit(probe, i): i for i in todo}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    sizes[i] = fut.result()
                except Exception as e:
                    problems.append((i, f'cannot read image ({type(e).__name__}: {e})'))
        if not sizes:
            return torch.empty((0, 3, 1, 1), dtype=torch.uint8), np.zeros(0, np.int64), sorted(problems), orig_hw
        target = Counter(sizes.values()).most_common(1)[0][0]
        for i, hw in sizes.items():
            if hw != target:
                problems.append((i, f'image is {hw[0]}x{hw[1]} (HxW) but most images are '
                                    f'{target[0]}x{target[1]}; pass resize_hw to resize them all'))
        todo = sorted(i for i, hw in sizes.items() if hw == target)
    else:
        target = resize_hw

    h, w = target
    images = torch.empty((n, 3, h, w), dtype=torch.uint8)
    ok = np.zeros(n, dtype=bool)

    def work(i):
        arr, hw = _decode(paths[i], resize_hw)
        if arr.shape[:2] != (h, w):
            raise ValueError(f'decoded size {arr.shape[0]}x{arr.shape[1]} differs from its header')
        # Write HWC pixels into the CHW slot of the shared tensor (numpy view, no extra copy).
        np.copyto(images[i].permute(1, 2, 0).numpy(), arr)
        return hw

    bar = tqdm(total=len(todo), desc='decoding images', unit='img', disable=not progress,
               mininterval=1.0, file=sys.stderr)
    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(work, i): i for i in todo}
        for fut in as_completed(futures):
            i = futures[fut]
            try:
                orig_hw[i] = fut.result()
                ok[i] = True
            except Exception as e:  # every failure is reported together, by file
                problems.append((i, f'cannot decode image ({type(e).__name__}: {e})'))
            bar.update(1)
    bar.close()

    kept = np.flatnonzero(ok)
    if len(kept) < n:
        # Compact in place (row j <= kept[j]), so memory is not doubled.
        for j, i in enumerate(kept):
            if j != i:
                images[j] = images[i]
        images = images[:len(kept)]
    seconds = time.perf_counter() - started
    gib = images.numel() / 2**30
    print(f'decoded {len(kept)} of {n} images to a uint8 tensor {tuple(images.shape)} '
          f'({gib:.2f} GiB in memory) in {seconds:.1f} s with {workers} threads', flush=True)
    return images, kept, sorted(problems), orig_hw


def _atomic_write(path: Path, write: Callable) -> None:
    """atomic_write (temp file, fsync, rename), creating the folder first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def _cache_files(cache: Path, key: str) -> tuple[Path, Path]:
    return cache / f'{key}.npy', cache / f'{key}.json'


def _cache_write(cache: Path, key: str, decoded, paths, resize_hw) -> None:
    images, kept, problems, orig_hw = decoded
    data_file, meta_file = _cache_files(cache, key)
    meta = {'version': CACHE_VERSION, 'key': key, 'shape': list(images.shape),
            'resize_hw': resize_hw, 'n_paths': len(paths), 'first_path': os.path.abspath(paths[0]),
            'kept': kept.tolist(), 'problems': problems, 'orig_hw': orig_hw.tolist(),
            'created': time.strftime('%Y-%m-%d %H:%M:%S')}
    try:
        # Data first; the metadata file marks the entry complete.
        _atomic_write(data_file, lambda f: np.lib.format.write_array(f, images.numpy(), allow_pickle=False))
        _atomic_write(meta_file, lambda f: f.write(json.dumps(meta).encode()))
    except OSError as e:
        # A full disk must not stop training: the decoded images are already in memory.
        print(f'warning: could not write the image cache in {cache} ({e}); continuing without it',
              file=sys.stderr, flush=True)
        return
    print(f'image cache written: {data_file} ({images.numel() / 2**30:.2f} GiB)', flush=True)


def _cache_read(cache: Path, key: str):
    data_file, meta_file = _cache_files(cache, key)
    if not (data_file.is_file() and meta_file.is_file()):
        return None
    started = time.perf_counter()
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get('version') != CACHE_VERSION or meta.get('key') != key:
            return None
        array = np.load(data_file, allow_pickle=False)
        if list(array.shape) != meta['shape'] or array.dtype != np.uint8:
            raise ValueError(f'shape {array.shape} {array.dtype}, expected {meta["shape"]} uint8')
    except Exception as e:
        print(f'warning: ignoring unreadable image cache {data_file} ({e}); decoding again',
              file=sys.stderr, flush=True)
        return None
    images = torch.from_numpy(array)
    kept = np.asarray(meta['kept'], dtype=np.int64)
    problems = [(int(i), str(r)) for i, r in meta['problems']]
    orig_hw = np.asarray(meta['orig_hw'], dtype=np.int64).reshape(-1, 2)
    print(f'image cache hit: {data_file} {tuple(images.shape)} ({images.numel() / 2**30:.2f} GiB) '
          f'loaded in {time.perf_counter() - started:.1f} s', flush=True)
    return images, kept, problems, orig_hw


# ----------------------------------------------------------------------------------------
# Patch batches
# ----------------------------------------------------------------------------------------

# RGB -> YIQ. The Y row is torchvision's grayscale weights, so saturation and contrast match
# ColorJitter; hue is a rotation of the (I, Q) chroma plane.
_RGB_TO_YIQ = np.array([[0.2989, 0.587, 0.114],
                        [0.5959, -0.2746, -0.3213],
                        [0.2115, -0.5227, 0.3112]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)
_GRAY_WEIGHTS = _RGB_TO_YIQ[0]
JITTER = {'brightness': 0.1, 'contrast': 0.1, 'saturation': 0.1, 'hue': 0.05}  # the user's values


def _generator(*entropy: int) -> torch.Generator:
    """A CPU generator fully determined by the integers given (seed, epoch, rank, ...)."""
    words = [int(v) & 0xFFFFFFFFFFFFFFFF for v in entropy]
    state = np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFFFFFFFFFFFFFF)


def _check_images(images_u8: torch.Tensor, patch_size: int, what: str) -> None:
    if not isinstance(images_u8, torch.Tensor) or images_u8.dim() != 4 or images_u8.shape[1] != 3 \
            or images_u8.dtype != torch.uint8:
        shape = tuple(images_u8.shape) if isinstance(images_u8, torch.Tensor) else type(images_u8).__name__
        raise DataError(f'{what}: expected a uint8 tensor (N, 3, H, W) from load_images, got {shape}')
    if images_u8.shape[0] == 0:
        raise DataError(f'{what}: no images')
    h, w = images_u8.shape[2:]
    if patch_size < 1 or h < patch_size or w < patch_size:
        raise DataError(f'{what}: images are {h}x{w} (HxW), smaller than patch_size {patch_size}; '
                        f'load them with a larger resize_hw or use a smaller patch_size')


# (x / 255 - mean) / std as one multiply and one add; clip bounds of [0, 1] in normalized units.
_NORM_SCALE = torch.tensor([1.0 / (255.0 * s) for s in IMAGENET_STD]).view(3, 1, 1)
_NORM_SHIFT = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)
_NORM_LOW = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
_NORM_HIGH = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
JITTER_CHUNK = 8   # patches per jitter step on CPU: their float copies stay in cache


_DEVICE_CONSTANTS: dict = {}


def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gray weights (3,), normalization scale (3, 1, 1), shift (3, 1, 1)) on `device`, copied
    there once per process: a .to(device) or torch.tensor(..., device=gpu) per batch is a
    blocking host->device copy, two hidden synchronisations per training step."""
    key = str(device)
    if key not in _DEVICE_CONSTANTS:
        _DEVICE_CONSTANTS[key] = (torch.tensor(_GRAY_WEIGHTS, dtype=torch.float32).to(device),
                                  _NORM_SCALE.to(device), _NORM_SHIFT.to(device))
    return _DEVICE_CONSTANTS[key]


def _jitter_factors(gen: torch.Generator, n: int) -> torch.Tensor:
    """(n, 4) brightness, contrast, saturation factors in [0.9, 1.1] and hue shift in [-0.05, 0.05],
    drawn like torchvision ColorJitter(0.1, 0.1, 0.1, 0.05) per patch."""
    u = torch.rand((n, 4), generator=gen, dtype=torch.float64)
    j = JITTER
    lo = torch.tensor([1 - j['brightness'], 1 - j['contrast'], 1 - j['saturation'], -j['hue']],
                      dtype=torch.float64)
    hi = torch.tensor([1 + j['brightness'], 1 + j['contrast'], 1 + j['saturation'], j['hue']],
                      dtype=torch.float64)
    return lo + u * (hi - lo)


def _jitter_maps(factors: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour jitter + ImageNet normalization of uint8 pixels x as a per-patch affine map:

        out = M x + shift + m0 * g,   m0 = the patch's mean gray level in [0, 1]

    Returns M (n, 3, 3) and g (n, 3) as float32 on `device`. Brightness scales, saturation
    blends with the gray value, contrast blends with the patch's mean gray (the m0 term),
    hue rotates the YIQ chroma plane: all linear and all keep the gray axis, so they commute
    and the random order torchvision draws does not matter. Compared with torchvision's
    ColorJitter, hue is rotated in YIQ instead of shifted in HSV, and values are clipped to
    [0, 1] once at the end instead of after every step.
    """
    f64 = torch.float64
    b, c, s, h = factors.to(f64).cpu().unbind(1)
    n = factors.shape[0]
    gray = torch.tensor(np.outer(np.ones(3), _GRAY_WEIGHTS), dtype=f64)    # x -> (Y, Y, Y)
    saturation = s.view(n, 1, 1) * torch.eye(3, dtype=f64) + (1 - s).view(n, 1, 1) * gray
    cos, sin = torch.cos(2 * math.pi * h), torch.sin(2 * math.pi * h)
    one, zero = torch.ones_like(h), torch.zeros_like(h)
    rotation = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], dim=1).view(n, 3, 3)
    hue = torch.tensor(_YIQ_TO_RGB, dtype=f64) @ rotation @ torch.tensor(_RGB_TO_YIQ, dtype=f64)
    chroma = hue @ saturation
    inv_std = 1.0 / torch.tensor(IMAGENET_STD, dtype=f64)
    matrix = (b * c).view(n, 1, 1) * chroma * (inv_std.view(1, 3, 1) / 255.0)
    # contrast pulls towards the mean gray level (after brightness): a gray offset
    gray_dir = ((1 - c) * b).view(n, 1) * chroma.sum(dim=2) * inv_std.view(1, 3)
    return matrix.float().to(device), gray_dir.float().to(device)


def _apply_jitter(x: torch.Tensor, matrix: torch.Tensor, gray_dir: torch.Tensor, out: torch.Tensor) -> None:
    """out (n, 3, P) = clip(M x + shift + m0 g) for float pixel values x (n, 3, P) in 0..255."""
    gray_weights, _, shift = _constants(x.device)
    gray_mean = x.mean(dim=2) @ gray_weights / 255.0
    offset = gray_dir * gray_mean.view(-1, 1) + shift.view(1, 3)
    torch.baddbmm(offset.unsqueeze(2), matrix, x, out=out)
    for ch in range(3):   # three scalar clamps: much faster on CPU than one clamp with tensor bounds
        out[:, ch].clamp_(_NORM_LOW[ch], _NORM_HIGH[ch])


def _patch_views(images: torch.Tensor, index, top, left, flip, p: int) -> Iterator[torch.Tensor]:
    """(3, p, p) uint8 views of the crops (mirrored copies where flip); images contiguous."""
    _, _, h, w = images.shape
    plane = h * w
    # as_strided's offset counts from the start of the storage, not of this tensor: a view such
    # as images[5:6] (contiguous, storage_offset 5 * 3 * plane) must add its own offset, or every
    # view of one storage yields the crops of its first image.
    base = images.storage_offset()
    for k, (i, t, l) in enumerate(zip(index, top, left)):
        # as_strided: one call instead of four-way slicing, which dominates at this size
        view = images.as_strided((3, p, p), (plane, w, 1), base + i * 3 * plane + t * w + l)
        yield view.flip(-1) if flip is not None and flip[k] else view


def _cut_normalized_cpu(images: torch.Tensor, index, top, left, flip, p: int,
                        jitter: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Normalized float32 patches (m, 3, p, p) from uint8 CPU images, patch by patch.

    Each patch is converted, normalized (or jittered) while its 600 KB are still in cache;
    whole-batch operations would stream the 19 MB batch through memory several times and
    run several times slower on a small CPU.
    """
    m = len(index)
    out = torch.empty((m, 3, p, p))
    views = _patch_views(images, index, top, left, flip, p)
    if jitter is None:
        for k, view in enumerate(views):
            out[k].copy_(view).mul_(_NORM_SCALE).add_(_NORM_SHIFT)
        return out
    matrix, gray_dir = jitter
    scratch = torch.empty((min(m, JITTER_CHUNK), 3, p * p))
    for a in range(0, m, JITTER_CHUNK):
        n = min(JITTER_CHUNK, m - a)
        x = scratch[:n]
        for k in range(n):
            x[k].view(3, p, p).copy_(next(views))
        _apply_jitter(x, matrix[a:a + n], gray_dir[a:a + n], out[a:a + n].view(n, 3, p * p))
    return out


def _cut_uint8(images: torch.Tensor, index, top, left, flip, p: int, pin: bool = False) -> torch.Tensor:
    """uint8 crops (m, 3, p, p) on the images' device (pinned for a later copy to a GPU)."""
    out = torch.empty((len(index), 3, p, p), dtype=torch.uint8, device=images.device, pin_memory=pin)
    for k, view in enumerate(_patch_views(images, index, top, left, flip, p)):
        out[k].copy_(view)
    return out


def _normalize_batch(crops_u8: torch.Tensor,
                     jitter: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Whole-batch normalization (+ jitter) of uint8 crops: the GPU path, where a few large
    kernels beat many small ones. Same arithmetic as _cut_normalized_cpu."""
    m, _, p, _ = crops_u8.shape
    x = crops_u8.float()
    if jitter is None:
        _, scale, shift = _constants(x.device)
        return x.mul_(scale).add_(shift)
    matrix, gray_dir = jitter
    out = torch.empty_like(x)
    _apply_jitter(x.view(m, 3, p * p), matrix, gray_dir, out.view(m, 3, p * p))
    return out


def _patches(images: torch.Tensor, index, top, left, flip, p: int,
             jitter: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device,
             pin: bool = False) -> torch.Tensor:
    """Normalized (optionally jittered, with _jitter_maps on `device`) float32 patches on `device`.

    CPU: patch by patch (cache-friendly). GPU: uint8 crops, then whole-batch kernels.
    """
    if images.device.type == 'cpu' and device.type == 'cpu':
        return _cut_normalized_cpu(images, index, top, left, flip, p, jitter)
    crops = _cut_uint8(images, index, top, left, flip, p, pin).to(device, non_blocking=True)
    return _normalize_batch(crops, jitter)


def canonical_device(device: str | torch.device) -> torch.device:
    """The device with its index filled in: 'cuda' -> cuda:<current device> (cuda:0 without CUDA).

    torch.device('cuda') != torch.device('cuda:0') although tensors made on the first are on
    the second, so a device compared with a tensor's .device must be canonical first; without
    that, images already on the GPU looked like host images at every evaluation.
    """
    device = torch.device(device)
    if device.type == 'cuda' and device.index is None:
        return torch.device('cuda', torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


GIB = 2 ** 30
PLAN_RESERVE_FRACTION = 0.10   # of the card kept free: allocator fragmentation, eval batches, cuDNN workspaces
PLAN_RESERVE_MIN = 1 * GIB
PLAN_NCCL_RESERVE = 1 * GIB    # NCCL's own buffers (outside PyTorch's allocator) with several processes


def plan_image_memory(free_bytes: int, total_bytes: int, step_bytes: int,
                      image_sets: Sequence[tuple[str, int]], world_size: int = 1, images_on: str = 'auto',
                      device: str = 'cuda:0') -> dict:
    """Decide, once and for all image sets together, which live on the GPU.

    A pure function of the card's free and total memory (bytes, measured after the model is
    built), `step_bytes` (what one training step still needs on top of that: the measured peak
    of a forward + backward minus what was allocated before, plus AdamW's two state tensors),
    the image sets as (name, bytes) in priority order (training images first: they are read
    every step; then val/test; a cross-test set last) and the number of processes. Each
    process holds its own copy of every set, on its own GPU or in host memory.

    images_on: 'auto' places sets in priority order while they fit the budget (free memory
    minus the step, minus a reserve of 10% of the card, at least 1 GiB, plus 1 GiB for NCCL
    with several processes), skipping a set that does not fit for a smaller one after it;
    'gpu' places every set and says when that exceeds the budget; 'cpu' keeps all on the host,
    where batches are cut and staged through small pinned buffers.

    Returns {'where': {name: 'gpu' | 'host'}, 'fits': bool, 'budget_bytes': int, 'lines': [str]}.
    'fits' is False when the step alone does not fit, or when 'gpu' asked for more than the budget.
    """
    if images_on not in ('auto', 'gpu', 'cpu'):
        raise ValueError(f"images_on must be 'auto', 'gpu' or 'cpu', got {images_on!r}")
    reserve = max(PLAN_RESERVE_MIN, int(PLAN_RESERVE_FRACTION * total_bytes))
    if world_size > 1:
        reserve += PLAN_NCCL_RESERVE
    budget = int(free_bytes - step_bytes - reserve)
    where, used = {}, 0
    for name, size in image_sets:
        if images_on == 'gpu' or (images_on == 'auto' and used + size <= budget):
            where[name] = 'gpu'
            used += size
        else:
            where[name] = 'host'
    fits = budget >= 0 and used <= budget
    gib = lambda b: f'{b / GIB:.1f} GiB'
    lines = [f'GPU memory plan for {device} ({gib(total_bytes)} card, {gib(free_bytes)} free after the model; '
             f'a training step needs {gib(step_bytes)}; {gib(reserve)} kept free): {gib(max(budget, 0))} for images, '
             f'--images_on {images_on}']
    for name, size in image_sets:
        why = ''
        if where[name] == 'host':
            why = ' (--images_on cpu)' if images_on == 'cpu' else ' (does not fit; batches staged through pinned buffers)'
        lines.append(f'  {name:<8} {gib(size):>9}  {"GPU" if where[name] == "gpu" else "host memory"}{why}')
    host = sum(size for name, size in image_sets if where[name] == 'host')
    lines.append(f'  on the GPU {gib(used)} per process; in host memory {gib(host)} per process'
                 + (f' x {world_size} processes = {gib(host * world_size)}' if world_size > 1 else ''))
    if budget < 0:
        lines.append(f'  WARNING: the training step alone needs {gib(step_bytes + reserve)} with the reserve, more than '
                     f'the {gib(free_bytes)} free: lower --batch_size (and raise --grad_accum_steps)')
    elif used > budget:
        lines.append(f'  WARNING: --images_on gpu places {gib(used)}, more than the {gib(budget)} budget: '
                     'expect out-of-memory errors; --images_on auto keeps what does not fit on the host')
    return {'where': where, 'fits': fits, 'budget_bytes': budget, 'lines': lines}


def place_images(images_u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Keep the uint8 images where patches are cut: on a GPU when they fit comfortably.

    Images already on a GPU stay where they are, and host images that do not fit stay
    unpinned: batches are staged in small pinned buffers (_cut_uint8), whereas pinning a whole
    set would lock up to twice its size in page-locked memory (the allocator rounds up).
    """
    device = canonical_device(device)
    if device.type != 'cuda' or images_u8.device.type == 'cuda':
        return images_u8
    free, _ = torch.cuda.mem_get_info(device)
    if images_u8.numel() < 0.4 * free:
        return images_u8.to(device)
    print(f'note: {images_u8.numel() / 2**30:.1f} GiB of images do not fit comfortably in the free '
          f'{free / 2**30:.1f} GiB of {device}; cutting patches on the CPU', flush=True)
    return images_u8


class TrainPatchSampler:
    """Training batches of random patches cut from the decoded images, like the user's
    RandomHorizontalFlip + RandomCrop + ColorJitter + Normalize pipeline but batched.

    Each epoch every image gives `patch_num` patches and all (image, patch) pairs are
    shuffled together, as in the original HyperIQA loader. Crop position, flip and jitter
    are drawn per patch from a generator seeded by (seed, epoch, rank), so an epoch is
    reproducible. With world_size > 1 the images are dealt out afresh each epoch (from
    (seed, epoch), the same on all ranks) so ranks hold disjoint shares; a rank with one
    image fewer repeats some of its own pairs so every rank yields the same number of batches.
    """

    def __init__(self, images_u8: torch.Tensor, mos, *, patch_size: int = 224, patch_num: int = 25,
                 batch_size: int = 32, color_jitter: bool = True, seed: int = 0,
                 device: str | torch.device = 'cpu', rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, place: bool = True):
        _check_images(images_u8, patch_size, 'TrainPatchSampler')
        n = images_u8.shape[0]
        mos = np.asarray(mos, dtype=np.float64).ravel()
        if len(mos) != n:
            raise DataError(f'TrainPatchSampler: {n} images but {len(mos)} scores')
        if patch_num < 1 or batch_size < 1:
            raise DataError(f'TrainPatchSampler: patch_num and batch_size must be >= 1, '
                            f'got {patch_num} and {batch_size}')
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f'TrainPatchSampler: rank {rank} is not in 0..{world_size - 1}')
        if n < world_size:
            raise DataError(f'TrainPatchSampler: {n} images cannot be shared by {world_size} processes')
        self.device = canonical_device(device)
        # place=False: the caller's memory plan decided where the images live; cut patches there
        self.images = place_images(images_u8.contiguous(), self.device) if place else images_u8.contiguous()
        self._pin = self.images.device.type == 'cpu' and self.device.type == 'cuda'
        self.mos = torch.from_numpy(mos).float().to(self.device)
        self.patch_size, self.patch_num, self.batch_size = patch_size, patch_num, batch_size
        self.color_jitter, self.seed, self.drop_last = color_jitter, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.pairs_per_rank = math.ceil(n / world_size) * patch_num
        if drop_last and self.pairs_per_rank < batch_size:
            raise DataError(f'TrainPatchSampler: {self.pairs_per_rank} patches per epoch are fewer than '
                            f'batch_size {batch_size} with drop_last')

    def __len__(self) -> int:
        if self.drop_last:
            return self.pairs_per_rank // self.batch_size
        return math.ceil(self.pairs_per_rank / self.batch_size)

    def epoch_pairs(self, epoch: int) -> torch.Tensor:
        """Image index of each patch of this rank's epoch, in the order they are served."""
        n = self.images.shape[0]
        shared = _generator(self.seed, epoch)                    # same on every rank
        mine = torch.randperm(n, generator=shared)[self.rank::self.world_size]
        pairs = mine.repeat_interleave(self.patch_num)
        own = _generator(self.seed, epoch, self.rank, 1)
        short = self.pairs_per_rank - len(pairs)
        if short > 0:
            pairs = torch.cat([pairs, pairs[torch.randperm(len(pairs), generator=own)[:short]]])
        return pairs[torch.randperm(len(pairs), generator=own)]

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (patches float32 (B, 3, p, p) normalized, mos float32 (B,), image index int64 (B,)),
        all on the sampler's device."""
        pairs = self.epoch_pairs(epoch)
        n_pairs, p = len(pairs), self.patch_size
        h, w = self.images.shape[2:]
        # The whole epoch's crop positions, flips and jitter factors, drawn at once.
        gen = _generator(self.seed, epoch, self.rank, 2)
        top = torch.randint(0, h - p + 1, (n_pairs,), generator=gen).tolist()
        left = torch.randint(0, w - p + 1, (n_pairs,), generator=gen).tolist()
        flip = (torch.rand(n_pairs, generator=gen) < 0.5).tolist()
        # per-patch jitter maps for the epoch at once: many tiny matrix ops, cheap in bulk
        jitter = _jitter_maps(_jitter_factors(gen, n_pairs), self.device) if self.color_jitter else None
        index = pairs.tolist()
        index_dev = pairs.to(self.device)
        for b in range(len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            patches = _patches(self.images, index[sl], top[sl], left[sl], flip[sl], p,
                               None if jitter is None else (jitter[0][sl], jitter[1][sl]),
                               self.device, self._pin)
            yield patches, self.mos[index_dev[sl]], index_dev[sl]


EVAL_CROPS = ('fixed', 'center', 'random')


def eval_crops_per_image(crop: str, patch_num: int) -> int:
    """Crops actually cut per image: `patch_num`, except 1 for 'center'.

    The user's CenterCrop protocol scores `--test_patch_num` identical centre crops; their mean is
    the score of one, so one is scored (the same number, patch_num times less work).
    """
    return 1 if crop == 'center' else patch_num


def eval_patch_batches(images_u8: torch.Tensor, *, patch_size: int = 224, patch_num: int = 25,
                       batch_size: int = 64, random_crop: bool = False, seed: int = 0,
                       device: str | torch.device = 'cpu',
                       image_ids: Sequence[int] | np.ndarray | None = None,
                       crop: str | None = None, place: bool = True
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (patches float32 (B, 3, p, p) normalized, image index int64 (B,)) on `device`:
    `patch_num` crops of every image, image after image; average the predictions per index.

    crop (None = 'random' if random_crop else 'fixed'):
      'fixed': pseudo-random positions that depend only on the image's index (and the sizes),
          so every evaluation of a model sees the same, spread-out patches;
      'random' (the user's --test_random_crop, their paper protocol): positions drawn from
          `seed` (pass seed + epoch for fresh crops each epoch);
      'center' (the user's default, torchvision CenterCrop): the centre crop, top =
          round((H - p) / 2), left = round((W - p) / 2); cut once per image (see
          eval_crops_per_image).
    No flip and no colour jitter. `image_ids` (e.g. one process's share under DDP) limits
    the images evaluated; their indices and crops are those of a run over all images.
    place=True moves host images to a GPU device when they fit (place_images); place=False
    cuts patches where the images are (a memory plan already decided).
    """
    crop = crop or ('random' if random_crop else 'fixed')
    if crop not in EVAL_CROPS:
        raise DataError(f'eval_patch_batches: crop must be one of {", ".join(EVAL_CROPS)}, got {crop!r}')
    _check_images(images_u8, patch_size, 'eval_patch_batches')
    if patch_num < 1 or batch_size < 1:
        raise DataError(f'eval_patch_batches: patch_num and batch_size must be >= 1, '
                        f'got {patch_num} and {batch_size}')
    device = canonical_device(device)
    n, _, h, w = images_u8.shape
    p = patch_size
    patch_num = eval_crops_per_image(crop, patch_num)
    if crop == 'center':
        # torchvision's center_crop: int(round((size - crop) / 2.0)), Python's round included
        top = np.full(n * patch_num, int(round((h - p) / 2.0)), dtype=np.int64)
        left = np.full(n * patch_num, int(round((w - p) / 2.0)), dtype=np.int64)
    else:
        # Row i of a sequential stream is the same whatever n is, so positions are per image.
        rng = np.random.default_rng(seed if crop == 'random' else 20_240_601)
        u = rng.random((n, patch_num, 2))
        top = np.floor(u[..., 0] * (h - p + 1)).astype(np.int64).ravel()
        left = np.floor(u[..., 1] * (w - p + 1)).astype(np.int64).ravel()
    ids = np.arange(n, dtype=np.int64) if image_ids is None else np.asarray(image_ids, dtype=np.int64).ravel()
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise DataError(f'eval_patch_batches: image_ids must be in 0..{n - 1}, got {ids.min()}..{ids.max()}')
    top = top.reshape(n, patch_num)[ids].ravel()
    left = left.reshape(n, patch_num)[ids].ravel()
    index = np.repeat(ids, patch_num)
    images = place_images(images_u8.contiguous(), device) if place else images_u8.contiguous()
    pin = images.device.type == 'cpu' and device.type == 'cuda'
    index_dev = torch.from_numpy(index).to(device)   # one copy, not one per batch
    for start in range(0, len(index), batch_size):
        sl = slice(start, start + batch_size)
        patches = _patches(images, index[sl].tolist(), top[sl].tolist(), left[sl].tolist(), None, p, None,
                           device, pin)
        yield patches, index_dev[sl]


# ----------------------------------------------------------------------------------------
# The built-in demo data set
# ----------------------------------------------------------------------------------------

DEMO_VERSION = 3
DEMO_SIZE = (384, 512)      # (H, W) stored: KonIQ's 4:3 landscape at half of 1024x768
DEMO_JPEG_QUALITY = 92      # storage quality; the 'jpeg' distortion goes far below it
# Reference images: scikit-image's bundled sample photos (files in skimage/data, no download)
# and procedural images; the split is fixed and by reference, so no content is on both sides.
DEMO_REFERENCES = (
    ('astronaut', 'astronaut.png', 'training'), ('grass', 'grass.png', 'training'),
    ('motorcycle', 'motorcycle_left.png', 'training'), ('hubble', 'hubble_deep_field.jpg', 'training'),
    ('retina', 'retina.jpg', 'training'), ('ihc', 'ihc.png', 'training'),
    ('brick', 'brick.png', 'training'), ('coins', 'coins.png', 'training'),
    ('shapes1', 'procedural', 'training'), ('clouds1', 'procedural', 'training'),
    ('rocket', 'rocket.jpg', 'validation'), ('coffee', 'coffee.png', 'validation'),
    ('shapes2', 'procedural', 'validation'),
    ('chelsea', 'chelsea.png', 'test'), ('camera', 'camera.png', 'test'),
    ('clouds2', 'procedural', 'test'),
)
# Three distortion kinds at five levels; level k of every kind gets the same score, a single
# perceptual scale from 'barely visible' to 'very strong'. They are the kinds a randomly
# initialised model learns within CPU minutes from ten training references. Version 2 also
# had blur and JPEG: judging how blurred or blocky an unseen picture is depends on its content,
# and neither nano nor a plain 4-layer CNN learned it from ten references (within-kind test
# SRCC about 0.3 for blur and 0.0 for JPEG after 600-1000 steps), which held the whole demo
# near SRCC 0.3. Over-exposure was tried as a fourth kind and learned worst (about 0.65).
DEMO_DISTORTIONS = {
    'noise': (8.0, 15.0, 25.0, 38.0, 56.0),          # white noise standard deviation (0-255)
    'haze': (0.2, 0.35, 0.5, 0.65, 0.8),             # weight of a blend towards light gray (200)
    'underexposure': (0.7, 0.5, 0.35, 0.25, 0.15),   # factor on all pixel values
}
DEMO_LUMA_MEAN_STD = (120.0, 55.0)   # every reference is brought to this mean / std of gray level
DEMO_LEVEL_SCORES = (90.0, 76.0, 63.0, 50.0, 36.0, 22.0)   # MOS_zscore of levels 0 (pristine) to 5
DEMO_SCORE_NOISE = 2.0     # rater disagreement added to each score (seeded)
DEMO_INFO = 'demo_info.json'


def ensure_demo_dataset(root: str | os.PathLike | None = None) -> Path:
    """Generate the built-in demo data set once (no download) and return its folder.

    KonIQ layout, read by the KonIQ reader: koniq10k_scores_and_distributions.csv,
    koniq10k_distributions_sets.csv (training / validation / test with disjoint reference
    images) and 512x384 JPEGs in 1024x768/ (the folder name the reader expects; the images
    are stored at half size to stay small). 16 references (scikit-image's bundled photos plus
    procedural images) x (pristine + 3 distortions x 5 levels) = 256 images, ~13 MB, about
    2 seconds to generate. Written to a temporary folder and renamed into place, so a crash or
    a concurrent run never leaves a half-written data set.
    """
    root = Path(root).expanduser().absolute() if root is not None else DEFAULT_ROOTS['demo']
    info_file = root / DEMO_INFO
    if _demo_is_current(info_file):
        return root
    if root.exists():
        if info_file.is_file() or (root.is_dir() and not any(root.iterdir())):
            shutil.rmtree(root)   # an older demo version (or an empty folder): regenerate
        else:
            raise DataError(f'{root} exists but is not a demo data set (no {DEMO_INFO}); '
                            f'remove it or give another folder for the demo data set')
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f'.{root.name}.tmp-{os.getpid()}-{threading.get_ident()}'
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    try:
        _write_demo(tmp)
        try:
            os.rename(tmp, root)
        except OSError:
            if not _demo_is_current(info_file):   # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f'demo data set generated in {root} in {time.perf_counter() - started:.1f} s', flush=True)
    return root


def _demo_is_current(info_file: Path) -> bool:
    try:
        return json.loads(info_file.read_text()).get('version') == DEMO_VERSION
    except (OSError, ValueError):
        return False


def _write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def _skimage_data_dir() -> Path | None:
    """skimage/data inside the installed wheel, found without importing skimage."""
    spec = importlib.util.find_spec('skimage')
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / 'data'
    return folder if folder.is_dir() else None


def _fit_demo_size(im: Image.Image) -> Image.Image:
    """Centre-crop to 4:3, resize to DEMO_SIZE and normalize the exposure.

    The references differ widely in brightness and contrast (the Hubble deep field is nearly
    black); bringing them all to one mean and spread of gray level leaves the exposure
    distortions as the only source of global photometric change, so their scores are
    learnable from any patch.
    """
    h, w = DEMO_SIZE
    im = _to_rgb(im)
    scale = min(im.width / w, im.height / h)
    cw, ch = round(w * scale), round(h * scale)
    x0, y0 = (im.width - cw) // 2, (im.height - ch) // 2
    im = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.LANCZOS)
    arr = np.asarray(im, dtype=np.float64)
    luma = arr @ _GRAY_WEIGHTS
    mean, std = DEMO_LUMA_MEAN_STD
    arr = (arr - luma.mean()) * (std / max(luma.std(), 1.0)) + mean
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), 'RGB')


def _procedural_reference(kind: str, seed: int) -> Image.Image:
    """A synthetic scene with sharp edges, smooth areas and texture, so every distortion shows."""
    rng = np.random.default_rng(seed)
    h, w = DEMO_SIZE
    if kind.startswith('clouds'):
        # 1/f noise (natural-image spectrum) mapped through a random colour matrix.
        fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing='ij')
        falloff = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(h, w)) ** 1.6
        fields = [np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((h, w))) * falloff)) for _ in range(2)]
        fields = [(f - f.mean()) / f.std() for f in fields]
        colours = rng.uniform(-60, 60, size=(2, 3))
        base = rng.uniform(90, 170, size=3)
        arr = base + fields[0][..., None] * colours[0] + fields[1][..., None] * colours[1]
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), 'RGB')
        n_shapes = 12
    else:
        # Smooth two-colour gradient background.
        c0, c1 = rng.uniform(30, 225, size=(2, 3))
        t = np.linspace(0, 1, w)[None, :, None] * 0.6 + np.linspace(0, 1, h)[:, None, None] * 0.4
        arr = c0 * (1 - t) + c1 * t
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), 'RGB')
        n_shapes = 45
    draw = ImageDraw.Draw(im)
    for _ in range(n_shapes):
        x0, y0 = rng.uniform(-40, w), rng.uniform(-40, h)
        sx, sy = rng.uniform(15, 140, size=2)
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        outline = tuple(int(v) for v in rng.integers(0, 256, size=3))
        shape = rng.integers(0, 4)
        if shape == 0:
            draw.ellipse([x0, y0, x0 + sx, y0 + sy], fill=fill, outline=outline, width=2)
        elif shape == 1:
            draw.rectangle([x0, y0, x0 + sx, y0 + sy], fill=fill, outline=outline, width=2)
        elif shape == 2:
            pts = [(x0 + rng.uniform(0, sx), y0 + rng.uniform(0, sy)) for _ in range(3)]
            draw.polygon(pts, fill=fill, outline=outline)
        else:
            for k in range(int(rng.integers(4, 12))):  # stripes: fine detail for blur to remove
                xs = x0 + k * 5
                draw.line([xs, y0, xs + sx / 3, y0 + sy], fill=fill, width=2)
    return im


def _distort(im: Image.Image, kind: str, value, rng: np.random.Generator) -> Image.Image:
    if kind == 'blur':
        return im.filter(ImageFilter.GaussianBlur(radius=value))
    if kind == 'jpeg':
        buf = io.BytesIO()
        im.save(buf, format='JPEG', quality=int(value))
        buf.seek(0)
        with Image.open(buf) as out:
            return out.convert('RGB')
    arr = np.asarray(im, dtype=np.float64)
    if kind == 'noise':
        arr = arr + rng.normal(0.0, value, size=arr.shape)
    elif kind == 'haze':
        arr = arr * (1.0 - value) + 200.0 * value
    elif kind == 'underexposure':
        arr = arr * value
    else:
        raise ValueError(f'unknown demo distortion {kind!r}')
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), 'RGB')


def _vote_counts(mos_1_5: float, rng: np.random.Generator, total: int = 100) -> list[int]:
    """KonIQ-style rating counts c1..c5 around a 1-5 MOS (discretized normal, sd 0.6)."""
    grid = np.arange(1, 6)
    weights = np.exp(-0.5 * ((grid - mos_1_5) / 0.6) ** 2) + 1e-3
    counts = rng.multinomial(total, weights / weights.sum())
    return [int(c) for c in counts]


def _csv_bytes(header: list[str], rows: list[list]) -> bytes:
    """KonIQ's CSV style: strings quoted, numbers bare."""
    out = io.StringIO()
    writer = csv.writer(out, quoting=csv.QUOTE_NONNUMERIC, lineterminator='\n')
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


def _write_demo(folder: Path) -> None:
    image_dir = folder / '1024x768'
    image_dir.mkdir(parents=True)
    photos = _skimage_data_dir()
    rng = np.random.default_rng(2024)
    rows = []          # (image_name, counts, MOS, SD, MOS_zscore, set)
    references = []
    for ref_no, (ref, source, split) in enumerate(DEMO_REFERENCES):
        if source != 'procedural' and photos is not None and (photos / source).is_file():
            with Image.open(photos / source) as im:
                pristine = _fit_demo_size(im)
            origin = f'skimage/data/{source}'
        else:
            # No scikit-image (or a file missing from it): a procedural image takes its place.
            pristine = _procedural_reference(ref if source == 'procedural' else 'shapes', 1000 + ref_no)
            origin = 'procedural'
        references.append({'reference': ref, 'origin': origin, 'set': split})
        variants = [(f'{ref}_pristine.jpg', pristine, 0)]
        for kind, values in DEMO_DISTORTIONS.items():
            for level, value in enumerate(values, start=1):
                variants.append((f'{ref}_{kind}{level}.jpg', _distort(pristine, kind, value, rng), level))
        for name, im, level in variants:
            buf = io.BytesIO()
            im.save(buf, format='JPEG', quality=DEMO_JPEG_QUALITY)
            _write_bytes(image_dir / name, buf.getvalue())
            zscore = float(np.clip(DEMO_LEVEL_SCORES[level] + rng.normal(0.0, DEMO_SCORE_NOISE), 0, 100))
            counts = _vote_counts(1.0 + 4.0 * zscore / 100.0, rng)
            votes = np.repeat(np.arange(1, 6), counts)
            rows.append((name, counts, float(votes.mean()), float(votes.std()), zscore, split))

    votes_columns = ['image_name', 'c1', 'c2', 'c3', 'c4', 'c5', 'c_total', 'MOS', 'SD']
    scores = [[name, *counts, sum(counts), round(mos, 4), round(sd, 4), round(z, 4)]
              for name, counts, mos, sd, z, _ in rows]
    # As in the real sets file, MOS there is on the 0-100 scale (SD too).
    sets = [[name, *counts, sum(counts), round(z, 4), round(25 * sd, 4), split]
            for name, counts, mos, sd, z, split in rows]
    _write_bytes(folder / KONIQ_SCORES, _csv_bytes(votes_columns + ['MOS_zscore'], scores))
    _write_bytes(folder / KONIQ_SETS, _csv_bytes(votes_columns + ['set'], sets))
    info = {
        'version': DEMO_VERSION, 'generator': 'data_loader.ensure_demo_dataset',
        'layout': 'KonIQ-10k', 'image_size_hw': DEMO_SIZE, 'jpeg_quality': DEMO_JPEG_QUALITY,
        'reference_gray_mean_std': DEMO_LUMA_MEAN_STD,
        'score': 'MOS_zscore 0-100, higher is better; level k of every distortion scores '
                 f'{list(DEMO_LEVEL_SCORES)}[k] + N(0, {DEMO_SCORE_NOISE})',
        'distortions': {k: list(v) for k, v in DEMO_DISTORTIONS.items()},
        'references': references, 'images': len(rows),
    }
    _write_bytes(folder / DEMO_INFO, json.dumps(info, indent=2).encode())  # written last: marks completion
