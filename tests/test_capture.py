"""Live capture: real LSL inlets and ZeroMQ subscribers on loopback against the rig simulator."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import zmq

from rtnf.config import SimulationConfig, load_config
from rtnf.data.sim import simulate
from rtnf.errors import RtnfError
from rtnf.stream.capture import capture_session
from rtnf.stream.sources import open_sources
from test_sim_stream import StreamerThread, spike_ids

SPEED = 4.0


@pytest.fixture(scope="module")
def session():
    (simulated,) = simulate(SimulationConfig(neurons=25, minutes=0.2, seed=9), "2p")
    return simulated


def rig(**sources):
    """The default rig with `sources` (kind -> dict of SourceConfig fields) replaced."""
    config = load_config().rig
    replaced = {kind: dataclasses.replace(getattr(config.sources, kind), **fields)
                for kind, fields in sources.items()}
    return dataclasses.replace(config, sources=dataclasses.replace(config.sources, **replaced))


def test_lsl_capture_holds_exactly_what_the_rig_sent(session):
    streamer = StreamerThread(session, "lsl", speed=SPEED)
    sources = open_sources(rig(frames={"kind": "lsl"}), "lsl")
    assert [s.name for s in sources] == ["lsl:rtnf-sim-spikes", "lsl:rtnf-sim-behavior",
                                        "lsl:rtnf-sim-frames"]
    streamer.go()
    progress = []
    captured = capture_session(sources, 2.0, progress.append)
    streamer.finish(stop=True)
    for source in sources:
        source.close()

    n = captured.n_spikes
    assert n > 100 and progress[-1].counts["spikes"] == n and progress[-1].rejected == 0
    # Every spike from the first, in order, with its unit id and its own time stamp.
    np.testing.assert_array_equal(captured.unit_ids[captured.spike_unit_index],
                                  spike_ids(session)[:n])
    np.testing.assert_allclose(captured.spike_times,
                               streamer.stats.clock.stamp(session.spike_times[:n]), atol=2e-3)
    assert set(captured.unit_ids) <= set(session.unit_ids)
    for name in ("speed", "gaze_phi", "gaze_theta"):
        got, sent = captured.behavior[name], session.behavior[name]
        k = got.values.size
        assert k > 10 and got.unit == sent.unit
        np.testing.assert_allclose(got.values, sent.values[:k].astype(np.float32), rtol=1e-6)
    frames = captured.frames
    np.testing.assert_array_equal(frames.images, session.frames.images[:len(frames.timestamps)])
    assert captured.metadata["interrupted"] is False
    assert 1.9 < captured.metadata["captured_wall_s"] < 4.0


def test_zmq_capture_and_a_malformed_message_is_counted_not_fatal(session):
    streamer = StreamerThread(session, "zmq", speed=SPEED, address="tcp://127.0.0.1:*")
    address = streamer.stats.endpoints["zmq"]
    sources = open_sources(rig(spikes={"address": address}, behavior={"address": address},
                               frames={"kind": "none"}), "zmq")
    assert len(sources) == 1 and sources[0].name == f"zmq:{address}"
    intruder = zmq.Context.instance().socket(zmq.PUB)  # a second publisher, sending garbage
    intruder_address = address.rsplit(":", 1)[0] + ":*"
    intruder.bind(intruder_address)
    sources[0].socket.connect(intruder.getsockopt(zmq.LAST_ENDPOINT).decode())
    streamer.go()

    def send_garbage() -> None:  # spaced out, during the capture (PUB drops before joining)
        for _ in range(20):
            time.sleep(0.03)
            intruder.send_multipart([b"spikes", b"not an rtnf message"])

    sender = threading.Thread(target=send_garbage)
    sender.start()
    captured = capture_session(sources, 1.5)
    sender.join()
    streamer.finish(stop=True)
    sources[0].close()
    intruder.close(linger=0)

    assert captured.n_spikes > 50
    ids = captured.unit_ids[captured.spike_unit_index]
    start = int(np.flatnonzero(spike_ids(session) == ids[0])[0])  # slow joiner: may miss some
    np.testing.assert_array_equal(ids[:50], spike_ids(session)[start:start + 50])
    assert 0 < sum(sources[0].rejected.values()) <= 20
    assert captured.metadata["rejected_messages"] == sum(sources[0].rejected.values())
    assert "bad magic" in next(iter(sources[0].rejected))


def test_no_stream_is_a_clear_error():
    with pytest.raises(RtnfError, match="no LSL stream matches rig.sources.spikes.lsl"):
        open_sources(rig(spikes={"lsl": dataclasses.replace(
            load_config().rig.sources.spikes.lsl, name="no-such-stream")}), "lsl")
