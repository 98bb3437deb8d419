"""Sorted spikes from the Open Ephys GUI's ZMQ Interface plugin, on this machine's clock.

The plugin (open-ephys-plugins/zmq-interface, Source/ZmqInterface.cpp) binds a PUB socket
(default tcp://*:5556) and sends, for its selected stream, multipart messages:

    frame 0  envelope   b"DATA\\0" (continuous data) or b"EVENT\\0" (spikes and TTL events)
    frame 1  header     JSON text:
             data   {"message_num", "type": "data", "content": {"stream", "channel_num",
                     "num_samples", "sample_num", "sample_rate"}, "data_size", "timestamp"}
             spike  {"message_num", "type": "spike", "spike": {"stream", "source_node",
                     "electrode", "sample_num", "num_channels", "num_samples", "sorted_id",
                     "threshold": [...]}, "timestamp"}        (the key is "spike", not "content")
             event  {"message_num", "type": "event", "content": {"stream", "source_node",
                     "type", "sample_num"}, "data_size", "timestamp"}
    frame 2  payload    data: float32 samples of one channel (data_size bytes); spike: the
                        waveform; event: the TTL bytes, and no frame 2 when data_size is 0

`message_num` restarts at 1 when acquisition starts; "timestamp" is the GUI's wall clock in ms
(not used). `OpenEphysSource` subscribes to everything and yields spike batches whose unit is
`sorted_id` (0 = unsorted: counted as "unsorted spike" and skipped); TTL events are ignored.
Malformed messages (wrong frame count, unknown envelope, bad JSON, missing or mistyped header
fields, a data payload whose length does not match) are rejected and counted, never fatal.

Clock mapping. A spike's time on the acquisition clock is sample_num / sample_rate, the rate
being the stream's `sample_rate` from its data messages once one has arrived, the configured
rate before. That clock is not this machine's, so it is mapped onto pylsl.local_clock by an
offset: the lower envelope (minimum) of arrival time - acquisition time over the last
`CLOCK_WINDOW_S` seconds of arrivals, from spikes and from data blocks (a block's acquisition
time is that of its end, the sample it was sent after). Every message arrives later than its
sample was acquired, by the GUI's processing and transport latency plus however long it waited
for `poll`; the minimum picks the fastest delivery in the window, so mapped times are
acquisition times on this clock plus that smallest latency (a near-constant bias: with data
blocks flowing, about the GUI's processing of one block; with spikes alone, up to a block
longer), and they drift by at most the window times the clocks' rate difference (about 0.5 ms
for 10 s at 50 ppm). A spike is never mapped before an earlier-sampled spike of its stream
already delivered (when the offset estimate drops, times are held at the last one delivered).
Sample numbers jumping back mean that acquisition restarted (they start again from 0): a data
block starting before the stream's previous block, or a spike more than `RESTART_JUMP_S` before
the latest sample seen (spikes of different electrodes may come slightly out of order). The
stream's mapping is then rebuilt from scratch and `restarts` counts it.

`encode_data` and `encode_spike_event` write messages in the plugin's format (for tests and
demos that stand in for the GUI).
"""

from __future__ import annotations

import json
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from rtnf.errors import RtnfError
from rtnf.stream.lslconfig import import_pylsl
from rtnf.stream.sources import MAX_MESSAGES_PER_POLL, ZMQ_HIGH_WATER_MARK, Batch, RecordGate
from rtnf.stream.subscriber import Subscriber
from rtnf.stream.zmq_messages import DEFAULT_MAX_BYTES, MessageError

DEFAULT_ADDRESS = "tcp://127.0.0.1:5556"
DATA_ENVELOPE = b"DATA\0"
EVENT_ENVELOPE = b"EVENT\0"
CLOCK_WINDOW_S = 10.0
RESTART_JUMP_S = 1.0
MAX_STREAMS = 16  # one plugin sends one stream; more is a foreign or hostile publisher
INVALID_FIELD = "missing or invalid header field"
SAMPLE_NUMBERS = (0, 2**62)
SORTED_IDS = (0, 2**31 - 1)
SAMPLE_RATES = (1.0, 1e7)  # Hz


@dataclass(frozen=True)
class DataBlock:
    """A data message's header: `num_samples` of one channel from `sample_num` on."""

    stream: str
    sample_num: int
    num_samples: int
    sample_rate: float


@dataclass(frozen=True)
class SpikeEvent:
    """A spike message's header: the peak's sample number and the sorted unit (0 unsorted)."""

    stream: str
    sample_num: int
    sorted_id: int


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------


def _header(text: bytes) -> dict:
    def refuse_constant(name: str) -> float:
        raise ValueError(f"{name} is not JSON")

    try:
        header = json.loads(bytes(text), parse_constant=refuse_constant)
    except (ValueError, RecursionError):
        raise MessageError(f"header {bytes(text[:32])!r}... is not JSON", "bad JSON") from None
    if not isinstance(header, dict):
        raise MessageError(f"header is JSON {type(header).__name__}, not an object", "bad JSON")
    return header


def _field(mapping: object, path: str, key: str, wanted: type | tuple[type, ...],
           bounds: tuple[float, float] | None = None) -> object:
    """mapping[key], checked to be of type `wanted` (never bool) and within `bounds`."""
    value = mapping.get(key) if isinstance(mapping, dict) else None
    if (not isinstance(value, wanted) or isinstance(value, bool)
            or (bounds is not None and not bounds[0] <= value <= bounds[1])):
        raise MessageError(f"header field {path}.{key} is {str(value)[:32]}", INVALID_FIELD)
    return value


def parse_message(parts: Sequence[bytes], max_bytes: int = DEFAULT_MAX_BYTES
                  ) -> DataBlock | SpikeEvent | None:
    """One ZMQ Interface message: a data block, a spike, or None for a TTL event."""
    size = sum(len(part) for part in parts)
    if size > max_bytes:
        raise MessageError(f"message of {size} bytes exceeds the limit of {max_bytes}",
                           "message too large")
    if len(parts) not in (2, 3):
        raise MessageError(f"expected 3 frames [envelope, header, payload], got {len(parts)}",
                           "wrong number of frames")
    envelope = bytes(parts[0])
    if envelope not in (DATA_ENVELOPE, EVENT_ENVELOPE):
        raise MessageError(f"unknown envelope {envelope[:16]!r}", "unknown envelope")
    header = _header(parts[1])
    kind = header.get("type")
    expected = ("data",) if envelope == DATA_ENVELOPE else ("spike", "event")
    if kind not in expected:
        raise MessageError(f"{envelope[:-1].decode()} message of type {str(kind)[:32]}",
                           "envelope does not match type")
    if kind == "event":
        return None
    if len(parts) != 3:
        raise MessageError(f"{kind} message without its payload frame", "wrong number of frames")
    if kind == "spike":
        spike = header.get("spike")
        return SpikeEvent(_field(spike, "spike", "stream", str),
                          _field(spike, "spike", "sample_num", int, SAMPLE_NUMBERS),
                          _field(spike, "spike", "sorted_id", int, SORTED_IDS))
    content = header.get("content")
    block = DataBlock(_field(content, "content", "stream", str),
                      _field(content, "content", "sample_num", int, SAMPLE_NUMBERS),
                      _field(content, "content", "num_samples", int, (0, max_bytes // 4)),
                      float(_field(content, "content", "sample_rate", (int, float),
                                   SAMPLE_RATES)))
    if len(parts[2]) != 4 * block.num_samples:
        raise MessageError(f"data payload of {len(parts[2])} bytes for {block.num_samples} "
                           "float32 samples", "wrong length")
    return block


def _message(envelope: bytes, header: dict, payload: bytes) -> list[bytes]:
    header["timestamp"] = int(time.time() * 1000)  # the GUI's wall clock, in ms
    return [envelope, json.dumps(header).encode(), payload]


def encode_data(samples: np.ndarray, sample_num: int, sample_rate: float,
                stream: str = "example_data", channel_num: int = 0,
                message_num: int = 1) -> list[bytes]:
    """A data message as the plugin sends it: one channel's float32 samples from `sample_num`."""
    payload = np.ascontiguousarray(samples, dtype="<f4").reshape(-1).tobytes()
    content = {"stream": stream, "channel_num": channel_num, "num_samples": len(payload) // 4,
               "sample_num": sample_num, "sample_rate": sample_rate}
    return _message(DATA_ENVELOPE, {"message_num": message_num, "type": "data",
                                    "content": content, "data_size": len(payload)}, payload)


def encode_spike_event(sample_num: int, sorted_id: int, stream: str = "example_data",
                       electrode: str = "Electrode 1", message_num: int = 1,
                       source_node: int = 100, num_channels: int = 1,
                       num_samples: int = 40) -> list[bytes]:
    """A spike message as the plugin sends it (the waveform is zeros)."""
    spike = {"stream": stream, "source_node": source_node, "electrode": electrode,
             "sample_num": sample_num, "num_channels": num_channels,
             "num_samples": num_samples, "sorted_id": sorted_id,
             "threshold": [-50.0] * num_channels}
    waveform = np.zeros(num_channels * num_samples, "<f4").tobytes()
    return _message(EVENT_ENVELOPE, {"message_num": message_num, "type": "spike",
                                     "spike": spike}, waveform)


# ---------------------------------------------------------------------------------------------
# Clock mapping
# ---------------------------------------------------------------------------------------------


class LowerEnvelope:
    """The minimum of values observed over the last `window` seconds of arrival time."""

    def __init__(self, window: float):
        self.window = window
        self._candidates: deque[tuple[float, float]] = deque()  # (arrival, value), values rise

    def observe(self, arrival: float, value: float) -> None:
        while self._candidates and self._candidates[-1][1] >= value:
            self._candidates.pop()
        self._candidates.append((arrival, value))
        while self._candidates[0][0] < arrival - self.window:
            self._candidates.popleft()

    @property
    def minimum(self) -> float:
        return self._candidates[0][1]

    def clear(self) -> None:
        self._candidates.clear()


@dataclass
class _StreamClock:
    """One acquisition stream's rate and its mapping onto this machine's clock."""

    sample_rate: float
    offset: LowerEnvelope = field(default_factory=lambda: LowerEnvelope(CLOCK_WINDOW_S))
    latest_sample: int = -1  # the highest sample number seen (restart detection)
    latest_block: int = -1  # where the latest data block started (restart detection)
    last_spike: tuple[int, float] | None = None  # (sample number, mapped time) last delivered

    def restart(self) -> None:
        self.offset.clear()
        self.latest_sample, self.latest_block, self.last_spike = -1, -1, None


class OpenEphysSource:
    """Spikes from one Open Ephys GUI ZMQ Interface plugin (a `Source`, kind spikes)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, sample_rate: float = 30000.0,
                 clock: Callable[[], float] | None = None, context=None,
                 max_message_bytes: int = DEFAULT_MAX_BYTES):
        if not SAMPLE_RATES[0] <= sample_rate <= SAMPLE_RATES[1]:
            raise RtnfError(f"Open Ephys sample_rate = {sample_rate}: expected "
                            f"{SAMPLE_RATES[0]:g} to {SAMPLE_RATES[1]:g} Hz")
        self.sample_rate, self.max_message_bytes = sample_rate, max_message_bytes
        self.clock = clock or import_pylsl().local_clock
        self.name = f"openephys:{address}"
        self.rejected: Counter = Counter()
        self.gate = RecordGate(self.rejected)
        self.restarts = 0  # acquisition restarts seen (sample numbers jumping back)
        self.streams: dict[str, _StreamClock] = {}
        self.subscriber = Subscriber(address, [b""], max_message_bytes, ZMQ_HIGH_WATER_MARK,
                                     context, rejected=self.rejected)
        self.socket = self.subscriber.socket

    def poll(self, timeout: float) -> list[Batch]:
        if not self.subscriber.poll(timeout):
            return []
        times, units = [], []
        for _ in range(MAX_MESSAGES_PER_POLL):
            parts = self.subscriber.receive()
            if parts is None:
                break
            arrival = self.clock()
            try:
                message = parse_message(parts, self.max_message_bytes)
                if isinstance(message, DataBlock):
                    self._on_data(message, arrival)
                elif isinstance(message, SpikeEvent):
                    mapped = self._on_spike(message, arrival)
                    if mapped is not None:
                        times.append(mapped)
                        units.append(message.sorted_id)
            except MessageError as exc:
                self.rejected[exc.reason] += 1
        return self.gate.admit("spikes", np.array(times), np.array(units, dtype=np.int64))

    def _stream(self, name: str, restarted: Callable[[_StreamClock], bool]) -> _StreamClock:
        """The stream's clock, rebuilt (and counted) if `restarted` says acquisition restarted."""
        if name not in self.streams and len(self.streams) >= MAX_STREAMS:
            raise MessageError(f"a message of stream {name[:32]!r} beyond the first "
                               f"{MAX_STREAMS} streams", "too many streams")
        stream = self.streams.setdefault(name, _StreamClock(self.sample_rate))
        if restarted(stream):
            stream.restart()
            self.restarts += 1
        return stream

    def _on_data(self, block: DataBlock, arrival: float) -> None:
        stream = self._stream(block.stream, lambda s: block.sample_num < s.latest_block)
        if block.sample_rate != stream.sample_rate:  # offsets seen so far used the wrong rate
            stream.sample_rate = block.sample_rate
            stream.restart()
        end = block.sample_num + block.num_samples
        stream.offset.observe(arrival, arrival - end / stream.sample_rate)
        stream.latest_sample = max(stream.latest_sample, end)
        stream.latest_block = block.sample_num

    def _on_spike(self, spike: SpikeEvent, arrival: float) -> float | None:
        """The spike's time on this machine's clock (None: unsorted, skipped and counted)."""
        stream = self._stream(spike.stream, lambda s: spike.sample_num < s.latest_sample
                              - RESTART_JUMP_S * s.sample_rate)
        acquired = spike.sample_num / stream.sample_rate
        stream.offset.observe(arrival, arrival - acquired)
        stream.latest_sample = max(stream.latest_sample, spike.sample_num)
        if spike.sorted_id == 0:
            self.rejected["unsorted spike"] += 1
            return None
        mapped = acquired + stream.offset.minimum
        previous = stream.last_spike
        if previous is None or spike.sample_num >= previous[0]:  # else: the gate judges it
            mapped = mapped if previous is None else max(mapped, previous[1])
            stream.last_spike = (spike.sample_num, mapped)
        return mapped

    def close(self) -> None:
        self.subscriber.close()
