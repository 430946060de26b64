"""The data-set registry: one record per data set, and reading a data set by its name.

A data set is declared once, in its own module under iqa/data/datasets/, by a DatasetRecord
(canonical name, aliases, default root, expected layout, annotation files, reader) passed to
register(). The tables the rest of the toolkit reads (DATASET_NAMES, DATASET_ALIASES,
DEFAULT_ROOTS, EXPECTED_LAYOUT, ANNOTATION_FILES) are derived from the records by register(),
so help texts and "not found" messages always say what the reader looks for.

Every problem with the input raises DataError with the file, line/row/entry or column and
what was expected.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

# The repository's folder: default data set roots and the demo data set live next to the scripts.
SCRIPT_DIR = Path(__file__).resolve().parents[2]

# Name of the record that reads a .csv/.json annotation file given as a path.
GENERIC = 'generic'
ROOT_HINT = ('put the data there or pass its folder '
             '(train_swin.py --data_root PATH, cross_dataset_test.py --datasets NAME=PATH)')
# split_source of a data set read whole (load_dataset(split=False)): no split drawn, none applied.
WHOLE_SOURCE = 'not split (every image)'
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
        split = f'split {self.split_source}: {parts}' if self.splits else self.split_source
        return (f'{self.name}: {len(self)} images in {self.root}; {self.score_name} {lo:g}-{hi:g} '
                f'({direction}); {split}')


@dataclass
class ReadContext:
    """What a reader needs besides the files: the data set's name and root and the split settings."""
    name: str
    root: Path
    seed: int
    score: str | None
    train_ratio: float
    val_ratio: float = DEFAULT_VAL_RATIO
    image_column: str = 'image'     # a generic CSV's columns
    score_column: str = 'score'
    whole: bool = False             # read every image, draw no split (load_dataset(split=False))


@dataclass(frozen=True)
class DatasetRecord:
    """Everything the toolkit knows about one data set, declared in one place (its module)."""
    name: str                                    # canonical, lower case: what logs and results say
    reader: Callable[[ReadContext], IQADataset]  # the data set's folder -> IQADataset
    layout: str                                  # what the reader looks for, quoted in messages
    default_root: Path | None = None             # None: no default folder (the generic file)
    aliases: tuple[str, ...] = ()                # other names accepted on the command line
    annotation_files: tuple[str, ...] = ()       # given as the root, their folder is the root
    prepare: Callable[[Path], Path] | None = None  # makes the data at the root before reading


# The records and the tables derived from them. The tables are the lookup index: they are
# updated in place by register()/unregister(), so names imported elsewhere stay current.
RECORDS: dict[str, DatasetRecord] = {}
DATASET_NAMES: list[str] = []          # records with a default root, in registration order
DATASET_ALIASES: dict[str, str] = {}
DEFAULT_ROOTS: dict[str, Path] = {}
EXPECTED_LAYOUT: dict[str, str] = {}
ANNOTATION_FILES: dict[str, tuple[str, ...]] = {}


def register(record: DatasetRecord) -> DatasetRecord:
    """Add a data set. A name or alias already taken is an error: one name, one reader."""
    names = [record.name, *record.aliases]
    for key in names:
        if key != key.lower():
            raise ValueError(f'data set names are lower case: {key!r}')
        if key in RECORDS or key in DATASET_ALIASES:
            raise ValueError(f'data set name {key!r} is already registered')
    RECORDS[record.name] = record
    if record.default_root is not None:
        DATASET_NAMES.append(record.name)
        DEFAULT_ROOTS[record.name] = Path(record.default_root)
    DATASET_ALIASES.update({alias: record.name for alias in record.aliases})
    EXPECTED_LAYOUT[record.name] = record.layout
    if record.annotation_files:
        ANNOTATION_FILES[record.name] = tuple(record.annotation_files)
    return record


def unregister(name: str) -> None:
    """Remove a data set and its table entries (tests register temporary ones)."""
    record = RECORDS.pop(name)
    if name in DATASET_NAMES:
        DATASET_NAMES.remove(name)
    for table in (DEFAULT_ROOTS, EXPECTED_LAYOUT, ANNOTATION_FILES):
        table.pop(name, None)
    for alias in record.aliases:
        DATASET_ALIASES.pop(alias, None)


# ----------------------------------------------------------------------------------------
# Names, roots and reading
# ----------------------------------------------------------------------------------------

def resolve_dataset(name_or_path: str, root: str | os.PathLike | None = None) -> tuple[str, Path]:
    """Canonical data set name and absolute root folder (or annotation file).

    A known name or alias (koniq, kadid, agiqa, ...) gets DEFAULT_ROOTS[name] unless `root`
    is given; a path ending in .csv or .json is a generic annotation file (name GENERIC).
    """
    text = str(name_or_path).strip()
    key = text.lower()
    name = DATASET_ALIASES.get(key, key)
    if name in RECORDS:
        if root is None:
            if name not in DEFAULT_ROOTS:
                raise DataError(f"dataset {name!r} needs a path to its .csv or .json annotation file")
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
                 csv_image_column: str = 'image', csv_score_column: str = 'score',
                 split: bool = True) -> IQADataset:
    """Read a data set's annotation files into an IQADataset (images are not opened here).

    `seed` and `train_ratio` choose the random split of data sets that have no official one
    (by reference image or prompt where several images share content, so no content is on
    both sides). Where a data set has no official validation split, `val_ratio` of its
    training side (same grouping, same seed) becomes the 'val' split (0: none); the test side
    does not depend on val_ratio. `score` picks another score column where a data set has
    several (KonIQ 'MOS' for the 1-5 scale, AGIQA-3K 'mos_align', ...). The image folder is
    found from the first listed image (formats.find_image_folder); the image files themselves
    are checked later, all together, by load_images.

    split=False reads every image the annotation lists and applies no split: none is drawn
    or announced, `splits` is empty, and a side that would be empty is no error. A set the
    model never saw is scored whole this way, whatever its reader's split would be (a few
    KADID references from one side of the official split, one AGIQA prompt).

    A file as the root (NAME=path/to/list.json, or a generic .csv/.json) is read by the
    generic record's reader whatever the data set; a data set's own annotation file as the
    root means its folder.
    """
    name, root = resolve_dataset(name, root)
    check_ratios(train_ratio, val_ratio)
    record = RECORDS[name]
    if record.prepare is not None:
        root = record.prepare(root)
    if not root.exists():
        raise DataError(f'{name}: dataset root {root} does not exist; expected '
                        f'{EXPECTED_LAYOUT[name]} there; {ROOT_HINT}')
    if root.is_file() and root.name in ANNOTATION_FILES.get(name, ()):
        root = root.parent
    # read whole: no validation share either, so no reader carves (and announces) one
    ctx = ReadContext(name=name, root=root, seed=seed, score=score, train_ratio=train_ratio,
                      val_ratio=val_ratio if split else 0.0, image_column=csv_image_column,
                      score_column=csv_score_column, whole=not split)
    reader = RECORDS[GENERIC].reader if root.is_file() else record.reader
    dataset = reader(ctx)
    if not split:
        dataset.splits, dataset.split_source = {}, WHOLE_SOURCE
    check_dataset(dataset, split)
    return dataset


def check_ratios(train_ratio: float, val_ratio: float) -> None:
    """Both sides of every split must be able to hold images: 0 < train_ratio < 1, 0 <= val_ratio < 1."""
    if not 0.0 < train_ratio < 1.0:
        raise DataError(f'train_ratio must be between 0 and 1 (exclusive), got {train_ratio}')
    if not 0.0 <= val_ratio < 1.0:
        raise DataError(f'val_ratio must be at least 0 and below 1, got {val_ratio} '
                        f'(train_swin.py --val_ratio; 0 = no validation split)')


def check_dataset(ds: IQADataset, split: bool = True) -> None:
    """Invariants every reader must give: aligned arrays, disjoint in-range splits, no duplicates;
    with `split`, a non-empty test side."""
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
    if split and 'test' not in ds.splits:
        raise DataError(f'{ds.name}: no test images in split {ds.split_source}')


def make_dataset(ctx: ReadContext, paths, mos, splits, source, score_name, score_range,
                 higher_is_better=True) -> IQADataset:
    """A reader's result under ctx's name and root, with scores as float64 (checked by load_dataset)."""
    return IQADataset(name=ctx.name, root=ctx.root, paths=[str(p) for p in paths],
                      mos=np.asarray(mos, dtype=np.float64), splits=splits, split_source=source,
                      score_name=score_name, score_range=tuple(float(v) for v in score_range),
                      higher_is_better=higher_is_better)


def missing_annotation(ctx: ReadContext) -> DataError:
    """The error of a root without the data set's annotation files, quoting its record's layout."""
    return DataError(f'{ctx.name}: no annotation file in {ctx.root}: expected '
                     f'{EXPECTED_LAYOUT[ctx.name]}')
