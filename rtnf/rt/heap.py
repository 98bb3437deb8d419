"""Giving the C heap's free memory back to the system now and then (glibc's `malloc_trim`).

What the sources read on their own threads (LSL inlets' readers, ZeroMQ subscribers) is
allocated there and freed on the loop thread. glibc's allocator keeps memory freed that way in
its arenas instead of returning it, so a run's resident memory crept up by 25-40 MB an hour
(soak benchmark) although nothing stayed alive: Python's traced memory was flat, and calling
`malloc_trim(0)` every few seconds kept the resident memory flat too (an hour-long soak with
this module: +2.7 MB an hour, +1.6% after the warm-up). `HeapTrimmer` does that
from the loop thread, right after a window is sent (when the next window is furthest away), at
most once per `interval_s`; where the C library has no `malloc_trim` (not glibc) it does nothing.
"""

from __future__ import annotations

import ctypes
from typing import Callable

TRIM_INTERVAL_S = 10.0


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the process's C library has none."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc; Windows has no CDLL(None)
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class HeapTrimmer:
    """Calls malloc_trim(0) at most once per `interval_s` of `clock`."""

    def __init__(self, clock: Callable[[], float], interval_s: float = TRIM_INTERVAL_S):
        self.trim, self.clock, self.interval_s = _malloc_trim(), clock, interval_s
        self.due = clock() + interval_s

    def maybe_trim(self) -> float | None:
        """Trim if `interval_s` passed since the last trim; the milliseconds it took, or None
        when it did not trim."""
        now = self.clock()
        if self.trim is None or now < self.due:
            return None
        self.trim(0)
        done = self.clock()
        self.due = done + self.interval_s
        return (done - now) * 1e3
