"""Correlation metrics for image quality assessment: SRCC, PLCC, KRCC and their bootstrap CIs.

Every metric compares one predicted score per *image* with that image's MOS. The training loop
predicts several patches per image, so `mean_per_image` first averages the patch scores (the
HyperIQA protocol); the correlations are then taken over images, never over patches.

The metrics return plain Python floats so they can go straight into metrics.csv, summary.json
and a checkpoint (torch.load(weights_only=True) refuses numpy scalars).

torch is never imported here (numpy and scipy only): a tool that scores predictions can use
these functions without paying for it.
"""
import sys

import numpy as np
import scipy.stats

METRICS = ('srcc', 'plcc', 'krcc')


def _as_1d(x, name):
    """Return x (list, numpy array or torch tensor, on any device) as a 1-D float64 array."""
    torch = sys.modules.get('torch')
    if torch is not None and isinstance(x, torch.Tensor):
        # float64 first: .numpy() cannot convert bfloat16/float16 and cannot read CUDA memory
        x = x.detach().to('cpu', torch.float64).numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f'{name} must be a sequence of numbers: {e}') from None
    if arr.ndim != 1:
        raise ValueError(f'{name} must be 1-D (one score per image), got shape {arr.shape}; '
                         f'flatten it with .ravel() / .reshape(-1) if that is what you mean')
    return arr


def _pair(pred, mos):
    """Validate a (pred, mos) pair and return them as float64 arrays.

    A non-finite MOS is a broken label file, so it is an error; a non-finite prediction is a
    diverged model, which the metrics report as NaN (see `_undefined`).
    """
    pred = _as_1d(pred, 'pred')
    mos = _as_1d(mos, 'mos')
    if len(pred) != len(mos):
        raise ValueError(f'pred and mos must have the same length, got len(pred)={len(pred)} '
                         f'and len(mos)={len(mos)}')
    if len(pred) < 2:
        raise ValueError(f'a correlation needs at least 2 images, got len(pred)={len(pred)} '
                         f'and len(mos)={len(mos)}')
    bad = np.flatnonzero(~np.isfinite(mos))
    if len(bad):
        raise ValueError(f'mos has {len(bad)} non-finite value(s), first at index {bad[0]} '
                         f'({mos[bad[0]]}); check the label file')
    return pred, mos


def _undefined(pred, mos):
    """True when the correlation does not exist: a constant input or a non-finite prediction.

    Why NaN and not an error: a model that collapses to one score for every image (it happens
    in the first epochs with a too-high learning rate) or that diverged to NaN is a training
    outcome, not a bug; NaN goes into metrics.csv, never wins "best" and the run goes on.
    Why we check before calling scipy: scipy would also return NaN, but with a
    ConstantInputWarning on every call, i.e. every epoch, which buries the useful log lines.
    """
    if not np.all(np.isfinite(pred)):
        return True
    return np.ptp(pred) == 0 or np.ptp(mos) == 0


def srcc(pred, mos):
    """Spearman rank-order correlation (monotonic agreement; the field's headline number)."""
    pred, mos = _pair(pred, mos)
    if _undefined(pred, mos):
        return float('nan')
    return float(scipy.stats.spearmanr(pred, mos)[0])


def plcc(pred, mos):
    """Pearson linear correlation of raw predictions and MOS.

    No logistic fit first: the reference numbers this toolkit is compared with are raw PLCC,
    and so is every PLCC it reports, so all of them stay comparable.
    """
    pred, mos = _pair(pred, mos)
    if _undefined(pred, mos):
        return float('nan')
    return float(scipy.stats.pearsonr(pred, mos)[0])


def krcc(pred, mos):
    """Kendall rank correlation, tau-b (tau-b corrects for the ties that rounded MOS values have)."""
    pred, mos = _pair(pred, mos)
    if _undefined(pred, mos):
        return float('nan')
    return float(scipy.stats.kendalltau(pred, mos)[0])


def correlations(pred, mos):
    """All three metrics at once: {'srcc': ..., 'plcc': ..., 'krcc': ...}."""
    return {'srcc': srcc(pred, mos), 'plcc': plcc(pred, mos), 'krcc': krcc(pred, mos)}


def _rowwise_pearson(x, y):
    """Pearson r of each row of x with the same row of y; NaN for a constant row, no warnings."""
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    num = np.einsum('ij,ij->i', x, y)
    den = np.sqrt(np.einsum('ij,ij->i', x, x) * np.einsum('ij,ij->i', y, y))
    with np.errstate(invalid='ignore', divide='ignore'):
        r = num / den
    r[den == 0] = np.nan
    # rounding can push a perfect correlation a hair past +-1
    return np.clip(r, -1.0, 1.0)


def _resample_ranks(keys, n_keys, idx):
    """Average ranks (1-based, ties share their mean rank, like scipy's rankdata) of every row
    of values[idx], where keys = the dense rank of each original value.

    Why not sort each resample: a resample only repeats original values, so counting how often
    each key occurs per row and taking a cumulative sum gives every rank in O(n) per row without
    an argsort; about 10x faster than scipy.stats.rankdata(axis=1).
    """
    rows = idx.shape[0]
    k = keys[idx]
    flat = (np.arange(rows)[:, None] * n_keys + k).ravel()
    counts = np.bincount(flat, minlength=rows * n_keys).reshape(rows, n_keys)
    smaller = np.cumsum(counts, axis=1) - counts
    avg_rank = smaller + (counts + 1) / 2.0
    return np.take_along_axis(avg_rank, k, axis=1)


def bootstrap_ci(pred, mos, metric='srcc', n_boot=1000, alpha=0.05, seed=0):
    """Percentile bootstrap confidence interval (lo, hi) of `metric` over images.

    Images are resampled with replacement (the test set is the random thing, not the patches),
    n_boot times; the interval is the alpha/2 and 1-alpha/2 percentiles of the resampled metric.
    Resamples whose metric is undefined (constant, only possible for tiny sets) are ignored;
    if all are, (nan, nan). A fixed seed makes summary.json reproducible.

    SRCC and PLCC are vectorised over resamples (1000 x 2000 images takes a fraction of a
    second); KRCC has no vectorised form here and loops over scipy (about 0.3 s for the same).
    """
    if metric not in METRICS:
        raise ValueError(f'metric must be one of {METRICS}, got {metric!r}')
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f'n_boot must be a positive integer, got {n_boot!r}')
    if not 0 < alpha < 1:
        raise ValueError(f'alpha must be between 0 and 1 (0.05 gives a 95% interval), got {alpha!r}')
    pred, mos = _pair(pred, mos)
    if not np.all(np.isfinite(pred)):
        return float('nan'), float('nan')
    n = len(pred)
    rng = np.random.default_rng(seed)
    if metric == 'srcc':
        _, pred_keys = np.unique(pred, return_inverse=True)
        _, mos_keys = np.unique(mos, return_inverse=True)
        n_pred_keys, n_mos_keys = pred_keys.max() + 1, mos_keys.max() + 1
    # chunks of resamples keep memory near 100 MB even for SPAQ-sized sets (11k images)
    chunk = max(1, 2_000_000 // n)
    stats = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        if metric == 'srcc':
            stats.append(_rowwise_pearson(_resample_ranks(pred_keys, n_pred_keys, idx),
                                          _resample_ranks(mos_keys, n_mos_keys, idx)))
        elif metric == 'plcc':
            stats.append(_rowwise_pearson(pred[idx], mos[idx]))
        else:
            stats.append(np.array([krcc(pred[i], mos[i]) for i in idx]))
    stats = np.concatenate(stats)
    stats = stats[np.isfinite(stats)]
    if len(stats) == 0:
        return float('nan'), float('nan')
    lo, hi = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def mean_per_image(patch_scores, image_index, n_images):
    """Average the patch predictions of each image: result[i] = mean of scores with index i.

    patch_scores: (n_patches,) scores (numpy or torch, any device); image_index: (n_patches,)
    integer image number of each patch, in [0, n_images). Returns float64 (n_images,).
    An image with no patch is an error (its mean would be NaN and silently drop out later).
    """
    scores = _as_1d(patch_scores, 'patch_scores')
    torch = sys.modules.get('torch')
    if torch is not None and isinstance(image_index, torch.Tensor):
        image_index = image_index.detach().cpu().numpy()
    index = np.asarray(image_index)
    if index.ndim != 1:
        raise ValueError(f'image_index must be 1-D, got shape {index.shape}')
    if len(index) != len(scores):
        raise ValueError(f'patch_scores and image_index must have the same length, got '
                         f'{len(scores)} and {len(index)}')
    if len(index) and not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f'image_index must hold integers, got dtype {index.dtype}')
    if isinstance(n_images, bool) or not isinstance(n_images, (int, np.integer)) or n_images < 1:
        raise ValueError(f'n_images must be a positive integer, got {n_images!r}')
    if len(index) and (index.min() < 0 or index.max() >= n_images):
        raise ValueError(f'image_index must be in [0, {n_images}), got values from '
                         f'{index.min()} to {index.max()}')
    counts = np.bincount(index, minlength=n_images)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise ValueError(f'{len(empty)} of {n_images} images have no patch score, first: '
                         f'image {empty[0]}')
    return np.bincount(index, weights=scores, minlength=n_images) / counts
