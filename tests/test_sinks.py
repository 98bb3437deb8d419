"""Sinks against real receivers: an LSL inlet, a ZeroMQ SUB socket, a pseudo-terminal standing in
for the Bpod App port and a UDP socket standing in for pybpod's net_port (all on 127.0.0.1)."""

from __future__ import annotations

import math
import os
import select
import socket
import time
import uuid
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from rtnf.config import BpodOutputConfig, LslOutputConfig, OutputsConfig, ZmqOutputConfig
from rtnf.errors import RtnfError
from rtnf.stream.lslconfig import import_pylsl
from rtnf.rt.closed_loop import free_tcp_port
from rtnf.stream.sinks import (
    TELEMETRY_COUNTERS,
    BpodSerialSink,
    BpodUdpSink,
    LslSink,
    ZmqSink,
    close_sinks,
    open_sinks,
)
from rtnf.stream.window_output import STAGES, Command, OutputLayout, TelemetrySample, WindowOutput

LAYOUT = OutputLayout(targets=("speed", "gaze_phi", "gaze_theta"),
                      target_units=("cm/s", "deg", "deg"),
                      unit_ids=np.array([3, 7, 12, 40], dtype=np.int64), window=0.05, hop=0.05)
WAIT_S = 2.0


def window_output(sequence: int, rng: np.random.Generator, commands: tuple[Command, ...] = (),
                  layout: OutputLayout = LAYOUT) -> WindowOutput:
    return WindowOutput(sequence=sequence, window_end=1000.0 + sequence * layout.hop + 1e-7,
                        decoded=rng.normal(10.0, 5.0, len(layout.targets)).astype(np.float32),
                        predicted=rng.gamma(2.0, 0.5, len(layout.unit_ids)).astype(np.float32),
                        commands=commands)


def telemetry(sequence: int) -> TelemetrySample:
    stages = {stage: 0.25 * (i + 1) for i, stage in enumerate(STAGES) if stage != "close"}
    return TelemetrySample(sequence=sequence, window_end=1000.0 + sequence * 0.05,
                           stage_ms=stages, latency_ms=3.5,
                           counters={"windows": sequence + 1, "skipped": 2, "rejected": 7,
                                     "engine_errors": 3, "unrelated": 99})


def expected_telemetry_counters(sample: TelemetrySample) -> list[int]:
    return [sample.counters.get(name, 0) for name in TELEMETRY_COUNTERS]


# ---------------------------------------------------------------------------------------------
# LSL
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pylsl():
    return import_pylsl("loopback")


STREAMS = ("decoded", "predicted", "control", "telemetry")


def lsl_inlets(pylsl, prefix: str) -> dict:
    """An open inlet on each of the sink's four streams, by stream suffix."""
    found = pylsl.resolve_bypred(f"starts-with(name, '{prefix}-')", len(STREAMS), WAIT_S)
    inlets = {info.name().removeprefix(f"{prefix}-"): pylsl.StreamInlet(info) for info in found}
    assert sorted(inlets) == sorted(STREAMS)
    for inlet in inlets.values():
        inlet.open_stream(WAIT_S)
    return inlets


def channels(info) -> list[tuple[str, str, str]]:
    described, channel = [], info.desc().child("channels").child("channel")
    while not channel.empty():
        described.append((channel.child_value("label"), channel.child_value("unit"),
                          channel.child_value("type")))
        channel = channel.next_sibling()
    return described


def test_lsl_outlets_describe_their_channels(pylsl):
    prefix = f"rtnf-test-{uuid.uuid4().hex[:8]}"
    sink = LslSink(LAYOUT, prefix, "rig-a", pylsl)
    try:
        infos = {stream: inlet.info(WAIT_S) for stream, inlet in lsl_inlets(pylsl, prefix).items()}
    finally:
        sink.close()
    decoded = infos["decoded"]
    assert (decoded.type(), decoded.channel_format()) == ("Decoded", pylsl.cf_double64)
    assert decoded.nominal_srate() == pytest.approx(20.0)
    assert channels(decoded) == [("sequence", "count", "Sequence"), ("speed", "cm/s", "Decoded"),
                                 ("gaze_phi", "deg", "Decoded"), ("gaze_theta", "deg", "Decoded")]
    assert float(decoded.desc().child("rtnf").child_value("hop")) == 0.05
    assert float(decoded.desc().child("rtnf").child_value("window")) == 0.05
    assert decoded.desc().child("rtnf").child_value("rig") == "rig-a"
    predicted = infos["predicted"]
    assert predicted.type() == "Predicted"
    assert [label for label, _, _ in channels(predicted)] == [
        "sequence", "unit-3", "unit-7", "unit-12", "unit-40"]
    assert {unit for _, unit, _ in channels(predicted)[1:]} == {"spikes"}
    control = infos["control"]
    assert (control.type(), control.channel_format()) == ("Markers", pylsl.cf_string)
    assert control.nominal_srate() == pylsl.IRREGULAR_RATE
    assert [label for label, _, _ in channels(control)] == ["command", "rule", "sequence"]
    described = channels(infos["telemetry"])
    assert [label for label, _, _ in described] == [
        "sequence", "latency_ms", *(f"{stage}_ms" for stage in STAGES), *TELEMETRY_COUNTERS]
    assert [unit for _, unit, _ in described[1:2 + len(STAGES)]] == ["ms"] * (1 + len(STAGES))
    source_ids = {info.source_id() for info in infos.values()}
    assert len(source_ids) == 4 and all(prefix in s and "rig-a" in s for s in source_ids)


def test_lsl_samples_carry_values_and_window_end_as_timestamp(pylsl):
    rng = np.random.default_rng(1)
    prefix = f"rtnf-test-{uuid.uuid4().hex[:8]}"
    sink = LslSink(LAYOUT, prefix, "rig-a", pylsl)
    try:
        inlets = lsl_inlets(pylsl, prefix)
        commands = (Command("reward-zone", "reward", ("lsl", "zmq")),
                    Command("bpod-only", "stop", ("bpod_serial",), soft_code=4))
        output = window_output(17, rng, commands)
        sample = telemetry(17)
        sink.publish(output)
        sink.publish_telemetry(sample)
        received = {stream: inlet.pull_sample(WAIT_S) for stream, inlet in inlets.items()}
        assert inlets["control"].pull_sample(0.2) == (None, None)  # the bpod-only command
    finally:
        sink.close()
    values, stamp = received["decoded"]
    assert stamp == output.window_end
    assert values == [17.0, *output.decoded.tolist()]
    values, stamp = received["predicted"]
    assert stamp == output.window_end
    assert values == [17.0, *output.predicted.tolist()]
    assert received["control"] == (["reward", "reward-zone", "17"], output.window_end)
    values, stamp = received["telemetry"]
    assert stamp == sample.window_end
    stage_values = values[2:2 + len(STAGES)]
    assert values[:2] == [17.0, 3.5]
    assert math.isnan(stage_values[STAGES.index("close")])
    assert [v for v in stage_values if not math.isnan(v)] == [
        sample.stage_ms[stage] for stage in STAGES if stage != "close"]
    assert values[2 + len(STAGES):] == expected_telemetry_counters(sample)
    assert not sink.errors


def test_lsl_sample_of_the_wrong_size_is_counted_not_raised(pylsl):
    rng = np.random.default_rng(2)
    sink = LslSink(LAYOUT, f"rtnf-test-{uuid.uuid4().hex[:8]}", "rig-a", pylsl)
    try:
        output = window_output(0, rng)
        sink.publish(WindowOutput(0, output.window_end, output.decoded[:2], output.predicted))
    finally:
        sink.close()
    assert sink.errors == {"lsl decoded: sample does not match the layout, dropped": 1}


# ---------------------------------------------------------------------------------------------
# ZeroMQ
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def zmq_sink(context: zmq.Context, payload_format: str, high_water_mark: int = 1000,
             layout: OutputLayout = LAYOUT) -> ZmqSink:
    config = ZmqOutputConfig(address="tcp://127.0.0.1:*", format=payload_format,
                             high_water_mark=high_water_mark)
    return ZmqSink(layout, config, context)


def joined_subscriber(context: zmq.Context, sink: ZmqSink, rng: np.random.Generator,
                      layout: OutputLayout = LAYOUT, **options: int) -> zmq.Socket:
    """A SUB socket that has seen the sink's messages (past the slow-joiner gap), drained."""
    subscriber = context.socket(zmq.SUB)
    for option, value in options.items():
        subscriber.setsockopt(getattr(zmq, option), value)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"")
    subscriber.connect(sink.endpoint)
    deadline = time.monotonic() + WAIT_S
    while not subscriber.poll(10):
        assert time.monotonic() < deadline, "the subscriber never received a message"
        sink.publish(window_output(0, rng, layout=layout))
    while subscriber.poll(50):
        subscriber.recv_multipart()
    return subscriber


def receive(subscriber: zmq.Socket, count: int) -> list[tuple[str, bytes]]:
    messages = []
    for _ in range(count):
        assert subscriber.poll(int(WAIT_S * 1000)), f"only {len(messages)} of {count} arrived"
        topic, payload = subscriber.recv_multipart()
        messages.append((topic.decode(), payload))
    return messages


def test_zmq_csv_payloads_follow_the_documented_field_order(context):
    rng = np.random.default_rng(3)
    sink = zmq_sink(context, "csv")
    subscriber = joined_subscriber(context, sink, rng)
    commands = (Command("reward-zone", "reward", ("zmq",)), Command("stop-zone", "stop", ("lsl",)))
    output = window_output(42, rng, commands)
    output = WindowOutput(42, output.window_end, np.array([12.5, np.nan, -np.inf], np.float32),
                          output.predicted, commands)
    sample = telemetry(42)
    sink.publish(output)
    sink.publish_telemetry(sample)
    messages = receive(subscriber, 4)
    sink.close()
    assert [topic for topic, _ in messages] == ["decoded", "predicted", "control", "telemetry"]
    lines = [payload.decode("ascii") for _, payload in messages]
    assert not any(line.endswith("\n") for line in lines)
    assert lines[0] == "42,1002.100000,12.5,NaN,-Infinity"
    fields = lines[1].split(",")
    assert fields[:2] == ["42", "1002.100000"]
    assert np.allclose([float(f) for f in fields[2:]], output.predicted, rtol=1e-5, atol=0)
    assert lines[2] == "42,1002.100000,reward,reward-zone"
    fields = lines[3].split(",")
    assert fields[:3] == ["42", "1002.100000", "3.5"]
    assert fields[3:3 + len(STAGES)] == [
        "NaN" if stage == "close" else f"{sample.stage_ms[stage]:g}" for stage in STAGES]
    assert [int(f) for f in fields[3 + len(STAGES):]] == expected_telemetry_counters(sample)
    assert not sink.errors


def test_zmq_msgpack_payloads_are_maps(context):
    rng = np.random.default_rng(4)
    sink = zmq_sink(context, "msgpack")
    subscriber = joined_subscriber(context, sink, rng)
    output = window_output(7, rng, (Command("reward-zone", "reward", ("zmq", "bpod_udp"), 2),))
    output = WindowOutput(np.int64(7), np.float64(output.window_end), output.decoded,
                          output.predicted, output.commands)  # numpy scalars pack as numbers
    sample = telemetry(7)
    sink.publish(output)
    sink.publish_telemetry(sample)
    messages = {topic: msgpack.unpackb(payload) for topic, payload in receive(subscriber, 4)}
    sink.close()
    assert messages["decoded"] == {"seq": 7, "t": output.window_end,
                                   "values": output.decoded.tolist()}
    assert messages["predicted"] == {"seq": 7, "t": output.window_end,
                                     "counts": output.predicted.tolist()}
    assert messages["control"] == {"seq": 7, "t": output.window_end, "command": "reward",
                                   "rule": "reward-zone"}
    received = messages["telemetry"]
    assert (received["seq"], received["t"], received["latency_ms"]) == (7, sample.window_end, 3.5)
    assert list(received["stages"]) == list(STAGES) and math.isnan(received["stages"]["close"])
    assert received["stages"]["infer"] == sample.stage_ms["infer"]
    assert received["counters"] == dict(zip(TELEMETRY_COUNTERS,
                                             expected_telemetry_counters(sample)))


def test_zmq_stalled_subscriber_costs_drops_not_time(context):
    rng = np.random.default_rng(5)
    layout = OutputLayout(LAYOUT.targets, LAYOUT.target_units, np.arange(200), 0.05, 0.05)
    sink = zmq_sink(context, "msgpack", high_water_mark=2, layout=layout)
    subscriber = joined_subscriber(context, sink, rng, layout, RCVHWM=2, RCVBUF=4096)
    outputs = [window_output(k, rng, layout=layout) for k in range(20_000)]
    started = time.monotonic()
    for output in outputs:
        sink.publish(output)
    elapsed = time.monotonic() - started
    sink.close()
    subscriber.close()
    drops = sum(sink.errors.values())
    assert elapsed < 2.0
    assert set(sink.errors) <= {"zmq decoded: subscriber queue full, dropped",
                                "zmq predicted: subscriber queue full, dropped"}
    assert 30_000 < drops < 40_000  # two messages per output; all but what the buffers hold


def test_zmq_sample_of_the_wrong_size_is_counted(context):
    rng = np.random.default_rng(6)
    sink = zmq_sink(context, "csv")
    output = window_output(0, rng)
    sink.publish(WindowOutput(0, output.window_end, output.decoded, output.predicted[:3]))
    sink.close()
    assert sink.errors == {"zmq predicted: sample does not match the layout, dropped": 1}


def test_zmq_address_in_use_names_the_key(context):
    first = zmq_sink(context, "csv")
    try:
        with pytest.raises(RtnfError, match=rf"^outputs\.zmq\.address = {first.endpoint}: "
                                            "cannot bind"):
            ZmqSink(LAYOUT, ZmqOutputConfig(address=first.endpoint), context)
    finally:
        first.close()


# ---------------------------------------------------------------------------------------------
# Bpod App serial port (a pseudo-terminal stands in for it)
# ---------------------------------------------------------------------------------------------


def read_available(fd: int, wait_s: float = WAIT_S) -> bytes:
    """What the pty master holds: waits up to `wait_s` for the first byte, then drains."""
    data = b""
    while select.select([fd], [], [], wait_s if not data else 0.05)[0]:
        data += os.read(fd, 65536)
    return data


@pytest.fixture()
def pty():
    master, slave = os.openpty()
    yield master, os.ttyname(slave)
    for fd in (master, slave):
        try:
            os.close(fd)
        except OSError:  # a test closed it already
            pass


def bpod_command(soft_code: int | None, sinks: tuple[str, ...] = ("bpod_serial",)) -> Command:
    return Command("reward-zone", "reward", sinks, soft_code)


def test_serial_sink_writes_the_soft_code_byte(pty):
    master, port = pty
    rng = np.random.default_rng(7)
    sink = BpodSerialSink(port)
    commands = (bpod_command(10), bpod_command(200), bpod_command(5, ("bpod_udp",)),
                bpod_command(300), bpod_command(None))
    sink.publish(window_output(0, rng, commands))
    sink.publish_telemetry(telemetry(0))
    sink.close()
    assert read_available(master) == bytes([10, 200])  # raw mode: byte 10 is not made "\r\n"
    assert sink.errors == {"bpod serial: soft code outside 0..255 dropped": 1,
                           "bpod serial: command without a soft code dropped": 1}


def test_serial_sink_full_output_buffer_counts_drops_without_blocking(pty):
    master, port = pty
    rng = np.random.default_rng(8)
    sink = BpodSerialSink(port)
    output = window_output(0, rng, (bpod_command(1),))
    started = time.monotonic()
    for _ in range(30_000):
        sink.publish(output)
    elapsed = time.monotonic() - started
    sink.close()
    dropped = sink.errors["bpod serial: output buffer full, command dropped"]
    assert elapsed < 2.0
    assert dropped > 0 and set(sink.errors) == {"bpod serial: output buffer full, command dropped"}
    assert len(read_available(master)) + dropped == 30_000


def test_serial_sink_survives_the_port_vanishing(pty):
    master, port = pty
    rng = np.random.default_rng(9)
    sink = BpodSerialSink(port)
    output = window_output(0, rng, (bpod_command(3),))
    sink.publish(output)
    assert read_available(master) == b"\x03"
    os.close(master)  # the device is unplugged: its node goes away
    for _ in range(200):
        sink.publish(output)
    sink.close()
    failed = [reason for reason in sink.errors if reason.startswith("bpod serial: write failed")]
    assert len(failed) == 1 and sink.errors[failed[0]] == 1
    assert sink.errors["bpod serial: port unavailable, command dropped"] == 199
    assert sink.errors["bpod serial: reopen failed"] == 0  # less than a second since the failure


def test_serial_sink_reopens_the_port_after_a_second(tmp_path: Path):
    rng = np.random.default_rng(10)
    link = tmp_path / "bpod-app-port"
    first_master, first_slave = os.openpty()
    link.symlink_to(os.ttyname(first_slave))
    sink = BpodSerialSink(str(link))
    output = window_output(0, rng, (bpod_command(9),))
    second_master, second_slave = os.openpty()
    try:
        os.close(first_master)
        sink.publish(output)  # fails: the port is gone
        link.unlink()
        link.symlink_to(os.ttyname(second_slave))  # the device is back under the same name
        sink.publish(output)  # too soon to reopen
        time.sleep(1.05)
        sink.publish(output)
        assert read_available(second_master) == b"\x09"
    finally:
        sink.close()
        for fd in (first_slave, second_master, second_slave):
            os.close(fd)
    assert sink.errors["bpod serial: port unavailable, command dropped"] == 1
    assert sink.errors["bpod serial: reopen failed"] == 0


def test_missing_serial_port_names_the_key(tmp_path: Path):
    port = tmp_path / "ttyACM9"
    with pytest.raises(RtnfError, match=rf"^outputs\.bpod\.serial_port = {port}: cannot open"):
        BpodSerialSink(str(port))


def test_serial_port_in_use_names_the_key(pty):
    _, port = pty
    sink = BpodSerialSink(port)
    try:
        with pytest.raises(RtnfError, match=r"^outputs\.bpod\.serial_port = .*: cannot open"):
            BpodSerialSink(port)
    finally:
        sink.close()


# ---------------------------------------------------------------------------------------------
# pybpod net_port (a UDP socket stands in for it)
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def pybpod_port():
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(WAIT_S)
    yield receiver
    receiver.close()


def test_udp_sink_sends_softcode_text(pybpod_port):
    rng = np.random.default_rng(11)
    sink = BpodUdpSink("127.0.0.1", pybpod_port.getsockname()[1])
    commands = (bpod_command(3, ("bpod_udp",)), bpod_command(4, ("bpod_serial",)),
                bpod_command(0, ("bpod_udp",)), bpod_command(12, ("bpod_udp",)))
    sink.publish(window_output(0, rng, commands))
    sink.publish_telemetry(telemetry(0))
    assert pybpod_port.recv(64) == b"SoftCode3"
    pybpod_port.settimeout(0.2)
    with pytest.raises(TimeoutError):
        pybpod_port.recv(64)
    sink.close()
    assert sink.errors == {"bpod udp: soft code outside 1..9 dropped": 2}


def test_udp_sink_counts_an_absent_listener(pybpod_port):
    rng = np.random.default_rng(12)
    port = pybpod_port.getsockname()[1]
    pybpod_port.close()  # nobody listens there now
    sink = BpodUdpSink("127.0.0.1", port)
    output = window_output(0, rng, (bpod_command(1, ("bpod_udp",)),))
    for _ in range(5):
        sink.publish(output)
        time.sleep(0.01)  # let the ICMP "port unreachable" come back
    sink.close()
    assert sink.errors["bpod udp: refused (is pybpod listening on net_port?), command dropped"] > 0


def test_udp_sink_rejects_a_bad_port():
    with pytest.raises(RtnfError, match=r"^outputs\.bpod\.net_port = 70000: "):
        BpodUdpSink("127.0.0.1", 70000)


# ---------------------------------------------------------------------------------------------
# open_sinks
# ---------------------------------------------------------------------------------------------


def test_open_sinks_opens_what_is_enabled(pty, pybpod_port, pylsl):
    _, port = pty
    outputs = OutputsConfig(
        lsl=LslOutputConfig(prefix=f"rtnf-test-{uuid.uuid4().hex[:8]}"),
        zmq=ZmqOutputConfig(address="tcp://127.0.0.1:*"),
        bpod=BpodOutputConfig(serial_port=port, net_port=pybpod_port.getsockname()[1]))
    sinks = open_sinks(outputs, LAYOUT, "rig-a")
    close_sinks(sinks)
    assert [sink.name for sink in sinks] == ["lsl", "zmq", "bpod_serial", "bpod_udp"]
    outputs.lsl.enabled, outputs.zmq.enabled = False, False
    outputs.bpod.serial_port, outputs.bpod.net_port = "", 0
    assert open_sinks(outputs, LAYOUT, "rig-a") == []


def test_open_sinks_closes_the_opened_ones_when_one_fails(tmp_path: Path):
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    outputs = OutputsConfig(lsl=LslOutputConfig(enabled=False),
                            zmq=ZmqOutputConfig(address=address),
                            bpod=BpodOutputConfig(serial_port=str(tmp_path / "ttyACM9")))
    with pytest.raises(RtnfError, match=r"^outputs\.bpod\.serial_port = "):
        open_sinks(outputs, LAYOUT, "rig-a")
    # The address was released (ZeroMQ closes sockets in its I/O thread: allow it a moment).
    deadline = time.monotonic() + 2.0
    while True:
        try:
            ZmqSink(LAYOUT, ZmqOutputConfig(address=address)).close()
            break
        except RtnfError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
