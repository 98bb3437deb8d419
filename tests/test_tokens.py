"""rtnf.tokens: spikes <-> (unit, dt) tokens against a plain-Python reference on integer time.

The property tests draw spike times and window ends on a grid of 10 us "grains" (coarser than the
tokenizer's tick, 0.5-2 us here), with many spikes exactly on bin and window edges; the reference
bins them with exact integer arithmetic on grains, so it shares nothing with the tokenizer's
float-to-tick conversion. Hypothesis runs derandomized, so every run draws the same examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtnf.config import WindowsConfig
from rtnf.errors import ConfigError
from rtnf.tokens import (TokenSpec, WindowTokens, tokenize_window, tokenize_windows,
                         tokens_to_counts, tokens_to_spikes, window_ends)

GRAIN = 1e-5  # seconds per grain: the integer time unit of the reference
PROPERTY_SETTINGS = settings(derandomize=True, max_examples=150, deadline=None)


@dataclass
class Case:
    """Windows, a sorted spike train and window ends, with every time in whole grains."""

    windows: WindowsConfig
    res: int  # dt_resolution in grains
    n_units: int
    spike_grains: np.ndarray
    spike_units: np.ndarray
    end_grains: np.ndarray

    @property
    def spec(self) -> TokenSpec:
        return TokenSpec.from_config(self.windows, self.n_units)

    @property
    def spike_times(self) -> np.ndarray:
        return self.spike_grains * GRAIN

    @property
    def ends(self) -> np.ndarray:
        return self.end_grains * GRAIN

    def window_start(self, end: int, window: str) -> int:
        return end - self.spec.layout(window).bins_before_end * self.res


@st.composite
def cases(draw: st.DrawFn) -> Case:
    res = draw(st.sampled_from([500, 1000, 2000]))  # 5, 10, 20 ms
    current_bins = draw(st.integers(1, 6))
    history_bins = draw(st.integers(0, 8))
    windows = WindowsConfig(
        hop=draw(st.integers(1, current_bins)) * res * GRAIN,
        current=current_bins * res * GRAIN,
        history=history_bins * res * GRAIN,
        dt_resolution=res * GRAIN,
        current_capacity=draw(st.integers(3, 14)),
        history_capacity=draw(st.integers(3, 30)),
    )
    n_units = draw(st.integers(1, 6))
    origin = draw(st.sampled_from([0, 10**8, 37 * 10**10]))  # 0 s, 1000 s, 3.7e6 s
    n_bins = current_bins + history_bins + 4
    on_edge = st.builds(lambda b: b * res, st.integers(0, n_bins))
    just_before_edge = st.builds(lambda b: b * res - 1, st.integers(1, n_bins))
    anywhere = st.integers(0, n_bins * res)
    grains = draw(st.lists(st.one_of(on_edge, just_before_edge, anywhere), max_size=60))
    units = draw(st.lists(st.integers(0, n_units - 1), min_size=len(grains),
                          max_size=len(grains)))
    order = np.lexsort((units, grains))
    ends = draw(st.lists(st.one_of(on_edge, anywhere), min_size=1, max_size=8))
    return Case(windows, res, n_units,
                spike_grains=origin + np.array(grains, dtype=np.int64)[order],
                spike_units=np.array(units, dtype=np.int32)[order],
                end_grains=origin + np.array(ends, dtype=np.int64))


def reference_spikes(case: Case, end: int, window: str) -> list[tuple[int, int]]:
    """(bin, unit) of every spike in the window, in the session's (time, unit) order."""
    layout = case.spec.layout(window)
    start = case.window_start(end, window)
    return [((int(g) - start) // case.res, int(u))
            for g, u in zip(case.spike_grains, case.spike_units)
            if start <= g < start + layout.n_bins * case.res]


def spike_tokens(tokens: WindowTokens) -> list[tuple[int, int]]:
    """(dt, unit) of the spike tokens of one sequence."""
    n = int(tokens.n_spikes)
    return list(zip(tokens.dts[1:n + 1].tolist(), tokens.units[1:n + 1].tolist()))


def each_window(case: Case):
    """(window end in grains, window name, that window's tokens) for every end of the case."""
    for end, seconds in zip(case.end_grains, case.ends):
        sample = tokenize_window(case.spike_times, case.spike_units, seconds, case.spec)
        for window in ("current", "history"):
            yield int(end), window, getattr(sample, window)


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(cases())
def test_tokens_match_the_integer_reference(case: Case) -> None:
    """Keep the latest capacity-2 spikes, order them by bin then unit, frame them in SOS/EOS/PAD."""
    spec = case.spec
    for end, window, tokens in each_window(case):
        layout = spec.layout(window)
        in_window = reference_spikes(case, end, window)
        kept = in_window[len(in_window) - min(len(in_window), layout.max_spikes):]
        assert spike_tokens(tokens) == sorted(kept)
        assert int(tokens.truncated) == len(in_window) - len(kept)
        n = int(tokens.n_spikes)
        assert tokens.units.shape == tokens.dts.shape == (layout.capacity,)
        assert (tokens.units[0], tokens.dts[0]) == (spec.unit_sos, layout.dt_sos)
        assert (tokens.units[n + 1], tokens.dts[n + 1]) == (spec.unit_eos, layout.dt_eos)
        assert np.all(tokens.units[n + 2:] == spec.unit_pad)
        assert np.all(tokens.dts[n + 2:] == layout.dt_pad)
        assert np.array_equal(tokens.padding_mask, np.arange(layout.capacity) >= n + 2)


@PROPERTY_SETTINGS
@given(cases())
def test_tokens_are_ordered_by_bin_then_unit(case: Case) -> None:
    for _, _, tokens in each_window(case):
        pairs = spike_tokens(tokens)
        assert pairs == sorted(pairs)


@PROPERTY_SETTINGS
@given(cases())
def test_capacity_keeps_the_latest_spikes_and_counts_the_rest(case: Case) -> None:
    for end, window, tokens in each_window(case):
        layout = case.spec.layout(window)
        in_window = reference_spikes(case, end, window)
        assert int(tokens.n_spikes) <= layout.max_spikes
        assert int(tokens.n_spikes) + int(tokens.truncated) == len(in_window)
        if tokens.truncated:
            earliest_kept_bin = min(dt for dt, _ in spike_tokens(tokens))
            dropped_bins = [b for b, _ in in_window[:int(tokens.truncated)]]
            assert max(dropped_bins) <= earliest_kept_bin


@PROPERTY_SETTINGS
@given(cases())
def test_round_trip_to_binned_counts(case: Case) -> None:
    """tokens -> counts equals integer binning of the kept spikes (all of them if none dropped)."""
    spec = case.spec
    for end, window, tokens in each_window(case):
        layout = spec.layout(window)
        expected = np.zeros((spec.n_units, layout.n_bins), dtype=np.int64)
        for b, u in reference_spikes(case, end, window)[int(tokens.truncated):]:
            expected[u, b] += 1
        counts = tokens_to_counts(tokens.units, tokens.dts, spec, window)
        assert np.array_equal(counts, expected)


@PROPERTY_SETTINGS
@given(cases())
def test_round_trip_through_spike_times(case: Case) -> None:
    """tokens -> spike times (bin centres) -> tokens gives the same sequence back."""
    spec = case.spec
    for end, window, tokens in each_window(case):
        times, units = tokens_to_spikes(tokens.units, tokens.dts, end * GRAIN, spec, window)
        assert np.all(np.diff(times) >= 0)
        again = getattr(tokenize_window(times, units, end * GRAIN, spec), window)
        assert np.array_equal(again.units, tokens.units)
        assert np.array_equal(again.dts, tokens.dts)


@PROPERTY_SETTINGS
@given(cases())
def test_batch_equals_one_window_at_a_time(case: Case) -> None:
    batch = tokenize_windows(case.spike_times, case.spike_units, case.ends, case.spec)
    assert batch.current.units.shape == (case.ends.size, case.windows.current_capacity)
    for row, seconds in enumerate(case.ends):
        single = tokenize_window(case.spike_times, case.spike_units, seconds, case.spec)
        for window in ("current", "history"):
            got, want = getattr(batch[row], window), getattr(single, window)
            for field in ("units", "dts", "n_spikes", "truncated"):
                assert np.array_equal(getattr(got, field), getattr(want, field))
    counts = tokens_to_counts(batch.history.units, batch.history.dts, case.spec, "history")
    for row in range(case.ends.size):
        one = tokens_to_counts(batch.history.units[row], batch.history.dts[row], case.spec,
                               "history")
        assert np.array_equal(counts[row], one)


@PROPERTY_SETTINGS
@given(cases(), st.booleans())
def test_windows_tile_the_session_and_edges_just_hold_fewer_spikes(case: Case,
                                                                   full_history: bool) -> None:
    start = int(case.spike_grains[0]) if case.spike_grains.size else int(case.end_grains[0])
    stop = start + 25 * case.res
    ends = window_ends(start * GRAIN, stop * GRAIN, case.windows, full_history)
    spec = case.spec
    first = start + spec.current.bins_before_end * case.res
    if full_history:
        first = start + spec.history.bins_before_end * case.res
    hop = round(case.windows.hop / GRAIN)
    assert np.array_equal(np.rint(ends / GRAIN).astype(np.int64),
                          np.arange(first, stop + 1, hop))
    samples = tokenize_windows(case.spike_times, case.spike_units, ends, spec)
    for row, end in enumerate(np.rint(ends / GRAIN).astype(np.int64)):
        for window in ("current", "history"):
            tokens = getattr(samples, window)[row]
            in_window = reference_spikes(case, int(end), window)
            assert int(tokens.n_spikes) + int(tokens.truncated) == len(in_window)


# ---------------------------------------------------------------------------------------------
# Exact edges
# ---------------------------------------------------------------------------------------------

SPEC = TokenSpec.from_config(WindowsConfig(), n_units=4)  # 10 ms bins, current 50 ms, history 150


def current_pairs(times: list[float], units: list[int], end: float) -> list[tuple[int, int]]:
    sample = tokenize_window(np.array(times), np.array(units), end, SPEC)
    return spike_tokens(sample.current)


def test_spike_on_a_bin_edge_goes_to_the_later_bin() -> None:
    # 0.1 and 0.13 are bin edges; 0.1 + 0.03 is 0.13000000000000003 and 0.3 - 0.17 is
    # 0.12999999999999998: float error on either side of the edge must not move them.
    assert current_pairs([0.1, 0.1 + 0.03, 0.3 - 0.17], [0, 1, 2], end=0.15) == [
        (0, 0), (3, 1), (3, 2)]


def test_window_edges() -> None:
    end = 0.15
    # 0.1 opens the current window (and closes the history); 0.15 belongs to the next window;
    # one tick (1 us) before the end stays in the last bin.
    sample = tokenize_window(np.array([0.1 - 1e-6, 0.1, end - 1e-6, end]), np.array([0, 1, 2, 3]),
                             end, SPEC)
    assert spike_tokens(sample.current) == [(0, 1), (4, 2)]
    assert spike_tokens(sample.history) == [(14, 0)]
    assert spike_tokens(tokenize_window(np.array([end]), np.array([3]), end + 0.05,
                                        SPEC).current) == [(0, 3)]


def test_within_half_a_tick_of_an_edge_counts_as_on_it() -> None:
    assert current_pairs([0.15 - 1e-9], [0], end=0.15) == []
    assert current_pairs([0.15 - 1e-9], [0], end=0.2) == [(0, 0)]


@pytest.mark.parametrize("offset", [0.0, 1000.0, 3.7e6, 1.7e9])
def test_float_bin_edges_at_any_clock_offset(offset: float) -> None:
    """Edges written three float ways (k*res, k/100, a running sum) all land in bin k."""
    k = np.arange(1000)
    running_sum = np.cumsum(np.full(k.size, 0.01)) - 0.01
    ends = offset + 0.05 * np.arange(1, 201)
    for edges in (offset + k * 0.01, offset + k / 100, offset + running_sum):
        batch = tokenize_windows(edges, np.zeros(k.size, dtype=np.int32), ends, SPEC)
        counts = tokens_to_counts(batch.current.units, batch.current.dts, SPEC)
        assert np.all(counts[:, 0] == 1)  # every window: one spike in each of its 5 bins
        assert np.all(counts[:, 1:] == 0)


def test_repeated_spikes_give_identical_tokens() -> None:
    assert current_pairs([0.111, 0.112, 0.113, 0.114], [2, 1, 2, 1], end=0.15) == [
        (1, 1), (1, 1), (1, 2), (1, 2)]


# ---------------------------------------------------------------------------------------------
# Vocabulary and the inverse on generated sequences
# ---------------------------------------------------------------------------------------------


def test_vocabulary_layout() -> None:
    spec = TokenSpec.from_config(WindowsConfig(), n_units=2023)
    assert (spec.unit_sos, spec.unit_eos, spec.unit_pad, spec.unit_vocab_size) == (
        2023, 2024, 2025, 2026)
    assert (spec.current.n_bins, spec.current.dt_sos, spec.current.dt_eos, spec.current.dt_pad,
            spec.current.dt_vocab_size, spec.current.max_spikes) == (5, 5, 6, 7, 8, 98)
    assert (spec.history.n_bins, spec.history.dt_vocab_size, spec.history.max_spikes) == (
        15, 18, 698)
    assert (spec.current.bins_before_end, spec.history.bins_before_end) == (5, 20)


def test_windows_must_be_whole_bins() -> None:
    with pytest.raises(ConfigError, match="windows.current"):
        TokenSpec.from_config(WindowsConfig(current=0.055), n_units=3)


def test_inverse_skips_special_tokens_and_stops_at_eos() -> None:
    c = SPEC.current
    units = np.array([SPEC.unit_sos, 1, SPEC.unit_pad, 3, 2, SPEC.unit_eos, 0])
    dts = np.array([c.dt_sos, 2, 4, c.dt_pad, 0, c.dt_eos, 1])
    counts = tokens_to_counts(units, dts, SPEC)
    expected = np.zeros((4, 5), dtype=np.int64)
    expected[1, 2] = expected[2, 0] = 1
    assert np.array_equal(counts, expected)
    times, spike_units = tokens_to_spikes(units, dts, 1.0, SPEC)
    assert np.allclose(times, [0.975, 0.955]) and spike_units.tolist() == [1, 2]
    # a generated sequence that stops with EOS only in the dt stream ends there too
    assert tokens_to_counts(np.array([0, 1]), np.array([c.dt_eos, 0]), SPEC).sum() == 0
