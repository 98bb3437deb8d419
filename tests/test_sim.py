"""The simulated rig: determinism, shapes, plausible statistics, and realism targets for decoding.

The decoding targets (ridge regression with 150 ms of history on 50 ms bins, regularisation
chosen on a validation block, contiguous held-out time at the end):
- from the true rates, speed r >= 0.9;
- from the same rates with 200 ms time blocks permuted (behaviour untouched), |r| < 0.2;
- from the observed 2p events (386 units, 4 minutes), clearly below: r about 0.6-0.8.
The held-out block of a 4-minute session is short, so r depends on how much the animal runs in
it; the seed is fixed and the test checks that the held-out block holds real running.
"""

from __future__ import annotations

import numpy as np
import pytest

from rtnf.config import SimulationConfig
from rtnf.data.session import Session
from rtnf.data.sim import simulate
from rtnf.data.sim_behavior import simulate_gaze, simulate_speed
from rtnf.errors import ConfigError

BIN_S = 0.05
LAGS = 4  # the current bin and three before it: 150 ms of history
LAMBDAS = 10.0 ** np.arange(0, 6)
TRAIN, VALIDATION = 0.6, 0.2  # then 0.2 held out


# ---------------------------------------------------------------------------------------------
# Ridge regression with history (numpy, closed form)
# ---------------------------------------------------------------------------------------------


def lagged(features: np.ndarray) -> np.ndarray:
    """Rows t hold features[t], features[t-1], ..., features[t-LAGS+1]; the first rows dropped."""
    return np.hstack([features[LAGS - 1 - lag:features.shape[0] - lag] for lag in range(LAGS)])


def fit_ridge(x: np.ndarray, y: np.ndarray, penalty: float):
    """Standardise on the fitting rows, solve the ridge normal equations; return a predictor."""
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = (x - mean) / scale
    weights = np.linalg.solve(z.T @ z + penalty * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return lambda new: ((new - mean) / scale) @ weights + y.mean()


def heldout_r(features: np.ndarray, target: np.ndarray) -> float:
    """Pearson r on the last 20% of time; penalty picked on the 20% before it, then refit."""
    x, y = lagged(features), target[LAGS - 1:]
    train_end, validation_end = int(TRAIN * len(y)), int((TRAIN + VALIDATION) * len(y))

    def validation_r(penalty: float) -> float:
        predict = fit_ridge(x[:train_end], y[:train_end], penalty)
        return np.corrcoef(predict(x[train_end:validation_end]), y[train_end:validation_end])[0, 1]

    penalty = max(LAMBDAS, key=validation_r)
    predict = fit_ridge(x[:validation_end], y[:validation_end], penalty)
    return float(np.corrcoef(predict(x[validation_end:]), y[validation_end:])[0, 1])


def binned_rates(session: Session) -> np.ndarray:
    truth = session.ground_truth
    per_bin = int(round(BIN_S / truth.rate_dt))
    n = truth.rates.shape[0] // per_bin
    return truth.rates[:n * per_bin].reshape(n, per_bin, -1).mean(axis=1)


def binned_counts(session: Session) -> np.ndarray:
    n = int(round(session.duration / BIN_S))
    index = np.minimum(np.floor(session.spike_times / BIN_S + 1e-9).astype(np.int64), n - 1)
    counts = np.bincount(index * session.n_units + session.spike_unit_index,
                         minlength=n * session.n_units)
    return counts.reshape(n, session.n_units).astype(np.float64)


def binned_behavior(session: Session, name: str) -> np.ndarray:
    channel = session.behavior[name]
    n = int(round(session.duration / BIN_S))
    index = np.minimum(np.floor(channel.timestamps / BIN_S + 1e-9).astype(np.int64), n - 1)
    return np.bincount(index, channel.values, n) / np.maximum(np.bincount(index, minlength=n), 1)


def permute_blocks(features: np.ndarray, block: int, seed: int) -> np.ndarray:
    """The rows in blocks of `block`, the blocks in random order (the tail is dropped)."""
    n = features.shape[0] // block
    order = np.random.default_rng(seed).permutation(n)
    return features[:n * block].reshape(n, block, -1)[order].reshape(n * block, -1)


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_photon() -> Session:
    (session,) = simulate(SimulationConfig(neurons=386, minutes=4.0, seed=0), "2p")
    return session


@pytest.fixture(scope="module")
def ephys() -> Session:
    (session,) = simulate(SimulationConfig(neurons=150, minutes=1.0, seed=1), "ephys")
    return session


@pytest.fixture(scope="module")
def days() -> list[Session]:
    config = SimulationConfig(neurons=200, minutes=0.5, seed=2, sessions=3, unit_turnover=0.2,
                              gain_drift=0.1)
    return simulate(config, "2p")


# ---------------------------------------------------------------------------------------------
# Determinism, shapes, metadata
# ---------------------------------------------------------------------------------------------


def session_arrays(session: Session) -> dict[str, np.ndarray]:
    truth = session.ground_truth
    arrays = {"unit_ids": session.unit_ids, "spike_times": session.spike_times,
              "spike_unit_index": session.spike_unit_index, "images": session.frames.images,
              "rates": truth.rates, "coupling": truth.coupling, "hubs": truth.hubs}
    arrays.update({f"behavior/{k}": c.values for k, c in session.behavior.items()})
    arrays.update({f"tuning/{k}": v for k, v in truth.tuning.items()})
    return arrays


def test_same_seed_gives_identical_sessions_and_another_seed_does_not():
    config = SimulationConfig(neurons=40, minutes=0.25, seed=7, sessions=2)
    first, again = simulate(config, "ephys"), simulate(config, "ephys")
    for a, b in zip(first, again):
        left, right = session_arrays(a), session_arrays(b)
        assert left.keys() == right.keys()
        for name in left:
            np.testing.assert_array_equal(left[name], right[name], err_msg=name)
        assert a.metadata == b.metadata
    other = simulate(SimulationConfig(neurons=40, minutes=0.25, seed=8, sessions=2), "ephys")
    assert not np.array_equal(other[0].ground_truth.rates, first[0].ground_truth.rates)


def test_shapes_dtypes_and_metadata(two_photon):
    s = two_photon
    truth = s.ground_truth
    assert s.n_units == 386
    assert truth.rates.shape == (24000, 386) and truth.rates.dtype == np.float32
    assert truth.coupling.shape == (386, 386)
    assert truth.rate_dt == 0.01
    assert s.frames.images.shape == (4800, 24, 32) and s.frames.images.dtype == np.uint8
    assert all(c.timestamps.size == 4800 for c in s.behavior.values())
    assert {c.unit for c in s.behavior.values()} == {"cm/s", "degrees"}
    for name, values in truth.tuning.items():
        assert values.shape[0] == 386, name
    assert {"baseline_hz", "speed_gain", "speed_pref", "gaze_phi_gain", "gaze_theta_gain",
            "rf_x", "rf_y"} <= truth.tuning.keys()
    assert s.metadata["profile"] == "2p" and s.metadata["source"] == "simulator"
    assert s.metadata["identifier"] == "2p-seed0-session0"
    assert (s.start_time, s.end_time) == (0.0, 240.0)
    np.testing.assert_array_equal(s.intervals["calibration"], [[0.0, 240.0]])


def test_unknown_profile_is_rejected():
    with pytest.raises(ConfigError, match="profile"):
        simulate(SimulationConfig(neurons=5, minutes=0.1), "fmri")


# ---------------------------------------------------------------------------------------------
# Plausible statistics
# ---------------------------------------------------------------------------------------------


def test_rates_are_bounded_and_plausible(two_photon):
    truth = two_photon.ground_truth
    assert np.all(np.isfinite(truth.rates)) and truth.rates.min() > 0
    assert truth.rates.max() <= 100.0 + 1e-3
    unit_means = truth.rates.mean(axis=0)
    assert 1.0 < np.median(unit_means) < 10.0
    assert np.mean(truth.rates >= 99.9) < 0.01  # the ceiling is a guard, not the regime
    assert 0.2 < unit_means.std() / unit_means.mean()  # lognormal spread across units


def test_coupling_has_hubs_and_refractoriness(two_photon):
    truth = two_photon.ground_truth
    assert np.all(np.diag(truth.coupling) < 0)
    out_degree = (truth.coupling != 0).sum(axis=0) - 1
    assert 2 <= truth.hubs.size <= 8
    assert out_degree[truth.hubs].min() > 5 * np.median(out_degree)
    speed_tuned = (truth.tuning["speed_gain"] != 0).mean()
    gaze_tuned = (truth.tuning["gaze_phi_gain"] != 0).mean()
    assert 0.2 < speed_tuned < 0.4 and 0.12 < gaze_tuned < 0.28


def test_speed_is_still_or_running_about_7_plus_minus_14():
    speed = simulate_speed(np.random.default_rng(0), 20 * 3600, 20.0)  # one hour
    assert speed.min() >= 0
    assert 5.5 < speed.mean() < 9.0 and 11.0 < speed.std() < 17.0
    assert 0.45 < np.mean(speed < 1.0) < 0.75  # still much of the time
    assert speed.max() < 100


def test_gaze_drifts_and_saccades():
    phi, theta = simulate_gaze(np.random.default_rng(0), 20 * 600, 20.0)
    assert 5 < phi.std() < 20 and 3 < theta.std() < 12
    jumps = np.abs(np.diff(phi)) > 4.0
    assert 0.1 < jumps.sum() / 600 < 1.0  # saccades per second


def test_2p_events_sit_on_imaging_frames(two_photon):
    frames = two_photon.spike_times * 30.0
    np.testing.assert_allclose(frames, np.rint(frames), atol=1e-6)
    rate = two_photon.n_spikes / two_photon.n_units / two_photon.duration
    true_rate = two_photon.ground_truth.rates.mean()
    assert 0.1 * true_rate < rate < true_rate  # deconvolution misses many single spikes


def test_ephys_spikes_on_30khz_clock_with_few_errors(ephys):
    samples = ephys.spike_times * 30000.0
    np.testing.assert_allclose(samples, np.rint(samples), atol=1e-4)
    expected = ephys.ground_truth.rates.sum() * ephys.ground_truth.rate_dt
    assert 0.93 < ephys.n_spikes / expected < 1.05
    assert ephys.spike_times.max() < ephys.end_time


def test_days_share_units_and_drift(days):
    assert [s.metadata["session_index"] for s in days] == [0, 1, 2]
    assert len({s.metadata["identifier"] for s in days}) == 3
    for before, after in zip(days, days[1:]):
        shared, in_before, in_after = np.intersect1d(before.unit_ids, after.unit_ids,
                                                     return_indices=True)
        assert shared.size / before.n_units == pytest.approx(1 - 0.2, abs=0.01)
        np.testing.assert_array_equal(  # coupling is the animal's, among the shared units
            before.ground_truth.coupling[np.ix_(in_before, in_before)],
            after.ground_truth.coupling[np.ix_(in_after, in_after)])
        gain = np.log(after.ground_truth.tuning["visual_gain"][in_after]
                      / before.ground_truth.tuning["visual_gain"][in_before])
        assert 0.05 < gain.std() < 0.15  # drift of about gain_drift = 0.1 per day
        assert after.metadata["animal"] == before.metadata["animal"]


# ---------------------------------------------------------------------------------------------
# Realism targets for decoding
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def speed_r(two_photon) -> dict[str, float]:
    speed = binned_behavior(two_photon, "speed")
    rates = binned_rates(two_photon)
    n = rates.shape[0] // 4 * 4
    return {
        "true": heldout_r(rates, speed),
        "permuted": heldout_r(permute_blocks(rates, 4, seed=0), speed[:n]),
        "observed": heldout_r(binned_counts(two_photon), speed),
    }


def test_heldout_block_holds_running(two_photon):
    speed = binned_behavior(two_photon, "speed")
    heldout = speed[int((TRAIN + VALIDATION) * speed.size):]
    assert heldout.std() > 5.0 and np.mean(heldout > 2.0) > 0.15


def test_true_rates_decode_speed(speed_r):
    assert speed_r["true"] >= 0.9


def test_permuted_rates_do_not_decode_speed(speed_r):
    assert abs(speed_r["permuted"]) < 0.2


def test_observed_2p_events_decode_speed_clearly_worse(speed_r):
    assert 0.55 <= speed_r["observed"] <= 0.85
    assert speed_r["observed"] < speed_r["true"] - 0.1
