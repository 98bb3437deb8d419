"""Baseline decoders: binned history on the tokenizer's edge rule, ridge, MLP and GRU (fit, seed,
save and rebuild), and speed decoding on a small simulated session's held-out time."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rtnf.config import CalibrationConfig, SimulationConfig, WindowsConfig
from rtnf.data.session import Session
from rtnf.data.sim import simulate
from rtnf.errors import RtnfError
from rtnf.tokens import TokenSpec, tokenize_windows, tokens_to_counts, window_ends
from rtnf.train.baselines import (GRUDecoder, MLPDecoder, RidgeDecoder, TrainingSettings,
                                  binned_history, decoder_from_state, evaluate, fit_baselines,
                                  standardized_targets)
from rtnf.train.dataset import contiguous_split

TARGETS = ["speed", "gaze_phi", "gaze_theta"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: on a busy 2-core machine, two spinning threads are many times
    slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def simulated() -> Session:
    (session,) = simulate(SimulationConfig(neurons=60, minutes=2, seed=1), "2p")
    return session


def spikes_session(times: np.ndarray, units: np.ndarray, n_units: int) -> Session:
    order = np.lexsort((units, times))
    return Session(unit_ids=np.arange(n_units) + 100, spike_times=times[order],
                   spike_unit_index=units[order]).validate()


# ---------------------------------------------------------------------------------------------
# binned_history
# ---------------------------------------------------------------------------------------------


def test_binned_history_by_hand_spikes_on_edges_go_to_the_later_bin():
    # Windows ending at 0.3 and 0.35 s, 2 bins of 50 ms. Times carry float error on purpose:
    # 0.7 - 0.5 (0.19999999999999996) is the edge 0.2, 0.35 - 0.1 (0.24999999999999997) the edge
    # 0.25, 0.1 + 0.2 (0.30000000000000004) the end of the first window, given as 0.1 * 3.
    times = np.array([0.1999, 0.7 - 0.5, 0.35 - 0.1, 0.2999, 0.1 + 0.2, 0.05 * 7])
    units = np.array([0, 1, 0, 1, 0, 1])
    counts = binned_history(spikes_session(times, units, 2), np.array([0.1 * 3, 0.35]), 0.05, 2)
    assert counts.dtype == np.float32 and counts.shape == (2, 2, 2)
    np.testing.assert_array_equal(counts[0], [[0, 1],    # [0.20, 0.25): the edge 0.2
                                              [1, 1]])   # [0.25, 0.30): the edge 0.25, 0.2999
    np.testing.assert_array_equal(counts[1], [[1, 1],    # [0.25, 0.30)
                                              [1, 0]])   # [0.30, 0.35): 0.1 + 0.2, not 0.35


@pytest.mark.parametrize("bin_s, bin_ms", [(0.05, 50), (0.01, 10)])
def test_binned_history_equals_brute_force_count(bin_s, bin_ms):
    rng = np.random.default_rng(0)
    n_units, n_bins = 5, 4
    # Spikes on a 1 ms grid, plus one on every bin edge of the 10 ms grid; ends every 10 ms
    # (for 50 ms bins, ends off the bin grid too). Exact counts come from integer milliseconds.
    spike_ms = np.concatenate([rng.integers(0, 2000, 3000), np.arange(0, 2000, 10)])
    units = rng.integers(0, n_units, spike_ms.size)
    end_ms = np.arange(0, 2100, 10)
    counts = binned_history(spikes_session(spike_ms / 1000, units, n_units), end_ms / 1000,
                            bin_s, n_bins)

    expected = np.zeros((end_ms.size, n_bins, n_units))
    for window, end in enumerate(end_ms):
        for k in range(n_bins):
            start = end - (n_bins - k) * bin_ms
            inside = (spike_ms >= start) & (spike_ms < start + bin_ms)
            expected[window, k] = np.bincount(units[inside], minlength=n_units)
    np.testing.assert_array_equal(counts, expected)


def test_binned_history_at_dt_resolution_counts_what_the_tokenizer_tokenizes(simulated):
    # 2p events sit on 30 Hz frames, so many fall exactly on 10 ms edges (k/30 = 0.1 for k = 3).
    windows = WindowsConfig(current_capacity=1000)
    spec = TokenSpec.from_config(windows, simulated.n_units)
    ends = window_ends(simulated.start_time, simulated.end_time, windows)[::7]
    tokens = tokenize_windows(simulated.spike_times, simulated.spike_unit_index, ends, spec)
    assert tokens.current.truncated.sum() == 0
    from_tokens = tokens_to_counts(tokens.current.units, tokens.current.dts, spec)
    counts = binned_history(simulated, ends, windows.dt_resolution, spec.current.n_bins)
    np.testing.assert_array_equal(counts, from_tokens.transpose(0, 2, 1))


def test_binned_history_of_no_windows():
    session = spikes_session(np.array([0.1]), np.array([0]), 3)
    assert binned_history(session, np.array([]), 0.05, 4).shape == (0, 4, 3)


# ---------------------------------------------------------------------------------------------
# Ridge
# ---------------------------------------------------------------------------------------------


def planted(n: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, 4, 10) of Poisson counts and 2 targets, a fixed linear map of them plus
    Gaussian noise of std `noise` (the map's output has std about 1.5)."""
    x = np.random.default_rng(seed).poisson(2.0, (n, 4, 10)).astype(np.float32)
    weight = np.random.default_rng(100).normal(0, 0.2, (40, 2))
    y = x.reshape(n, -1) @ weight + np.array([1.0, -2.0])
    y += np.random.default_rng(seed + 1).normal(0, noise, y.shape)
    return x, y.astype(np.float32)


def test_ridge_recovers_a_planted_linear_map():
    x, y = planted(600, noise=0.0)
    ridge = RidgeDecoder().fit(x[:300], y[:300], x[300:400], y[300:400])
    scores = evaluate(ridge, x[400:], y[400:])
    assert min(scores["r"].values()) > 0.99 and scores["r2_weighted"] > 0.99
    assert ridge.penalty == min(ridge.penalties)


def test_ridge_penalty_is_chosen_by_validation_larger_with_noise():
    x, clean = planted(200, noise=0.0)
    _, noisy = planted(200, noise=8.0)
    fits = {name: RidgeDecoder().fit(x[:60], y[:60], x[60:], y[60:])
            for name, y in (("clean", clean), ("noisy", noisy))}
    assert fits["noisy"].penalty > fits["clean"].penalty


def test_ridge_predict_is_one_affine_map_of_the_raw_counts():
    x, y = planted(300, noise=0.5)
    ridge = RidgeDecoder().fit(x[:200], y[:200], x[200:], y[200:])
    single = x[250:251]
    np.testing.assert_allclose(ridge.predict(single),
                               single.reshape(1, -1) @ ridge.weight + ridge.bias)
    with pytest.raises(RtnfError, match="should be"):
        ridge.predict(x[:, :3])


# ---------------------------------------------------------------------------------------------
# All decoders: save and rebuild, determinism
# ---------------------------------------------------------------------------------------------


def small_decoders(seed: int = 0) -> list:
    training = TrainingSettings(max_epochs=4, seed=seed)
    return [RidgeDecoder(n_bins=4),
            MLPDecoder(n_bins=4, hidden=16, training=training),
            GRUDecoder(n_bins=4, hidden=8, training=training)]


@pytest.mark.parametrize("index", range(3), ids=["ridge", "mlp", "gru"])
def test_saved_and_rebuilt_decoder_predicts_identically(index, tmp_path):
    x, y = planted(300, noise=0.5)
    decoder = small_decoders()[index].fit(x[:200], y[:200], x[200:250], y[200:250])
    save_file(decoder.to_tensors(), str(tmp_path / "decoder.safetensors"))
    (tmp_path / "decoder.json").write_text(json.dumps(decoder.config()))

    rebuilt = decoder_from_state(load_file(str(tmp_path / "decoder.safetensors")),
                                 json.loads((tmp_path / "decoder.json").read_text()))
    assert type(rebuilt) is type(decoder) and rebuilt.config() == decoder.config()
    np.testing.assert_array_equal(rebuilt.predict(x[250:]), decoder.predict(x[250:]))


def test_unknown_decoder_kind_is_refused():
    with pytest.raises(RtnfError, match="unknown baseline decoder kind 'lstm'"):
        decoder_from_state({}, {"kind": "lstm"})


@pytest.mark.parametrize("index", [1, 2], ids=["mlp", "gru"])
def test_networks_are_deterministic_for_a_seed(index):
    x, y = planted(300, noise=0.5)

    def predictions(seed: int) -> np.ndarray:
        decoder = small_decoders(seed)[index].fit(x[:200], y[:200], x[200:250], y[200:250])
        return decoder.predict(x[250:])

    first = predictions(seed=3)
    np.testing.assert_array_equal(predictions(seed=3), first)
    assert not np.array_equal(predictions(seed=4), first)


# ---------------------------------------------------------------------------------------------
# A simulated session: held-out contiguous time
# ---------------------------------------------------------------------------------------------


def test_speed_decodes_on_held_out_time_of_a_simulated_session(simulated):
    session = simulated
    windows, calibration = WindowsConfig(), CalibrationConfig()
    ends = window_ends(session.start_time, session.end_time - windows.current, windows)
    fitting, held_out = contiguous_split(ends, calibration.holdout_fraction, windows,
                                         windows.current)
    train, validation = contiguous_split(fitting, calibration.validation_fraction, windows,
                                         windows.current)

    fit = fit_baselines(session, train, validation, TARGETS)
    assert set(fit.decoders) == set(fit.validation) == {"ridge", "mlp", "gru"}
    held_out_y = standardized_targets(session, TARGETS, held_out, fit.normalization,
                                      windows.dt_resolution)
    speed_r = {}
    for kind, decoder in fit.decoders.items():
        scores = evaluate(decoder, decoder.features(session, held_out), held_out_y, TARGETS)
        assert all(np.isfinite(r) for r in scores["r"].values()), kind
        speed_r[kind] = scores["r"]["speed"]
    assert speed_r["ridge"] > 0.3, speed_r
