"""Sinks: where each window's outputs leave rtnf. LSL outlets, a ZeroMQ PUB socket, the Bpod
state machine's App serial port, and pybpod's UDP `net_port`.

The real-time loop hands every open sink each `WindowOutput` (one per processed window) and each
`TelemetrySample` (`rtnf.stream.window_output`). Once a sink is open it never blocks and never
raises: every send is non-blocking, and a failure (a full queue, a vanished serial port, a UDP
error) is counted in the sink's `errors`, a `collections.Counter` keyed by a readable reason;
the sink carries on. A send that fails is dropped, never retried: a late command is worse than a
missing one in a closed loop. Opening a sink that cannot work (bad address, port in use, no such
serial device) raises `RtnfError` with one line naming the rtnf.yaml key and its value.

`open_sinks` opens the sinks that rtnf.yaml's `outputs:` section enables; `close_sinks` closes
them. A command (`Command`) goes to a sink only if its `sinks` names that sink ("lsl", "zmq",
"bpod_serial", "bpod_udp").

LSL (`LslSink`): four outlets, each sample stamped with its window end t_k, so a receiver's
latency is its `pylsl.local_clock()` at arrival minus the sample's timestamp:

    <prefix>-decoded    type Decoded,   double64, rate 1/hop: sequence, then the targets
    <prefix>-predicted  type Predicted, double64, rate 1/hop: sequence, then unit-<id> per unit
                        (expected spikes in [t_k, t_k + window))
    <prefix>-control    type Markers,   string, irregular: command, rule, sequence (as text)
    <prefix>-telemetry  type Telemetry, double64, rate 1/hop: sequence, latency_ms, <stage>_ms
                        for each of STAGES (NaN if not measured), then the counters
                        TELEMETRY_COUNTERS: windows, skipped, late_spikes, rejected,
                        reconnects, engine_errors, engine_skipped (0 if absent)

Labels, units and types are in desc/channels/channel/{label,unit,type}; desc/rtnf holds the hop
and the prediction window in seconds and the rig's name.

ZeroMQ (`ZmqSink`), the public contract for Bonsai workflows: a PUB socket bound to
outputs.zmq.address sends two-frame messages [topic, payload] on the topics `decoded`,
`predicted`, `control` (one message per command routed to "zmq") and `telemetry`. Field order:

  outputs.zmq.format = csv: one line of UTF-8 text, comma-separated, no trailing newline.
    decoded    seq,window_end,<target 1>,...,<target T>     (OutputLayout.targets order)
    predicted  seq,window_end,<count 1>,...,<count N>       (OutputLayout.unit_ids order)
    control    seq,window_end,command,rule
    telemetry  seq,window_end,latency_ms,ingest_ms,close_ms,tokenize_ms,infer_ms,publish_ms,
               windows,skipped,late_spikes,rejected,reconnects,engine_errors,engine_skipped
  seq and the counters are integers; window_end is seconds on the stream clock written with
  '%.6f'; the other values use '%.6g', with NaN, Infinity and -Infinity spelled as .NET parses
  them. A Bonsai workflow reads them with Subscriber -> Last -> ConvertToString -> Parse, e.g.
  the pattern `%i,%d,%d,%d,%d` for three decoded targets (`%i` int, `%d` double) or
  `%i,%d,%s,%s` for control. Command and rule names must not contain commas.

  outputs.zmq.format = msgpack: one map per message.
    decoded    {"seq": int, "t": float, "values": [float, ...]}
    predicted  {"seq": int, "t": float, "counts": [float, ...]}
    control    {"seq": int, "t": float, "command": str, "rule": str}
    telemetry  {"seq": int, "t": float, "latency_ms": float,
                "stages": {stage: ms for each of STAGES, NaN if not measured},
                "counters": {name: int for each of TELEMETRY_COUNTERS}}

  Each subscriber has a queue of outputs.zmq.high_water_mark messages. When a subscriber's queue
  is full the message is dropped (for every subscriber: the socket runs with ZMQ_XPUB_NODROP so
  that ZeroMQ reports the drop instead of hiding it) and counted in `errors`.

Bpod: `BpodSerialSink` writes the single byte n = Command.soft_code (0..255) to the state
machine's App serial port, where it becomes the event APP_SoftCode<n>. `BpodUdpSink` sends the
text `SoftCode<n>` (n = 1..9) to pybpod-api's UDP `net_port`.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Protocol

import msgpack
import serial
import zmq

from rtnf.config import OutputsConfig, ZmqOutputConfig
from rtnf.errors import RtnfError
from rtnf.stream.lslconfig import import_pylsl
from rtnf.stream.window_output import STAGES, Command, OutputLayout, TelemetrySample, WindowOutput

# The running counters every telemetry sample carries, in this order (new ones go at the end:
# receivers read them by position); `Telemetry.counter_values` gives exactly these.
TELEMETRY_COUNTERS = ("windows", "skipped", "late_spikes", "rejected", "reconnects",
                      "engine_errors", "engine_skipped")
SERIAL_REOPEN_INTERVAL_S = 1.0
APP_PORT_SOFT_CODES = range(256)  # one byte on the App port
NET_PORT_SOFT_CODES = range(1, 10)  # pybpod reads one digit and sends soft code k - 1


class Sink(Protocol):
    """Where outputs leave rtnf. `publish*` never block and never raise once the sink is open."""

    name: str
    errors: Counter[str]

    def publish(self, output: WindowOutput) -> None: ...

    def publish_telemetry(self, sample: TelemetrySample) -> None: ...

    def close(self) -> None: ...


def _routed(commands: Sequence[Command], sink: str) -> list[Command]:
    """The commands that go to `sink` (one of window_output.SINKS)."""
    return [command for command in commands if sink in command.sinks]


def _stage_values(sample: TelemetrySample) -> list[float]:
    """Milliseconds per STAGES entry, NaN where the sample has none."""
    return [float(sample.stage_ms.get(stage, math.nan)) for stage in STAGES]


def _counter_values(sample: TelemetrySample) -> list[int]:
    """The TELEMETRY_COUNTERS, in that order, 0 where the sample has none."""
    return [int(sample.counters.get(name, 0)) for name in TELEMETRY_COUNTERS]


def _soft_code_for(command: Command, valid: range, errors: Counter[str], sink: str) -> int | None:
    """The command's soft code if `valid` holds it; otherwise count the reason and give None."""
    if command.soft_code is None:
        errors[f"{sink}: command without a soft code dropped"] += 1
        return None
    if command.soft_code not in valid:
        errors[f"{sink}: soft code outside {valid.start}..{valid.stop - 1} dropped"] += 1
        return None
    return command.soft_code


# ---------------------------------------------------------------------------------------------
# LSL
# ---------------------------------------------------------------------------------------------

_Channel = tuple[str, str, str]  # label, unit, type
_SEQUENCE_CHANNEL: _Channel = ("sequence", "count", "Sequence")


def _lsl_channels(layout: OutputLayout) -> dict[str, list[_Channel]]:
    """Each outlet's channels, by stream suffix."""
    return {
        "decoded": [_SEQUENCE_CHANNEL, *((target, unit, "Decoded") for target, unit
                                        in zip(layout.targets, layout.target_units))],
        "predicted": [_SEQUENCE_CHANNEL,
                      *((f"unit-{int(unit)}", "spikes", "Predicted") for unit in layout.unit_ids)],
        "control": [("command", "", "Marker"), ("rule", "", "Marker"), _SEQUENCE_CHANNEL],
        "telemetry": [_SEQUENCE_CHANNEL, ("latency_ms", "ms", "Latency"),
                      *((f"{stage}_ms", "ms", "Stage") for stage in STAGES),
                      *((name, "count", "Counter") for name in TELEMETRY_COUNTERS)],
    }


_LSL_TYPES = {"decoded": "Decoded", "predicted": "Predicted", "control": "Markers",
             "telemetry": "Telemetry"}


class LslSink:
    """Four LSL outlets (module docstring); samples are stamped with their window end."""

    name = "lsl"

    def __init__(self, layout: OutputLayout, prefix: str, rig_name: str, pylsl: ModuleType):
        self.errors: Counter[str] = Counter()
        self.source_ids: dict[str, str] = {}
        self._outlets: dict[str, object] = {}
        for stream, channels in _lsl_channels(layout).items():
            info = self._stream_info(pylsl, layout, prefix, rig_name, stream, channels)
            try:
                self._outlets[stream] = pylsl.StreamOutlet(info)
            except RuntimeError as exc:
                self.close()
                raise RtnfError(f"outputs.lsl.prefix = {prefix}: cannot open LSL outlet "
                                f"{prefix}-{stream} ({exc})") from None
            self.source_ids[stream] = info.source_id()

    @staticmethod
    def _stream_info(pylsl: ModuleType, layout: OutputLayout, prefix: str, rig_name: str,
                     stream: str, channels: list[_Channel]):
        """The outlet's StreamInfo with its channels and desc/rtnf described."""
        if stream == "control":
            rate, channel_format = pylsl.IRREGULAR_RATE, pylsl.cf_string
        else:
            rate, channel_format = 1.0 / layout.hop, pylsl.cf_double64
        info = pylsl.StreamInfo(f"{prefix}-{stream}", _LSL_TYPES[stream], len(channels), rate,
                                channel_format, f"{prefix}-{rig_name}-{stream}")
        described = info.desc().append_child("channels")
        for label, unit, kind in channels:
            channel = described.append_child("channel")
            channel.append_child_value("label", label)
            channel.append_child_value("unit", unit)
            channel.append_child_value("type", kind)
        rtnf = info.desc().append_child("rtnf")
        rtnf.append_child_value("hop", repr(layout.hop))
        rtnf.append_child_value("window", repr(layout.window))
        rtnf.append_child_value("rig", rig_name)
        return info

    def publish(self, output: WindowOutput) -> None:
        sequence = float(output.sequence)
        self._push("decoded", [sequence, *output.decoded.tolist()], output.window_end)
        self._push("predicted", [sequence, *output.predicted.tolist()], output.window_end)
        for command in _routed(output.commands, "lsl"):
            self._push("control", [command.name, command.rule, str(output.sequence)],
                       output.window_end)

    def publish_telemetry(self, sample: TelemetrySample) -> None:
        values = [float(sample.sequence), float(sample.latency_ms), *_stage_values(sample),
                  *map(float, _counter_values(sample))]
        self._push("telemetry", values, sample.window_end)

    def _push(self, stream: str, sample: list, timestamp: float) -> None:
        try:
            self._outlets[stream].push_sample(sample, timestamp, True)
        except ValueError:  # pylsl: the sample's length is not the outlet's channel count
            self.errors[f"lsl {stream}: sample does not match the layout, dropped"] += 1
        except RuntimeError as exc:  # pylsl's errors from liblsl
            self.errors[f"lsl {stream}: push failed ({type(exc).__name__})"] += 1

    def close(self) -> None:
        self._outlets.clear()  # a dropped outlet is destroyed and leaves the network


# ---------------------------------------------------------------------------------------------
# ZeroMQ
# ---------------------------------------------------------------------------------------------


def _csv_number(value: float) -> str:
    """'%.6g', with non-finite values spelled as .NET's invariant culture parses them."""
    if math.isfinite(value):
        return f"{value:.6g}"
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _csv_line(sequence: int, window_end: float, fields: list[str]) -> bytes:
    return ",".join([str(sequence), f"{window_end:.6f}", *fields]).encode("utf-8")


class _CsvPayloads:
    """Text payloads for Bonsai's Parse node (module docstring)."""

    @staticmethod
    def decoded(output: WindowOutput) -> bytes:
        values = [_csv_number(v) for v in output.decoded.tolist()]
        return _csv_line(output.sequence, output.window_end, values)

    @staticmethod
    def predicted(output: WindowOutput) -> bytes:
        counts = [_csv_number(v) for v in output.predicted.tolist()]
        return _csv_line(output.sequence, output.window_end, counts)

    @staticmethod
    def control(output: WindowOutput, command: Command) -> bytes:
        return _csv_line(output.sequence, output.window_end, [command.name, command.rule])

    @staticmethod
    def telemetry(sample: TelemetrySample) -> bytes:
        fields = [_csv_number(float(sample.latency_ms)),
                  *(_csv_number(v) for v in _stage_values(sample)),
                  *(str(n) for n in _counter_values(sample))]
        return _csv_line(sample.sequence, sample.window_end, fields)


class _MsgpackPayloads:
    """msgpack maps (module docstring)."""

    @staticmethod
    def decoded(output: WindowOutput) -> bytes:
        return msgpack.packb({"seq": int(output.sequence), "t": float(output.window_end),
                              "values": output.decoded.tolist()})

    @staticmethod
    def predicted(output: WindowOutput) -> bytes:
        return msgpack.packb({"seq": int(output.sequence), "t": float(output.window_end),
                              "counts": output.predicted.tolist()})

    @staticmethod
    def control(output: WindowOutput, command: Command) -> bytes:
        return msgpack.packb({"seq": int(output.sequence), "t": float(output.window_end),
                              "command": command.name, "rule": command.rule})

    @staticmethod
    def telemetry(sample: TelemetrySample) -> bytes:
        return msgpack.packb({"seq": int(sample.sequence), "t": float(sample.window_end),
                              "latency_ms": float(sample.latency_ms),
                              "stages": dict(zip(STAGES, _stage_values(sample))),
                              "counters": dict(zip(TELEMETRY_COUNTERS, _counter_values(sample)))})


_PAYLOADS = {"csv": _CsvPayloads, "msgpack": _MsgpackPayloads}


class ZmqSink:
    """A bound PUB socket sending [topic, payload] without blocking (module docstring)."""

    name = "zmq"

    def __init__(self, layout: OutputLayout, config: ZmqOutputConfig,
                 context: zmq.Context | None = None):
        if config.format not in _PAYLOADS:
            raise RtnfError(f"outputs.zmq.format = {config.format}: expected one of "
                            f"{', '.join(_PAYLOADS)}")
        self.errors: Counter[str] = Counter()
        self._payloads = _PAYLOADS[config.format]
        self._sizes = {"decoded": len(layout.targets), "predicted": len(layout.unit_ids)}
        self._socket = (context or zmq.Context.instance()).socket(zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, config.high_water_mark)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.XPUB_NODROP, 1)  # a full queue raises zmq.Again: counted
        try:
            self._socket.bind(config.address)
        except zmq.ZMQError as exc:
            self._socket.close()
            raise RtnfError(f"outputs.zmq.address = {config.address}: cannot bind ({exc})") \
                from None
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def publish(self, output: WindowOutput) -> None:
        if self._fits_layout("decoded", output.decoded.size):
            self._send(b"decoded", self._payloads.decoded(output))
        if self._fits_layout("predicted", output.predicted.size):
            self._send(b"predicted", self._payloads.predicted(output))
        for command in _routed(output.commands, "zmq"):
            self._send(b"control", self._payloads.control(output, command))

    def publish_telemetry(self, sample: TelemetrySample) -> None:
        self._send(b"telemetry", self._payloads.telemetry(sample))

    def _fits_layout(self, topic: str, size: int) -> bool:
        """A payload's field count is part of the contract (a Bonsai Parse pattern)."""
        if size == self._sizes[topic]:
            return True
        self.errors[f"zmq {topic}: sample does not match the layout, dropped"] += 1
        return False

    def _send(self, topic: bytes, payload: bytes) -> None:
        try:
            self._socket.send_multipart((topic, payload), zmq.NOBLOCK)
        except zmq.Again:
            self.errors[f"zmq {topic.decode()}: subscriber queue full, dropped"] += 1
        except zmq.ZMQError as exc:
            self.errors[f"zmq {topic.decode()}: send failed ({exc.strerror})"] += 1

    def close(self) -> None:
        self._socket.close(linger=0)


# ---------------------------------------------------------------------------------------------
# Bpod
# ---------------------------------------------------------------------------------------------


def _open_serial(port: str, baudrate: int) -> serial.Serial:
    """The port opened non-blocking, locked against other users, with DTR asserted (the Bpod
    App port needs it). DTR is set before opening: pyserial then asserts it on open and
    tolerates devices without modem lines (a pty)."""
    device = serial.Serial()
    device.port, device.baudrate = port, baudrate
    device.timeout, device.write_timeout = 0, 0
    device.exclusive = True
    device.dtr = True
    device.open()
    return device


def _write_without_blocking(device: serial.Serial, data: bytes) -> int:
    """Bytes written, 0 when the output buffer is full.

    pyserial 3.5's POSIX `write` retries EAGAIN in a loop even with write_timeout=0 (it spins
    until the device drains), so on POSIX the byte goes straight to its non-blocking descriptor.
    """
    if os.name != "posix":
        return device.write(data) or 0
    try:
        return os.write(device.fileno(), data)
    except BlockingIOError:
        return 0


class BpodSerialSink:
    """Soft codes as single bytes on the Bpod state machine's App serial port (byte n becomes
    the event APP_SoftCode<n>). A port that fails (unplugged, device reset) is closed and
    re-opened at most once a second; commands meanwhile are dropped and counted."""

    name = "bpod_serial"

    def __init__(self, port: str, baudrate: int = 115200):
        self.errors: Counter[str] = Counter()
        self.port, self.baudrate = port, baudrate
        self._last_open_attempt = time.monotonic()
        self._closed = False
        try:
            self._device: serial.Serial | None = _open_serial(port, baudrate)
        except (serial.SerialException, ValueError) as exc:
            raise RtnfError(f"outputs.bpod.serial_port = {port}: cannot open ({exc})") from None

    def publish(self, output: WindowOutput) -> None:
        for command in _routed(output.commands, "bpod_serial"):
            code = _soft_code_for(command, APP_PORT_SOFT_CODES, self.errors, "bpod serial")
            if code is not None:
                self._write(bytes([code]))

    def publish_telemetry(self, sample: TelemetrySample) -> None:
        """The App port carries soft codes only."""

    def _write(self, data: bytes) -> None:
        device = self._device if self._device is not None else self._reopen()
        if device is None:
            self.errors["bpod serial: port unavailable, command dropped"] += 1
            return
        try:
            written = _write_without_blocking(device, data)
        except (serial.SerialException, OSError) as exc:
            self.errors[f"bpod serial: write failed ({exc}), command dropped"] += 1
            self._forget_device()
            return
        if written < len(data):
            self.errors["bpod serial: output buffer full, command dropped"] += 1

    def _reopen(self) -> serial.Serial | None:
        """The port opened again, or None if it still fails or was tried less than
        SERIAL_REOPEN_INTERVAL_S ago (or the sink is closed)."""
        now = time.monotonic()
        if self._closed or now - self._last_open_attempt < SERIAL_REOPEN_INTERVAL_S:
            return None
        self._last_open_attempt = now
        try:
            self._device = _open_serial(self.port, self.baudrate)
        except (serial.SerialException, OSError):
            self.errors["bpod serial: reopen failed"] += 1
        return self._device

    def _forget_device(self) -> None:
        """Close a failed port; the next reopen waits SERIAL_REOPEN_INTERVAL_S from now."""
        with contextlib.suppress(serial.SerialException, OSError):
            self._device.close()
        self._device = None
        self._last_open_attempt = time.monotonic()

    def close(self) -> None:
        self._closed = True
        if self._device is not None:
            self._forget_device()


# pybpod-api's net_port listener (pybpod/pybpod-api, pybpodapi/bpod/bpod_base.py,
# Bpod.handle_inline, and non_blockingsocketreceive.py): each datagram is read with recv(64),
# decoded and stripped, so no newline is needed; `inline.startswith('SoftCode')` then
# `softcode = int(inline[-1]) - 1` and `trigger_softcode(softcode)`. Only the last character is
# read, hence one digit, 1..9 (SoftCode0 would ask for soft code -1).
class BpodUdpSink:
    """`SoftCode<n>` datagrams to pybpod-api's UDP net_port (Bpod(net_port=N))."""

    name = "bpod_udp"

    def __init__(self, host: str, port: int):
        self.errors: Counter[str] = Counter()
        if not 0 < port < 65536:
            raise RtnfError(f"outputs.bpod.net_port = {port}: not a UDP port (1..65535)")
        try:
            family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        except OSError as exc:
            raise RtnfError(f"outputs.bpod.net_host = {host}: cannot resolve ({exc})") from None
        self._socket = socket.socket(family, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        try:
            self._socket.connect(address)  # no traffic; lets ICMP "port unreachable" show up
        except OSError as exc:
            self._socket.close()
            raise RtnfError(f"outputs.bpod.net_host = {host}, net_port = {port}: cannot "
                            f"address ({exc})") from None

    def publish(self, output: WindowOutput) -> None:
        for command in _routed(output.commands, "bpod_udp"):
            code = _soft_code_for(command, NET_PORT_SOFT_CODES, self.errors, "bpod udp")
            if code is not None:
                self._send(f"SoftCode{code}".encode("ascii"))

    def publish_telemetry(self, sample: TelemetrySample) -> None:
        """pybpod's net_port takes commands only."""

    def _send(self, datagram: bytes) -> None:
        try:
            self._socket.send(datagram)
        except BlockingIOError:
            self.errors["bpod udp: send buffer full, command dropped"] += 1
        except ConnectionRefusedError:
            self.errors["bpod udp: refused (is pybpod listening on net_port?), "
                        "command dropped"] += 1
        except OSError as exc:
            self.errors[f"bpod udp: send failed ({exc.strerror}), command dropped"] += 1

    def close(self) -> None:
        self._socket.close()


# ---------------------------------------------------------------------------------------------
# Opening and closing the configured sinks
# ---------------------------------------------------------------------------------------------


def open_sinks(outputs: OutputsConfig, layout: OutputLayout, rig_name: str,
               lsl_setting: str = "loopback") -> list[Sink]:
    """The sinks `outputs` enables: LSL, ZeroMQ, the Bpod App serial port (when
    bpod.serial_port is set) and pybpod's UDP port (when bpod.net_port > 0). If one cannot be
    opened, those already open are closed and the RtnfError is raised."""
    openers: list[Callable[[], Sink]] = []
    if outputs.lsl.enabled:
        openers.append(lambda: LslSink(layout, outputs.lsl.prefix, rig_name,
                                       import_pylsl(lsl_setting)))
    if outputs.zmq.enabled:
        openers.append(lambda: ZmqSink(layout, outputs.zmq))
    if outputs.bpod.serial_port:
        openers.append(lambda: BpodSerialSink(outputs.bpod.serial_port))
    if outputs.bpod.net_port > 0:
        openers.append(lambda: BpodUdpSink(outputs.bpod.net_host, outputs.bpod.net_port))
    sinks: list[Sink] = []
    try:
        for open_sink in openers:
            sinks.append(open_sink())
    except BaseException:
        close_sinks(sinks)
        raise
    return sinks


def close_sinks(sinks: Sequence[Sink]) -> None:
    """Close every sink (each close releases its socket, port or outlets)."""
    for sink in sinks:
        sink.close()
