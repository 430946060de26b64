"""iqa.metrics: hand-computed correlations, edge cases, bootstrap CIs, per-image averaging."""
import time
import warnings

import numpy as np
import pytest
import scipy.stats
import torch

from iqa import metrics as iqa_metrics
from iqa.metrics import bootstrap_ci, correlations, krcc, mean_per_image, plcc, srcc


def test_hand_computed_values():
    # pred ranks 1 2 3 4, mos ranks 1 3 2 4: sum d^2 = 2 -> srcc = 1 - 6*2/(4*15) = 0.8
    # one discordant pair of 6 -> krcc = (5-1)/6; centred dot products 4 / sqrt(5*5) -> plcc = 0.8
    pred, mos = [1, 2, 3, 4], [1, 3, 2, 4]
    assert srcc(pred, mos) == pytest.approx(0.8)
    assert plcc(pred, mos) == pytest.approx(0.8)
    assert krcc(pred, mos) == pytest.approx(4 / 6)
    assert correlations(pred, mos) == pytest.approx({'srcc': 0.8, 'plcc': 0.8, 'krcc': 4 / 6})


def test_plcc_is_linear_srcc_is_not():
    pred = np.array([1.0, 2.0, 3.0, 10.0])
    mos = np.array([1.0, 2.0, 3.0, 4.0])
    assert srcc(pred, mos) == pytest.approx(1.0)
    # hand: centred pred (-3,-2,-1,6), mos (-1.5,-.5,.5,1.5): 14 / sqrt(50 * 5)
    assert plcc(pred, mos) == pytest.approx(14 / np.sqrt(250))


def test_krcc_counts_ties_as_tau_b():
    # pred has a tie: concordant 5, discordant 0, tied-in-pred 1 -> 5 / sqrt(5 * 6)
    assert krcc([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / np.sqrt(30))


def test_perfect_and_inverse_correlation():
    mos = np.linspace(0, 100, 50)
    for fn in (srcc, plcc, krcc):
        assert fn(2 * mos + 3, mos) == pytest.approx(1.0)
        assert fn(-mos, mos) == pytest.approx(-1.0)


def test_returns_python_floats_for_numpy_and_torch_inputs():
    # np.float64 would not load back with torch.load(weights_only=True) from a checkpoint
    mos = np.array([3.0, 1.0, 2.0, 5.0])
    for pred in (mos * 2, torch.tensor(mos * 2, dtype=torch.bfloat16), list(mos)):
        values = correlations(pred, mos)
        assert all(type(v) is float for v in values.values())
        assert values['srcc'] == pytest.approx(1.0)


def test_constant_or_diverged_prediction_is_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # scipy's ConstantInputWarning would fail the test
        for fn in (srcc, plcc, krcc):
            assert np.isnan(fn([0.5, 0.5, 0.5], [1, 2, 3]))
            assert np.isnan(fn([1, 2, 3], [4, 4, 4]))
            assert np.isnan(fn([1, float('nan'), 3], [1, 2, 3]))
        assert np.isnan(bootstrap_ci([1, 1, 1], [1, 2, 3])).all()


def test_bad_lengths_name_both_lengths():
    with pytest.raises(ValueError, match=r'len\(pred\)=3 and len\(mos\)=2'):
        srcc([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match=r'at least 2 images.*len\(pred\)=1'):
        plcc([1], [1])
    with pytest.raises(ValueError, match='1-D'):
        krcc(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match='mos has 1 non-finite value.*index 2'):
        srcc([1, 2, 3], [1, 2, float('nan')])


def test_resample_ranks_match_scipy_rankdata_with_ties():
    rng = np.random.default_rng(3)
    values = rng.integers(0, 7, size=40).astype(float)  # many ties
    idx = rng.integers(0, 40, size=(25, 40))
    _, keys = np.unique(values, return_inverse=True)
    ranks = iqa_metrics._resample_ranks(keys, keys.max() + 1, idx)
    np.testing.assert_allclose(ranks, scipy.stats.rankdata(values[idx], axis=1))


def test_bootstrap_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    mos = rng.normal(size=60)
    pred = mos + rng.normal(size=60)
    # same generator, same draws: the vectorised path must equal resampling one by one
    idx = np.random.default_rng(5).integers(0, 60, size=(200, 60))
    for metric, fn in (('srcc', srcc), ('plcc', plcc), ('krcc', krcc)):
        expected = np.percentile([fn(pred[i], mos[i]) for i in idx], [2.5, 97.5])
        got = bootstrap_ci(pred, mos, metric=metric, n_boot=200, seed=5)
        np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_bootstrap_contains_estimate_narrows_and_is_reproducible():
    rng = np.random.default_rng(1)
    mos = rng.uniform(0, 100, size=2000)
    pred = mos + rng.normal(0, 25, size=2000)
    widths = {}
    for n in (50, 2000):
        for metric in ('srcc', 'plcc'):
            lo, hi = bootstrap_ci(pred[:n], mos[:n], metric=metric, n_boot=300)
            estimate = getattr(iqa_metrics, metric)(pred[:n], mos[:n])
            assert lo < estimate < hi
            widths[n, metric] = hi - lo
    assert widths[2000, 'srcc'] < widths[50, 'srcc'] / 3
    assert widths[2000, 'plcc'] < widths[50, 'plcc'] / 3
    assert bootstrap_ci(pred, mos, seed=7, n_boot=100) == bootstrap_ci(pred, mos, seed=7, n_boot=100)
    lo95, hi95 = bootstrap_ci(pred, mos, n_boot=300)
    lo50, hi50 = bootstrap_ci(pred, mos, n_boot=300, alpha=0.5)
    assert lo95 < lo50 < hi50 < hi95


def test_bootstrap_1000_resamples_of_2000_images_is_fast():
    rng = np.random.default_rng(2)
    mos = rng.uniform(0, 100, size=2000)
    pred = np.round(mos + rng.normal(0, 10, size=2000))  # rounded: ties, as with real scores
    start = time.perf_counter()
    bootstrap_ci(pred, mos, 'srcc', n_boot=1000)
    bootstrap_ci(pred, mos, 'plcc', n_boot=1000)
    # well under a second on an idle core; generous because the machine is shared
    assert time.perf_counter() - start < 3.0


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(ValueError, match="metric must be one of.*'rmse'"):
        bootstrap_ci([1, 2, 3], [1, 2, 3], metric='rmse')
    with pytest.raises(ValueError, match='alpha'):
        bootstrap_ci([1, 2, 3], [1, 2, 3], alpha=5)
    with pytest.raises(ValueError, match='n_boot'):
        bootstrap_ci([1, 2, 3], [1, 2, 3], n_boot=0)


def test_mean_per_image_numpy_and_torch():
    scores = [1.0, 3.0, 10.0, 5.0, 7.0, 9.0]
    index = [0, 0, 2, 1, 1, 1]
    np.testing.assert_allclose(mean_per_image(scores, index, 3), [2.0, 7.0, 10.0])
    got = mean_per_image(torch.tensor(scores, dtype=torch.float16), torch.tensor(index), 3)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    np.testing.assert_allclose(got, [2.0, 7.0, 10.0])


def test_mean_per_image_errors():
    with pytest.raises(ValueError, match='image 1'):
        mean_per_image([1.0, 2.0], [0, 2], 3)
    with pytest.raises(ValueError, match=r'in \[0, 2\).*0 to 5'):
        mean_per_image([1.0, 2.0], [0, 5], 2)
    with pytest.raises(ValueError, match='same length, got 2 and 3'):
        mean_per_image([1.0, 2.0], [0, 1, 1], 2)
    with pytest.raises(ValueError, match='integers'):
        mean_per_image([1.0, 2.0], [0.0, 1.0], 2)
