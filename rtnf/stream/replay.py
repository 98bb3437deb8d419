"""Replay a `Session` as a live source: its spikes, behaviour and frames arrive in real time.

`ReplaySource` is a `Source` (rtnf.stream.sources) that plays a session in-process, without a
transport: session time t of pass p is due at stream time clock_start + (t - session start +
p * duration) / speed, the mapping of `rtnf.stream.sim_stream.StreamClock`, and is delivered
with that stream time as its timestamp. The stream clock starts at the first `poll`, so a
source opened early does not deliver a backlog. `poll(timeout)` returns every record due by
now (one batch per kind) and, when nothing is due yet, sleeps until the next record is due but
never longer than `timeout`. Without `loop` the source is `finished` after the last record;
with it, the session plays again and again (the demo's simulator runs as long as it likes).

`open_sources` uses it for rig.sources.<kind>.kind = replay (a session file) and sim (a session
simulated from the `simulation` config).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from rtnf.data.session import Session
from rtnf.errors import RtnfError
from rtnf.stream.lslconfig import import_pylsl
from rtnf.stream.sim_stream import StreamClock, _tracks
from rtnf.stream.sources import KINDS, Batch, RecordGate


class ReplaySource:
    """`session`'s records of `kinds`, played `speed` x faster than real time on `clock`
    (pylsl.local_clock unless given)."""

    def __init__(self, session: Session, kinds: Sequence[str], speed: float = 1.0,
                 loop: bool = False, clock: Callable[[], float] | None = None,
                 name: str | None = None):
        if not speed > 0:
            raise RtnfError(f"replay speed = {speed}: expected a positive factor")
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise RtnfError(f"replay kinds {unknown}: expected some of {', '.join(KINDS)}")
        identifier = session.metadata.get("identifier", "session")
        if "frames" in kinds and session.frames is None:
            raise RtnfError(f"session {identifier} has no stimulus frames to replay; set "
                            "rig.sources.frames.kind to none or give frames another source")
        self.tracks = [track for track in _tracks(session) if track.name in kinds]
        if not any(track.times.size for track in self.tracks):
            raise RtnfError(f"session {identifier} has no {' or '.join(kinds)} to replay")
        if loop and not session.duration > 0:
            raise RtnfError(f"session {identifier} lasts 0 s: it cannot be replayed in a loop")
        self.session, self.speed, self.loop = session, speed, loop
        self.clock = clock or import_pylsl().local_clock
        self.name = name or f"replay:{identifier}"
        self.rejected: Counter = Counter()
        self.gate = RecordGate(self.rejected)
        self.stream_clock: StreamClock | None = None  # set by the first poll
        self.pass_index = 0
        self.finished = False

    def poll(self, timeout: float) -> list[Batch]:
        now = self.clock()
        if self.stream_clock is None:
            self.stream_clock = StreamClock(now, self.session.start_time, self.session.duration,
                                            self.speed)
        batches = self._due(now)
        if batches or self.finished:
            return batches
        time.sleep(max(0.0, min(timeout, self._next_due() - now)))
        return self._due(self.clock())

    def _due(self, now: float) -> list[Batch]:
        """Every record due by stream time `now`, one batch per kind (passes wrap with loop)."""
        due: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        while not self.finished:
            reached = self.stream_clock.session_time(now, self.pass_index)
            for track in self.tracks:
                end = int(np.searchsorted(track.times, reached, side="right"))
                if end > track.cursor:
                    part = slice(track.cursor, end)
                    due.setdefault(track.name, []).append(
                        (self.stream_clock.stamp(track.times[part], self.pass_index),
                         track.records[part]))
                    track.cursor = end
            if any(track.cursor < track.times.size for track in self.tracks):
                break
            self._next_pass()
        return [batch for kind, parts in due.items()
                for batch in self.gate.admit(kind, np.concatenate([p[0] for p in parts]),
                                             np.concatenate([p[1] for p in parts]))]

    def _next_pass(self) -> None:
        """The session has been played: start it again (loop) or finish."""
        if not self.loop:
            self.finished = True
            return
        self.pass_index += 1
        for track in self.tracks:
            track.cursor = 0

    def _next_due(self) -> float:
        return min(self.stream_clock.stamp(track.times[track.cursor], self.pass_index)
                   for track in self.tracks if track.cursor < track.times.size)

    def close(self) -> None:
        """Stop playing (nothing else to release)."""
        self.finished = True
