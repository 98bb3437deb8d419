"""Sessions -> windows -> batches of `ModelInputs` / `ModelTargets` (rtnf/model/inputs.py).

A sample is keyed by its window end t (rtnf.tokens). Everything a sample reads comes from before
t, and everything it is scored against from the window itself or after it:
- tokens: the current and history windows (`rtnf.tokens.tokenize_windows`);
- behaviour (targets and inputs): the last sample strictly before t; a window with no earlier
  sample takes the session's first one, so values are never missing;
- stimulus clip: the last T frames strictly before t (T = `ModelDims.frame_shape[0]`). A clip that
  reaches back past the first frame repeats the first frame; a window before any frame was shown
  gets a blank (zero) clip. No frame at or after t is ever used (the original's clip leaked one);
- rate target: each unit's spike count in the next window [t, t + next_window).
"Strictly before t" follows the tokenizer's bin-edge rule: a time within half a tick of t counts
as at t (`rtnf.tokens`), so float noise in recorded timestamps cannot let a frame shown at t in.

Held-out time is one contiguous trailing block per session with a gap before it
(`contiguous_split`): neighbouring windows share history, so interleaved windows would leak
(NEUROFORMER.md, "Defects of the original code").

Behaviour is standardised (regression) or binned into quantile classes (classification) with a
`Normalization` fitted on training windows only and saved with the weights (normalization.json).
A batch holds windows of one session, so one set of unit rows (`Vocabulary`) serves it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from rtnf.config import Config, WindowsConfig
from rtnf.data.session import Session
from rtnf.errors import RtnfError
from rtnf.model.inputs import ModelInputs, ModelTargets, inputs_from_tokens
from rtnf.model.spec import ModelDims, ModelSpec, dims_from_config
from rtnf.model.vocabulary import Vocabulary, session_key
from rtnf.tokens import (TICKS_PER_BIN, SampleTokens, TokenSpec, tokenize_windows, window_ends,
                         window_start_bins)

STD_FLOOR = 1e-3
"""Smallest standard deviation used to standardise a behaviour channel (physical units)."""

MIN_BATCH = 2
"""Fewest windows in a batch: the contrastive loss contrasts each window with the others."""

Split = Literal["train", "validation"]


def _edge_tolerance(dt_resolution: float) -> float:
    """Half a tokenizer tick: times closer than this to a window end count as at the end."""
    return 0.5 * dt_resolution / TICKS_PER_BIN


def _last_before(timestamps: np.ndarray, ends: np.ndarray, tolerance: float) -> np.ndarray:
    """Index of the last timestamp strictly before each end (-1 where there is none)."""
    return np.searchsorted(timestamps, ends - tolerance, side="left") - 1


# ---------------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------------


@dataclass
class Normalization:
    """Per behaviour channel mean and std, and per classified target its class bin edges.

    `class_edges[name]` holds the n_classes - 1 inner edges (training quantiles); class k is
    [edge k-1, edge k), so values map to 0..n_classes-1. Tied training values give repeated
    edges, and the classes between them stay empty.
    """

    mean: dict[str, float]
    std: dict[str, float]
    class_edges: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def fit(cls, values: dict[str, np.ndarray], classified: Sequence[str] = (),
            n_classes: int = 0) -> Normalization:
        """Fit on training `values` (name -> samples); quantile classes for `classified` names."""
        quantiles = np.arange(1, n_classes) / n_classes
        return cls(
            mean={name: float(np.mean(v)) for name, v in values.items()},
            std={name: max(float(np.std(v)), STD_FLOOR) for name, v in values.items()},
            class_edges={name: np.quantile(values[name], quantiles).tolist()
                         for name in classified},
        )

    def standardize(self, name: str, values: np.ndarray) -> np.ndarray:
        return (np.asarray(values, dtype=np.float64) - self.mean[name]) / self.std[name]

    def unstandardize(self, name: str, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float64) * self.std[name] + self.mean[name]

    def classify(self, name: str, values: np.ndarray) -> np.ndarray:
        """Class ids (int64, 0..n_classes-1) of `values`."""
        return np.searchsorted(self.class_edges[name], values, side="right").astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": dict(self.mean), "std": dict(self.std),
                "class_edges": {name: list(edges) for name, edges in self.class_edges.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalization:
        return cls(mean={str(k): float(v) for k, v in data["mean"].items()},
                   std={str(k): float(v) for k, v in data["std"].items()},
                   class_edges={str(k): [float(e) for e in v]
                                for k, v in data.get("class_edges", {}).items()})


# ---------------------------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------------------------


def contiguous_split(ends: np.ndarray, fraction: float, windows: WindowsConfig,
                     next_window: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Split one session's window ends (increasing) into a leading and a trailing block.

    The trailing block is the last ceil(fraction * n) windows (none for fraction 0). The leading
    block is every earlier window whose end is at most t0 - gap, t0 being the first trailing
    end and gap = current + max(history, next_window) seconds: the trailing block's history and
    current windows ([t0 - current - history, ...)) then never overlap a leading window's current
    window, nor does a leading window's next-window rate target [t, t + next_window) reach a
    trailing current window. The windows in the gap are dropped. The blocks are never
    interleaved.
    """
    ends = np.asarray(ends, dtype=np.float64)
    n_trailing = min(ends.size, math.ceil(fraction * ends.size - 1e-9))
    if n_trailing == 0:
        return ends, ends[:0]
    leading, trailing = ends[:ends.size - n_trailing], ends[ends.size - n_trailing:]
    gap = windows.current + max(windows.history, next_window)
    last_leading_end = trailing[0] - gap + _edge_tolerance(windows.dt_resolution)
    return leading[leading <= last_leading_end], trailing


# ---------------------------------------------------------------------------------------------
# One session's windows
# ---------------------------------------------------------------------------------------------


def _require_channels(session: Session, names: Sequence[str]) -> None:
    missing = [name for name in names if name not in session.behavior]
    if missing:
        raise RtnfError(f"session {session_key(session)}: no behaviour channel "
                        f"{', '.join(missing)} (has: {', '.join(session.behavior) or 'none'})")


def _require_frames(session: Session, frame_size: tuple[int, int]) -> None:
    if session.frames is None:
        raise RtnfError(f"session {session_key(session)}: no stimulus frames, but the model "
                        f"reads {frame_size[0]}x{frame_size[1]} frames")
    size = tuple(session.frames.images.shape[1:])
    if size != tuple(frame_size):
        raise RtnfError(f"session {session_key(session)}: frames are {size[0]}x{size[1]} pixels, "
                        f"expected {frame_size[0]}x{frame_size[1]} like the other sessions")


def behavior_before(session: Session, names: Sequence[str], ends: np.ndarray,
                    dt_resolution: float) -> dict[str, np.ndarray]:
    """Each channel's last sample strictly before each end (physical units, float64).

    Ends before a channel's first sample take that first sample.
    """
    _require_channels(session, names)
    tolerance = _edge_tolerance(dt_resolution)
    values = {}
    for name in names:
        channel = session.behavior[name]
        values[name] = channel.values[np.maximum(
            _last_before(channel.timestamps, ends, tolerance), 0)]
    return values


def encode_values(values: dict[str, np.ndarray], encode: Callable[[str, np.ndarray], np.ndarray],
                  n_windows: int, dtype: type) -> np.ndarray:
    """(n_windows, channels) array of each channel's `encode(name, values)`, also for none."""
    columns = [encode(name, v) for name, v in values.items()]
    return np.ascontiguousarray(np.asarray(columns, dtype=dtype).reshape(len(columns),
                                                                         n_windows).T)


class SessionWindows:
    """One session's windows, precomputed for training and evaluation.

    Tokens, start bins, behaviour targets and inputs, frame-clip indices and the spans of the
    next-window spikes are computed for all `ends` at construction (vectorised); `batch` gathers
    the frames and counts the next-window spikes of the windows it is asked for, so memory grows
    with the windows, not with windows x units or windows x pixels.
    """

    def __init__(self, session: Session, ends: np.ndarray, spec: TokenSpec, dims: ModelDims,
                 normalization: Normalization, unit_rows: np.ndarray, session_row: int,
                 next_window: float) -> None:
        self.session = session
        self.ends = np.asarray(ends, dtype=np.float64)
        self.dims = dims
        self.spec = spec
        self.next_window = next_window
        self.unit_rows = torch.as_tensor(unit_rows, dtype=torch.long)
        self.session_row = torch.tensor(session_row, dtype=torch.long)
        tolerance = _edge_tolerance(spec.dt_resolution)

        self.tokens: SampleTokens = tokenize_windows(session.spike_times,
                                                     session.spike_unit_index, self.ends, spec)
        self.current_start_bin, self.history_start_bin = window_start_bins(self.ends, spec)

        n_windows = self.ends.size
        targets = behavior_before(session, dims.behavior_targets, self.ends, spec.dt_resolution)
        if dims.objective == "classification":
            self.behavior_targets = encode_values(targets, normalization.classify, n_windows, np.int64)
        else:
            self.behavior_targets = encode_values(targets, normalization.standardize, n_windows,
                                             np.float32)
        inputs = behavior_before(session, dims.behavior_inputs, self.ends, spec.dt_resolution)
        self.behavior_inputs = (encode_values(inputs, normalization.standardize, n_windows, np.float32)
                                if inputs else None)

        # Spikes of the next window [t, t + next_window), as index spans into the session's
        # spikes (on the same edge rule as the tokens).
        self.next_first = np.searchsorted(session.spike_times, self.ends - tolerance)
        self.next_stop = np.searchsorted(session.spike_times,
                                         self.ends + next_window - tolerance)

        # Frame indices of each clip, oldest first; -1 marks a blank frame (none shown yet).
        self.frame_clips: np.ndarray | None = None
        if dims.frame_shape is not None:
            _require_frames(session, dims.frame_shape[1:])
            last = _last_before(session.frames.timestamps, self.ends, tolerance)
            clips = np.maximum(last[:, None] + np.arange(1 - dims.frame_shape[0], 1), 0)
            clips[last < 0] = -1
            self.frame_clips = clips

    def __len__(self) -> int:
        return int(self.ends.size)

    def next_counts(self, indices: np.ndarray) -> np.ndarray:
        """Spikes of each unit in the next window of the windows at `indices`: (B, N) int64."""
        first, stop = self.next_first[indices], self.next_stop[indices]
        per_window = stop - first
        rows = np.repeat(np.arange(indices.size), per_window)
        within = np.arange(rows.size) - np.repeat(np.cumsum(per_window) - per_window, per_window)
        units = self.session.spike_unit_index[np.repeat(first, per_window) + within]
        n_units = self.session.n_units
        counts = np.bincount(rows * n_units + units, minlength=indices.size * n_units)
        return counts.reshape(indices.size, n_units)

    def mean_next_counts(self) -> np.ndarray:
        """Each unit's mean spike count per next window over these windows (N,): the
        per-unit mean-rate forecast that bits/spike is measured against."""
        return self.next_counts(np.arange(len(self))).mean(axis=0)

    def frames(self, indices: np.ndarray) -> np.ndarray:
        """The stimulus clips of the windows at `indices`: uint8 (B, T, H, W)."""
        clips = self.frame_clips[indices]
        images = self.session.frames.images[np.maximum(clips, 0)]
        images[clips < 0] = 0
        return images

    def batch(self, indices: np.ndarray) -> tuple[ModelInputs, ModelTargets]:
        """The model's inputs and targets for the windows at `indices` (positions in `ends`)."""
        indices = np.asarray(indices, dtype=np.int64)
        inputs = inputs_from_tokens(
            self.tokens[indices], self.ends[indices], self.spec, self.unit_rows, self.session_row,
            frames=None if self.frame_clips is None else self.frames(indices),
            behavior_inputs=None if self.behavior_inputs is None
            else self.behavior_inputs[indices]).trimmed()
        targets = ModelTargets(
            behavior=torch.from_numpy(self.behavior_targets[indices]),
            next_counts=torch.from_numpy(self.next_counts(indices).astype(np.float32)),
        )
        return inputs, targets


# ---------------------------------------------------------------------------------------------
# Several sessions
# ---------------------------------------------------------------------------------------------


class TrainingData:
    """Training and validation windows of several sessions, with shared rows and normalization.

    Per session: windows tile [start, end - next_window] (so every rate target lies inside the
    recording; next_window = windows.current, the length of a window), split by
    `contiguous_split` with `training.validation_fraction`. `train[i]` and `validation[i]` are
    session i's blocks. Unit and session rows come from `vocabulary` (extended with new units
    and sessions; a fresh one when None); the `Normalization` is fitted on the training blocks
    of all sessions.
    """

    def __init__(self, sessions: Sequence[Session], config: Config, dims: ModelDims,
                 vocabulary: Vocabulary | None = None) -> None:
        self.vocabulary = Vocabulary() if vocabulary is None else vocabulary
        self.next_window = config.windows.current
        windows = config.windows
        splits = [contiguous_split(
            window_ends(s.start_time, s.end_time - self.next_window, windows),
            config.training.validation_fraction, windows, self.next_window) for s in sessions]
        if not any(train.size for train, _ in splits):
            raise RtnfError(f"no training windows: the sessions are shorter than one window "
                            f"({windows.current} s) plus the next window ({self.next_window} s)")

        channels = dims.behavior_targets + dims.behavior_inputs
        sampled = [behavior_before(s, channels, train, windows.dt_resolution)
                   for s, (train, _) in zip(sessions, splits)]
        classified = dims.behavior_targets if dims.objective == "classification" else ()
        self.normalization = Normalization.fit(
            {name: np.concatenate([values[name] for values in sampled]) for name in channels},
            classified, dims.n_classes)

        self.train: list[SessionWindows] = []
        self.validation: list[SessionWindows] = []
        for session, (train, validation) in zip(sessions, splits):
            unit_rows, session_row = self.vocabulary.add_session(session)
            spec = TokenSpec.from_config(windows, session.n_units)
            for block, ends in ((self.train, train), (self.validation, validation)):
                block.append(SessionWindows(session, ends, spec, dims, self.normalization,
                                            unit_rows, session_row, self.next_window))

    def split(self, split: Split) -> list[SessionWindows]:
        """The sessions' windows of `split` ("train" or "validation")."""
        return {"train": self.train, "validation": self.validation}[split]

    def _plan(self, split: Split, batch_size: int, rng: np.random.Generator | None = None
              ) -> list[tuple[SessionWindows, np.ndarray]]:
        """(session windows, window indices) of each batch, shuffled by `rng` when given.

        Each batch holds windows of one session; a session's last partial batch is kept when it
        has at least MIN_BATCH windows.
        """
        plan = []
        for windows in self.split(split):
            order = np.arange(len(windows)) if rng is None else rng.permutation(len(windows))
            chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
            plan += [(windows, chunk) for chunk in chunks if chunk.size >= MIN_BATCH]
        if rng is not None:
            plan = [plan[i] for i in rng.permutation(len(plan))]
        return plan

    def batches(self, split: Split, batch_size: int, rng: np.random.Generator,
                shuffle: bool) -> Iterator[tuple[ModelInputs, ModelTargets]]:
        """One epoch of batches of `split`; with `shuffle`, windows and sessions interleave in
        an order drawn from `rng` (the same for the same seed), else in time order per session."""
        for windows, indices in self._plan(split, batch_size, rng if shuffle else None):
            yield windows.batch(indices)

    def epoch_size(self, split: Split, batch_size: int) -> int:
        """Batches in one epoch of `split`."""
        return len(self._plan(split, batch_size))


def dims_for_sessions(sessions: Sequence[Session], config: Config, spec: ModelSpec) -> ModelDims:
    """`ModelDims` for training on `sessions`: frame size and rate (median frame interval) of
    the first session, no stimulus when no session has frames.

    RtnfError (naming the session) when a session lacks a behaviour target or input, lacks
    frames that others have, or has frames of another size.
    """
    for session in sessions:
        _require_channels(session, [*config.decoding.targets, *config.decoding.inputs])
    sizes = [s.frames.images.shape[1:] for s in sessions if s.frames is not None]
    if not sizes:
        return dims_from_config(config, None, None, spec)
    for session in sessions:
        _require_frames(session, sizes[0])
    timestamps = sessions[0].frames.timestamps
    if timestamps.size < 2:
        raise RtnfError(f"session {session_key(sessions[0])}: fewer than 2 stimulus frames, so "
                        "no frame rate")
    frame_rate = 1.0 / float(np.median(np.diff(timestamps)))
    return dims_from_config(config, sizes[0], frame_rate, spec)
