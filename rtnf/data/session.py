"""The `Session`: one recording (spikes, behaviour, stimulus frames, intervals, ground truth).

Every reader returns a `Session` and every writer takes one; `Session.validate()` is the single
place that checks the invariants, so a reader can build one from any file and get the same checks.

Conventions:
- times are float64 seconds on the recording's clock;
- `unit_ids` are the rig's unit identifiers (unique int64); spikes refer to units by their
  position in `unit_ids` (`spike_unit_index`), so tokens and arrays index units 0..N-1;
- spikes are sorted by time, then by unit index;
- behaviour values are in physical units: speed in cm/s, gaze phi/theta in degrees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rtnf.errors import SessionFormatError

BEHAVIOR_UNITS = {"speed": "cm/s", "gaze_phi": "degrees", "gaze_theta": "degrees"}
INTERVAL_NAMES = ("train", "test", "calibration")


def sort_spikes(times: np.ndarray, unit_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spikes in session order: by time, then by unit index."""
    order = np.lexsort((unit_index, times))
    return times[order], unit_index[order]


@dataclass
class BehaviorChannel:
    """One behaviour signal sampled at `timestamps` (seconds), in physical `unit`."""

    timestamps: np.ndarray  # (T,) float64, strictly increasing
    values: np.ndarray  # (T,) float64
    unit: str = ""


@dataclass
class Frames:
    """Stimulus frames shown at `timestamps` (seconds): `images` is uint8 (T, H, W)."""

    timestamps: np.ndarray  # (T,) float64, strictly increasing
    images: np.ndarray  # (T, H, W) uint8


@dataclass
class GroundTruth:
    """What the simulator knows and a real rig never does.

    `rates[k, i]` is unit i's true firing rate (Hz) over [t0 + k*rate_dt, t0 + (k+1)*rate_dt).
    `coupling[i, j]` is the weight of unit j's recent spikes on unit i's log-rate.
    `tuning` holds named per-unit parameter arrays (first axis = unit), e.g. speed gains.
    """

    rate_dt: float
    rates: np.ndarray  # (K, N) float32, Hz
    coupling: np.ndarray  # (N, N) float32
    hubs: np.ndarray  # (H,) int64 unit indices
    tuning: dict[str, np.ndarray] = field(default_factory=dict)
    t0: float = 0.0

    def rate_times(self) -> np.ndarray:
        """Start time of each rate bin."""
        return self.t0 + self.rate_dt * np.arange(self.rates.shape[0])


@dataclass
class Session:
    """One recording. Build it with arrays, then call `validate()` (readers always do)."""

    unit_ids: np.ndarray  # (N,) int64, unique
    spike_times: np.ndarray  # (S,) float64, sorted
    spike_unit_index: np.ndarray  # (S,) int32, position in unit_ids
    behavior: dict[str, BehaviorChannel] = field(default_factory=dict)
    frames: Frames | None = None
    intervals: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (K, 2) [start, stop)
    metadata: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable scalars/strings
    ground_truth: GroundTruth | None = None

    @property
    def n_units(self) -> int:
        return int(self.unit_ids.shape[0])

    @property
    def n_spikes(self) -> int:
        return int(self.spike_times.shape[0])

    @property
    def start_time(self) -> float:
        """Start of the recording: metadata `start_time`, else the first event of any stream."""
        if "start_time" in self.metadata:
            return float(self.metadata["start_time"])
        return min(self._event_times(), default=0.0)

    @property
    def end_time(self) -> float:
        """End of the recording: metadata `end_time`, else the last event of any stream."""
        if "end_time" in self.metadata:
            return float(self.metadata["end_time"])
        return max(self._event_times(end=True), default=0.0)

    @property
    def duration(self) -> float:
        return self.end_time - self.start_time

    def _event_times(self, end: bool = False) -> list[float]:
        pick = -1 if end else 0
        arrays = [self.spike_times] + [c.timestamps for c in self.behavior.values()]
        if self.frames is not None:
            arrays.append(self.frames.timestamps)
        return [float(a[pick]) for a in arrays if a.size]

    def spikes_of_unit(self, index: int) -> np.ndarray:
        """Spike times of the unit at position `index` in `unit_ids`."""
        return self.spike_times[self.spike_unit_index == index]

    def first(self, seconds: float) -> "Session":
        """The first `seconds` of the recording (everything before start_time + seconds)."""
        return self.between(self.start_time, self.start_time + seconds)

    def after(self, seconds: float) -> "Session":
        """The recording from start_time + `seconds` on (e.g. what follows a calibration)."""
        return self.between(self.start_time + seconds, np.inf)

    def between(self, begin: float, stop: float) -> "Session":
        """The part of the recording in [begin, stop) (session times, seconds)."""
        def inside(times: np.ndarray) -> np.ndarray:
            return (times >= begin) & (times < stop)

        keep = inside(self.spike_times)
        behavior = {name: BehaviorChannel(c.timestamps[inside(c.timestamps)],
                                          c.values[inside(c.timestamps)], c.unit)
                    for name, c in self.behavior.items()}
        frames = None
        if self.frames is not None:
            shown = inside(self.frames.timestamps)
            frames = Frames(self.frames.timestamps[shown], self.frames.images[shown])
        intervals = {name: np.clip(spans[(spans[:, 0] < stop) & (spans[:, 1] > begin)],
                                   begin, stop)
                     for name, spans in self.intervals.items()}
        truth = self.ground_truth
        if truth is not None:
            first = max(int(np.floor((begin - truth.t0) / truth.rate_dt + 1e-9)), 0)
            last = max(int(np.ceil((min(stop, self.end_time) - truth.t0) / truth.rate_dt
                                   - 1e-9)), first)
            truth = GroundTruth(truth.rate_dt, truth.rates[first:last], truth.coupling,
                                truth.hubs, truth.tuning, truth.t0 + first * truth.rate_dt)
        metadata = {**self.metadata, "start_time": max(self.start_time, begin),
                    "end_time": min(self.end_time, stop)}
        return Session(self.unit_ids, self.spike_times[keep], self.spike_unit_index[keep],
                       behavior, frames, intervals, metadata, truth).validate()

    def with_units(self, unit_ids: np.ndarray) -> "Session":
        """The recording seen through the unit list `unit_ids`, in that order: other units'
        spikes are left out and units it lacks are silent (their true rates zero)."""
        unit_ids = np.asarray(unit_ids, dtype=np.int64)
        position = {int(unit): k for k, unit in enumerate(unit_ids)}
        mapped = np.array([position.get(int(unit), -1) for unit in self.unit_ids],
                          dtype=np.int64)
        new_index = mapped[self.spike_unit_index] if self.n_spikes else np.zeros(0, np.int64)
        keep = new_index >= 0
        truth = self.ground_truth
        if truth is not None:
            present = mapped >= 0
            rates = np.zeros((truth.rates.shape[0], unit_ids.size), dtype=truth.rates.dtype)
            rates[:, mapped[present]] = truth.rates[:, present]
            coupling = np.zeros((unit_ids.size, unit_ids.size), dtype=truth.coupling.dtype)
            rows = mapped[present]
            coupling[np.ix_(rows, rows)] = truth.coupling[np.ix_(present, present)]
            hubs = mapped[truth.hubs][mapped[truth.hubs] >= 0]
            tuning = {}
            for name, values in truth.tuning.items():
                tuning[name] = np.zeros((unit_ids.size, *values.shape[1:]), dtype=values.dtype)
                tuning[name][rows] = values[present]
            truth = GroundTruth(truth.rate_dt, rates, coupling, hubs, tuning, truth.t0)
        metadata = {**self.metadata, "start_time": self.start_time, "end_time": self.end_time}
        return Session(unit_ids, self.spike_times[keep], new_index[keep].astype(np.int32),
                       self.behavior, self.frames, self.intervals, metadata, truth).validate()

    def validate(self, source: str = "session") -> "Session":
        """Coerce dtypes and check every invariant; raise `SessionFormatError` naming `source`."""

        def fail(what: str) -> None:
            raise SessionFormatError(f"{source}: {what}")

        self.unit_ids = np.asarray(self.unit_ids, dtype=np.int64).reshape(-1)
        if np.unique(self.unit_ids).size != self.unit_ids.size:
            fail("unit ids are not unique")
        self.spike_times = np.asarray(self.spike_times, dtype=np.float64).reshape(-1)
        self.spike_unit_index = np.asarray(self.spike_unit_index, dtype=np.int32).reshape(-1)
        if self.spike_times.shape != self.spike_unit_index.shape:
            fail(f"{self.spike_times.size} spike times but {self.spike_unit_index.size} spike units")
        if not np.all(np.isfinite(self.spike_times)):
            fail("spike times contain NaN or infinity")
        if self.spike_unit_index.size and (
            self.spike_unit_index.min() < 0 or self.spike_unit_index.max() >= self.n_units
        ):
            fail(f"spike unit index outside 0..{self.n_units - 1}")
        order = np.lexsort((self.spike_unit_index, self.spike_times))
        if np.any(order != np.arange(order.size)):
            fail("spikes are not sorted by time, then unit")

        for name, channel in self.behavior.items():
            channel.timestamps = np.asarray(channel.timestamps, dtype=np.float64).reshape(-1)
            channel.values = np.asarray(channel.values, dtype=np.float64).reshape(-1)
            if channel.timestamps.shape != channel.values.shape:
                fail(f"behaviour '{name}': {channel.timestamps.size} timestamps but "
                     f"{channel.values.size} values")
            if np.any(np.diff(channel.timestamps) <= 0):
                fail(f"behaviour '{name}': timestamps are not strictly increasing")
            if not channel.unit:
                channel.unit = BEHAVIOR_UNITS.get(name, "")

        if self.frames is not None:
            self.frames.timestamps = np.asarray(self.frames.timestamps, np.float64).reshape(-1)
            images = np.asarray(self.frames.images)
            if images.ndim != 3 or images.dtype != np.uint8:
                fail(f"frames must be uint8 (T, H, W), got {images.dtype} {images.shape}")
            if images.shape[0] != self.frames.timestamps.size:
                fail(f"{images.shape[0]} frames but {self.frames.timestamps.size} frame timestamps")
            if np.any(np.diff(self.frames.timestamps) <= 0):
                fail("frame timestamps are not strictly increasing")
            self.frames.images = images

        for name, spans in self.intervals.items():
            spans = np.asarray(spans, dtype=np.float64).reshape(-1, 2)
            if np.any(spans[:, 1] < spans[:, 0]):
                fail(f"interval '{name}' has a stop before its start")
            self.intervals[name] = spans

        if self.ground_truth is not None:
            truth = self.ground_truth
            truth.rates = np.asarray(truth.rates, dtype=np.float32)
            truth.coupling = np.asarray(truth.coupling, dtype=np.float32)
            truth.hubs = np.asarray(truth.hubs, dtype=np.int64).reshape(-1)
            if truth.rates.ndim != 2 or truth.rates.shape[1] != self.n_units:
                fail(f"ground-truth rates must be (bins, {self.n_units}), got {truth.rates.shape}")
            if truth.coupling.shape != (self.n_units, self.n_units):
                fail(f"ground-truth coupling must be ({self.n_units}, {self.n_units}), "
                     f"got {truth.coupling.shape}")
            if not truth.rate_dt > 0:
                fail(f"ground-truth rate_dt must be positive, got {truth.rate_dt}")
        return self
