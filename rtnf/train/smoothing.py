"""Causal smoothing of decoded behaviour: a one-pole low-pass filter per target.

Behaviour changes slowly next to a 50 ms hop while one window's decode is noisy, so the loop can
average decodes causally, window by window:

    y_k = (1 - a) * y_(k-1) + a * x_k,   a = hop / (tau + hop)   (tau = 0: no smoothing)

Calibration picks tau per model and target from `TAUS_S`, the one with the best R^2 on the
validation block, by the same rule for the Neuroformer and every baseline (so comparisons stay
fair), and records them in the bundle (smoothing.json) for `rtnf evaluate` and the loop.
"""

from __future__ import annotations

import numpy as np

from rtnf.train.metrics import r_squared

TAUS_S = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)


def smooth(values: np.ndarray, taus_s: np.ndarray, hop_s: float) -> np.ndarray:
    """`values` (windows, targets), consecutive windows `hop_s` apart, filtered per column."""
    gains = hop_s / (np.asarray(taus_s, dtype=np.float64) + hop_s)
    out = np.empty(values.shape, dtype=np.float64)
    state = values[0].astype(np.float64)
    for k, row in enumerate(values):
        state = (1.0 - gains) * state + gains * row
        out[k] = state
    return out.astype(values.dtype)


def fit_taus(predicted: np.ndarray, actual: np.ndarray, hop_s: float) -> np.ndarray:
    """Per target, the tau of `TAUS_S` whose smoothed `predicted` has the best R^2."""
    scores = np.array([[r_squared(smooth(predicted, np.full(predicted.shape[1], tau), hop_s)
                                  [:, j], actual[:, j]) for j in range(predicted.shape[1])]
                       for tau in TAUS_S])
    return np.asarray(TAUS_S)[np.argmax(scores, axis=0)]
