"""What cross_dataset_test.py scores of each data set: one rule for both systems.

    checkpoint        -> TrainingRun   swin_run(ckpt, ...) (train_swin.py), clip_run(ckpt, ...) (train_clip.py)
    data set, --split -> Selection     select_images(label, name, root, run, flag, ...)
    every named set   -> results       score_each(specs, score_one), then exit_status()

The rule:
* the data set the run was trained on -> the run's own test split (--split val: its val split),
  redrawn from the checkpoint the way its trainer drew it: the same reader (Swin) or prompt
  CSV (CLIP), seed + round - 1, the same ratios, split file and score columns. A training
  image is never scored as if it were unseen.
* any other data set -> every image its annotation lists, read with load_dataset(split=False):
  its reader's split is not applied at all, so a user's subset (a few KADID references from one
  side of the official split, one AGIQA prompt, 20 SPAQ images) is scored whole.
* a run whose split cannot be redrawn (a bare state_dict given --trained_on, an imported file):
  nothing of its training set, unless --split all.
* the training set unknown (a bare state_dict without --trained_on): every set's own (reader's)
  test split, the images a run of that reader and seed cannot have trained on.
* --split test / val: the reader's test / val split of the other sets, as papers report them;
  --split all: every image of every set (a warning for the training set).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from iqa.clip import data as clip_data
from iqa.data.registry import (ANNOTATION_FILES, GENERIC, WHOLE_SOURCE, DataError, load_dataset,
                               resolve_dataset)


@dataclass
class Selection:
    """The images of one data set to score, with their scores and why they were chosen."""
    name: str                       # the data set's name, as results say it
    root: Path
    paths: list[str]                # the images chosen
    mos: np.ndarray                 # their scores as annotated
    score_name: str
    higher_is_better: bool
    split: str                      # 'test', 'val' or 'all'
    reason: str                     # why this split, in words (printed with the count)
    source: str                     # how that split was drawn (reader or split file, seed), or WHOLE_SOURCE
    training_set: bool
    images_in_dataset: int
    prompts: list[str] | None = None    # CLIP training set: each image's prompt
    mos_c: np.ndarray | None = None     # CLIP training set: each image's consistency score

    def names(self, index=None) -> list[str]:
        """Image names relative to the data set's folder (of `index` into paths, else all)."""
        folder = self.root if self.root.is_dir() else self.root.parent
        chosen = self.paths if index is None else [self.paths[int(i)] for i in index]
        return [os.path.relpath(p, folder) for p in chosen]

    def record(self, kept) -> dict:
        """The results JSON's description of what was scored; `kept`: the readable images' indices.

        split_reason is the rule that chose the images, split_source how their split was drawn;
        image_names lists every scored image, so that what was scored can be compared with a run's
        own split (or with another checkpoint's results)."""
        out = dict(root=str(self.root), split=self.split, split_reason=self.reason, split_source=self.source,
                   training_set=self.training_set, images_selected=len(self.paths),
                   images_in_dataset=self.images_in_dataset, skipped_images=int(len(self.paths) - len(kept)),
                   score=self.score_name, higher_is_better=bool(self.higher_is_better))
        out['image_names'] = self.names(kept)
        return out

    def announce(self, label):
        print(f'{label}: {len(self.paths)} of {self.images_in_dataset} images ({self.split}: {self.reason}); '
              f'target {self.score_name}; {"split " if self.split != "all" else ""}{self.source}', flush=True)


def is_training_set(name, root, trained_on) -> bool:
    """Whether a data set is the one a Swin run was trained on (its --dataset, or --trained_on).

    Known data sets compare by name wherever their folder is (a copy of KonIQ is KonIQ, so its
    training images stay out); annotation files (generic) by path, since they all share the name.
    """
    if not trained_on:
        return False
    try:
        trained_name, trained_root = resolve_dataset(trained_on)
    except DataError:
        return False
    if name == GENERIC or trained_name == GENERIC:
        return os.path.abspath(root) == os.path.abspath(trained_root)
    return name == trained_name


@dataclass
class TrainingRun:
    """What a checkpoint says about the data it was trained on, and how to redraw its split."""
    system: str                     # 'swin' or 'clip'
    trained_on: str | None          # Swin: --dataset or --trained_on; CLIP: the prompt CSV; None: unknown
    seed: int = 0                   # the split's seed: the run's seed + round - 1
    why_not: str | None = None      # why the run's split cannot be redrawn; None: it can
    options: dict = field(default_factory=dict)  # Swin: load_dataset keywords; CLIP: draw_split's data

    def is_training_set(self, name, root) -> bool:
        if self.system == 'swin' or self.trained_on is None or not self.options.get('csv'):
            return is_training_set(name, root, self.trained_on)
        root = Path(root)
        files = [root] if root.is_file() else [root / f for f in ANNOTATION_FILES.get(name, ('data.csv',))]
        return any(os.path.realpath(f) == os.path.realpath(self.options['csv']) for f in files)

    def redraw(self, name, root, whole=False):
        """(Selection fields of every image, splits, source) of the training set as the run read it
        (a CLIP file without its prompt CSV: as the data set's reader reads it, whole only)."""
        if self.system == 'swin' or not self.options.get('csv'):
            ds = load_dataset(name, root, seed=self.seed, split=not whole, **self.options)
            return _fields(ds.name, ds.root, ds.paths, ds.mos, ds.score_name, ds.higher_is_better), \
                ds.splits, ds.split_source
        o = self.options
        ds = clip_data.read_prompt_csv(o['csv'], o['image_base_dir'], quality_column=o['quality_column'],
                                       align_column=o['align_column'])
        fields = _fields(Path(o['csv']).parent.name, Path(o['csv']), ds.paths, ds.mos_q, o['quality_column'],
                         True, prompts=ds.prompts, mos_c=ds.mos_c)
        if whole:
            return fields, {}, WHOLE_SOURCE
        splits, source = clip_data.draw_split(ds, self.seed, o['val_ratio'], o['test_ratio'], o['split_file'])
        return fields, splits, source


def _fields(name, root, paths, mos, score_name, higher_is_better, prompts=None, mos_c=None):
    return dict(name=name, root=Path(root), paths=list(paths), mos=np.asarray(mos, dtype=np.float64),
                score_name=score_name, higher_is_better=bool(higher_is_better), prompts=prompts,
                mos_c=None if mos_c is None else np.asarray(mos_c, dtype=np.float64))


def swin_run(ckpt, trained_on=None, read=None, val_ratio=0.0) -> TrainingRun:
    """The training run of a train_swin.py checkpoint (or a bare state_dict: nothing known).

    `read`: the load_dataset keywords the run read its data with (score, CSV columns);
    `val_ratio`: its validation share (0 for runs from before validation splits)."""
    config = ckpt.get('config') or {}
    name = trained_on or config.get('dataset')
    why_not = None
    if not config:
        why_not = 'it is a bare state_dict: the seed and split it was trained with are not stored'
    elif 'seed' not in config or 'dataset' not in config:
        why_not = 'its configuration stores no --dataset or --seed'
    elif trained_on and not is_training_set(*resolve_dataset(config['dataset']), trained_on):
        why_not = f'--trained_on {trained_on} is not the --dataset it stores ({config["dataset"]})'
    seed = int(config.get('seed', 0)) + int(ckpt.get('round') or 1) - 1
    return TrainingRun('swin', name, seed, why_not, dict(read or {}, val_ratio=val_ratio))


CLIP_SPLIT_KEYS = ('data_csv_path', 'seed', 'val_ratio', 'test_ratio')


def clip_run(ckpt, trained_on=None) -> TrainingRun:
    """The training run of a train_clip.py checkpoint: its prompt CSV and split settings.

    Paths come from the absolute ones train_clip.py stores (clip_data.SPLIT_PATH_KEYS); a
    checkpoint from before them has the flags as given, read relative to the working folder.
    A checkpoint without the split settings (an imported baseline.py file) cannot redraw its
    split: --trained_on then names its training set, which is scored only with --split all."""
    config = ckpt.get('config') or {}
    missing = [k for k in CLIP_SPLIT_KEYS if k not in config]
    if missing:
        why_not = f'the checkpoint stores no {", ".join(missing)} (not a train_clip.py run)'
        return TrainingRun('clip', trained_on, 0, why_not, {})
    given = SimpleNamespace(**{'image_base_dir': None, 'split_file': None, **config})
    paths = {**clip_data.split_paths(given), **{k: config[k] for k in clip_data.SPLIT_PATH_KEYS if config.get(k)}}
    options = dict(csv=paths['data_csv_file'], image_base_dir=paths['image_base_dir_abs'],
                   split_file=paths['split_file_abs'],
                   quality_column=config.get('quality_column', 'mos_quality'),
                   align_column=config.get('align_column', 'mos_align'),
                   val_ratio=float(config['val_ratio']), test_ratio=float(config['test_ratio']))
    seed = int(config['seed']) + int(ckpt.get('round') or 1) - 1
    return TrainingRun('clip', options['csv'], seed, None, options)


def select_images(label, name, root, run: TrainingRun, flag, *, seed=0, val_ratio=0.0, read=None) -> Selection:
    """The images of one data set cross_dataset_test.py scores under --split `flag` (module docstring).

    `seed` and `val_ratio` draw the reader's split of other sets under --split test / val (and of
    every set when the training set is unknown); `read`: load_dataset keywords of other sets.
    Raises DataError naming the set and why nothing of it can be scored."""
    read = read or {}
    side = 'val' if flag == 'val' else 'test'
    if run.is_training_set(name, root):
        if flag == 'all':
            fields, _, _ = run.redraw(name, root, whole=True)
            print(f'warning: --split all on {label}, the data set the checkpoint was trained on: '
                  'its training images are scored too', file=sys.stderr, flush=True)
            return _choose(fields, None, 'all', '--split all', WHOLE_SOURCE, True)
        if run.why_not:
            raise DataError(f'{label} is the data set this checkpoint was trained on, but {run.why_not}: '
                            f'the run\'s {side} split cannot be redrawn, so none of it is scored '
                            '(--split all scores every image, its training images included)')
        fields, splits, source = run.redraw(name, root)
        if side not in splits:
            raise DataError(f'{label}: no validation split ({source})')
        reason = ('the training data set: held-out test split' if flag == 'auto' else
                  f'--split {flag}: the run\'s own {side} split')
        return _choose(fields, splits[side], side, reason, source, True)
    if flag == 'all' or (flag == 'auto' and run.trained_on):
        ds = load_dataset(name, root, split=False, **read)
        reason = '--split all' if flag == 'all' else 'not the training data set: every image'
        return _choose(_dataset_fields(ds), None, 'all', reason, ds.split_source, False)
    try:
        ds = load_dataset(name, root, seed=seed, val_ratio=val_ratio, **read)
    except DataError as err:
        if flag != 'auto':
            raise
        raise DataError(f'{err}; the training set is unknown (give --trained_on), so only test splits '
                        'are scored') from None
    if side not in ds.splits:
        raise DataError(f'{label}: no validation split ({ds.split_source})')
    reason = f'--split {flag}' if flag != 'auto' else 'training set unknown (give --trained_on): test split'
    return _choose(_dataset_fields(ds), ds.splits[side], side, reason, ds.split_source, False)


def _dataset_fields(ds):
    return _fields(ds.name, ds.root, ds.paths, ds.mos, ds.score_name, ds.higher_is_better)


def _choose(fields, index, split, reason, source, training) -> Selection:
    n = len(fields['paths'])
    index = np.arange(n) if index is None else np.asarray(index, dtype=np.int64)
    chosen = dict(fields, paths=[fields['paths'][i] for i in index], mos=fields['mos'][index])
    for key in ('prompts', 'mos_c'):
        if fields[key] is not None:
            chosen[key] = [fields[key][i] for i in index] if key == 'prompts' else fields[key][index]
    return Selection(**chosen, split=split, reason=reason, source=source, training_set=training, images_in_dataset=n)


# --------------------------------------------------------------------------- every named set

def score_each(specs, score_one):
    """(results, missing, failed) of score_one(label, name, root) over --datasets' specs.

    A folder that does not exist is skipped (the default sets need not all be there); a set that
    exists but cannot be scored (no images found, an unreadable annotation, fewer than 2 usable
    images) is failed with its reason, one line each."""
    results, missing, failed = {}, {}, {}
    for label, name, root in specs:
        if not Path(root).exists():
            missing[label] = str(root)
            print(f'{label}: not found at {root}; skipped', flush=True)
            continue
        print(f'{label}: {name} from {root}', flush=True)
        try:
            results[label] = score_one(label, name, root)
        except ValueError as err:  # DataError, or iqa.metrics: fewer than 2 usable images
            failed[label] = str(err)
            print(f'{label}: ERROR, skipped: {err}', file=sys.stderr, flush=True)
    return results, missing, failed


def report_skipped(missing, failed) -> int:
    """Print one line per set not scored; the exit status: 0 unless a named set failed."""
    for label, root in missing.items():
        print(f'skipped {label}: not found at {root} (use --datasets {label}=PATH)')
    for label, err in failed.items():
        print(f'not scored {label}: {err.splitlines()[0]}', file=sys.stderr)
    return 1 if failed else 0
