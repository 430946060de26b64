"""Train/val/test splits: seeded, by group (reference image, prompt) where images share content.

A split depends only on the seed, the ratios and the group keys, never on the order files
were found in: the units are sorted before they are shuffled.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from iqa.data.registry import DEFAULT_VAL_RATIO, WHOLE_SOURCE, ReadContext, check_ratios

__all__ = ['DEFAULT_VAL_RATIO', 'split_by_groups', 'random_split', 'val_from_train', 'random_source',
           'val_source', 'seeded_split', 'announce_split']


def split_by_groups(n: int, seed: int, train_ratio: float = 0.8, val_ratio: float = DEFAULT_VAL_RATIO,
                    groups: Sequence | None = None) -> dict[str, np.ndarray]:
    """Seeded random train/val/test split of n images; with `groups`, whole groups go to one side.

    `groups` holds one key per image (its reference image, its prompt): images that share
    content must not be trained on and tested on. Like HyperIQA, the units (images or
    groups) are shuffled and round(train_ratio * count) go to the training side; test is the
    rest. The
    validation split is then carved out of the training side with the same grouping:
    round(val_ratio * training units), at least one unit when val_ratio > 0 and the training
    side has two or more (val_ratio 0: no 'val' key). Returns 'train' / 'val' / 'test' ->
    sorted int64 indices.
    """
    check_ratios(train_ratio, val_ratio)
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


def random_split(ctx: ReadContext, n: int, groups: Sequence | None = None) -> dict:
    """split_by_groups with the reader's seed and ratios."""
    return split_by_groups(n, ctx.seed, ctx.train_ratio, ctx.val_ratio, groups)


def val_from_train(ctx: ReadContext, splits: dict, n: int, groups: Sequence | None = None) -> dict:
    """A fixed train/test split without validation images: carve val out of its training side
    (same grouping, seeded by ctx.seed); the given test side stays as it is."""
    if len(splits.get('val', ())):
        return splits
    return _carve_val(splits, _unit_keys(n, groups), np.random.default_rng(ctx.seed), ctx.val_ratio)


def random_source(ctx: ReadContext, unit: str) -> str:
    """How a random split was made, for IQADataset.split_source and the log."""
    pct = int(round(ctx.train_ratio * 100))
    return f'random {pct}/{100 - pct} by {unit} (seed {ctx.seed})' + val_source(ctx, unit)


def val_source(ctx: ReadContext, unit: str) -> str:
    if ctx.val_ratio == 0:
        return '; no validation split (val_ratio 0)'
    return f'; val {ctx.val_ratio * 100:g}% of the training side by {unit} (seed {ctx.seed})'


def seeded_split(ctx: ReadContext, n: int, unit: str = 'image', groups: Sequence | None = None,
                 label: str | None = None) -> tuple[dict, str]:
    """(splits, source) of a random split by `unit` (whole `groups`), printed under `label`.

    A set read whole (ctx.whole) gets no split: nothing is drawn, nothing printed."""
    if ctx.whole:
        return {}, WHOLE_SOURCE
    source = random_source(ctx, unit)
    splits = random_split(ctx, n, groups)
    announce_split(label or ctx.name, source, splits)
    return splits, source


def announce_split(name: str, source: str, splits: dict, why: str = 'no official split') -> None:
    # A split that was not the data set's own is printed: the results depend on it.
    sizes = ' / '.join(f'{k} {len(v)}' for k, v in splits.items())
    print(f'{name}: {why}; using {source}: {sizes} images', flush=True)

