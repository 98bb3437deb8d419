"""Record the rig's live streams for a while into a `Session` (calibration from a live rig).

`capture_session` polls every source until `seconds` have passed on this machine's clock (or
`stop` is set, or Ctrl-C: what arrived so far is kept and the session is marked interrupted),
reporting progress every `PROGRESS_EVERY_S`. The session holds every spike (units are the ids
that fired), the behaviour channels that carried values and the frames, on the receiving
clock's timestamps; it spans from the first to the last timestamp received. Messages a source
rejected are counted in the session's metadata.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from rtnf.data.session import BEHAVIOR_UNITS, BehaviorChannel, Frames, Session, sort_spikes
from rtnf.errors import RtnfError
from rtnf.stream.sources import Batch, Source
from rtnf.stream.zmq_messages import BEHAVIOR_CHANNELS

PROGRESS_EVERY_S = 0.5
POLL_S = 0.02


@dataclass
class CaptureProgress:
    elapsed_s: float
    total_s: float
    counts: dict[str, int]  # spikes, behavior samples, frames received so far
    rejected: int


def capture_session(sources: list[Source], seconds: float,
                    progress: Callable[[CaptureProgress], None] | None = None,
                    stop: threading.Event | None = None) -> Session:
    """Everything `sources` deliver during `seconds`, as one `Session`."""
    received: dict[str, list[Batch]] = {"spikes": [], "behavior": [], "frames": []}
    counts = dict.fromkeys(received, 0)
    started = time.monotonic()
    last_report = -np.inf
    interrupted = False
    try:
        while (elapsed := time.monotonic() - started) < seconds:
            if stop is not None and stop.is_set():
                interrupted = True
                break
            for source in sources:
                for batch in source.poll(POLL_S / len(sources)):
                    received[batch.kind].append(batch)
                    counts[batch.kind] += len(batch.timestamps)
            if progress is not None and elapsed - last_report >= PROGRESS_EVERY_S:
                last_report = elapsed
                progress(CaptureProgress(elapsed, seconds, dict(counts), _rejected(sources)))
    except KeyboardInterrupt:
        interrupted = True
    if progress is not None:
        progress(CaptureProgress(min(time.monotonic() - started, seconds), seconds,
                                 dict(counts), _rejected(sources)))
    return _session(received, sources, time.monotonic() - started, interrupted)


def _rejected(sources: list[Source]) -> int:
    return sum(sum(source.rejected.values()) for source in sources)


def _joined(batches: list[Batch], distinct: bool = False
            ) -> tuple[np.ndarray, np.ndarray] | None:
    """Timestamps and records of one kind, in time order (stable); with `distinct`, only the
    first record of each timestamp (samples of a signal need increasing times)."""
    if not batches:
        return None
    stamps = np.concatenate([b.timestamps for b in batches])
    records = np.concatenate([b.records for b in batches])
    order = np.argsort(stamps, kind="stable")
    stamps, records = stamps[order], records[order]
    if distinct:
        first = np.r_[True, np.diff(stamps) > 0]
        stamps, records = stamps[first], records[first]
    return stamps, records


def _session(received: dict[str, list[Batch]], sources: list[Source], wall_s: float,
             interrupted: bool) -> Session:
    spikes = _joined(received["spikes"])
    if spikes is None:
        names = ", ".join(source.name for source in sources)
        raise RtnfError(f"no spikes arrived from {names} in {wall_s:.1f} s; is the rig "
                        f"streaming?")
    times, ids = spikes
    unit_ids = np.unique(ids)
    times, index = sort_spikes(times, np.searchsorted(unit_ids, ids).astype(np.int32))
    behavior = {}
    joined = _joined(received["behavior"], distinct=True)
    if joined is not None:
        stamps, values = joined
        for column, name in enumerate(BEHAVIOR_CHANNELS):
            valid = np.isfinite(values[:, column])
            if valid.any():
                behavior[name] = BehaviorChannel(stamps[valid], values[valid, column]
                                                 .astype(np.float64), BEHAVIOR_UNITS[name])
    frames = None
    joined = _joined(received["frames"], distinct=True)
    if joined is not None:
        frames = Frames(*joined)
    every = [times] + [c.timestamps for c in behavior.values()]
    every += [frames.timestamps] if frames is not None else []
    rejected = _rejected(sources)
    metadata = {"identifier": "live-capture", "source": "live",
                "streams": ", ".join(source.name for source in sources),
                "start_time": float(min(a[0] for a in every)),
                "end_time": float(max(a[-1] for a in every)),
                "captured_wall_s": round(wall_s, 3), "interrupted": interrupted,
                "rejected_messages": rejected}
    return Session(unit_ids, times, index, behavior, frames, {}, metadata).validate("capture")
