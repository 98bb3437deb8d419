"""Fault injection for the closed loop: each scenario runs a real loop (in this process, or as an
`rtnf run` / `rtnf calibrate` process), injects one fault for real and reports what the operator
saw (the warning and error lines), the counters, and what the run's record holds afterwards.

tests/test_faults.py runs the scenarios small and asserts on the reports;
benchmarks/bench_faults.py runs them long (more restarts, more kill -9 trials) and writes
benchmarks/results/faults.json. The faults:

- a spike source killed and restarted mid-run: a ZeroMQ publisher whose socket is closed and
  bound again; an LSL outlet destroyed and created again with the same source id
  (`source_restarts`);
- the behaviour stream disappearing for good (`behavior_disappears`);
- output consumers that stop reading: a ZeroMQ subscriber that never receives, an LSL inlet
  never pulled (`stalled_consumers`);
- the Bpod App serial port vanishing and returning, a pty behind a symlink (`bpod_port_returns`);
- the run directory's disk filling up mid-run: a small tmpfs when this process may mount one,
  otherwise RLIMIT_FSIZE on the `rtnf run` process (`disk_full`);
- the engine raising mid-run (`engine_fails`): the one injected fault that needs a stand-in,
  `FailingBackend`, a wrapper around the real backend that raises after a number of windows;
- SIGTERM while the recorder flushes (`sigterm_during_flush`), and during the final flush
  (`sigterm_during_final_flush`);
- kill -9 of `rtnf run` at a random point (`kill9_trial`) and of `rtnf calibrate` writing into an
  existing bundle (`calibration_kill_trial`).

LSL stays on this machine: callers point LSLAPICFG at tests/lsl-loopback.cfg before pylsl loads.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tty
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
import zmq

from rtnf.bundle import Bundle, load_bundle, verify_bundle
from rtnf.config import EngineConfig, LslSourceConfig, SourceConfig, ZmqOutputConfig
from rtnf.engine.select import open_engine
from rtnf.errors import RtnfError
from rtnf.rt import run as run_module
from rtnf.rt.closed_loop import free_tcp_port
from rtnf.rt.decoder import WindowDecoder
from rtnf.rt.loop import LoopSettings, RealtimeLoop
from rtnf.rt.recorder import RunRecording, read_run
from rtnf.rt.run import fault_lines, output_layout
from rtnf.stream.lslconfig import import_pylsl
from rtnf.stream.sinks import TELEMETRY_COUNTERS, BpodSerialSink, LslSink, Sink, ZmqSink
from rtnf.stream.sources import LslSource, Source, ZmqSource
from rtnf.stream.window_output import STAGES, Command
from rtnf.stream.zmq_messages import encode_behavior, encode_spikes

SEND_INTERVAL_S = 0.004  # a publisher sends every 4 ms
SPIKES_PER_SEND = 3
FLUSH_INTERVAL_S = 0.2  # the recorder's, in the scenarios that do not test it
START_TIMEOUT_S = 60.0  # for an `rtnf run` / `rtnf calibrate` process to get going
SKIPPED_FIELD = 3 + len(STAGES) + TELEMETRY_COUNTERS.index("skipped")  # in a telemetry CSV line
Outage = tuple[float, float | None]  # seconds after the start, length (None: for good)
# Seconds between restarts and after the last: a ZeroMQ subscriber reconnects within ~0.1 s; an
# LSL inlet re-resolves a recreated outlet in ~3.6 s (measured here), however short the outage.
RESTART_EVERY_S = {"zmq": 1.4, "lsl": 4.5}


# ---------------------------------------------------------------------------------------------
# What the operator sees, what the record holds
# ---------------------------------------------------------------------------------------------


class WarningLines(logging.Handler):
    """The warning and error lines the loop logs while in the `with` block."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> WarningLines:
        logging.getLogger("rtnf.rt").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("rtnf.rt").removeHandler(self)


def record_report(directory: Path) -> dict[str, Any]:
    """What a run's record holds: whether it opens and is finished, records per kind, and
    whether every kind is whole (numbers and sequences in order, outputs in step)."""
    try:
        recording = read_run(directory)
    except RtnfError as error:
        return {"opens": False, "error": str(error)}
    sequence = recording.decoded["sequence"]
    return {"opens": True, "finished": recording.finished,
            "records": {kind: int(getattr(recording, kind).size) for kind in
                        ("spikes", "behavior", "frames", "decoded", "predicted", "telemetry")},
            "inputs_numbered_in_order": _inputs_in_order(recording),
            "decoded_sequence_increasing": bool(np.all(np.diff(sequence) > 0)),
            "decoded_sequence_gaps": _gaps(sequence),
            "outputs_in_step": _outputs_in_step(recording),
            "summary": recording.info.get("summary")}


def _gaps(sequence: np.ndarray) -> int:
    """Windows missing between the first and the last sequence number."""
    return int(sequence[-1] - sequence[0] + 1 - sequence.size) if sequence.size else 0


def _inputs_in_order(recording: RunRecording) -> bool:
    """Every input kind numbered 0, 1, 2, ... with time never going back: nothing torn or
    garbled (a torn trailing record is not read)."""
    return all(np.array_equal(records["number"], np.arange(records.size))
               and bool(np.all(np.diff(records["timestamp"]) >= 0))
               for records in (recording.spikes, recording.behavior, recording.frames))


def _outputs_in_step(recording: RunRecording) -> bool:
    """Decoded, predicted and telemetry records name the same windows in the same order, as
    far as the shortest goes (each kind's file is written on its own: a crash or a failing disk
    can cut them at different windows since the last flush)."""
    kinds = (recording.decoded, recording.predicted, recording.telemetry)
    shortest = min(records.size for records in kinds)
    first = recording.decoded["sequence"][:shortest]
    return all(np.array_equal(records["sequence"][:shortest], first) for records in kinds)


# ---------------------------------------------------------------------------------------------
# Rig processes that die and come back
# ---------------------------------------------------------------------------------------------


class Publisher(ABC):
    """A rig's process sending records from a thread, stamped on the LSL clock: spikes of
    `units` (SPIKES_PER_SEND every SEND_INTERVAL_S) or behaviour samples (one per send). For
    each outage (start, length), seconds after `start()`, the process is gone: its socket or
    outlet is closed, and opened again after `length` (never, for None). `gone` holds each
    outage's (start, end) on the clock."""

    def __init__(self, kind: str, units: np.ndarray, clock: Callable[[], float],
                 outages: Sequence[Outage] = ()):
        self.kind, self.units, self.clock, self.outages = kind, units, clock, list(outages)
        self.stop = threading.Event()
        self.opened = threading.Event()
        self.gone: list[tuple[float, float | None]] = []
        self.thread = threading.Thread(target=self._run, name=f"publisher-{kind}", daemon=True)

    def start(self) -> None:
        self.thread.start()
        self.opened.wait(10.0)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10.0)

    @abstractmethod
    def _open(self) -> None:
        """Open the socket or outlet."""

    @abstractmethod
    def _close(self) -> None:
        """Close it."""

    @abstractmethod
    def _send(self, stamp: float, rng: np.random.Generator) -> None:
        """Send one record stamped `stamp`."""

    def _run(self) -> None:
        rng = np.random.default_rng(0)
        self._open()
        self.opened.set()
        started = time.monotonic()
        pending = sorted(self.outages)
        while not self.stop.is_set():
            if pending and time.monotonic() - started >= pending[0][0]:
                self._be_gone(pending.pop(0)[1])
                continue
            self._send(self.clock(), rng)
            time.sleep(SEND_INTERVAL_S)
        self._close()

    def _be_gone(self, length: float | None) -> None:
        self._close()
        went = self.clock()
        self.stop.wait(length)
        self._open()  # (closed again at the end of _run when stopped meanwhile)
        self.gone.append((went, None if length is None else self.clock()))


class ZmqPublisher(Publisher):
    """rtnf's binary messages on a PUB socket bound to `address`."""

    def __init__(self, address: str, kind: str, units: np.ndarray, clock: Callable[[], float],
                 outages: Sequence[Outage] = ()):
        super().__init__(kind, units, clock, outages)
        self.address = address
        self.context = zmq.Context.instance()
        self.socket: zmq.Socket | None = None

    def _open(self) -> None:
        self.socket = self.context.socket(zmq.PUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(self.address)

    def _close(self) -> None:
        self.socket.close(linger=0)

    def _send(self, stamp: float, rng: np.random.Generator) -> None:
        if self.kind == "spikes":
            payload = encode_spikes(np.full(SPIKES_PER_SEND, stamp),
                                    rng.choice(self.units, SPIKES_PER_SEND))
        else:
            payload = encode_behavior(np.array([stamp]), rng.normal(size=(1, 3)))
        self.socket.send_multipart([self.kind.encode(), payload])


class LslSpikePublisher(Publisher):
    """Spikes on an LSL outlet (one int channel); it comes back with the same source id."""

    def __init__(self, name: str, source_id: str, units: np.ndarray, pylsl,
                 outages: Sequence[Outage] = ()):
        super().__init__("spikes", units, pylsl.local_clock, outages)
        self.name, self.source_id, self.pylsl = name, source_id, pylsl
        self.outlet = None

    def _open(self) -> None:
        info = self.pylsl.StreamInfo(self.name, "Spikes", 1, self.pylsl.IRREGULAR_RATE,
                                     self.pylsl.cf_int32, self.source_id)
        self.outlet = self.pylsl.StreamOutlet(info)

    def _close(self) -> None:
        self.outlet = None  # the outlet is destroyed: the stream leaves the network

    def _send(self, stamp: float, rng: np.random.Generator) -> None:
        for unit in rng.choice(self.units, SPIKES_PER_SEND):
            self.outlet.push_sample([int(unit)], stamp)


@contextlib.contextmanager
def publishing(*publishers: Publisher) -> Iterator[None]:
    for publisher in publishers:
        publisher.start()
    try:
        yield
    finally:
        for publisher in publishers:
            publisher.close()


# ---------------------------------------------------------------------------------------------
# A loop in this process
# ---------------------------------------------------------------------------------------------


def torch_decoder(bundle: Bundle, decoder: str = "auto") -> WindowDecoder:
    return WindowDecoder(bundle, open_engine(bundle, EngineConfig(backend="torch", threads=1),
                                             "torch"), decoder)


def run_loop(bundle: Bundle, sources: list[Source], run_dir: Path, seconds: float,
             sinks: Sequence[Sink] = (), rules=None, silence_s: float = 0.3
             ) -> tuple[dict[str, Any], list[str]]:
    """Run a recorded loop on `sources` for `seconds`; its summary and warning lines."""
    from rtnf.rt.recorder import Recorder

    pylsl = import_pylsl()
    decoder = torch_decoder(bundle)
    layout = output_layout(decoder, bundle.unit_ids)
    try:
        with Recorder(run_dir, layout, FLUSH_INTERVAL_S) as recorder, WarningLines() as seen:
            loop = RealtimeLoop(decoder, sources, list(sinks), layout, pylsl.local_clock, rules,
                                recorder, LoopSettings(seconds=seconds, silence_s=silence_s))
            summary = loop.run()
            recorder.close(summary)
    finally:
        for source in sources:
            source.close()
    return summary, seen.lines


def _loop_report(summary: dict[str, Any], warnings: list[str], run_dir: Path
                 ) -> dict[str, Any]:
    return {"warnings": warnings, "windows": summary["windows"], "skipped": summary["skipped"],
            "counters": summary["counters"], "latency_ms": summary["latency_ms"],
            "record": record_report(run_dir)}


def _windows_after(run_dir: Path, clock_time: float) -> int:
    """Decoded windows recorded that end after `clock_time` (stream clock)."""
    return int(np.sum(read_run(run_dir).decoded["window_end"] > clock_time))


def source_restarts(bundle: Bundle, transport: str, restarts: int, workdir: Path,
                    outage_s: float = 0.5) -> dict[str, Any]:
    """The spike source killed and restarted `restarts` times mid-run, over `transport`
    (zmq: its PUB socket closed and bound again; lsl: the outlet destroyed and created again
    with the same source id)."""
    pylsl = import_pylsl()
    every_s = RESTART_EVERY_S[transport]
    outages = [(1.2 + k * every_s, outage_s) for k in range(restarts)]
    seconds = outages[-1][0] + every_s
    publisher: Publisher
    if transport == "zmq":
        address = f"tcp://127.0.0.1:{free_tcp_port()}"
        publisher = ZmqPublisher(address, "spikes", bundle.unit_ids, pylsl.local_clock, outages)
    else:
        name, source_id = f"rtnf-fault-{os.getpid()}", f"rtnf-fault-{time.monotonic_ns()}"
        publisher = LslSpikePublisher(name, source_id, bundle.unit_ids, pylsl, outages)
    run_dir = workdir / f"restarts-{transport}"
    with publishing(publisher):
        source: Source = ZmqSource(address, ["spikes"]) if transport == "zmq" else LslSource(
            "spikes", SourceConfig(lsl=LslSourceConfig(name=name, type="Spikes",
                                                       source_id=source_id)), pylsl)
        summary, warnings = run_loop(bundle, [source], run_dir, seconds)
    report = _loop_report(summary, warnings, run_dir)
    last_back = publisher.gone[-1][1] if publisher.gone else None
    report |= {"fault": f"spike source restarted ({transport})", "restarts": len(publisher.gone),
               "windows_after_last_restart": None if last_back is None
               else _windows_after(run_dir, last_back),
               "spikes_recorded_during_outages": _inputs_during(run_dir, publisher.gone)}
    return report


def _inputs_during(run_dir: Path, gone: list[tuple[float, float | None]]) -> int:
    """Spikes recorded with stamps inside an outage (must be none: nobody sent them)."""
    stamps = read_run(run_dir).spikes["timestamp"]
    return int(sum(np.sum((stamps > start + 0.05) & (stamps < (np.inf if end is None else end)))
                   for start, end in gone))


def behavior_disappears(bundle: Bundle, workdir: Path, after_s: float = 1.5,
                        seconds: float = 4.0) -> dict[str, Any]:
    """The behaviour stream's process dies for good mid-run; spikes keep coming."""
    pylsl = import_pylsl()
    spikes_at, behavior_at = (f"tcp://127.0.0.1:{free_tcp_port()}" for _ in range(2))
    spikes = ZmqPublisher(spikes_at, "spikes", bundle.unit_ids, pylsl.local_clock)
    behavior = ZmqPublisher(behavior_at, "behavior", bundle.unit_ids, pylsl.local_clock,
                            [(after_s, None)])
    run_dir = workdir / "behavior-gone"
    with publishing(spikes, behavior):
        summary, warnings = run_loop(bundle, [ZmqSource(spikes_at, ["spikes"]),
                                              ZmqSource(behavior_at, ["behavior"])],
                                     run_dir, seconds)
    recording = read_run(run_dir)
    went = behavior.gone[0][0]
    report = _loop_report(summary, warnings, run_dir)
    report |= {"fault": "behaviour stream disappeared", "behavior_source": f"zmq:{behavior_at}",
               "windows_after_gap": _windows_after(run_dir, went),
               "behavior_recorded_after_gap": int(np.sum(
                   recording.behavior["timestamp"] > went + 0.05)),
               "decoded_finite_after_gap": bool(np.isfinite(recording.decoded["values"][
                   recording.decoded["window_end"] > went]).all())}
    return report


def stalled_consumers(bundle: Bundle, workdir: Path, seconds: float = 4.0,
                      high_water_mark: int = 5) -> dict[str, Any]:
    """A ZeroMQ subscriber that never receives (queues of one message, on an ipc socket whose
    buffers fill in a second) and an LSL inlet that is never pulled, on every window's
    outputs: the loop must not block."""
    pylsl = import_pylsl()
    layout = output_layout(torch_decoder(bundle), bundle.unit_ids)
    prefix = f"rtnf-stall-{os.getpid()}"
    zmq_sink = ZmqSink(layout, ZmqOutputConfig(address=f"ipc://{workdir}/outputs.ipc",
                                               high_water_mark=high_water_mark))
    lsl_sink = LslSink(layout, prefix, "fault-rig", pylsl)
    subscriber = zmq.Context.instance().socket(zmq.SUB)
    subscriber.setsockopt(zmq.RCVHWM, 1)
    subscriber.setsockopt(zmq.LINGER, 0)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"")
    subscriber.connect(zmq_sink.endpoint)
    (found,) = pylsl.resolve_bypred(f"name='{prefix}-predicted'", 1, 10.0)
    inlet = pylsl.StreamInlet(found, max_buflen=1)
    inlet.open_stream(10.0)
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    spikes = ZmqPublisher(address, "spikes", bundle.unit_ids, pylsl.local_clock)
    run_dir = workdir / "stalled-consumers"
    try:
        with publishing(spikes):
            summary, warnings = run_loop(bundle, [ZmqSource(address, ["spikes"])], run_dir,
                                         seconds, sinks=[zmq_sink, lsl_sink])
    finally:
        subscriber.close(linger=0)
        inlet.close_stream()
        zmq_sink.close()
        lsl_sink.close()
    report = _loop_report(summary, warnings, run_dir)
    report |= {"fault": "output consumers stopped reading", "hop_ms": layout.hop * 1e3,
               "publish_ms": summary["stages_ms"]["publish"],
               "sink_errors": {"zmq": dict(zmq_sink.errors), "lsl": dict(lsl_sink.errors)}}
    return report


class EveryWindow:
    """Control rules that send one Bpod soft code every window (a driver for the port fault:
    configured rules fire on edges, too rarely to watch a port come back)."""

    def __init__(self, soft_code: int):
        self.command = Command("every-window", "pulse", ("bpod_serial",), soft_code)

    def evaluate(self, sequence: int, window_end: float, decoded: np.ndarray,
                 predicted: np.ndarray) -> tuple[Command, ...]:
        return (self.command,)


class SerialPort:
    """The Bpod state machine's App port: a pty behind a stable path (a symlink), which can be
    unplugged (its master closed, the node gone) and plugged in again (a new pty)."""

    def __init__(self, path: Path):
        self.path = path
        self.received: list[bytes] = []  # what each plug-in period read
        self.slaves: list[int] = []
        self.master: int | None = None
        self.plug_in()

    def plug_in(self) -> None:
        master, slave = os.openpty()
        tty.setraw(master)
        os.set_blocking(master, False)
        self.path.unlink(missing_ok=True)
        self.path.symlink_to(os.ttyname(slave))
        self.master = master
        self.slaves.append(slave)
        self.received.append(b"")

    def read(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.master, 4096):
                self.received[-1] += chunk

    def unplug(self) -> None:
        self.read()
        os.close(self.master)
        self.master = None
        self.path.unlink()

    def close(self) -> None:
        if self.master is not None:
            self.read()
            os.close(self.master)
        for slave in self.slaves:
            os.close(slave)


def bpod_port_returns(bundle: Bundle, workdir: Path, vanishes: int = 1, away_s: float = 0.5,
                      every_s: float = 2.0) -> dict[str, Any]:
    """The App serial port unplugged and plugged in again `vanishes` times mid-run, while a
    soft code goes out every window."""
    pylsl = import_pylsl()
    port = SerialPort(workdir / "bpod-app-port")
    sink = BpodSerialSink(str(port.path))
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    spikes = ZmqPublisher(address, "spikes", bundle.unit_ids, pylsl.local_clock)
    stop = threading.Event()

    def unplug_and_return() -> None:
        for k in range(vanishes):
            if stop.wait(1.5 if k == 0 else every_s - away_s):
                return
            port.unplug()
            if stop.wait(away_s):
                return
            port.plug_in()

    cable = threading.Thread(target=unplug_and_return, daemon=True)
    run_dir = workdir / "bpod-port"
    seconds = 1.5 + vanishes * every_s + 1.5
    try:
        with publishing(spikes):
            cable.start()
            summary, warnings = run_loop(bundle, [ZmqSource(address, ["spikes"])], run_dir,
                                         seconds, sinks=[sink], rules=EveryWindow(7))
    finally:
        stop.set()
        cable.join()
        sink.close()
        port.close()
    report = _loop_report(summary, warnings, run_dir)
    report |= {"fault": "Bpod App port vanished and returned", "vanishes": vanishes,
               "bytes_per_plug_in": [len(chunk) for chunk in port.received],
               "all_bytes_are_the_soft_code": all(set(chunk) <= {7} for chunk in port.received),
               "sink_errors": dict(sink.errors)}
    return report


# ---------------------------------------------------------------------------------------------
# The engine raising mid-run
# ---------------------------------------------------------------------------------------------


class FailingBackend:
    """The injected fault: the real backend, until `fail_after` window decodes have run; from
    then on every call raises, as a backend whose device failed does."""

    ERROR = "CUDA error: an illegal memory access was encountered (injected)"

    def __init__(self, backend, fail_after: int):
        self.backend, self.fail_after, self.decodes = backend, fail_after, 0
        self.name = backend.name

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if graph == "decode":
            self.decodes += 1
        if self.decodes > self.fail_after:
            raise RuntimeError(self.ERROR)
        return self.backend.run(graph, inputs)

    def describe(self) -> dict[str, Any]:
        return self.backend.describe()


@contextlib.contextmanager
def failing_engines(fail_after: int) -> Iterator[None]:
    """`rtnf run` in this process opens engines whose backend fails after `fail_after`."""
    real = run_module.open_engine

    def open_failing(*args, **kwargs):
        engine = real(*args, **kwargs)
        engine.backend = FailingBackend(engine.backend, fail_after)
        return engine

    run_module.open_engine = open_failing
    try:
        yield
    finally:
        run_module.open_engine = real


def run_config(workdir: Path, flush_interval: float = FLUSH_INTERVAL_S,
               recording: str | Path | None = None) -> Path:
    """An rtnf.yaml for `rtnf run` here: the ZeroMQ output on a free port, LSL outputs off,
    the recording under `workdir`."""
    path = workdir / f"run-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump({
        "outputs": {"zmq": {"address": f"tcp://127.0.0.1:{free_tcp_port()}"},
                    "lsl": {"enabled": False}},
        "recording": {"directory": str(recording or workdir / "runs"),
                      "flush_interval": flush_interval}}))
    return path


def sim_flags(bundle: Bundle) -> list[str]:
    """`--set` flags that make `--stream sim` play the session the bundle was calibrated on."""
    simulation = bundle.config.simulation
    flags = [f"simulation.{key}={getattr(simulation, key)}"
             for key in ("neurons", "minutes", "seed", "sessions")]
    flags.append(f"rig.profile={bundle.config.rig.profile}")
    return [arg for flag in flags for arg in ("--set", flag)]


def run_arguments(bundle_dir: Path, config: Path, run_dir: Path, *extra: str) -> list[str]:
    bundle = load_bundle(bundle_dir)
    return ["run", "--config", str(config), "--bundle", str(bundle_dir), "--stream", "sim",
            "--backend", "torch", "--run-dir", str(run_dir), "--json", *sim_flags(bundle),
            *extra]


def engine_fails(bundle_dir: Path, workdir: Path, fail_after: int = 30, seconds: float = 4.0,
                 decoder: str = "neuroformer") -> dict[str, Any]:
    """`rtnf run` (in this process) whose engine fails after `fail_after` window decodes."""
    from rtnf.cli import main

    run_dir = workdir / f"engine-fails-{time.monotonic_ns()}"
    arguments = run_arguments(bundle_dir, run_config(workdir), run_dir, "--decoder", decoder,
                              "--seconds", str(seconds))
    stdout, stderr = io.StringIO(), io.StringIO()
    with failing_engines(fail_after), WarningLines() as seen, \
            contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(arguments)
    summary = json.loads(stdout.getvalue())
    recording = read_run(run_dir)
    mean = load_bundle(bundle_dir).mean_next_counts
    matches_mean = np.isclose(recording.predicted["values"], mean[None, :].astype(np.float32))
    return {"fault": "engine raised mid-run", "exit_status": status, "warnings": seen.lines,
            "error_line": next((line for line in stderr.getvalue().splitlines()
                                if line.startswith("rtnf: error:")), None),
            "operator_lines": fault_lines(summary),
            "fallback": summary["fallback"], "failures": summary["failures"],
            "windows": summary["windows"], "counters": summary["counters"],
            "record": record_report(run_dir),
            "first_window_at_mean_counts": _first_all(matches_mean.all(axis=1),
                                                      recording.predicted["sequence"]),
            "decoded_finite": bool(np.isfinite(recording.decoded["values"]).all())}


def _first_all(flags: np.ndarray, sequence: np.ndarray) -> int | None:
    """The sequence number from which every flag is set to the end (None: the last is not)."""
    if not flags.size or not flags[-1]:
        return None
    unset = np.flatnonzero(~flags)
    return int(sequence[0 if not unset.size else unset[-1] + 1])


# ---------------------------------------------------------------------------------------------
# `rtnf run` processes: disk full, SIGTERM, kill -9
# ---------------------------------------------------------------------------------------------


LIMITED_CLI = """
import resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from rtnf.cli import main
sys.exit(main(sys.argv[2:]))
"""


def rtnf_process(arguments: list[str], limit_file_bytes: int | None = None
                 ) -> subprocess.Popen:
    """The rtnf command line with `arguments` in a new process, optionally with its writes
    limited to files of `limit_file_bytes` (RLIMIT_FSIZE: a bigger write fails with EFBIG;
    Python ignores the SIGXFSZ that comes with it)."""
    command = (["-m", "rtnf.cli"] if limit_file_bytes is None
               else ["-c", LIMITED_CLI, str(limit_file_bytes)])
    # One torch thread: calibration on a loaded 2-core machine is several times slower with
    # more (the engine of `rtnf run` uses engine.threads anyway).
    return subprocess.Popen([sys.executable, *command, *arguments], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _operator_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("rtnf: ")]


@contextlib.contextmanager
def small_disk(directory: Path, size_bytes: int) -> Iterator[bool]:
    """A tmpfs of `size_bytes` mounted on `directory` when this process may mount one (yields
    True); otherwise nothing (False: limit the writer's file size instead)."""
    directory.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(directory)],
        capture_output=True, check=False).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(directory)], check=True)


def disk_full(bundle_dir: Path, workdir: Path, size_bytes: int = 96 * 1024,
              seconds: float = 6.0) -> dict[str, Any]:
    """`rtnf run` recording onto a disk that fills up mid-run: a `size_bytes` tmpfs, or files
    limited to `size_bytes` where mounting is not allowed."""
    disk = workdir / "small-disk"
    with small_disk(disk, size_bytes) as mounted:
        run_dir = disk / "run"
        process = rtnf_process(run_arguments(bundle_dir, run_config(workdir, 0.2), run_dir,
                                             "--seconds", str(seconds)),
                               None if mounted else size_bytes)
        stdout, stderr = process.communicate(timeout=START_TIMEOUT_S + seconds)
        record = record_report(run_dir)
        sizes = {path.name: path.stat().st_size for path in run_dir.iterdir()}
    lines = _operator_lines(stderr)
    return {"fault": "disk full mid-run", "how": "tmpfs" if mounted else "RLIMIT_FSIZE",
            "size_bytes": size_bytes, "exit_status": process.returncode,
            "warnings": [line for line in lines if "recording" in line and "failed" in line
                         and not line.startswith("rtnf: error:")],
            "error_line": next((line for line in lines if line.startswith("rtnf: error:")), None),
            "summary": json.loads(stdout) if stdout.strip() else None,
            "file_sizes": sizes, "record": record}


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise RtnfError(f"the process ended ({process.returncode}) before {path} appeared: "
                            f"{process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise RtnfError(f"{path} did not appear in {timeout:g} s")
        time.sleep(0.01)


def sigterm_during_flush(bundle_dir: Path, workdir: Path, rng: np.random.Generator,
                         flush_interval: float = 0.005) -> dict[str, Any]:
    """SIGTERM to `rtnf run` while its recorder flushes every `flush_interval` seconds."""
    run_dir = workdir / f"sigterm-{time.monotonic_ns()}"
    process = rtnf_process(run_arguments(bundle_dir, run_config(workdir, flush_interval),
                                         run_dir))
    _wait_for(run_dir / "decoded.bin", process)
    time.sleep(rng.uniform(0.3, 1.5))
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    summary = json.loads(stdout) if stdout.strip() else None
    return {"fault": "SIGTERM during a flush", "exit_status": process.returncode,
            "warnings": _operator_lines(stderr), "summary": summary,
            "record": record_report(run_dir)}


FINAL_FLUSH_CHILD = """
import json, os, signal, sys, threading, time
from pathlib import Path
from rtnf.config import load_config
from rtnf.rt import recorder
from rtnf.rt.run import RunOptions, run_closed_loop

config_path, bundle, run_dir, *overrides = sys.argv[1:]
drain = recorder.Recorder._stop_writer

def signalled_drain(self):
    os.kill(os.getpid(), signal.SIGTERM)  # as the final flush begins
    drain(self)

def stop_when_recording() -> None:
    while not (Path(run_dir) / "decoded.bin").exists():
        time.sleep(0.01)
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)

recorder.Recorder._stop_writer = signalled_drain
threading.Thread(target=stop_when_recording, daemon=True).start()
config = load_config([config_path], overrides)
summary = run_closed_loop(config, RunOptions(Path(bundle), "sim", "torch",
                                             run_dir=Path(run_dir)))
print(json.dumps({"windows": summary["windows"]}))
"""


def sigterm_during_final_flush(bundle_dir: Path, workdir: Path) -> dict[str, Any]:
    """`rtnf run` stopped by SIGTERM, and signalled again as its final flush begins."""
    run_dir = workdir / f"final-flush-{time.monotonic_ns()}"
    overrides = sim_flags(load_bundle(bundle_dir))[1::2]
    process = subprocess.run([sys.executable, "-c", FINAL_FLUSH_CHILD,
                              str(run_config(workdir, 0.005)), str(bundle_dir), str(run_dir),
                              *overrides], capture_output=True, text=True, check=False,
                             env={**os.environ, "OMP_NUM_THREADS": "1"},
                             timeout=START_TIMEOUT_S + 30)
    return {"fault": "SIGTERM during the final flush", "exit_status": process.returncode,
            "stderr_tail": process.stderr[-1000:],
            "summary": json.loads(process.stdout) if process.returncode == 0 else None,
            "record": record_report(run_dir)}


@dataclass
class SentWindow:
    sequence: int
    skipped: int  # the loop's skipped counter when the window was sent
    received: float  # time.monotonic() when its telemetry arrived here


class TelemetryListener:
    """Every window `rtnf run` sends, as its ZeroMQ telemetry says (sequence, skipped)."""

    def __init__(self, address: str):
        self.socket = zmq.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"telemetry")
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self.sent: list[SentWindow] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            if not self.socket.poll(20):
                continue
            _, payload = self.socket.recv_multipart()
            fields = payload.decode().split(",")
            self.sent.append(SentWindow(int(fields[0]), int(fields[SKIPPED_FIELD]),
                                        time.monotonic()))

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.socket.close(linger=0)


def kill9_trial(bundle_dir: Path, workdir: Path, rng: np.random.Generator,
                longest_s: float = 3.0, flush_interval: float = FLUSH_INTERVAL_S
                ) -> dict[str, Any]:
    """kill -9 of `rtnf run` at a random point (0.1 s to `longest_s` after its first decoded
    window reached the disk); what the record holds against what the run sent."""
    config = run_config(workdir, flush_interval)
    address = yaml.safe_load(config.read_text())["outputs"]["zmq"]["address"]
    run_dir = workdir / f"kill9-{time.monotonic_ns()}"
    listener = TelemetryListener(address)
    process = rtnf_process(run_arguments(bundle_dir, config, run_dir))
    try:
        _wait_for(run_dir / "decoded.bin", process)
        time.sleep(rng.uniform(0.1, longest_s))
        process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        process.wait(30)
    finally:
        listener.close()
    report = record_report(run_dir)
    report |= _lost_windows(read_run(run_dir), listener.sent, killed, flush_interval)
    return {"fault": "kill -9 of rtnf run", "exit_status": process.returncode,
            "killed_after_s": round(killed - (listener.sent[0].received if listener.sent
                                              else killed), 3), "record": report}


def _lost_windows(recording: RunRecording, sent: list[SentWindow], killed: float,
                  flush_interval: float) -> dict[str, Any]:
    """Windows sent but not in the record (all must be from the last flush interval before
    the kill, plus the writer's turn), and whether each gap in the recorded sequence numbers
    is exactly the windows the loop skipped there."""
    recorded = set(recording.decoded["sequence"].tolist())
    lost = [window for window in sent if window.sequence not in recorded]
    skipped = {window.sequence: window.skipped for window in sent}
    sequence = recording.decoded["sequence"].tolist()
    gaps_explained = all(
        b - a - 1 == skipped[b] - skipped[a] for a, b in pairwise(sequence)
        if a in skipped and b in skipped)
    return {"windows_sent": len(sent), "windows_lost": len(lost),
            "oldest_lost_s_before_kill": round(max((killed - w.received for w in lost),
                                                   default=0.0), 3),
            "flush_interval_s": flush_interval, "gaps_are_skipped_windows": gaps_explained,
            "windows_skipped": sent[-1].skipped if sent else 0}


# ---------------------------------------------------------------------------------------------
# kill -9 of a calibration writing into an existing bundle
# ---------------------------------------------------------------------------------------------


def calibration_kill_trial(previous: Path, session_file: Path, workdir: Path,
                           overrides: Sequence[str], rng: np.random.Generator,
                           mid_write: bool) -> dict[str, Any]:
    """`rtnf calibrate` into a copy of the bundle `previous`, killed with SIGKILL as it writes
    the new bundle (`mid_write`: once its staging directory appears, plus up to 50 ms) or at a
    random point of its run; does the bundle directory still verify, and which bundle is it?"""
    out = workdir / f"bundle-{time.monotonic_ns()}"
    shutil.copytree(previous, out)
    before = verify_bundle(out)["created"]
    process = rtnf_process(["calibrate", "--data", str(session_file), "--out", str(out),
                            "--method", "scratch", "--no-compile", "--json",
                            *[arg for flag in overrides for arg in ("--set", flag)]])
    started = time.monotonic()
    if mid_write:
        _wait_for_staging(out, process)
        time.sleep(rng.uniform(0.0, 0.05))
    else:
        process_wait(process, rng.uniform(1.0, 8.0))
    finished_first = process.poll() is not None
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    try:
        manifest = verify_bundle(out)
        verdict = {"verifies": True,
                   "holds": "previous" if manifest["created"] == before else "new"}
    except RtnfError as error:
        verdict = {"verifies": False, "error": str(error)}
    return {"fault": "calibration killed mid-write" if mid_write else "calibration killed",
            "killed_after_s": round(time.monotonic() - started, 3),
            "finished_before_kill": finished_first, **verdict}


def process_wait(process: subprocess.Popen, seconds: float) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(seconds)


def _wait_for_staging(out: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    pattern = f".{out.name}.staging-*"
    while not any(out.parent.glob(pattern)) and process.poll() is None:
        if time.monotonic() > deadline:
            raise RtnfError(f"no staging directory {pattern} in {START_TIMEOUT_S:g} s")
        time.sleep(0.001)


def port_is_free(address: str, within_s: float = 2.0) -> bool:
    """Whether a TCP `address` (tcp://host:port) can be bound within `within_s` (ZeroMQ
    releases a closed socket's port from its I/O thread): nothing was left holding it."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    deadline = time.monotonic() + within_s
    while True:
        with socket.socket() as probe:
            try:
                probe.bind((host, int(port)))
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
        time.sleep(0.05)
