"""Causal output smoothing: the filter, and picking its time constant on validation data."""

from __future__ import annotations

import numpy as np

from rtnf.train.smoothing import TAUS_S, fit_taus, smooth


def test_the_filter_is_causal_one_pole_and_tau_zero_is_identity():
    values = np.random.default_rng(0).standard_normal((50, 2))
    np.testing.assert_array_equal(smooth(values, np.zeros(2), 0.05), values)
    step = np.r_[np.zeros(10), np.ones(40)][:, None]
    out = smooth(step, np.array([0.45]), 0.05)  # gain 0.1 per window
    np.testing.assert_allclose(out[:10], 0.0)
    np.testing.assert_allclose(out[10:, 0], 1 - 0.9 ** np.arange(1, 41), rtol=1e-12)
    changed = values.copy()
    changed[30:] += 5.0  # the future never changes the past
    np.testing.assert_array_equal(smooth(changed, np.ones(2), 0.05)[:30],
                                  smooth(values, np.ones(2), 0.05)[:30])


def test_fit_picks_smoothing_for_a_slow_signal_and_none_for_a_fast_one():
    rng = np.random.default_rng(1)
    slow = np.cumsum(rng.standard_normal(4000)) * 0.05  # a random walk: slow next to the hop
    slow -= np.convolve(slow, np.ones(200) / 200, mode="same")
    fast = rng.standard_normal(4000)
    actual = np.c_[slow, fast]
    predicted = actual + rng.standard_normal(actual.shape) * np.array([0.5, 0.05])
    taus = fit_taus(predicted, actual, 0.05)
    assert taus[0] > 0 and taus[1] == 0 and set(taus) <= set(TAUS_S)
