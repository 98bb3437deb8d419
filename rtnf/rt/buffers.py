"""Fixed-capacity buffers of what the sources delivered, on the stream clock.

- `SpikeBuffer`: spike times (float64 s) and local unit indices, in arrival order, which is time
  order (the loop refuses spikes older than the newest one). Memory is allocated once; spikes
  older than the oldest time a future window can read are discarded (`discard_before`), and the
  live part is moved to the front when the end of the arrays is reached. A batch that would not
  fit even then is cut to what fits (its latest spikes are refused and counted by the caller).
- `FrameBuffer`: the latest stimulus frames (a window reads the last T frames before its end).
- `BehaviorBuffer`: the latest behaviour samples (a window reads the last one before its end).
"""

from __future__ import annotations

import numpy as np


class SpikeBuffer:
    def __init__(self, capacity: int):
        self.times = np.empty(capacity, dtype=np.float64)
        self.units = np.empty(capacity, dtype=np.int64)
        self.start = self.stop = 0

    @property
    def capacity(self) -> int:
        return self.times.size

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def newest(self) -> float:
        return float(self.times[self.stop - 1]) if self.stop > self.start else -np.inf

    def append(self, times: np.ndarray, units: np.ndarray) -> int:
        """Append spikes (not older than `newest`); returns how many fitted (the earliest ones)."""
        if self.stop + times.size > self.capacity:
            self._compact()
        fits = min(times.size, self.capacity - self.stop)
        self.times[self.stop:self.stop + fits] = times[:fits]
        self.units[self.stop:self.stop + fits] = units[:fits]
        self.stop += fits
        return fits

    def discard_before(self, time: float) -> None:
        """Forget spikes before `time` (no window will read them again)."""
        self.start += int(np.searchsorted(self.times[self.start:self.stop], time))

    def between(self, begin: float, end: float) -> tuple[np.ndarray, np.ndarray]:
        """Views of the times and units of spikes in [begin, end)."""
        times = self.times[self.start:self.stop]
        first, last = np.searchsorted(times, (begin, end))
        return times[first:last], self.units[self.start + first:self.start + last]

    def _compact(self) -> None:
        live = self.stop - self.start
        self.times[:live] = self.times[self.start:self.stop]
        self.units[:live] = self.units[self.start:self.stop]
        self.start, self.stop = 0, live


class FrameBuffer:
    """The latest `capacity` frames (uint8 H x W) with their timestamps, oldest first."""

    def __init__(self, capacity: int, shape: tuple[int, int]):
        self.images = np.zeros((capacity, *shape), dtype=np.uint8)
        self.times = np.full(capacity, -np.inf)
        self.count = 0  # frames received so far
        self.version = 0  # changes whenever a frame is added

    def append(self, times: np.ndarray, images: np.ndarray) -> None:
        keep = min(times.size, self.times.size)
        self.times = np.roll(self.times, -keep)
        self.images = np.roll(self.images, -keep, axis=0)
        self.times[-keep:], self.images[-keep:] = times[-keep:], images[-keep:]
        self.count += times.size
        self.version += 1

    def clip_before(self, end: float, length: int) -> np.ndarray:
        """The `length` frames shown last strictly before `end`, oldest first (1, T, H, W): the
        oldest held frame repeated when fewer were shown, blank frames when none was (as the
        training windows are built)."""
        shown = int(np.searchsorted(self.times, end, side="left"))
        first = max(self.times.size - self.count, 0)  # the oldest slot holding a frame
        if shown <= first:
            return np.zeros((1, length, *self.images.shape[1:]), dtype=np.uint8)
        rows = np.maximum(np.arange(shown - length, shown), first)
        return self.images[rows][None]


class BehaviorBuffer:
    """The latest behaviour samples (timestamps, values (n, channels)), oldest first."""

    def __init__(self, capacity: int, channels: int):
        self.values = np.full((capacity, channels), np.nan, dtype=np.float32)
        self.times = np.full(capacity, -np.inf)

    def append(self, times: np.ndarray, values: np.ndarray) -> None:
        keep = min(times.size, self.times.size)
        self.times = np.roll(self.times, -keep)
        self.values = np.roll(self.values, -keep, axis=0)
        self.times[-keep:], self.values[-keep:] = times[-keep:], values[-keep:]

    def last_before(self, end: float) -> np.ndarray | None:
        """Each channel's last value strictly before `end` (NaN where none); None if nothing."""
        shown = int(np.searchsorted(self.times, end, side="left"))
        if shown == 0 or not np.isfinite(self.times[shown - 1]):
            return None
        return self.values[shown - 1]
