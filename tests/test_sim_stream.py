"""Streaming a session in real time over LSL and ZeroMQ, and rtnf's ZeroMQ message format.

The LSL tests use real outlets and inlets on loopback (conftest.py scopes discovery); the
streamer runs in a thread and waits in `on_started` until the test's inlets are connected, so the
test sees every sample from the first.
"""

from __future__ import annotations

import struct
import threading
import time

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from rtnf.config import SimulationConfig
from rtnf.data.session import Session
from rtnf.data.sim import simulate
from rtnf.errors import RtnfError
from rtnf.stream.lslconfig import import_pylsl
from rtnf.stream.sim_stream import StreamStats, stream_session
from rtnf.stream.zmq_messages import (HEADER, MAGIC, BehaviorMessage, FrameMessage, Kind,
                                      MessageError, SpikeMessage, decode, decode_behavior,
                                      decode_multipart, decode_spikes, encode_behavior,
                                      encode_frames, encode_spikes)

SPEED = 8.0
CHECKED_SPIKES = 200
ANY_PORT = "tcp://127.0.0.1:*"


@pytest.fixture(scope="module")
def session() -> Session:
    (simulated,) = simulate(SimulationConfig(neurons=20, minutes=0.1, seed=3), "ephys")
    return simulated


@pytest.fixture(scope="module")
def pylsl():
    return import_pylsl("loopback")


class StreamerThread:
    """`stream_session` in a thread that holds at `on_started` until `go()`."""

    def __init__(self, session: Session, transport: str, **options):
        self.started, self.released = threading.Event(), threading.Event()
        self.stop = threading.Event()
        self.stats: StreamStats | None = None
        self.result: StreamStats | None = None

        def on_started(stats: StreamStats) -> None:
            self.stats = stats
            self.started.set()
            self.released.wait(10)

        def run() -> None:
            self.result = stream_session(session, transport, stop=self.stop,
                                         on_started=on_started, **options)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert self.started.wait(10), "the streamer did not start"

    def go(self) -> None:
        self.released.set()

    def finish(self, stop: bool = False) -> StreamStats:
        if stop:
            self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the streamer did not stop"
        return self.result


def spike_ids(session: Session) -> np.ndarray:
    return session.unit_ids[session.spike_unit_index]


# ---------------------------------------------------------------------------------------------
# LSL
# ---------------------------------------------------------------------------------------------


def open_inlet(pylsl, name: str, source_id: str):
    found = pylsl.resolve_bypred(f"name='{name}' and source_id='{source_id}'", timeout=5)
    assert found, f"no LSL stream {name} ({source_id})"
    inlet = pylsl.StreamInlet(found[0])
    inlet.open_stream(timeout=5)
    return inlet


def pull(inlet, wanted: int, timeout: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    samples, stamps = [], []
    deadline = time.monotonic() + timeout
    while len(stamps) < wanted and time.monotonic() < deadline:
        chunk, chunk_stamps = inlet.pull_chunk(timeout=0.2)
        samples.extend(chunk)
        stamps.extend(chunk_stamps)
    return np.array(samples), np.array(stamps)


def test_lsl_streams_spikes_and_behaviour_on_the_session_clock(session, pylsl):
    streamer = StreamerThread(session, "lsl", speed=SPEED)
    ids = streamer.stats.endpoints
    assert ids["spikes"] == "rtnf-sim-ephys-seed3-session0-spikes"
    spikes = open_inlet(pylsl, "rtnf-sim-spikes", ids["spikes"])
    behavior = open_inlet(pylsl, "rtnf-sim-behavior", ids["behavior"])
    frames = open_inlet(pylsl, "rtnf-sim-frames", ids["frames"])
    streamer.go()
    units, stamps = pull(spikes, CHECKED_SPIKES)
    values, behavior_stamps = pull(behavior, 10)
    pixels, _ = pull(frames, 2)
    stats = streamer.finish()

    assert stats.sent["spikes"] == session.n_spikes and stats.passes == 1 and not stats.stopped
    n = CHECKED_SPIKES
    np.testing.assert_array_equal(units[:n, 0], spike_ids(session)[:n])
    offsets = stamps[:n] - session.spike_times[:n] / SPEED  # constant if the mapping holds
    assert np.ptp(offsets) < 1e-3
    np.testing.assert_allclose(stamps[:n], stats.clock.stamp(session.spike_times[:n]),
                               atol=1e-3)

    speed = session.behavior["speed"]
    np.testing.assert_allclose(values[:10, 0], speed.values[:10], rtol=1e-6)
    np.testing.assert_allclose(behavior_stamps[:10], stats.clock.stamp(speed.timestamps[:10]),
                               atol=1e-3)
    np.testing.assert_array_equal(pixels[0], session.frames.images[0].ravel())

    info = behavior.info()
    channel = info.desc().child("channels").child("channel")
    described = []
    while not channel.empty():
        described.append((channel.child_value("label"), channel.child_value("unit")))
        channel = channel.next_sibling()
    assert described == [("speed", "cm/s"), ("gaze_phi", "degrees"), ("gaze_theta", "degrees")]
    assert info.type() == "Behavior" and info.nominal_srate() == pytest.approx(20 * SPEED)
    spike_info = spikes.info()
    assert (spike_info.type(), spike_info.channel_count()) == ("Spikes", 1)
    assert spike_info.channel_format() == pylsl.cf_int32 and spike_info.nominal_srate() == 0
    frame_desc = frames.info().desc().child("frame")
    assert (frame_desc.child_value("height"), frame_desc.child_value("width")) == ("24", "32")


# ---------------------------------------------------------------------------------------------
# ZeroMQ
# ---------------------------------------------------------------------------------------------


def test_zmq_publishes_decodable_spike_and_behaviour_messages(session):
    context = zmq.Context()
    subscriber = context.socket(zmq.SUB)
    try:
        streamer = StreamerThread(session, "zmq", speed=SPEED, address=ANY_PORT)
        endpoint = streamer.stats.endpoints["zmq"]
        assert endpoint.startswith("tcp://127.0.0.1:")
        subscriber.connect(endpoint)
        for topic in (b"spikes", b"behavior"):
            subscriber.setsockopt(zmq.SUBSCRIBE, topic)
        time.sleep(0.3)  # let the subscription reach the publisher (PUB/SUB slow joiner)
        streamer.go()
        messages = {SpikeMessage: [], BehaviorMessage: []}
        deadline = time.monotonic() + 10
        while sum(m.timestamps.size for m in messages[SpikeMessage]) < CHECKED_SPIKES:
            assert time.monotonic() < deadline, "spike messages did not arrive"
            if subscriber.poll(200):
                message = decode_multipart(subscriber.recv_multipart())
                messages[type(message)].append(message)
        stats = streamer.finish()
    finally:
        subscriber.close(linger=0)
        context.term()

    stamps = np.concatenate([m.timestamps for m in messages[SpikeMessage]])
    units = np.concatenate([m.unit_ids for m in messages[SpikeMessage]])
    # A late subscription would lose the first messages: line up on the first one received.
    expected_stamps = stats.clock.stamp(session.spike_times)
    first = int(np.searchsorted(expected_stamps, stamps[0] - 1e-6))
    assert first < 50, "the subscriber joined late"
    n, sent = CHECKED_SPIKES, slice(first, first + CHECKED_SPIKES)
    np.testing.assert_array_equal(units[:n], spike_ids(session)[sent])
    assert np.ptp(stamps[:n] - session.spike_times[sent] / SPEED) < 1e-3
    np.testing.assert_allclose(stamps[:n], expected_stamps[sent], atol=1e-3)
    behavior = messages[BehaviorMessage][0]
    sample = int(np.searchsorted(stats.clock.stamp(session.behavior["speed"].timestamps),
                                 behavior.timestamps[0] - 1e-6))
    np.testing.assert_allclose(behavior.values[0], [session.behavior[c].values[sample] for c in
                                                    ("speed", "gaze_phi", "gaze_theta")],
                               rtol=1e-6)


def test_stop_ends_a_looping_stream_and_releases_the_socket(session):
    streamer = StreamerThread(session, "zmq", speed=20.0, address=ANY_PORT, loop=True)
    endpoint = streamer.stats.endpoints["zmq"]
    streamer.go()
    time.sleep(0.8)  # a pass takes 0.3 s at 20x
    stats = streamer.finish(stop=True)
    assert stats.stopped and stats.passes >= 2
    assert stats.sent["spikes"] >= 2 * session.n_spikes
    context = zmq.Context()
    again = context.socket(zmq.PUB)
    try:
        again.bind(endpoint)  # would fail if the streamer had not closed its socket
    finally:
        again.close(linger=0)
        context.term()


def test_bad_arguments_are_reported(session):
    with pytest.raises(RtnfError, match="transport"):
        stream_session(session, "udp")
    with pytest.raises(RtnfError, match="speed"):
        stream_session(session, "zmq", speed=0.0)


# ---------------------------------------------------------------------------------------------
# Message format
# ---------------------------------------------------------------------------------------------


def test_messages_round_trip():
    stamps = np.array([1.0, 1.5, 1.5])
    spikes = decode(encode_spikes(stamps, [7, -2, 2**31 - 1]))
    assert isinstance(spikes, SpikeMessage)
    np.testing.assert_array_equal(spikes.timestamps, stamps)
    np.testing.assert_array_equal(spikes.unit_ids, [7, -2, 2**31 - 1])
    values = np.array([[1.0, np.nan, -3.5], [0.0, 2.0, 4.0], [5.0, 6.0, 7.0]], np.float32)
    behavior = decode_behavior(encode_behavior(stamps, values))
    np.testing.assert_array_equal(behavior.values, values)
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    frames = decode(encode_frames(stamps, images))
    assert isinstance(frames, FrameMessage)
    np.testing.assert_array_equal(frames.images, images)
    assert len(encode_spikes(stamps, [1, 2, 3])) == HEADER.size + 3 * (8 + 4)


@given(st.lists(st.floats(-1e9, 1e9), max_size=50).map(sorted), st.data())
@settings(max_examples=50, deadline=None)
def test_spike_messages_round_trip_any_content(stamps, data):
    ids = data.draw(st.lists(st.integers(-2**31, 2**31 - 1), min_size=len(stamps),
                             max_size=len(stamps)))
    message = decode_spikes(encode_spikes(np.array(stamps), np.array(ids, dtype=np.int64)))
    np.testing.assert_array_equal(message.timestamps, stamps)
    np.testing.assert_array_equal(message.unit_ids, ids)


def header(kind: int = 1, count: int = 1, dim0: int = 0, dim1: int = 0, version: int = 1,
           magic: bytes = MAGIC) -> bytes:
    return HEADER.pack(magic, version, kind, count, dim0, dim1)


GOOD_SPIKE = encode_spikes([0.5], [3])

any_header = st.builds(header, st.integers(0, 4), st.integers(0, 2**32 - 1),
                       st.integers(0, 3), st.integers(0, 3), st.integers(0, 2))


@given(st.one_of(st.binary(max_size=200), st.tuples(any_header, st.binary(max_size=200)).map(
    lambda parts: parts[0] + parts[1])))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_decode_or_raise_message_error(payload):
    try:
        decode(payload)
    except MessageError:
        pass


@pytest.mark.parametrize("payload, complaint", [
    (b"", "shorter than"),
    (b"RTNF\x01", "shorter than"),
    (header(magic=b"PICK") + GOOD_SPIKE[16:], "bad magic"),
    (header(version=2) + GOOD_SPIKE[16:], "unsupported message version 2"),
    (header(kind=9) + GOOD_SPIKE[16:], "unknown message kind 9"),
    (GOOD_SPIKE[:-1], "should be 28 bytes, got 27"),
    (GOOD_SPIKE + b"\x00", "should be 28 bytes, got 29"),
    (header(count=1_000_000) + GOOD_SPIKE[16:], "should be"),
    (header(kind=1, dim0=3) + GOOD_SPIKE[16:], "spikes message with dims"),
    (header(kind=2, dim0=0) + b"\x00" * 8, "behavior message with dims"),
    (header(kind=3, dim0=4, dim1=0) + b"\x00" * 8, "frames message with dims"),
    (header(count=1) + struct.pack("<d", float("nan")) + b"\x00" * 4, "NaN"),
    (header(count=2) + struct.pack("<dd", 2.0, 1.0) + b"\x00" * 8, "backwards"),
])
def test_malformed_messages_are_rejected_clearly(payload, complaint):
    with pytest.raises(MessageError, match=complaint):
        decode(payload)


def test_message_limits_and_topics():
    big = encode_frames(np.zeros(20), np.zeros((20, 100, 100), np.uint8))
    with pytest.raises(MessageError, match="exceeds the limit of 100000"):
        decode(big, max_bytes=100_000)
    with pytest.raises(MessageError, match="expected a spikes message, got behavior"):
        decode_multipart([b"spikes", encode_behavior([0.0], [[1.0, 2.0, 3.0]])])
    with pytest.raises(MessageError, match="unknown topic"):
        decode_multipart([b"decoded", GOOD_SPIKE])
    with pytest.raises(MessageError, match="expected 2 message parts"):
        decode_multipart([GOOD_SPIKE])
    assert decode_multipart([b"spikes", GOOD_SPIKE]).kind is Kind.SPIKES
    assert issubclass(MessageError, ValueError)


def test_unencodable_data_is_refused():
    with pytest.raises(MessageError, match="int32"):
        encode_spikes([0.0], [2**31])
    with pytest.raises(MessageError, match="integers"):
        encode_spikes([0.0], [1.5])
    with pytest.raises(MessageError, match="uint8"):
        encode_frames([0.0], np.zeros((1, 2, 2), np.float32))
    with pytest.raises(MessageError, match="2 timestamps but 1 records"):
        encode_spikes([0.0, 1.0], [1])
