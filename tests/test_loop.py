"""The closed loop end to end on real transports: three processes over LSL, hostile and vanishing
ZeroMQ publishers, control rules reaching a Bpod App port (pty) and pybpod's UDP port, a clean
stop on SIGTERM with the run recorded."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tty

import numpy as np
import pytest
import yaml
import zmq

from random_bundle import write_bundle
from rtnf.bundle import load_bundle
from rtnf.config import EngineConfig, load_config
from rtnf.data.sim import simulate
from rtnf.engine.compile import compile_bundle
from rtnf.engine.select import open_engine
from rtnf.rt.closed_loop import free_tcp_port, run_against_simulated_rig
from rtnf.rt.decoder import WindowDecoder
from rtnf.rt.export import export_nwb
from rtnf.rt.loop import LoopSettings, RealtimeLoop
from rtnf.rt.recorder import read_run
from rtnf.rt.rules import Rules
from rtnf.rt.run import output_layout
from rtnf.stream.lslconfig import import_pylsl
from rtnf.stream.replay import ReplaySource
from rtnf.stream.sinks import BpodSerialSink, BpodUdpSink
from rtnf.stream.sources import ZmqSource
from rtnf.stream.zmq_messages import encode_spikes

# The simulated rig of these tests: `rtnf simulate` with these flags simulates exactly the
# session the bundle is written for (same seed, same units).
RIG = {"neurons": 40, "minutes": 0.5, "seed": 21, "profile": "ephys"}
RIG_FLAGS = ["--neurons", "40", "--minutes", "0.5", "--seed", "21", "--profile", "ephys",
             "--sessions", "1"]


@pytest.fixture(scope="module")
def rig_session():
    config = load_config(overrides=[f"simulation.neurons={RIG['neurons']}",
                                    f"simulation.minutes={RIG['minutes']}",
                                    f"simulation.seed={RIG['seed']}", "simulation.sessions=1"])
    (session,) = simulate(config.simulation, RIG["profile"])
    return session


@pytest.fixture(scope="module")
def compiled_bundle(rig_session, tmp_path_factory):
    bundle = write_bundle(rig_session, tmp_path_factory.mktemp("loop") / "bundle",
                          behavior_inputs=())
    compile_bundle(bundle, EngineConfig(backend="onnxruntime", threads=1))
    return bundle


@pytest.fixture(scope="module")
def frameless_bundle(rig_session, tmp_path_factory):
    return load_bundle(write_bundle(rig_session, tmp_path_factory.mktemp("loop") / "plain",
                                    behavior_inputs=(), frames=False))


def run_config(tmp_path, **sections) -> str:
    settings = {"outputs": {"zmq": {"address": f"tcp://127.0.0.1:{free_tcp_port()}"}},
                "recording": {"directory": str(tmp_path / "runs"), "flush_interval": 0.2},
                **sections}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def test_three_processes_over_lsl(compiled_bundle, tmp_path):
    """`rtnf simulate --stream lsl` | `rtnf run --stream lsl` | a plain pylsl inlet here."""
    pylsl = import_pylsl()
    seconds = 4.0
    received, (truth_times, truth), summary = run_against_simulated_rig(
        compiled_bundle, run_config(tmp_path), RIG_FLAGS, seconds, tmp_path, pylsl)
    # The receiver joins once the outlets exist (resolving takes a moment): most windows.
    assert received.sequence.size >= 0.4 * seconds / 0.05
    assert received.gaps() == summary["skipped"] == 0
    assert np.all(np.diff(received.sequence) == 1)
    assert received.targets == ["speed", "gaze_phi", "gaze_theta"]
    assert np.median(received.latency_ms) < 50.0
    assert summary["windows"] >= received.sequence.size
    assert truth_times.size > 0 and np.all(np.isfinite(received.decoded))
    # The run was recorded: every window sent is in the record, and it exports to NWB.
    (run_dir,) = (tmp_path / "runs").iterdir()
    recording = read_run(run_dir)
    assert recording.finished and recording.decoded.size == summary["windows"]
    assert set(received.sequence) <= set(recording.decoded["sequence"].tolist())
    assert recording.spikes.size > 0
    nwb = export_nwb(run_dir, tmp_path / "run.nwb")
    assert nwb.stat().st_size > 0


class Publisher:
    """rtnf's spike messages for `units`, stamped on the LSL clock, from a thread; `garbage`
    messages and out-of-bundle units between them; can vanish and come back."""

    def __init__(self, address: str, units: np.ndarray, clock):
        self.address, self.units, self.clock = address, units, clock
        self.context = zmq.Context.instance()
        self.stop = threading.Event()
        self.paused = threading.Event()
        self.sent_garbage = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _socket(self):
        socket_ = self.context.socket(zmq.PUB)
        socket_.setsockopt(zmq.LINGER, 0)
        socket_.bind(self.address)
        return socket_

    def _run(self) -> None:
        rng = np.random.default_rng(0)
        publisher = self._socket()
        hostile = [lambda: [b"spikes", b"RTNF\x01\x00garbage"],
                   lambda: [b"spikes", os.urandom(64)], lambda: [b"spikes", b"1.0,2.0,3.0\n"],
                   lambda: [b"spikes", b"a", b"b"],  # then a unit the bundle does not know:
                   lambda: [b"spikes", encode_spikes(np.array([self.clock()]),
                                                     np.array([999_999]))]]
        while not self.stop.is_set():
            if self.paused.is_set():
                publisher.close(linger=0)
                while self.paused.is_set() and not self.stop.is_set():
                    time.sleep(0.01)
                time.sleep(0.05)
                publisher = self._socket()
            now = self.clock()
            units = rng.choice(self.units, size=3)
            publisher.send_multipart([b"spikes", encode_spikes(np.full(3, now), units)])
            if rng.random() < 0.1:
                publisher.send_multipart(hostile[self.sent_garbage % len(hostile)]())
                self.sent_garbage += 1
            time.sleep(0.004)
        publisher.close(linger=0)


def loop_on_zmq(bundle, address, sinks=(), rules=None, seconds=3.0, silence_s=2.0):
    pylsl = import_pylsl()
    decoder = WindowDecoder(bundle, open_engine(bundle, EngineConfig(backend="torch",
                                                                     threads=1), "torch"))
    layout = output_layout(decoder, bundle.unit_ids)
    source = ZmqSource(address, ["spikes"])
    rules = Rules.from_config(rules or [], layout)
    loop = RealtimeLoop(decoder, [source], list(sinks), layout, pylsl.local_clock, rules,
                        settings=LoopSettings(seconds=seconds, silence_s=silence_s))
    return loop, source, pylsl


def test_hostile_input_is_counted_while_outputs_continue(frameless_bundle):
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    loop, source, pylsl = loop_on_zmq(frameless_bundle, address)
    publisher = Publisher(address, frameless_bundle.unit_ids, pylsl.local_clock)
    publisher.thread.start()
    try:
        summary = loop.run()
    finally:
        publisher.stop.set()
        publisher.thread.join()
        source.close()
    assert summary["windows"] >= 0.8 * 3.0 / 0.05 - 25  # ~1 s of settling at most
    assert publisher.sent_garbage >= 5
    assert summary["rejected"]["unknown unit"] >= 1
    reasons = set(source.rejected)
    assert {"message too short", "bad magic, not CSV text", "CSV wrong column count",
            "wrong number of parts"} <= reasons, reasons
    # Every bad message was counted, but for a few sent before the subscription took or after
    # the loop stopped.
    counted = sum(source.rejected.values()) + summary["rejected"]["unknown unit"]
    assert publisher.sent_garbage - 6 <= counted <= publisher.sent_garbage


def test_a_vanished_publisher_is_waited_for_and_reattached(frameless_bundle):
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    loop, source, pylsl = loop_on_zmq(frameless_bundle, address, seconds=4.0, silence_s=0.3)
    publisher = Publisher(address, frameless_bundle.unit_ids, pylsl.local_clock)
    publisher.thread.start()

    def vanish_and_return() -> None:
        time.sleep(1.8)
        publisher.paused.set()
        time.sleep(0.8)
        publisher.paused.clear()

    outage = threading.Thread(target=vanish_and_return, daemon=True)
    outage.start()
    try:
        summary = loop.run()
    finally:
        publisher.stop.set()
        outage.join()
        publisher.thread.join()
        source.close()
    assert summary["counters"]["source_gaps"] >= 1
    assert summary["counters"]["reconnects"] >= 1
    assert summary["windows"] >= 0.8 * 4.0 / 0.05 - 25  # windows kept coming through the gap


def test_a_rule_reaches_the_bpod_app_port_and_pybpod(frameless_bundle):
    master, slave = os.openpty()
    tty.setraw(master)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(2.0)
    rule = {"name": "always", "when": [{"value": "decoded.speed", "above": -1e9}],
            "command": "go", "sinks": ["bpod_serial", "bpod_udp"], "soft_code": 5}
    sinks = [BpodSerialSink(os.ttyname(slave)), BpodUdpSink("127.0.0.1", udp.getsockname()[1])]
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    loop, source, pylsl = loop_on_zmq(frameless_bundle, address, sinks, [rule], seconds=2.0)
    publisher = Publisher(address, frameless_bundle.unit_ids, pylsl.local_clock)
    publisher.thread.start()
    try:
        loop.run()
    finally:
        publisher.stop.set()
        publisher.thread.join()
        source.close()
        for sink in sinks:
            sink.close()
    assert os.read(master, 16) == b"\x05"  # fired once: a rising edge, then it holds
    assert udp.recv(64) == b"SoftCode5"
    os.close(master)
    os.close(slave)
    udp.close()


def test_run_stops_cleanly_on_sigterm_with_its_record(compiled_bundle, tmp_path):
    """`rtnf run --stream sim`: the simulated rig in-process; SIGTERM ends it with the final
    flush and the summary, exit status 0."""
    flags = [f"simulation.neurons={RIG['neurons']}", f"simulation.seed={RIG['seed']}",
             f"simulation.minutes={RIG['minutes']}", "simulation.sessions=1",
             f"rig.profile={RIG['profile']}"]
    command = [sys.executable, "-m", "rtnf.cli", "run", "--config", run_config(tmp_path),
               "--bundle", str(compiled_bundle), "--stream", "sim", "--json",
               *[arg for flag in flags for arg in ("--set", flag)]]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    time.sleep(8.0)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    summary = json.loads(out)
    assert summary["windows"] > 10
    (run_dir,) = (tmp_path / "runs").iterdir()
    record = read_run(run_dir)
    assert record.finished and record.info["summary"]["loop"]["windows"] == summary["windows"]


def test_demo_reports_decoding_and_latency(tmp_path):
    """`rtnf demo --json` end to end, on a tiny model and a small rig."""
    tiny = ["simulation.neurons=30", "model.n_embd=32", "model.n_head=2",
            "model.n_current_layers=1", "model.n_history_layers=1",
            "model.n_frame_encoder_layers=1", "model.n_frame_layers=1",
            "model.n_decoder_layers=1", "calibration.max_epochs=2", "calibration.patience=1",
            "training.max_steps=10", "training.eval_every=10", "training.batch_size=8"]
    environment = {**os.environ, "RTNF_CACHE": str(tmp_path / "cache")}
    pretrained = tmp_path / "pretrained"
    subprocess.run([sys.executable, "-m", "rtnf.cli", "pretrain", "--simulated", "--out",
                    str(pretrained), "--json", "--set", "simulation.sessions=2",
                    "--set", "simulation.minutes=0.5",
                    *[arg for flag in tiny for arg in ("--set", flag)]],
                   check=True, capture_output=True, env=environment, timeout=300)
    result = subprocess.run([sys.executable, "-m", "rtnf.cli", "demo", "--json", "--seconds", "8",
                             "--pretrained", str(pretrained), "--workdir", str(tmp_path / "demo"),
                             *[arg for flag in tiny for arg in ("--set", flag)]],
                            capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert set(report["latency_ms"]) >= {"p50", "p99", "p999", "max"}
    assert report["windows"] > 20 and report["skipped"] >= 0 and report["missed"] >= 0
    assert set(report["decoding"]) == {"speed_r", "gaze_phi_r", "gaze_theta_r"}
    # r is undefined (NaN) where the truth did not vary in the few seconds scored.
    scores = [r for r in report["decoding"].values() if r == r]
    assert scores and all(-1.0 <= r <= 1.0 for r in scores), report["decoding"]
    assert report["decoder"] in ("neuroformer", "ridge")


def test_a_file_replayed_four_times_faster_keeps_session_time_windows(frameless_bundle,
                                                                      rig_session):
    """At 4x, the loop's windows are still 50 ms of the session: four times as many per second
    of the clock, each stamped on the clock at a quarter of the hop."""
    pylsl = import_pylsl()
    decoder = WindowDecoder(frameless_bundle, open_engine(frameless_bundle, EngineConfig(
        backend="torch", threads=1), "torch"))
    layout = output_layout(decoder, frameless_bundle.unit_ids)
    replay = ReplaySource(rig_session, ["spikes", "behavior"], speed=4.0)
    seconds = 2.0
    loop = RealtimeLoop(decoder, [replay], [], layout, pylsl.local_clock,
                        settings=LoopSettings(seconds=seconds, speed=4.0))
    summary = loop.run()
    replay.close()
    # Windows from the first one after the settling, for what is left of the 2 s, at 4 x 20/s.
    assert summary["windows"] >= 0.8 * 4.0 * (seconds - 1.0) / 0.05
    assert summary["skipped"] == 0 and summary["counters"].get("late_spikes", 0) == 0
