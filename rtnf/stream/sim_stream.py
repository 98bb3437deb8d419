"""Stream a `Session` in real time, like a rig: spikes, behaviour and frames over LSL or ZeroMQ.

The stages of `stream_session`, in order:

1. open the transport: three LSL outlets (`rtnf-sim-spikes`, `rtnf-sim-behavior`,
   `rtnf-sim-frames`; discovery scoped by `lsl_setting`, loopback by default), or one ZeroMQ PUB
   socket bound to `address` sending `[topic, payload]` messages (`zmq_messages`);
2. call `on_started(stats)` (it may block, e.g. until a subscriber is listening); then the
   stream clock starts: session time t of pass p is stamped on pylsl.local_clock as
   clock_start + (t - session start + p * duration) / speed (`StreamClock`);
3. pace: sleep until the next spike, behaviour sample or frame is due (at least
   MIN_PUSH_INTERVAL_S after the previous push, so dense spikes go out in small chunks), then
   push everything whose time has come, one chunk per stream, each sample with its own stamp;
4. finish at the end of the session (or loop over it again with `loop`), or when `stop` is set,
   or on Ctrl-C; close the outlets / socket and return what was sent (`StreamStats`).

Behaviour is streamed as the three channels of `BEHAVIOR_CHANNELS` (NaN where the session lacks
one); frames as uint8 pixels (cf_int16 over LSL, which holds 0..255 exactly).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Literal

import numpy as np

from rtnf.data.session import BEHAVIOR_UNITS, Session
from rtnf.errors import RtnfError
from rtnf.stream.lslconfig import import_pylsl
from rtnf.stream.zmq_messages import (BEHAVIOR_CHANNELS, TOPICS, Kind, encode_behavior,
                                      encode_frames, encode_spikes, records_per_message)

MIN_PUSH_INTERVAL_S = 0.001
ZMQ_LINGER_MS = 1000
STREAM_NAMES = {"spikes": "rtnf-sim-spikes", "behavior": "rtnf-sim-behavior",
                "frames": "rtnf-sim-frames"}


@dataclass(frozen=True)
class StreamClock:
    """Session time <-> stream time (pylsl.local_clock seconds) for pass `p` over the session."""

    start: float  # local_clock() when streaming began
    session_start: float
    duration: float
    speed: float

    def stamp(self, session_time: float | np.ndarray, pass_index: int = 0) -> float | np.ndarray:
        """Stream time at which `session_time` (float or array) of pass `pass_index` is sent."""
        return self.start + (session_time - self.session_start
                             + pass_index * self.duration) / self.speed

    def session_time(self, stamp: float, pass_index: int = 0) -> float:
        """The session time of pass `pass_index` that `stamp` corresponds to."""
        return (stamp - self.start) * self.speed + self.session_start - pass_index * self.duration


@dataclass
class StreamStats:
    """What `stream_session` did: where it sent, its clock, and how much it sent."""

    transport: str
    endpoints: dict[str, str]  # stream -> LSL source id, or "zmq" -> the bound endpoint
    clock: StreamClock | None = None  # set when the stream clock starts
    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STREAM_NAMES, 0))
    passes: int = 0  # complete passes through the session
    stopped: bool = False  # ended by `stop` or Ctrl-C rather than by the session's end


@dataclass
class _Track:
    """One stream's events: session times, one record each, and how far it has been sent."""

    name: str  # "spikes", "behavior" or "frames"
    times: np.ndarray  # (n,) session seconds, sorted
    records: np.ndarray  # (n, ...): unit id / behaviour values / image
    max_records: int  # per chunk: what one ZeroMQ message may hold
    cursor: int = 0


def _behavior_matrix(session: Session) -> tuple[np.ndarray, np.ndarray]:
    """Behaviour as (timestamps, float32 values in BEHAVIOR_CHANNELS order, NaN if absent)."""
    channels = [session.behavior[name] for name in BEHAVIOR_CHANNELS if name in session.behavior]
    if not channels:
        return np.zeros(0), np.zeros((0, len(BEHAVIOR_CHANNELS)), np.float32)
    timestamps = channels[0].timestamps
    if any(not np.array_equal(c.timestamps, timestamps) for c in channels):
        raise RtnfError("behaviour channels have different timestamps; resample them onto one "
                        "clock before streaming")
    values = np.full((timestamps.size, len(BEHAVIOR_CHANNELS)), np.nan, np.float32)
    for column, name in enumerate(BEHAVIOR_CHANNELS):
        if name in session.behavior:
            values[:, column] = session.behavior[name].values
    return timestamps, values


def _tracks(session: Session) -> list[_Track]:
    """The session's event streams (frames only if it has them)."""
    info = np.iinfo(np.int32)
    if session.n_units and (session.unit_ids.min() < info.min
                            or session.unit_ids.max() > info.max):
        raise RtnfError("unit ids do not fit in int32, the spike streams' format")
    spike_units = session.unit_ids[session.spike_unit_index].astype(np.int32)
    behavior_times, behavior_values = _behavior_matrix(session)
    tracks = [_Track("spikes", session.spike_times, spike_units,
                     records_per_message((), Kind.SPIKES)),
              _Track("behavior", behavior_times, behavior_values,
                     records_per_message(behavior_values.shape[1:], Kind.BEHAVIOR))]
    if session.frames is not None:
        images = session.frames.images
        tracks.append(_Track("frames", session.frames.timestamps, images,
                             records_per_message(images.shape[1:], Kind.FRAMES)))
    return tracks


def _nominal_rate(timestamps: np.ndarray, speed: float) -> float:
    """Samples per second of stream time (0, LSL's irregular rate, if it cannot tell)."""
    step = float(np.median(np.diff(timestamps))) if timestamps.size > 1 else 0.0
    return speed / step if step > 0 else 0.0


class _LslSink:
    """One LSL outlet per track; each chunk is pushed with one timestamp per sample."""

    def __init__(self, pylsl: ModuleType, session: Session, tracks: list[_Track], speed: float):
        self.pylsl = pylsl
        identifier = str(session.metadata.get("identifier", "session"))
        self.source_ids = {t.name: f"rtnf-sim-{identifier}-{t.name}" for t in tracks}
        self.outlets: dict[str, object] = {}
        for track in tracks:
            info = self._stream_info(track, _nominal_rate(track.times, speed))
            session_desc = info.desc().append_child("session")
            session_desc.append_child_value("identifier", identifier)
            session_desc.append_child_value("profile", str(session.metadata.get("profile", "")))
            session_desc.append_child_value("speed", str(speed))
            self.outlets[track.name] = pylsl.StreamOutlet(info)

    def _stream_info(self, track: _Track, rate: float):
        """The track's stream: type, rate, format, and its channels described (RIGS.md)."""
        lsl = self.pylsl
        if track.name == "spikes":
            kind, channels, rate, channel_format = "Spikes", 1, lsl.IRREGULAR_RATE, lsl.cf_int32
            labels = [("unit", "id")]
        elif track.name == "behavior":
            kind, channels, channel_format = "Behavior", len(BEHAVIOR_CHANNELS), lsl.cf_float32
            labels = [(name, BEHAVIOR_UNITS[name]) for name in BEHAVIOR_CHANNELS]
        else:
            kind, channels, channel_format = "Frames", track.records[0].size, lsl.cf_int16
            labels = []  # one channel per pixel, described as a frame instead
        info = lsl.StreamInfo(STREAM_NAMES[track.name], kind, channels, rate, channel_format,
                              self.source_ids[track.name])
        described = info.desc().append_child("channels")
        for label, unit in labels:
            channel = described.append_child("channel")
            channel.append_child_value("label", label)
            channel.append_child_value("unit", unit)
            channel.append_child_value("type", kind)
        if track.name == "frames":
            height, width = track.records.shape[1:]
            frame = info.desc().append_child("frame")
            frame.append_child_value("height", str(height))
            frame.append_child_value("width", str(width))
            frame.append_child_value("layout", "row-major uint8 pixels")
        return info

    def push(self, stream: str, stamps: np.ndarray, records: np.ndarray) -> None:
        samples = records.reshape(records.shape[0], -1)  # one row per sample
        self.outlets[stream].push_chunk(samples, stamps.tolist())

    def endpoints(self) -> dict[str, str]:
        return dict(self.source_ids)

    def close(self) -> None:
        self.outlets.clear()  # dropping an outlet destroys it: it vanishes from the network


class _ZmqSink:
    """One PUB socket; each chunk is one `[topic, payload]` message (`zmq_messages`)."""

    ENCODERS = {"spikes": (Kind.SPIKES, encode_spikes),
                "behavior": (Kind.BEHAVIOR, encode_behavior),
                "frames": (Kind.FRAMES, encode_frames)}

    def __init__(self, address: str):
        import zmq

        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PUB)
        self.socket.setsockopt(zmq.LINGER, ZMQ_LINGER_MS)
        try:
            self.socket.bind(address)
        except zmq.ZMQError as exc:
            self.close()
            raise RtnfError(f"cannot bind the ZeroMQ publisher to {address}: {exc}") from None
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def push(self, stream: str, stamps: np.ndarray, records: np.ndarray) -> None:
        kind, encode = self.ENCODERS[stream]
        self.socket.send_multipart([TOPICS[kind], encode(stamps, records)])

    def endpoints(self) -> dict[str, str]:
        return {"zmq": self.endpoint}

    def close(self) -> None:
        self.socket.close()
        self.context.term()


def _pace(tracks: list[_Track], sink: _LslSink | _ZmqSink, clock: StreamClock,
          now: Callable[[], float], stop: threading.Event, loop: bool,
          stats: StreamStats) -> None:
    """Push each track's events as the stream clock passes them (stage 3)."""
    pass_index = 0
    last_push = -np.inf
    while True:
        for track in tracks:
            track.cursor = 0
        while True:
            pending = [t for t in tracks if t.cursor < t.times.size]
            if not pending:
                break
            next_time = min(t.times[t.cursor] for t in pending)
            due = max(clock.stamp(next_time, pass_index), last_push + MIN_PUSH_INTERVAL_S)
            if stop.wait(max(0.0, due - now())):
                stats.stopped = True
                return
            reached = clock.session_time(now(), pass_index)
            for track in pending:
                end = min(int(np.searchsorted(track.times, reached, side="right")),
                          track.cursor + track.max_records)
                if end > track.cursor:
                    part = slice(track.cursor, end)
                    sink.push(track.name, clock.stamp(track.times[part], pass_index),
                              track.records[part])
                    stats.sent[track.name] += end - track.cursor
                    track.cursor = end
                    last_push = now()
        stats.passes += 1
        if not loop:
            return
        pass_index += 1


def stream_session(session: Session, transport: Literal["lsl", "zmq"], speed: float = 1.0,
                   address: str = "tcp://127.0.0.1:5556", lsl_setting: str = "loopback",
                   stop: threading.Event | None = None, loop: bool = False,
                   on_started: Callable[[StreamStats], None] | None = None) -> StreamStats:
    """Stream `session` in real time (`speed` x faster) over `transport`; return what was sent.

    Returns when the session ends (never with `loop`), when `stop` is set, or on Ctrl-C.
    """
    if transport not in ("lsl", "zmq"):
        raise RtnfError(f"transport {transport!r}: expected 'lsl' or 'zmq'")
    if not speed > 0:
        raise RtnfError(f"speed = {speed}: expected a positive factor")
    pylsl = import_pylsl(lsl_setting)  # its local_clock is the stream clock for both transports
    stop = threading.Event() if stop is None else stop
    tracks = _tracks(session)
    sink = _LslSink(pylsl, session, tracks, speed) if transport == "lsl" else _ZmqSink(address)
    stats = StreamStats(transport, sink.endpoints())
    try:
        if on_started is not None:
            on_started(stats)
        stats.clock = StreamClock(pylsl.local_clock(), session.start_time, session.duration,
                                  speed)
        _pace(tracks, sink, stats.clock, pylsl.local_clock, stop, loop, stats)
    except KeyboardInterrupt:
        stats.stopped = True
    finally:
        sink.close()
    return stats
