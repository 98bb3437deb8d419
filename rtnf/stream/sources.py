"""Rig inputs as batches of timestamped records: LSL inlets and ZeroMQ subscribers.

A source yields `Batch`es: the kind (`spikes`, `behavior`, `frames`), timestamps in seconds on
the receiving machine's LSL clock (pylsl.local_clock), and one record per timestamp (a unit id;
the three behaviour values in `BEHAVIOR_CHANNELS` order, NaN where the stream lacks one; a uint8
image). `poll(timeout)` waits at most `timeout` seconds and never blocks longer.

- LSL (`LslSource`): the stream named in rig.sources.<kind>.lsl (then type and source id when
  given) is resolved with discovery scoped by rig.lsl.config (loopback by default); the inlet
  has `recover` on and clock synchronisation on, so timestamps are mapped onto this machine's
  clock (`time_correction`). Spike streams have one int channel (unit id) or two (channel,
  unit: RIGS.md); behaviour channels are matched by the labels in the stream description;
  frames are reshaped with the description's height and width.
- ZeroMQ (`ZmqSource`): a SUB socket connects to the publisher's address and takes rtnf's binary
  messages (`rtnf.stream.zmq_messages`). A malformed message is rejected and counted by reason
  (`rejected`), never unpickled, never fatal.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import numpy as np

from rtnf.config import RigConfig, SourceConfig
from rtnf.errors import RtnfError
from rtnf.stream.lslconfig import import_pylsl
from rtnf.stream.zmq_messages import (BEHAVIOR_CHANNELS, TOPICS, BehaviorMessage, FrameMessage,
                                      Kind, MessageError, SpikeMessage, decode_multipart)

KINDS = ("spikes", "behavior", "frames")
RESOLVE_TIMEOUT_S = 5.0
ZMQ_HIGH_WATER_MARK = 100_000  # messages queued before ZeroMQ drops (a capture must not lose any)


@dataclass
class Batch:
    kind: str  # "spikes", "behavior" or "frames"
    timestamps: np.ndarray  # (n,) float64 seconds, this machine's LSL clock
    records: np.ndarray  # spikes (n,) int64 unit ids; behavior (n, 3) float32; frames (n, H, W)


class Source(Protocol):
    name: str
    rejected: Counter

    def poll(self, timeout: float) -> list[Batch]:
        ...

    def close(self) -> None:
        ...


class LslSource:
    """One LSL stream of the rig (spikes, behaviour or frames)."""

    def __init__(self, kind: str, source: SourceConfig, pylsl: ModuleType,
                 resolve_timeout: float = RESOLVE_TIMEOUT_S):
        self.kind, self.pylsl, self.rejected = kind, pylsl, Counter()
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
        flags = pylsl.proc_clocksync  # timestamps mapped onto this machine's clock
        self.inlet = pylsl.StreamInlet(found[0], max_buflen=360, recover=True,
                                       processing_flags=flags)
        info = self.inlet.info(resolve_timeout)
        self.channels = info.channel_count()
        self.behavior_columns = self._behavior_columns(info) if kind == "behavior" else None
        self.frame_shape = self._frame_shape(info) if kind == "frames" else None
        self.inlet.open_stream(resolve_timeout)

    @staticmethod
    def _labels(info) -> list[str]:
        labels, channel = [], info.desc().child("channels").child("channel")
        while not channel.empty():
            labels.append(channel.child_value("label"))
            channel = channel.next_sibling()
        return labels

    def _behavior_columns(self, info) -> list[int | None]:
        """For each of BEHAVIOR_CHANNELS, the stream's column holding it (None: absent)."""
        labels = self._labels(info)
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
        if shape[0] * shape[1] != self.channels:
            raise RtnfError(f"LSL stream {self.name}: frame {shape[0]}x{shape[1]} does not match "
                            f"its {self.channels} channels")
        return shape

    def poll(self, timeout: float) -> list[Batch]:
        samples, stamps = self.inlet.pull_chunk(timeout=timeout, max_samples=100_000)
        if not stamps:
            return []
        values, stamps = np.asarray(samples), np.asarray(stamps, dtype=np.float64)
        if self.kind == "spikes":
            records = values[:, -1].astype(np.int64)  # (unit) or (channel, unit)
        elif self.kind == "behavior":
            records = np.full((len(stamps), len(BEHAVIOR_CHANNELS)), np.nan, dtype=np.float32)
            for k, column in enumerate(self.behavior_columns):
                if column is not None:
                    records[:, k] = values[:, column]
        else:
            if values.min() < 0 or values.max() > 255:
                self.rejected["frame pixels outside 0..255"] += len(stamps)
                return []
            records = values.astype(np.uint8).reshape(len(stamps), *self.frame_shape)
        return [Batch(self.kind, stamps, records)]

    def close(self) -> None:
        self.inlet.close_stream()


class ZmqSource:
    """rtnf's ZeroMQ messages from one publisher, for the kinds given."""

    def __init__(self, address: str, kinds: list[str], context=None):
        import zmq

        self.zmq, self.kinds, self.rejected = zmq, kinds, Counter()
        self.name = f"zmq:{address}"
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, ZMQ_HIGH_WATER_MARK)
        self.socket.setsockopt(zmq.LINGER, 0)
        for kind in kinds:
            self.socket.setsockopt(zmq.SUBSCRIBE, TOPICS[Kind[kind.upper()]])
        self.socket.connect(address)

    def poll(self, timeout: float) -> list[Batch]:
        batches: list[Batch] = []
        if not self.socket.poll(int(timeout * 1000)):
            return batches
        while True:
            try:
                parts = self.socket.recv_multipart(self.zmq.NOBLOCK)
            except self.zmq.Again:
                return batches
            try:
                message = decode_multipart(parts)
            except MessageError as exc:
                self.rejected[str(exc)] += 1
                continue
            if isinstance(message, SpikeMessage):
                batches.append(Batch("spikes", message.timestamps.copy(),
                                     message.unit_ids.astype(np.int64)))
            elif isinstance(message, BehaviorMessage):
                batches.append(Batch("behavior", message.timestamps.copy(),
                                     message.values.copy()))
            elif isinstance(message, FrameMessage):
                batches.append(Batch("frames", message.timestamps.copy(), message.images.copy()))

    def close(self) -> None:
        self.socket.close(linger=0)


def open_sources(rig: RigConfig, transport: str | None = None) -> list[Source]:
    """The rig's configured inputs (spikes required; behaviour and frames unless `none`);
    `transport` (lsl or zmq) replaces every configured kind that is not `none`."""
    chosen = {kind: getattr(rig.sources, kind) for kind in KINDS}
    kinds = {kind: transport if transport and source.kind != "none" else source.kind
             for kind, source in chosen.items()}
    if kinds["spikes"] == "none":
        raise RtnfError("rig.sources.spikes.kind is none: rtnf needs a spike stream")
    unsupported = {kind: k for kind, k in kinds.items() if k not in ("lsl", "zmq", "none")}
    if unsupported:
        kind, value = next(iter(unsupported.items()))
        raise RtnfError(f"rig.sources.{kind}.kind = {value}: capturing supports lsl and zmq")
    sources: list[Source] = []
    pylsl = None
    by_address: dict[str, list[str]] = {}
    try:
        for kind, source_kind in kinds.items():
            if source_kind == "lsl":
                pylsl = pylsl or import_pylsl(rig.lsl.config, rig.lsl.session_id)
                sources.append(LslSource(kind, chosen[kind], pylsl))
            elif source_kind == "zmq":
                by_address.setdefault(chosen[kind].address, []).append(kind)
        sources += [ZmqSource(address, kinds_) for address, kinds_ in by_address.items()]
    except BaseException:
        for source in sources:
            source.close()
        raise
    return sources
