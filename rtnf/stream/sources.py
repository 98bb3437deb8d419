"""Rig inputs as batches of timestamped records: LSL inlets, ZeroMQ subscribers (rtnf binary or
Bonsai-style CSV), the Open Ephys GUI's ZMQ Interface, replay of a session file and the
in-process simulator; `open_sources` opens what rig.sources configures.

A source yields `Batch`es: the kind (`spikes`, `behavior`, `frames`), timestamps in seconds on
the receiving machine's LSL clock (pylsl.local_clock), and one record per timestamp (a unit id;
the three behaviour values in `BEHAVIOR_CHANNELS` order, NaN where the stream lacks one; a uint8
image). `poll(timeout)` waits at most `timeout` seconds and never blocks longer.

Every source passes what it delivers through a `RecordGate`: per kind, timestamps must be finite
and never earlier than the last one delivered; unit ids must be integers, behaviour values finite
or NaN ("no value"), frame pixels within 0..255. Offending records are dropped and counted by
reason in the source's `rejected` counter, as are malformed messages (one count per message);
nothing is fatal and nothing received is unpickled. Unknown units are the loop's business (it
knows the bundle's units).

- LSL (`LslSource`): the stream named in rig.sources.<kind>.lsl (then type and source id when
  given) is resolved with discovery scoped by rig.lsl.config (loopback by default); the inlet
  has `recover` on and clock synchronisation on, so timestamps are mapped onto this machine's
  clock (`time_correction`), and an outlet that vanishes and comes back (same source id) is
  re-attached. liblsl blocks every pull for a second or two while it re-attaches, so each inlet
  is read by its own thread, which hands chunks over through a queue bounded in bytes
  (`rtnf.stream.handover`). Spike streams have one int channel (unit id) or two (channel, unit:
  RIGS.md); behaviour channels are matched by the labels in the stream description; frames are
  reshaped with the description's height and width.
  liblsl sizes an inlet's buffers by what the stream declares, so before any inlet exists the
  stream's channel count (`LSL_MAX_CHANNELS` per kind), value format (numbers) and nominal rate
  are checked, and `max_buflen` is what fits in `LSL_BUFFER_BYTES` (64 MiB) with liblsl's
  up-front reserve (at most `LSL_MAX_BUFLEN_S`); a stream beyond them is refused (RtnfError
  naming it, the declared value and the limit).
- ZeroMQ (`ZmqSource`): a SUB socket connects to the publisher's address and takes rtnf's
  messages, binary or CSV text (`rtnf.stream.zmq_messages`); ZeroMQ reconnects by itself when
  a publisher goes away and another binds the address. What waits to be polled is bounded in
  messages and bytes (`rtnf.stream.subscriber`); beyond that, messages are dropped and counted.
- Open Ephys (`rtnf.stream.openephys.OpenEphysSource`): sorted spikes from the GUI's ZMQ
  Interface plugin, its sample clock mapped onto this machine's clock.
- Replay and simulator (`rtnf.stream.replay.ReplaySource`): a session file, or a session
  simulated from the `simulation` config, played in real time (or faster).
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import numpy as np

from rtnf.config import RigConfig, SimulationConfig, SourceConfig
from rtnf.data.session import Session
from rtnf.errors import RtnfError
from rtnf.stream.handover import QUEUE_FULL, HandOver
from rtnf.stream.lslconfig import import_pylsl
from rtnf.stream.subscriber import QUEUE_BYTES, Subscriber
from rtnf.stream.zmq_messages import (
    BEHAVIOR_CHANNELS,
    DEFAULT_MAX_BYTES,
    TOPICS,
    FrameMessage,
    Kind,
    Message,
    MessageError,
    SpikeMessage,
    decode_multipart,
)

KINDS = ("spikes", "behavior", "frames")
SOURCE_KINDS = ("lsl", "zmq", "openephys", "replay", "sim", "none")
RESOLVE_TIMEOUT_S = 5.0
LSL_QUEUED_CHUNKS = 10_000  # chunks an LSL reader thread hands over before it drops (counted)
LSL_READ_WAIT_S = 0.1  # an LSL reader thread's longest wait, so it notices a close promptly
# What an LSL stream may declare: spikes (unit) or (channel, unit); behaviour, labelled
# channels; frames, height x width pixels.
LSL_MAX_CHANNELS = {"spikes": 2, "behavior": 256, "frames": 4096 * 4096}
LSL_VALUE_TYPES = {"cf_float32": np.float32, "cf_double64": np.float64, "cf_int32": np.int32,
                   "cf_int16": np.int16, "cf_int8": np.int8, "cf_int64": np.int64}  # numbers only
LSL_PULL_SAMPLES = 1024  # the most one pull takes (the reader thread pulls again at once)
LSL_BUFFER_BYTES = 64 << 20  # what one inlet may buffer in liblsl, and again in its hand-over
LSL_MAX_BUFLEN_S = 360  # liblsl's default max_buflen: the longest an inlet buffers
# liblsl buffers max_buflen x rate samples, or max_buflen x 100 when the rate is irregular, and
# reserves 5 s of samples up front, or 128 samples (its [tuning] defaults).
LSL_IRREGULAR_SAMPLES_PER_S, LSL_RESERVE_S, LSL_IRREGULAR_RESERVE = 100, 5.0, 128
ZMQ_HIGH_WATER_MARK = 100_000  # messages a ZeroMQ source queues (a capture must not lose any)
MAX_MESSAGES_PER_POLL = 10_000  # a flooding publisher cannot hold poll() for long


@dataclass
class Batch:
    kind: str  # "spikes", "behavior" or "frames"
    timestamps: np.ndarray  # (n,) float64 seconds, this machine's LSL clock
    records: np.ndarray  # spikes (n,) int64 unit ids; behavior (n, 3) float32; frames (n, H, W)


class Source(Protocol):
    name: str
    rejected: Counter  # reason -> rejected records or messages

    def poll(self, timeout: float) -> list[Batch]:
        ...

    def close(self) -> None:
        ...


class RecordGate:
    """The checks every source applies to the records it delivers, per kind; what fails is
    dropped and counted in `rejected` under one reason per record."""

    def __init__(self, rejected: Counter):
        self.rejected = rejected
        self.latest: dict[str, float] = {}  # kind -> last timestamp delivered

    def admit(self, kind: str, timestamps: np.ndarray, records: np.ndarray) -> list[Batch]:
        """The records of `kind` that pass, as a batch (none if nothing passes)."""
        timestamps = np.asarray(timestamps, dtype=np.float64).reshape(-1)
        finite = np.isfinite(timestamps)
        records, valid, invalid_reason = _checked_records(kind, np.asarray(records))
        candidate = finite & valid
        # The latest time delivered before each record; a rejected record never raises it.
        before = np.maximum.accumulate(np.concatenate((
            [self.latest.get(kind, -np.inf)], np.where(candidate, timestamps, -np.inf))))[:-1]
        keep = candidate & (timestamps >= before)
        self._count("timestamp not finite", ~finite)
        self._count(invalid_reason, finite & ~valid)
        self._count("time went backwards", candidate & ~keep)
        if not keep.any():
            return []
        self.latest[kind] = float(timestamps[keep][-1])
        return [Batch(kind, timestamps[keep], records[keep])]

    def _count(self, reason: str, offending: np.ndarray) -> None:
        count = int(np.count_nonzero(offending))
        if count:
            self.rejected[reason] += count


def _checked_records(kind: str, records: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """The records in the kind's dtype, which of them hold valid values, and the reason the
    others are rejected under."""
    if kind == "spikes":
        if records.dtype.kind != "f":
            return records.astype(np.int64), np.ones(len(records), bool), ""
        valid = np.isfinite(records) & (np.floor(records) == records) & (
            np.abs(records) < 2.0 ** 63)
        return np.where(valid, records, 0).astype(np.int64), valid, "unit not an integer"
    if kind == "behavior":
        with np.errstate(over="ignore"):  # beyond float32: infinity, rejected
            values = records.astype(np.float32)
        return values, ~np.isinf(values).any(axis=1), "behaviour value infinite"
    if records.dtype == np.uint8:
        return records, np.ones(len(records), bool), ""
    pixels = records.reshape(len(records), -1)
    valid = (np.isfinite(pixels) & (pixels >= 0) & (pixels <= 255)).all(axis=1)
    images = np.where(valid[:, None], pixels, 0).astype(np.uint8).reshape(records.shape)
    return images, valid, "frame pixels outside 0..255"


@dataclass(frozen=True)
class InletSize:
    """What an LSL inlet buffers: liblsl's `max_buflen` (seconds, or hundreds of samples when
    the rate is irregular) and the samples that makes; and the type of the stream's values."""

    max_buflen: int
    samples: int
    value_type: np.dtype


def inlet_size(kind: str, name: str, info, pylsl: ModuleType) -> InletSize:
    """The buffer of an inlet on the resolved stream `info` of `kind`: as long as fits in
    LSL_BUFFER_BYTES beside liblsl's reserve, at most LSL_MAX_BUFLEN_S. Checked before any inlet
    exists, as liblsl allocates by what the stream declares: RtnfError (naming the stream, what
    it declares and the limit) for a stream beyond rtnf's limits."""
    value_type, rate = _declared_values(kind, name, info, pylsl)
    sample_bytes = value_type.itemsize * info.channel_count()
    per_buflen, reserve = ((rate, LSL_RESERVE_S * rate) if rate else
                           (LSL_IRREGULAR_SAMPLES_PER_S, LSL_IRREGULAR_RESERVE))
    max_buflen = min(LSL_MAX_BUFLEN_S,
                     int((LSL_BUFFER_BYTES // sample_bytes - reserve) // per_buflen))
    if max_buflen < 1:
        needed = sample_bytes * (reserve + per_buflen) / 2**20
        raise RtnfError(f"LSL stream {name} declares samples of {sample_bytes} bytes at "
                        f"{rate:g} Hz: {needed:.0f} MiB to buffer; rtnf buffers at most "
                        f"{LSL_BUFFER_BYTES >> 20} MiB per stream")
    return InletSize(max_buflen, max(1, int(max_buflen * per_buflen)), value_type)


def _declared_values(kind: str, name: str, info, pylsl: ModuleType) -> tuple[np.dtype, float]:
    """The type of the stream's values and its nominal rate (0: irregular), once its channel
    count, channel format and rate are checked."""
    channels, rate = info.channel_count(), info.nominal_srate()
    limit = LSL_MAX_CHANNELS[kind]
    if not 1 <= channels <= limit:
        raise RtnfError(f"LSL stream {name} declares {channels} channels; rtnf takes 1 to "
                        f"{limit} for {kind}")
    channel_format = _format_name(info.channel_format(), pylsl)
    if channel_format not in LSL_VALUE_TYPES:
        raise RtnfError(f"LSL stream {name} declares channel format {channel_format}; rtnf "
                        f"takes numbers ({', '.join(LSL_VALUE_TYPES)})")
    if not (math.isfinite(rate) and rate >= 0):
        raise RtnfError(f"LSL stream {name} declares a nominal rate of {rate} Hz; rtnf takes 0 "
                        "(irregular) or a positive rate")
    return np.dtype(LSL_VALUE_TYPES[channel_format]), rate


def _format_name(channel_format: int, pylsl: ModuleType) -> str:
    """pylsl's name of a channel format (cf_float32, ...)."""
    names = {getattr(pylsl, name): name for name in (*LSL_VALUE_TYPES, "cf_string")}
    return names.get(channel_format, f"#{channel_format}")


class LslSource:
    """One LSL stream of the rig (spikes, behaviour or frames)."""

    def __init__(self, kind: str, source: SourceConfig, pylsl: ModuleType,
                 resolve_timeout: float = RESOLVE_TIMEOUT_S):
        self.kind, self.pylsl, self.rejected = kind, pylsl, Counter()
        self.gate = RecordGate(self.rejected)
        wanted = source.lsl
        predicate = f"name='{wanted.name}'"
        if wanted.type:
            predicate += f" and type='{wanted.type}'"
        if wanted.source_id:
            predicate += f" and source_id='{wanted.source_id}'"
        found = pylsl.resolve_bypred(predicate, 1, resolve_timeout)
        if not found:
            raise RtnfError(f"no LSL stream matches rig.sources.{kind}.lsl ({predicate}) after "
                            f"{resolve_timeout:g} s; is the rig streaming, and does "
                            f"rig.lsl.config let rtnf see it?")
        self.name = f"lsl:{wanted.name}"
        self.size = inlet_size(kind, self.name, found[0], pylsl)
        self.channels = found[0].channel_count()  # what liblsl reads samples by
        # Timestamps mapped onto this machine's clock, and kept in order when a new clock-offset
        # estimate jumps back by a fraction of a millisecond. max_chunklen stays 0: it only
        # tells the outlet how to group samples on the wire (a nonzero one would hold samples
        # back until a chunk fills) and allocates nothing here.
        flags = pylsl.proc_clocksync | pylsl.proc_monotonize
        self.inlet = pylsl.StreamInlet(found[0], max_buflen=self.size.max_buflen,
                                       max_chunklen=0, recover=True, processing_flags=flags)
        info = self.inlet.info(resolve_timeout)
        self.behavior_columns = self._behavior_columns(info) if kind == "behavior" else None
        self.frame_shape = self._frame_shape(info) if kind == "frames" else None
        self.inlet.open_stream(resolve_timeout)
        # Pulls land in one buffer allocated here, not in arrays allocated per pull.
        self.buffer = np.empty((min(self.size.samples, LSL_PULL_SAMPLES), self.channels),
                               self.size.value_type)
        # liblsl blocks every pull for a second or two while it re-attaches to a restarted
        # outlet, so the inlet is read by its own thread and `poll` never touches it.
        self.chunks: HandOver[tuple[np.ndarray, np.ndarray]] = HandOver(LSL_QUEUED_CHUNKS,
                                                                        LSL_BUFFER_BYTES)
        self.stopping = threading.Event()
        self.reader = threading.Thread(target=self._read, name=f"rtnf-{self.name}", daemon=True)
        self.reader.start()

    @staticmethod
    def _labels(info) -> list[str]:
        labels, channel = [], info.desc().child("channels").child("channel")
        while not channel.empty():
            labels.append(channel.child_value("label"))
            channel = channel.next_sibling()
        return labels

    def _behavior_columns(self, info) -> list[int | None]:
        """For each of BEHAVIOR_CHANNELS, the stream's column holding it (None: absent)."""
        labels = self._labels(info)[:self.channels]  # a description may list more than it has
        if not labels:  # undescribed: the channels are taken to be in rtnf's order
            labels = list(BEHAVIOR_CHANNELS[:self.channels])
        columns = [labels.index(name) if name in labels else None for name in BEHAVIOR_CHANNELS]
        if all(column is None for column in columns):
            raise RtnfError(f"LSL stream {self.name} has channels {labels}, none of "
                            f"{', '.join(BEHAVIOR_CHANNELS)}")
        return columns

    def _frame_shape(self, info) -> tuple[int, int]:
        frame = info.desc().child("frame")
        try:
            shape = int(frame.child_value("height")), int(frame.child_value("width"))
        except ValueError:
            raise RtnfError(f"LSL stream {self.name} does not describe its frame size "
                            f"(desc/frame/height and width)") from None
        if min(shape) < 1 or shape[0] * shape[1] != self.channels:
            raise RtnfError(f"LSL stream {self.name}: frame {shape[0]}x{shape[1]} does not match "
                            f"its {self.channels} channels")
        return shape

    def _pull_waiting(self) -> tuple[np.ndarray, np.ndarray]:
        """What the inlet holds (up to the buffer's length): values (samples, channels) and
        timestamps, copied out of the buffer."""
        _, stamps = self.inlet.pull_chunk(timeout=0.0, max_samples=len(self.buffer),
                                          dest_obj=self.buffer)
        return self.buffer[:len(stamps)].copy(), np.asarray(stamps, dtype=np.float64)

    def _pull(self, timeout: float) -> tuple[np.ndarray, np.ndarray]:
        """What the inlet holds, or the first sample within `timeout` and what came with it.
        (pull_chunk with a timeout waits until its buffer is full or the timeout expires, so it
        would hold samples back; pull_sample returns as soon as one arrives.)"""
        values, stamps = self._pull_waiting()
        if stamps.size:
            return values, stamps
        first, stamp = self.inlet.pull_sample(timeout=timeout)
        if first is None:
            return values, stamps
        values, stamps = self._pull_waiting()
        return (np.concatenate((np.asarray([first], self.buffer.dtype), values)),
                np.concatenate(([stamp], stamps)))

    def _read(self) -> None:
        while not self.stopping.is_set():
            values, times = self._pull(LSL_READ_WAIT_S)
            if times.size and not self.chunks.put((values, times),
                                                  values.nbytes + times.nbytes):
                self.rejected[QUEUE_FULL] += len(times)

    def poll(self, timeout: float) -> list[Batch]:
        if not self.chunks.wait(timeout):
            return []
        chunks = self.chunks.take(LSL_QUEUED_CHUNKS)
        values = np.concatenate([values for values, _ in chunks])
        stamps = np.concatenate([times for _, times in chunks])
        if self.kind == "spikes":
            records = values[:, -1]  # (unit) or (channel, unit)
        elif self.kind == "behavior":
            records = np.full((len(stamps), len(BEHAVIOR_CHANNELS)), np.nan)
            for k, column in enumerate(self.behavior_columns):
                if column is not None:
                    records[:, k] = values[:, column]
        else:
            records = values.reshape(len(stamps), *self.frame_shape)
        return self.gate.admit(self.kind, stamps, records)

    def close(self) -> None:
        self.stopping.set()
        self.reader.join(timeout=2 * LSL_READ_WAIT_S + 1.0)
        self.inlet.close_stream()


class ZmqSource:
    """rtnf's ZeroMQ messages (binary or CSV text) from one publisher, for the kinds given."""

    def __init__(self, address: str, kinds: list[str], context=None,
                 max_message_bytes: int = DEFAULT_MAX_BYTES,
                 max_queued_bytes: int = QUEUE_BYTES):
        """Messages waiting to be polled: at most ZMQ_HIGH_WATER_MARK and `max_queued_bytes`
        (in ZeroMQ as much again); what does not fit is dropped and counted (QUEUE_FULL)."""
        self.kinds, self.rejected = kinds, Counter()
        self.gate = RecordGate(self.rejected)
        self.max_message_bytes = max_message_bytes
        self.name = f"zmq:{address}"
        self.subscriber = Subscriber(address, [TOPICS[Kind[kind.upper()]] for kind in kinds],
                                     max_message_bytes, ZMQ_HIGH_WATER_MARK, context,
                                     max_queued_bytes=max_queued_bytes, rejected=self.rejected)
        self.socket = self.subscriber.socket

    def poll(self, timeout: float) -> list[Batch]:
        batches: list[Batch] = []
        if not self.subscriber.poll(timeout):
            return batches
        for _ in range(MAX_MESSAGES_PER_POLL):
            parts = self.subscriber.receive()
            if parts is None:
                break
            try:
                kind, timestamps, records = _message_records(
                    decode_multipart(parts, self.max_message_bytes))
            except MessageError as exc:
                self.rejected[exc.reason] += 1
                continue
            batches += self.gate.admit(kind, timestamps, records)
        return batches

    def close(self) -> None:
        self.subscriber.close()


def _message_records(message: Message) -> tuple[str, np.ndarray, np.ndarray]:
    """A decoded message as (kind, timestamps, records); behaviour padded to three channels."""
    if isinstance(message, SpikeMessage):
        return "spikes", message.timestamps, message.unit_ids
    if isinstance(message, FrameMessage):
        return "frames", message.timestamps, message.images
    channels = message.values.shape[1]
    if channels > len(BEHAVIOR_CHANNELS):
        raise MessageError(f"behaviour message with {channels} channels; rtnf takes at most "
                           f"{len(BEHAVIOR_CHANNELS)} ({', '.join(BEHAVIOR_CHANNELS)})",
                           "too many behaviour channels")
    values = np.full((len(message.timestamps), len(BEHAVIOR_CHANNELS)), np.nan, np.float32)
    values[:, :channels] = message.values
    return "behavior", message.timestamps, values


# ---------------------------------------------------------------------------------------------
# Opening the rig's sources
# ---------------------------------------------------------------------------------------------


def open_sources(rig: RigConfig, transport: str | None = None,
                 simulation: SimulationConfig | None = None,
                 max_message_bytes: int = DEFAULT_MAX_BYTES) -> list[Source]:
    """The rig's configured inputs (spikes required; behaviour and frames unless `none`).

    `transport` replaces every configured kind that is not `none`. Kinds that share a ZeroMQ
    address share one subscriber; kinds replayed from the same file share one `ReplaySource`, as
    do `sim` kinds (one session simulated from `simulation` with profile rig.profile, looped).
    """
    groups = _source_groups(_source_kinds(rig, transport), rig)
    needs_clock = any(source_kind != "zmq" for source_kind, _ in groups)
    pylsl = import_pylsl(rig.lsl.config, rig.lsl.session_id) if needs_clock else None
    sources: list[Source] = []
    try:
        for (source_kind, key), kinds in groups.items():
            sources.append(_open_group(source_kind, key, kinds, rig, simulation, pylsl,
                                       max_message_bytes))
    except BaseException:
        for source in sources:
            source.close()
        raise
    return sources


def _source_kinds(rig: RigConfig, transport: str | None) -> dict[str, str]:
    """kind -> source kind, checked: spikes required, Open Ephys for spikes only."""
    configured = {kind: getattr(rig.sources, kind).kind for kind in KINDS}
    kinds = {kind: transport if transport and value != "none" else value
             for kind, value in configured.items()}
    for kind, value in kinds.items():
        if value not in SOURCE_KINDS:
            raise RtnfError(f"rig.sources.{kind}.kind = {value!r}: expected one of "
                            f"{', '.join(SOURCE_KINDS)}")
        if value == "openephys" and kind != "spikes":
            raise RtnfError(f"rig.sources.{kind}.kind = openephys: the Open Ephys ZMQ Interface "
                            "gives spikes only")
    if kinds["spikes"] == "none":
        raise RtnfError("rig.sources.spikes.kind is none: rtnf needs a spike stream")
    return kinds


def _source_groups(kinds: dict[str, str], rig: RigConfig) -> dict[tuple[str, str], list[str]]:
    """(source kind, what identifies one source) -> the kinds it delivers."""
    groups: dict[tuple[str, str], list[str]] = {}
    for kind, source_kind in kinds.items():
        source = getattr(rig.sources, kind)
        key = {"lsl": kind, "zmq": source.address, "openephys": source.address,
               "replay": source.file, "sim": "", "none": None}[source_kind]
        if key is not None:
            groups.setdefault((source_kind, key), []).append(kind)
    return groups


def _open_group(source_kind: str, key: str, kinds: list[str], rig: RigConfig,
                simulation: SimulationConfig | None, pylsl: ModuleType | None,
                max_message_bytes: int) -> Source:
    """One source delivering `kinds` (Open Ephys and replay are imported only when used)."""
    first: SourceConfig = getattr(rig.sources, kinds[0])
    if source_kind == "lsl":
        return LslSource(kinds[0], first, pylsl)
    if source_kind == "zmq":
        return ZmqSource(key, kinds, max_message_bytes=max_message_bytes)
    if source_kind == "openephys":
        from rtnf.stream.openephys import OpenEphysSource

        return OpenEphysSource(key, first.sample_rate, clock=pylsl.local_clock,
                               max_message_bytes=max_message_bytes)
    from rtnf.stream.replay import ReplaySource

    speed = _shared_speed(rig, kinds)
    if source_kind == "replay":
        return ReplaySource(_replayed_session(rig, kinds), kinds, speed,
                            clock=pylsl.local_clock, name=f"replay:{key}")
    return ReplaySource(_simulated_session(rig, kinds, simulation), kinds, speed, loop=True,
                        clock=pylsl.local_clock, name=f"sim:{rig.profile}")


def _shared_speed(rig: RigConfig, kinds: list[str]) -> float:
    speeds = {kind: getattr(rig.sources, kind).speed for kind in kinds}
    if len(set(speeds.values())) > 1:
        listed = ", ".join(f"rig.sources.{kind}.speed = {speed:g}" for kind, speed in
                           speeds.items())
        raise RtnfError(f"{listed}: kinds played from one session share one speed")
    return speeds[kinds[0]]


def _replayed_session(rig: RigConfig, kinds: list[str]) -> Session:
    from rtnf.data.io import read_session

    path = getattr(rig.sources, kinds[0]).file
    if not path:
        raise RtnfError(f"rig.sources.{kinds[0]}.file is empty: replay needs a session file "
                        "(.npz, .nwb or .xdf)")
    return read_session(path, rig.nwb, rig.xdf)


def _simulated_session(rig: RigConfig, kinds: list[str],
                       simulation: SimulationConfig | None) -> Session:
    from rtnf.data.sim import simulate

    if simulation is None:
        raise RtnfError(f"rig.sources.{kinds[0]}.kind = sim needs the simulation section of the "
                        "configuration (open_sources(..., simulation=config.simulation))")
    return simulate(simulation, rig.profile)[0]
