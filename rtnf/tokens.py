"""Spikes <-> Neuroformer's (unit, dt) tokens, vectorised, with integer time arithmetic.

A sample is keyed by its window end t (seconds). Its current window is [t - current, t) and its
history window is [t - current - history, t - current). Each spike in a window becomes one token
(unit, dt): `unit` is the spike's unit index (its position in `Session.unit_ids`) and `dt` the index
of its `dt_resolution` bin counted from the start of ITS window (history dts count from the history
window's start). Tokens are ordered by bin, then unit; a unit with k spikes in a bin gives k
identical tokens. Each window becomes a fixed-length sequence

    [SOS, spike tokens..., EOS, PAD, ...]    (length = the window's capacity)

so at most capacity - 2 spikes fit; on overflow the latest spikes are kept and the earlier ones are
dropped and counted (`WindowTokens.truncated`).

Vocabularies (`TokenSpec`, `WindowLayout`):
    unit ids  0..N-1 are the units, then SOS = N, EOS = N + 1, PAD = N + 2 (size N + 3); shared
              by both windows.
    dt ids    0..B-1 are the window's bins, then SOS = B, EOS = B + 1, PAD = B + 2 (size B + 3),
              where B is the window's own bin count (current / dt_resolution for the current
              window, history / dt_resolution for the history), so each window has its own.

The bin-edge rule: every time (spike or window end) is snapped once to an integer tick,
rint(t / tick), on a grid of tick = dt_resolution / TICKS_PER_BIN (1 us at 10 ms bins) anchored at
time 0; from then on all arithmetic is on integers. A window is a whole number of bins, so its
bounds are whole ticks, and a spike's bin is (spike tick - window start tick) // TICKS_PER_BIN.
Hence a spike exactly on a bin edge (t = 0.1 with 10 ms bins, whatever float error 0.1 carries)
goes to the later bin, a spike one tick or more before a window end stays in the window's last bin,
and only a spike within half a tick of an edge counts as on it. Window membership and bins come
from the same ticks, so they always agree. float64 keeps the tick exact while |t| / tick < 2**51
(|t| < 2e9 s at 10 ms bins: any recording clock, LSL's, or Unix time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from rtnf.config import WindowsConfig

TICKS_PER_BIN = 10_000
"""Integer time ticks per `dt_resolution` bin (the tick grid of the bin-edge rule above)."""

WindowName = Literal["current", "history"]


# ---------------------------------------------------------------------------------------------
# Vocabulary and layout
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowLayout:
    """How one window (current or history) is cut from a window end t and laid out as tokens.

    The window is [t - bins_before_end * res, t - (bins_before_end - n_bins) * res), res being
    `dt_resolution`; its dt ids are 0..n_bins-1 followed by its own SOS, EOS and PAD.
    """

    n_bins: int
    bins_before_end: int
    capacity: int

    @property
    def max_spikes(self) -> int:
        """Spike tokens that fit between SOS and EOS."""
        return self.capacity - 2

    @property
    def dt_sos(self) -> int:
        return self.n_bins

    @property
    def dt_eos(self) -> int:
        return self.n_bins + 1

    @property
    def dt_pad(self) -> int:
        return self.n_bins + 2

    @property
    def dt_vocab_size(self) -> int:
        return self.n_bins + 3


@dataclass(frozen=True)
class TokenSpec:
    """The token vocabularies and both windows' layouts for `n_units` units."""

    n_units: int
    dt_resolution: float
    current: WindowLayout
    history: WindowLayout

    @classmethod
    def from_config(cls, windows: WindowsConfig, n_units: int) -> TokenSpec:
        current_bins = windows.bins("current")
        history_bins = windows.bins("history")
        return cls(
            n_units=n_units,
            dt_resolution=windows.dt_resolution,
            current=WindowLayout(current_bins, current_bins, windows.current_capacity),
            history=WindowLayout(history_bins, current_bins + history_bins,
                                 windows.history_capacity),
        )

    @property
    def unit_sos(self) -> int:
        return self.n_units

    @property
    def unit_eos(self) -> int:
        return self.n_units + 1

    @property
    def unit_pad(self) -> int:
        return self.n_units + 2

    @property
    def unit_vocab_size(self) -> int:
        return self.n_units + 3

    def layout(self, window: WindowName) -> WindowLayout:
        """The layout of the window called `window` ("current" or "history")."""
        return {"current": self.current, "history": self.history}[window]


def to_ticks(times: np.ndarray | float, dt_resolution: float) -> np.ndarray:
    """Seconds -> integer ticks of dt_resolution / TICKS_PER_BIN (the module's bin-edge rule)."""
    return np.rint(np.asarray(times, dtype=np.float64) * (TICKS_PER_BIN / dt_resolution)).astype(
        np.int64)


def to_seconds(ticks: np.ndarray, dt_resolution: float) -> np.ndarray:
    """Integer ticks -> seconds (float64), the inverse of `to_ticks` on the tick grid."""
    return ticks / (TICKS_PER_BIN / dt_resolution)


# ---------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------


def window_ends(start: float, end: float, windows: WindowsConfig,
                full_history: bool = False) -> np.ndarray:
    """The window ends t (seconds, float64, increasing) that tile the span [start, end].

    The first is start + current, the first window whose current window lies inside the span (its
    history then starts before `start` and simply holds fewer spikes); with `full_history` it is
    start + current + history instead, so that every history window lies inside the span too.
    Then one every `hop`, the last at most `end`. The ends lie on the tick grid of the bin-edge
    rule, so each is exactly the tick the tokenizer uses.
    """
    first_bins = windows.bins("current")
    if full_history:
        first_bins += windows.bins("history")
    first = to_ticks(start, windows.dt_resolution) + first_bins * TICKS_PER_BIN
    last = to_ticks(end, windows.dt_resolution)
    hop = windows.bins("hop") * TICKS_PER_BIN
    return to_seconds(np.arange(first, last + 1, hop, dtype=np.int64), windows.dt_resolution)


def window_start_bins(ends: np.ndarray, spec: TokenSpec) -> tuple[np.ndarray, np.ndarray]:
    """Absolute bin indices (int64) of the current and history windows' starts for `ends`.

    Bins count `dt_resolution` steps on one grid for all windows of a stream (the grid of the
    window starts, which differ by whole bins), so a token's absolute bin, its window's start bin
    plus its dt, is the same in every window that holds the spike.
    """
    end_ticks = to_ticks(np.atleast_1d(ends), spec.dt_resolution)
    end_bins = end_ticks // TICKS_PER_BIN  # floor: the same offset for every end on one grid
    return (end_bins - spec.current.bins_before_end, end_bins - spec.history.bins_before_end)


def absolute_bins(spike_times: np.ndarray, window_end: float, spec: TokenSpec) -> np.ndarray:
    """Absolute bins (int64) of spikes on the grid of `window_start_bins` for windows ending at
    `window_end` (or any end a whole number of bins from it): the start bin of any window plus
    the spike's dt in that window."""
    end_tick = int(to_ticks(window_end, spec.dt_resolution))
    offset = end_tick % TICKS_PER_BIN
    return (to_ticks(spike_times, spec.dt_resolution) - offset) // TICKS_PER_BIN


# ---------------------------------------------------------------------------------------------
# Spikes -> tokens
# ---------------------------------------------------------------------------------------------


@dataclass
class WindowTokens:
    """The token sequences of one window kind, for one sample or a batch of samples.

    `units` and `dts` are int64 of shape (capacity,) for one sample, (n_windows, capacity) for a
    batch: [SOS, spike tokens..., EOS, PAD...]. `n_spikes` (int64: a scalar for one sample,
    (n_windows,) for a batch) counts the spike tokens kept, so a sequence holds n_spikes + 2
    tokens before its padding; `truncated` counts the earliest spikes dropped for lack of room.
    """

    units: np.ndarray
    dts: np.ndarray
    n_spikes: np.ndarray
    truncated: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        """Tokens before the padding (SOS, spikes, EOS)."""
        return self.n_spikes + 2

    @property
    def padding_mask(self) -> np.ndarray:
        """True at PAD positions; same shape as `units`."""
        return np.arange(self.units.shape[-1]) >= self.lengths[..., None]

    def __getitem__(self, index: int | slice | np.ndarray) -> WindowTokens:
        """The sample(s) at `index` of a batch."""
        return WindowTokens(self.units[index], self.dts[index], self.n_spikes[index],
                            self.truncated[index])


@dataclass
class SampleTokens:
    """The current and history token sequences of one sample (or of a batch of samples)."""

    current: WindowTokens
    history: WindowTokens

    def __getitem__(self, index: int | slice | np.ndarray) -> SampleTokens:
        """The sample(s) at `index` of a batch."""
        return SampleTokens(self.current[index], self.history[index])


def tokenize_windows(spike_times: np.ndarray, spike_units: np.ndarray, ends: np.ndarray,
                     spec: TokenSpec) -> SampleTokens:
    """Tokenize the samples ending at each of `ends` (window ends in seconds, any order) at once.

    `spike_times` (float64 seconds, sorted) and `spike_units` (unit indices) are a session's
    spikes, as in `Session.spike_times` and `Session.spike_unit_index`. Returns arrays of shape
    (n_windows, capacity). Only the spikes spanned by the windows are read, so the cost grows with
    the spikes in the windows, not in the session.
    """
    end_ticks = to_ticks(np.atleast_1d(ends), spec.dt_resolution)
    span = (0, 0)
    if end_ticks.size:
        # The spikes the windows span, cut in seconds with one tick of margin each side; each
        # window then takes its own exactly, on ticks.
        span_ticks = np.array([
            end_ticks.min() - spec.history.bins_before_end * TICKS_PER_BIN - 1,
            end_ticks.max() + 1,
        ])
        span = np.searchsorted(spike_times, to_seconds(span_ticks, spec.dt_resolution))
    ticks = to_ticks(spike_times[span[0]:span[1]], spec.dt_resolution)
    units = np.asarray(spike_units[span[0]:span[1]], dtype=np.int64)
    return SampleTokens(
        current=_window_sequences(ticks, units, end_ticks, spec.current, spec),
        history=_window_sequences(ticks, units, end_ticks, spec.history, spec),
    )


def tokenize_window(spike_times: np.ndarray, spike_units: np.ndarray, window_end: float,
                    spec: TokenSpec) -> SampleTokens:
    """Tokenize the one sample ending at `window_end` (the real-time path): arrays (capacity,)."""
    return tokenize_windows(spike_times, spike_units, np.array([window_end]), spec)[0]


def tokenize_current(spike_times: np.ndarray, spike_units: np.ndarray, window_end: float,
                     spec: TokenSpec) -> WindowTokens:
    """The current window's tokens of the one sample ending at `window_end` (arrays
    (capacity,)), for a loop that keeps the history's keys/values cached and needs no history
    tokens. `spike_times` must hold at least the window's spikes, sorted."""
    end_ticks = to_ticks(np.array([window_end]), spec.dt_resolution)
    ticks = to_ticks(spike_times, spec.dt_resolution)
    units = np.asarray(spike_units, dtype=np.int64)
    return _window_sequences(ticks, units, end_ticks, spec.current, spec)[0]


def _window_sequences(ticks: np.ndarray, units: np.ndarray, end_ticks: np.ndarray,
                      layout: WindowLayout, spec: TokenSpec) -> WindowTokens:
    """One window kind's sequences for every window end, from sorted spike ticks and units."""
    n_windows = end_ticks.size
    starts = end_ticks - layout.bins_before_end * TICKS_PER_BIN
    first = np.searchsorted(ticks, starts)
    stop = np.searchsorted(ticks, starts + layout.n_bins * TICKS_PER_BIN)
    in_window = stop - first
    kept = np.minimum(in_window, layout.max_spikes)

    # Gather each window's latest `kept` spikes, window after window, in time order.
    row_offsets = np.cumsum(kept) - kept
    total = int(kept.sum())
    within_row = np.arange(total) - np.repeat(row_offsets, kept)
    spikes = np.repeat(stop - kept, kept) + within_row
    rows = np.repeat(np.arange(n_windows), kept)
    bins = (ticks[spikes] - starts[rows]) // TICKS_PER_BIN
    spike_units = units[spikes]

    # Within a bin, order by unit (spikes arrive ordered by time, not by unit).
    order = np.argsort((rows * layout.n_bins + bins) * spec.n_units + spike_units, kind="stable")

    shape = (n_windows, layout.capacity)
    token_units = np.full(shape, spec.unit_pad, dtype=np.int64)
    token_dts = np.full(shape, layout.dt_pad, dtype=np.int64)
    token_units[:, 0], token_dts[:, 0] = spec.unit_sos, layout.dt_sos
    token_units[rows, within_row + 1] = spike_units[order]
    token_dts[rows, within_row + 1] = bins[order]
    every_row = np.arange(n_windows)
    token_units[every_row, kept + 1], token_dts[every_row, kept + 1] = spec.unit_eos, layout.dt_eos
    return WindowTokens(token_units, token_dts, kept.astype(np.int64),
                        (in_window - kept).astype(np.int64))


# ---------------------------------------------------------------------------------------------
# Tokens -> spikes (the inverse, for generated sequences too)
# ---------------------------------------------------------------------------------------------


def _spike_token_mask(units: np.ndarray, dts: np.ndarray, spec: TokenSpec,
                      layout: WindowLayout) -> np.ndarray:
    """True at the tokens that are spikes: a real unit and a real bin, before the first EOS.

    A sequence ends at the first position whose unit or dt is EOS; SOS, PAD and any other
    special id before it are skipped (a generated sequence need not be well formed).
    """
    ended = np.cumsum((units == spec.unit_eos) | (dts == layout.dt_eos), axis=-1) > 0
    real_unit = (units >= 0) & (units < spec.n_units)
    real_bin = (dts >= 0) & (dts < layout.n_bins)
    return ~ended & real_unit & real_bin


def tokens_to_counts(units: np.ndarray, dts: np.ndarray, spec: TokenSpec,
                     window: WindowName = "current") -> np.ndarray:
    """Spike counts per unit and bin, int64 (..., n_units, n_bins), of sequences (..., length).

    Special tokens are ignored and each sequence stops at its first EOS (`_spike_token_mask`).
    """
    layout = spec.layout(window)
    leading = np.shape(units)[:-1]
    units = np.asarray(units).reshape(-1, np.shape(units)[-1])  # one row per sequence
    dts = np.asarray(dts).reshape(units.shape)
    row, position = np.nonzero(_spike_token_mask(units, dts, spec, layout))
    cell = (row * spec.n_units + units[row, position]) * layout.n_bins + dts[row, position]
    counts = np.bincount(cell, minlength=units.shape[0] * spec.n_units * layout.n_bins)
    return counts.reshape(leading + (spec.n_units, layout.n_bins))


def tokens_to_spikes(units: np.ndarray, dts: np.ndarray, window_end: float, spec: TokenSpec,
                     window: WindowName = "current") -> tuple[np.ndarray, np.ndarray]:
    """Spike times (float64 seconds) and unit indices (int64) of one sequence (length,).

    Each spike is placed at the centre of its bin, window start + (dt + 0.5) * dt_resolution, so
    tokenizing the result again gives the same tokens. Special tokens are ignored and the sequence
    stops at its first EOS (`_spike_token_mask`); the spikes come ordered by time, then unit, if
    the tokens were ordered by bin, then unit.
    """
    layout = spec.layout(window)
    units, dts = np.asarray(units), np.asarray(dts)
    is_spike = _spike_token_mask(units, dts, spec, layout)
    bin_centres_before_end = layout.bins_before_end - (dts[is_spike] + 0.5)
    times = window_end - bin_centres_before_end * spec.dt_resolution
    return times, units[is_spike].astype(np.int64)
