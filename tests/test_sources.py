"""The real-time loop's sources over real sockets and LSL on loopback: CSV and binary ZeroMQ
messages, the Open Ephys ZMQ Interface format, replay and the simulator, what is rejected (and
counted) and how vanished publishers are re-attached."""

from __future__ import annotations

import dataclasses
import json
import struct
import time
import uuid
from collections import Counter

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from rtnf.config import LslSourceConfig, SimulationConfig, SourceConfig, load_config
from rtnf.data.io import write_session
from rtnf.data.session import Session
from rtnf.data.sim import simulate
from rtnf.errors import ConfigError, RtnfError
from rtnf.stream.lslconfig import import_pylsl
from rtnf.stream.openephys import OpenEphysSource, encode_data, encode_spike_event
from rtnf.stream.replay import ReplaySource
from rtnf.stream.sources import Batch, LslSource, RecordGate, ZmqSource, open_sources
from rtnf.stream.zmq_messages import (
    HEADER,
    MAGIC,
    Kind,
    MessageError,
    decode_csv,
    encode_behavior,
    encode_spikes,
)

ANY_PORT = "tcp://127.0.0.1:*"
RATE = 30000.0


@pytest.fixture(scope="module")
def pylsl():
    return import_pylsl("loopback")


@pytest.fixture
def context():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)  # closes the test's sockets too


@pytest.fixture(scope="module")
def session():
    (simulated,) = simulate(SimulationConfig(neurons=12, minutes=0.02, seed=5), "ephys")
    return simulated


def publisher(context: zmq.Context, address: str = ANY_PORT) -> tuple[zmq.Socket, str]:
    socket = context.socket(zmq.PUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(address)
    return socket, socket.getsockopt_string(zmq.LAST_ENDPOINT)


def until(condition, timeout: float = 5.0, what: str = "the source") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not deliver in {timeout} s"


def join(pub: zmq.Socket, source: ZmqSource, clock) -> None:
    """Send a probe spike (unit -1) until one arrives: PUB drops what precedes the subscription."""
    def probe_arrived() -> bool:
        pub.send_multipart([b"spikes", f"{clock():.6f},-1".encode()])
        return bool(source.poll(0.05))

    until(probe_arrived, what="the probe")


def collect(source, done, timeout: float = 5.0) -> dict[str, list[Batch]]:
    """Poll until `done(received)`; received: kind -> batches."""
    received: dict[str, list[Batch]] = {"spikes": [], "behavior": [], "frames": []}

    def finished() -> bool:
        for batch in source.poll(0.02):
            received[batch.kind].append(batch)
        return done(received)

    until(finished)
    return received


def joined(batches: list[Batch]) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([b.timestamps for b in batches]),
            np.concatenate([b.records for b in batches]))


def has_unit(unit: int):
    return lambda received: any(unit in b.records for b in received["spikes"])


# ---------------------------------------------------------------------------------------------
# The checks every source applies
# ---------------------------------------------------------------------------------------------


def test_gate_rejects_offending_records_only_and_counts_them():
    rejected = Counter()
    gate = RecordGate(rejected)
    (batch,) = gate.admit("spikes", [1.0, np.nan, 0.5, 2.0, 2.0, np.inf],
                          np.array([1, 2, 3, 4, 5, 6]))
    np.testing.assert_array_equal(batch.timestamps, [1.0, 2.0, 2.0])
    np.testing.assert_array_equal(batch.records, [1, 4, 5])
    assert batch.records.dtype == np.int64
    assert gate.admit("spikes", [1.9], np.array([7])) == []  # earlier than what was delivered
    (batch,) = gate.admit("spikes", [3.0, 3.5, 4.0], np.array([1.0, 2.5, np.nan]))  # LSL floats
    np.testing.assert_array_equal(batch.records, [1])
    (batch,) = gate.admit("behavior", [1.0, 1.5, 2.0],  # kinds are checked apart
                          np.array([[1.0, np.nan, 2.0], [np.inf, 0.0, 0.0], [1e300, 0, 0]]))
    np.testing.assert_array_equal(batch.timestamps, [1.0])
    assert np.isnan(batch.records[0, 1]) and batch.records.dtype == np.float32
    (batch,) = gate.admit("frames", [0.0, 1.0], np.array([[[0, 255]], [[-1, 3]]]))
    assert batch.records.dtype == np.uint8 and batch.records.shape == (1, 1, 2)
    assert rejected == Counter({"timestamp not finite": 2, "time went backwards": 2,
                                "unit not an integer": 2, "behaviour value infinite": 2,
                                "frame pixels outside 0..255": 1})


# ---------------------------------------------------------------------------------------------
# ZeroMQ: CSV text as Bonsai sends it, rtnf binary, and what is rejected
# ---------------------------------------------------------------------------------------------


def test_csv_spikes_and_behaviour_arrive_beside_binary_messages(context, pylsl):
    pub, address = publisher(context)
    source = ZmqSource(address, ["spikes", "behavior"], context=context)
    try:
        join(pub, source, pylsl.local_clock)
        t = pylsl.local_clock() + 1.0
        pub.send_multipart([b"spikes", f"{t},3\n{t + 0.5},7\n".encode()])
        pub.send_multipart([b"behavior", f"{t},12.5,-3.0,4.25\r\n{t + 0.1},13\n"
                                         f"{t + 0.2}, NaN ,1,2\n\n".encode()])
        pub.send_multipart([b"spikes", encode_spikes([t + 1.0], [9])])
        pub.send_multipart([b"spikes", f"{t + 1.5},-4".encode()])
        received = collect(source, has_unit(-4))
    finally:
        source.close()
    stamps, units = joined(received["spikes"])
    real = units != -1  # not the probes
    np.testing.assert_array_equal(units[real], [3, 7, 9, -4])
    np.testing.assert_allclose(stamps[real], t + np.array([0.0, 0.5, 1.0, 1.5]), atol=1e-6)
    stamps, values = joined(received["behavior"])
    np.testing.assert_allclose(stamps, t + np.array([0.0, 0.1, 0.2]), atol=1e-6)
    np.testing.assert_array_equal(values, np.array(
        [[12.5, -3.0, 4.25], [13.0, np.nan, np.nan], [np.nan, 1.0, 2.0]], np.float32))
    assert not source.rejected


def hostile_messages(t: float) -> list[tuple[list[bytes], str]]:
    """(message, the reason it is counted under), in the order sent after a valid spike at t."""
    nan_stamp = HEADER.pack(MAGIC, 1, Kind.SPIKES, 1, 0, 0) + struct.pack("<di", np.nan, 1)
    huge_count = HEADER.pack(MAGIC, 1, Kind.SPIKES, 2**32 - 1, 0, 0) + bytes(12)
    random_bytes = np.random.default_rng(0).bytes(64)
    assert not random_bytes.startswith(MAGIC)
    return [
        ([b"spikes", b"1.0"], "CSV wrong column count"),
        ([b"spikes", f"{t + 1},2,3".encode()], "CSV wrong column count"),
        ([b"behavior", f"{t + 1},1,2,3,4".encode()], "CSV wrong column count"),
        ([b"spikes", f"{t + 1}.5,2".encode()], "CSV not a number"),
        ([b"spikes", f"{t + 1},2.5".encode()], "unit not an integer"),
        ([b"spikes", f"{t + 1},99999999999".encode()], "unit out of range"),
        ([b"spikes", b"nan,2"], "timestamp not finite"),
        ([b"spikes", b"-inf,2"], "timestamp not finite"),
        ([b"spikes", f"{t + 2},1\n{t + 1},1".encode()], "time went backwards"),
        ([b"spikes", b"\xff\xfe\x00,1"], "bad magic, not CSV text"),
        ([b"spikes", b"not an rtnf message"], "bad magic, not CSV text"),
        ([b"spikes", b"PICK" + encode_spikes([t + 1], [1])[4:]], "bad magic, not CSV text"),
        ([b"spikes", random_bytes], "bad magic, not CSV text"),
        ([b"frames", f"{t + 1},1".encode()], "no CSV form for this kind"),
        ([b"spikes", huge_count], "wrong length"),
        ([b"spikes", nan_stamp], "timestamp not finite"),
        # (a message over max_message_bytes never gets this far: ZeroMQ drops it unread and
        # the source re-attaches; tests/test_security.py)
        ([b"spikes", f"{t + 1},1".encode(), b"extra"], "wrong number of parts"),
        ([b"spikesX", f"{t + 1},1".encode()], "unknown topic"),
        ([b"behavior", encode_behavior([t + 1], [[1, 2, 3, 4]])], "too many behaviour channels"),
        ([b"spikes", encode_spikes([t - 1, t + 1], [5, 6])], "time went backwards"),  # t - 1 only
        ([b"behavior", f"{t + 1},inf,1,2".encode()], "behaviour value infinite"),
    ]


def test_malformed_and_hostile_messages_are_counted_and_later_ones_still_arrive(context, pylsl):
    pub, address = publisher(context)
    source = ZmqSource(address, ["spikes", "behavior", "frames"], context=context,
                       max_message_bytes=4096)
    try:
        join(pub, source, pylsl.local_clock)
        t = pylsl.local_clock() + 1.0
        pub.send_multipart([b"spikes", f"{t},1".encode()])
        hostile = hostile_messages(t)
        for parts, _ in hostile:
            pub.send_multipart(parts)
        pub.send_multipart([b"spikes", f"{t + 5},42".encode()])
        received = collect(source, has_unit(42))
    finally:
        source.close()
    assert source.rejected == Counter(reason for _, reason in hostile)
    stamps, units = joined(received["spikes"])
    real = units != -1
    np.testing.assert_array_equal(units[real], [1, 6, 42])  # 6: the valid half of a message
    np.testing.assert_allclose(stamps[real], [t, t + 1, t + 5], atol=1e-6)


@given(st.binary(max_size=300) | st.text("0123456789.,-+eEnaNif \n\r").map(str.encode))
@settings(max_examples=300, deadline=None)
def test_any_payload_decodes_as_csv_or_raises_message_error(payload):
    for kind in (Kind.SPIKES, Kind.BEHAVIOR):
        try:
            message = decode_csv(kind, payload)
        except MessageError as exc:
            assert exc.reason
            continue
        assert np.all(np.diff(message.timestamps) >= 0) and np.all(np.isfinite(
            message.timestamps))


def test_a_publisher_that_goes_away_is_re_attached_when_another_binds(context, pylsl):
    first, address = publisher(context)
    source = ZmqSource(address, ["spikes"], context=context)
    try:
        join(first, source, pylsl.local_clock)
        first.send_multipart([b"spikes", f"{pylsl.local_clock()},1".encode()])
        collect(source, has_unit(1))
        first.close()  # the publisher vanishes mid-stream
        quiet_until = time.monotonic() + 0.3
        while time.monotonic() < quiet_until:
            assert source.poll(0.02) == []
        second, _ = publisher(context, address)  # a new one binds the same address
        join(second, source, pylsl.local_clock)
        second.send_multipart([b"spikes", f"{pylsl.local_clock()},2".encode()])
        collect(source, has_unit(2))
        second.close()
    finally:
        source.close()
    assert not source.rejected


# ---------------------------------------------------------------------------------------------
# LSL: an outlet that vanishes and comes back is recovered
# ---------------------------------------------------------------------------------------------


def spike_outlet(pylsl, name: str, source_id: str):
    info = pylsl.StreamInfo(name, "Spikes", 1, pylsl.IRREGULAR_RATE, pylsl.cf_int32, source_id)
    return pylsl.StreamOutlet(info)


def test_an_lsl_outlet_that_vanishes_and_returns_is_re_attached(pylsl):
    name, source_id = "rtnf-test-recover", f"rtnf-test-{uuid.uuid4().hex[:8]}"
    outlet = spike_outlet(pylsl, name, source_id)
    config = SourceConfig(lsl=LslSourceConfig(name=name, type="Spikes", source_id=source_id))
    source = LslSource("spikes", config, pylsl)
    try:
        assert outlet.wait_for_consumers(5)
        outlet.push_sample([1], pylsl.local_clock())
        collect(source, has_unit(1))
        del outlet  # the outlet is destroyed: the stream vanishes
        quiet_until = time.monotonic() + 0.3
        while time.monotonic() < quiet_until:
            assert source.poll(0.02) == []
        outlet = spike_outlet(pylsl, name, source_id)  # same name and source id
        assert outlet.wait_for_consumers(8), "the inlet did not re-attach"
        outlet.push_sample([2], pylsl.local_clock())
        received = collect(source, has_unit(2))
    finally:
        source.close()
    assert joined(received["spikes"])[1][-1] == 2 and not source.rejected


# ---------------------------------------------------------------------------------------------
# Open Ephys ZMQ Interface
# ---------------------------------------------------------------------------------------------


class FakeAcquisition:
    """Sample numbers advancing with this machine's clock since acquisition started
    `running_for` seconds ago, as a GUI's would."""

    def __init__(self, clock, running_for: float):
        self.clock, self.start = clock, clock() - running_for

    def sample_now(self) -> int:
        return int((self.clock() - self.start) * RATE)

    def block(self, samples: int = 300) -> list[bytes]:
        """The data block that has just been acquired."""
        return encode_data(np.zeros(samples, np.float32), self.sample_now() - samples, RATE)


def malformed_open_ephys() -> list[tuple[list[bytes], str]]:
    spike = encode_spike_event(100, 2)
    header = json.loads(spike[1])
    missing = dict(header, spike={k: v for k, v in header["spike"].items() if k != "sorted_id"})
    negative = dict(header, spike=dict(header["spike"], sorted_id=-3))
    data = encode_data(np.zeros(10, np.float32), 100, RATE)
    return [
        (spike[:2], "wrong number of frames"),
        (spike + [b""], "wrong number of frames"),
        ([spike[0], b"{not json", spike[2]], "bad JSON"),
        ([spike[0], b"[1, 2]", spike[2]], "bad JSON"),
        ([spike[0], b'{"type": "spike", "spike": {"sample_num": NaN}}', spike[2]], "bad JSON"),
        ([spike[0], json.dumps(missing).encode(), spike[2]], "missing or invalid header field"),
        ([spike[0], json.dumps(negative).encode(), spike[2]], "missing or invalid header field"),
        ([b"SPIKE\0", spike[1], spike[2]], "unknown envelope"),
        ([b"EVENT", spike[1], spike[2]], "unknown envelope"),
        ([b"DATA\0", spike[1], spike[2]], "envelope does not match type"),
        (data[:2] + [data[2][:-4]], "wrong length"),
    ]


def test_open_ephys_spikes_get_sorted_ids_as_units_and_times_on_the_local_clock(context, pylsl):
    pub, address = publisher(context)
    source = OpenEphysSource(address, sample_rate=20000.0, clock=pylsl.local_clock,
                             context=context)  # the data messages correct the rate
    gui = FakeAcquisition(pylsl.local_clock, running_for=1.0)
    try:
        def rate_learnt() -> bool:
            pub.send_multipart(gui.block())
            source.poll(0.02)
            return "example_data" in source.streams

        until(rate_learnt, what="the data messages")
        for _ in range(5):  # data flows on while spikes arrive
            time.sleep(0.01)
            pub.send_multipart(gui.block())
        first = gui.sample_now() - 90  # spikes are sent a few ms after their peak
        pub.send_multipart(encode_spike_event(first, 3, message_num=7))
        pub.send_multipart(encode_spike_event(first + 15, 0))  # unsorted
        pub.send_multipart(encode_spike_event(first + 30, 5))
        pub.send_multipart(encode_spike_event(first + 60, 3, num_channels=4))
        ttl = json.dumps({"message_num": 9, "type": "event", "content": {
            "stream": "example_data", "source_node": 100, "type": 3, "sample_num": first},
            "data_size": 0, "timestamp": 0}).encode()
        pub.send_multipart([b"EVENT\0", ttl])  # TTL events are not spikes: ignored
        for parts, _ in malformed_open_ephys():
            pub.send_multipart(parts)
        pub.send_multipart(encode_spike_event(first + 90, 8))
        received = collect(source, has_unit(8))
        stamps, units = joined(received["spikes"])
        arrived_by = pylsl.local_clock()

        np.testing.assert_array_equal(units, [3, 5, 3, 8])
        samples = first + np.array([0, 30, 60, 90])
        acquired = gui.start + samples / RATE  # when the fake GUI "acquired" each peak
        np.testing.assert_allclose(np.diff(stamps), np.diff(samples) / RATE, atol=1e-9)
        assert np.all(stamps >= acquired) and np.all(stamps - acquired < 0.02)
        assert np.all(stamps <= arrived_by)
        assert source.streams["example_data"].sample_rate == RATE
        expected = Counter(reason for _, reason in malformed_open_ephys())
        assert source.rejected == expected + Counter({"unsorted spike": 1})

        # Acquisition restarts: sample numbers start again from 0 and the mapping is rebuilt.
        gui = FakeAcquisition(pylsl.local_clock, running_for=0.02)
        pub.send_multipart(gui.block(samples=200))
        restarted = gui.sample_now() - 30
        pub.send_multipart(encode_spike_event(restarted, 4))
        received = collect(source, has_unit(4))
        (stamp,), _ = joined(received["spikes"])
    finally:
        source.close()
    assert source.restarts == 1
    assert 0 <= stamp - (gui.start + restarted / RATE) < 0.02


# ---------------------------------------------------------------------------------------------
# Replay and the simulator
# ---------------------------------------------------------------------------------------------


def test_replay_delivers_every_spike_in_order_on_the_session_clock(session, pylsl):
    speed = 4.0
    source = ReplaySource(session, ["spikes", "behavior"], speed=speed, clock=pylsl.local_clock)
    batches: list[Batch] = []
    started = time.monotonic()
    while not source.finished:
        before = pylsl.local_clock()
        polled = source.poll(0.01)
        after = pylsl.local_clock()
        assert after - before < 0.01 + 0.02  # sleeps at most the timeout
        for batch in polled:
            assert batch.timestamps[-1] <= after  # nothing is delivered before it is due
        batches += polled
    elapsed = time.monotonic() - started
    assert elapsed == pytest.approx(session.duration / speed, abs=0.1)
    stamps, units = joined([b for b in batches if b.kind == "spikes"])
    np.testing.assert_array_equal(units, session.unit_ids[session.spike_unit_index])
    offsets = stamps - session.spike_times / speed  # constant: spaced as in the session
    assert np.ptp(offsets) < 1e-9
    behavior_stamps, values = joined([b for b in batches if b.kind == "behavior"])
    np.testing.assert_allclose(behavior_stamps,
                               session.behavior["speed"].timestamps / speed + offsets[0])
    np.testing.assert_allclose(values[:, 0], session.behavior["speed"].values, rtol=1e-6)
    assert source.poll(0.01) == [] and not source.rejected


def test_replay_poll_sleeps_until_the_next_record_but_never_beyond_the_timeout(pylsl):
    two_spikes = Session(np.array([3, 4]), np.array([0.0, 0.4]), np.array([0, 1])).validate()
    source = ReplaySource(two_spikes, ["spikes"], clock=pylsl.local_clock)

    def timed_poll(timeout: float) -> tuple[list[Batch], float]:
        before = time.monotonic()
        return source.poll(timeout), time.monotonic() - before

    (first,), waited = timed_poll(1.0)
    assert first.records.tolist() == [3] and waited < 0.01
    nothing, waited = timed_poll(0.05)
    assert nothing == [] and 0.04 < waited < 0.1
    (second,), waited = timed_poll(2.0)
    assert second.records.tolist() == [4] and 0.25 < waited < 0.4
    np.testing.assert_allclose(second.timestamps - first.timestamps, 0.4)
    assert source.finished


def test_a_looping_replay_plays_the_session_again_later(session, pylsl):
    speed = 40.0  # one pass: 30 ms
    source = ReplaySource(session, ["spikes"], speed=speed, loop=True, clock=pylsl.local_clock)
    deadline = time.monotonic() + 0.1
    batches = []
    while time.monotonic() < deadline:
        batches += source.poll(0.005)
    stamps, units = joined(batches)
    n = session.n_spikes
    assert not source.finished and source.pass_index >= 2 and stamps.size > 2 * n
    np.testing.assert_array_equal(units[n:2 * n], units[:n])
    np.testing.assert_allclose(stamps[n:2 * n] - stamps[:n], session.duration / speed)


def rig(**sources):
    """The default rig with `sources` (kind -> dict of SourceConfig fields) replaced."""
    config = load_config().rig
    replaced = {kind: dataclasses.replace(getattr(config.sources, kind), **fields)
                for kind, fields in sources.items()}
    return dataclasses.replace(config, sources=dataclasses.replace(config.sources, **replaced))


def test_sim_and_replay_kinds_open_through_open_sources(session, tmp_path):
    simulation = SimulationConfig(neurons=10, minutes=0.05, seed=2)
    (sim,) = open_sources(rig(spikes={"kind": "sim", "speed": 4.0},
                              behavior={"kind": "sim", "speed": 4.0}, frames={"kind": "none"}),
                          simulation=simulation)
    assert isinstance(sim, ReplaySource) and sim.name == "sim:2p" and sim.loop
    received = collect(sim, lambda r: r["spikes"] and r["behavior"])
    assert received["spikes"][0].records.dtype == np.int64
    sim.close()

    path = tmp_path / "session.npz"
    write_session(session, path)
    (replay,) = open_sources(rig(spikes={"kind": "replay", "file": str(path), "speed": 8.0},
                                 behavior={"kind": "replay", "file": str(path), "speed": 8.0},
                                 frames={"kind": "none"}))
    assert replay.name == f"replay:{path}" and not replay.loop
    received = collect(replay, lambda r: replay.finished)
    np.testing.assert_array_equal(joined(received["spikes"])[1],
                                  session.unit_ids[session.spike_unit_index])


TINY = SimulationConfig(neurons=4, minutes=0.01)
NO_BEHAVIOR = {"behavior": {"kind": "none"}}


@pytest.mark.parametrize("sources, simulation, complaint", [
    ({"spikes": {"kind": "sim"}, **NO_BEHAVIOR}, None,
     "rig.sources.spikes.kind = sim needs the simulation"),
    ({"behavior": {"kind": "openephys"}}, None, "rig.sources.behavior.kind = openephys"),
    ({"spikes": {"kind": "udp"}}, None, "rig.sources.spikes.kind = 'udp'"),
    ({"spikes": {"kind": "none"}}, None, "rig.sources.spikes.kind is none"),
    ({"spikes": {"kind": "replay"}, **NO_BEHAVIOR}, None, "rig.sources.spikes.file is empty"),
    ({"spikes": {"kind": "sim", "speed": 2.0}, "behavior": {"kind": "sim"}}, TINY,
     "rig.sources.spikes.speed = 2, rig.sources.behavior.speed = 1"),
])
def test_open_sources_names_the_key_of_what_it_cannot_open(sources, simulation, complaint):
    with pytest.raises(RtnfError, match=complaint):
        open_sources(rig(**sources), simulation=simulation)


def test_the_simulator_gives_frames_too():
    (source,) = open_sources(rig(spikes={"kind": "sim"}, frames={"kind": "sim"}, **NO_BEHAVIOR),
                             simulation=TINY)
    received = collect(source, lambda r: r["frames"])
    assert received["frames"][0].records.shape[1:] == (TINY.frame_height, TINY.frame_width)
    source.close()


def test_replay_refuses_what_the_session_cannot_give(session):
    with pytest.raises(RtnfError, match="no stimulus frames"):
        ReplaySource(dataclasses.replace(session, frames=None), ["spikes", "frames"])
    with pytest.raises(RtnfError, match="speed"):
        ReplaySource(session, ["spikes"], speed=0.0)
    with pytest.raises(RtnfError, match="replay kinds"):
        ReplaySource(session, ["audio"])


def test_config_validates_the_source_fields():
    with pytest.raises(ConfigError, match="rig.sources.spikes.speed = 0"):
        load_config(overrides=["rig.sources.spikes.speed=0"])
    with pytest.raises(ConfigError, match="rig.sources.spikes.sample_rate = -1"):
        load_config(overrides=["rig.sources.spikes.sample_rate=-1"])
    config = load_config(overrides=["rig.sources.spikes.kind=openephys",
                                    "rig.sources.spikes.sample_rate=25000"])
    assert config.rig.sources.spikes.sample_rate == 25000.0
