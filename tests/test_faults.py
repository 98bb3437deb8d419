"""Fault injection, CI-sized: each fault of rtnf.bench.faults injected for real into a running
loop or `rtnf run` / `rtnf calibrate` process, and, for each, what the operator sees (the
warning and error lines), what the record holds afterwards and the counters
(benchmarks/bench_faults.py runs the same scenarios long)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from random_bundle import write_bundle

from rtnf.bench import faults
from rtnf.bench.untrained_bundle import write_untrained_bundle
from rtnf.bundle import load_bundle
from rtnf.cli import main
from rtnf.config import load_config
from rtnf.data.io import write_session
from rtnf.data.sim import simulate
from rtnf.rt.loop import MAX_ENGINE_FAILURES
from rtnf.rt.run import fault_lines
from rtnf.train.calibrate import calibrate

# A calibration small enough for CI (as tests/test_calibrate.py's), from scratch.
TINY = ["simulation.sessions=1", "simulation.neurons=30", "simulation.minutes=1.2",
        "simulation.seed=7", "model.n_embd=32", "model.n_head=2", "model.n_current_layers=1",
        "model.n_history_layers=1", "model.n_frame_encoder_layers=1", "model.n_frame_layers=1",
        "model.n_decoder_layers=1", "training.batch_size=16", "training.max_steps=20",
        "training.eval_every=20", "calibration.max_epochs=2", "calibration.patience=1",
        "calibration.method=scratch"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def animal():
    config = load_config(overrides=TINY)
    (session,) = simulate(config.simulation, config.rig.profile)
    return config, session


@pytest.fixture(scope="module")
def calibrated(animal, tmp_path_factory) -> Path:
    """A calibrated bundle with baselines (ridge among them); `--stream sim` plays its session."""
    config, session = animal
    out = tmp_path_factory.mktemp("calibrated") / "bundle"
    calibrate(session, config, out, source={"kind": "test"}, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def untrained(animal, tmp_path_factory) -> Path:
    """The same rig's bundle without baselines: nothing to fall back to."""
    config, session = animal
    return write_untrained_bundle(session, config, tmp_path_factory.mktemp("untrained") / "b")


@pytest.fixture(scope="module")
def frameless(animal, tmp_path_factory):
    """For loops fed spikes only (no frame stream)."""
    _, session = animal
    return load_bundle(write_bundle(session, tmp_path_factory.mktemp("frameless") / "b",
                                    behavior_inputs=(), frames=False))


def assert_record_whole(record: dict) -> None:
    assert record["opens"], record
    assert record["inputs_numbered_in_order"] and record["outputs_in_step"]
    assert record["decoded_sequence_increasing"]


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["zmq", "lsl"])
def test_a_spike_source_killed_and_restarted_three_times(frameless, tmp_path, transport):
    report = faults.source_restarts(frameless, transport, 3, tmp_path)
    assert report["restarts"] == 3
    gaps, reconnects = report["counters"]["source_gaps"], report["counters"]["reconnects"]
    # ZeroMQ: one gap per outage. LSL: liblsl may hand over a last chunk of the old stream
    # while it re-attaches (seen: silent, back, silent, back per restart): every gap is closed.
    expected = [3] if transport == "zmq" else range(3, 7)
    assert gaps == reconnects and gaps in expected, report["warnings"]
    name = "zmq:tcp://127.0.0.1" if transport == "zmq" else "lsl:rtnf-fault-"
    silent = [line for line in report["warnings"] if re.match(
        rf"source {re.escape(name)}\S* silent for \d+\.\d s; waiting for it to come back", line)]
    back = [line for line in report["warnings"] if re.match(
        rf"source {re.escape(name)}\S* is back after \d+\.\d s", line)]
    assert len(silent) == len(back) == gaps, report["warnings"]
    # Windows kept coming through every outage and after the last restart; the only gaps in
    # the sequence are windows the loop counted as skipped.
    record = report["record"]
    assert_record_whole(record)
    assert record["finished"] and record["decoded_sequence_gaps"] == report["skipped"]
    # (LSL: liblsl blocks pulls for ~2 s while it re-attaches; the inlet's own reader thread
    # keeps that off the loop thread.)
    assert report["skipped"] <= 3  # at most a window at each reconnect
    assert report["windows_after_last_restart"] >= 10
    assert report["spikes_recorded_during_outages"] == 0
    assert record["records"]["spikes"] > 100


def test_the_behaviour_stream_disappearing(animal, tmp_path_factory, tmp_path):
    """The model reads the speed: it goes on with the last sample, and the gap is reported."""
    _, session = animal
    bundle = load_bundle(write_bundle(session, tmp_path_factory.mktemp("reads") / "b",
                                      behavior_inputs=("speed",), frames=False))
    report = faults.behavior_disappears(bundle, tmp_path)
    assert report["counters"]["source_gaps"] == 1
    assert report["counters"].get("reconnects", 0) == 0
    assert [line for line in report["warnings"] if "silent" in line] == [
        line for line in report["warnings"] if line.startswith(
            f"source {report['behavior_source']} silent for ")], report["warnings"]
    assert len(report["warnings"]) == 1
    assert report["windows_after_gap"] >= 30 and report["decoded_finite_after_gap"]
    assert report["behavior_recorded_after_gap"] == 0
    assert_record_whole(report["record"])
    assert report["record"]["decoded_sequence_gaps"] == 0


# ---------------------------------------------------------------------------------------------
# Sinks
# ---------------------------------------------------------------------------------------------


def test_output_consumers_that_stop_reading_never_block_the_loop(tmp_path):
    (session,) = simulate(load_config(overrides=["simulation.neurons=400",
                                                 "simulation.minutes=0.1"]).simulation, "ephys")
    wide = load_bundle(write_bundle(session, tmp_path / "wide", behavior_inputs=(),
                                    frames=False))
    report = faults.stalled_consumers(wide, tmp_path)
    zmq_errors = report["sink_errors"]["zmq"]
    assert zmq_errors.get("zmq predicted: subscriber queue full, dropped", 0) > 10, zmq_errors
    assert set(zmq_errors) <= {f"zmq {topic}: subscriber queue full, dropped"
                               for topic in ("decoded", "predicted", "telemetry")}
    assert report["sink_errors"]["lsl"] == {}  # pushing to a stalled inlet never fails
    dropped = zmq_errors["zmq predicted: subscriber queue full, dropped"]
    assert (f"output zmq: zmq predicted: subscriber queue full, dropped: {dropped}"
            in fault_lines({"sink_errors": report["sink_errors"]}))  # as `rtnf run` says it
    assert report["latency_ms"]["p99"] < report["hop_ms"]
    assert report["publish_ms"]["max"] < report["hop_ms"] / 2
    assert report["windows"] >= 50 and report["skipped"] == 0
    assert report["warnings"] == []


def test_the_bpod_port_vanishing_and_returning_mid_run(frameless, tmp_path):
    report = faults.bpod_port_returns(frameless, tmp_path)
    before, after = report["bytes_per_plug_in"]
    assert before >= 5 and after >= 10 and report["all_bytes_are_the_soft_code"]
    errors = report["sink_errors"]
    failed = [reason for reason in errors if reason.startswith("bpod serial: write failed")]
    assert len(failed) == 1 and errors[failed[0]] == 1
    assert f"output bpod_serial: {failed[0]}: 1" in fault_lines(
        {"sink_errors": {"bpod_serial": errors}})  # as `rtnf run` says it
    # Dropped while away, until the reopen a second after the failure: about 20 windows.
    assert 10 <= errors["bpod serial: port unavailable, command dropped"] <= 30
    assert report["windows"] >= before + after + errors[
        "bpod serial: port unavailable, command dropped"]
    assert report["latency_ms"]["p99"] < 50.0 and report["skipped"] == 0
    assert_record_whole(report["record"])


# ---------------------------------------------------------------------------------------------
# The run directory
# ---------------------------------------------------------------------------------------------


@pytest.fixture(params=["below a file", "read-only"])
def unwritable(request, tmp_path):
    """A recording.directory rtnf cannot write into, even as root."""
    if request.param == "below a file":
        (tmp_path / "disk").write_text("a file, not a directory")
        yield tmp_path / "disk" / "runs"
        return
    directory = tmp_path / "read-only"
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o555)
        yield directory
        directory.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs",
                              str(directory)], capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode()}")
    yield directory
    subprocess.run(["umount", str(directory)], check=True)


def test_an_unwritable_run_directory_is_a_clear_error_at_start(calibrated, unwritable, tmp_path,
                                                               capsys):
    config = faults.run_config(tmp_path, recording=unwritable)
    arguments = faults.run_arguments(calibrated, config, unwritable / "run", "--seconds", "2")
    assert main(arguments) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(rf"rtnf: error: recording\.directory: cannot record into "
                    rf"{re.escape(str(unwritable / 'run'))} \((Not a directory|Read-only file "
                    rf"system|Permission denied): .+\); choose a writable directory", error), error
    # Nothing that was opened is left open: the run's output port is free again.
    address = yaml.safe_load(config.read_text())["outputs"]["zmq"]["address"]
    assert faults.port_is_free(address)


def test_a_disk_that_fills_up_mid_run(calibrated, tmp_path):
    report = faults.disk_full(calibrated, tmp_path, size_bytes=64 * 1024, seconds=5.0)
    reason = "No space left on device" if report["how"] == "tmpfs" else "File too large"
    assert report["exit_status"] == 2, report
    (warning,) = report["warnings"]
    assert re.match(rf"rtnf: recording to \S+ failed \(\S+: {reason}\): the loop goes on, "
                    rf"but nothing more is recorded", warning), warning
    assert re.match(rf"rtnf: error: the run failed: recording \S+ failed: \S+: {reason} "
                    rf"\(\d+ records not written", report["error_line"]), report["error_line"]
    summary = report["summary"]
    assert summary["recording"]["failure"].endswith(reason)
    assert sum(summary["recording"]["dropped"].values()) > 0
    assert summary["windows"] > 40 and summary["skipped"] == 0  # the loop went on
    record = report["record"]
    assert_record_whole(record)  # what was written before the failure is intact
    assert record["decoded_sequence_gaps"] == 0
    flushed = summary["recording"]["records"]
    assert all(record["records"][kind] >= flushed[kind] > 0 for kind in ("decoded", "frames"))
    assert record["records"]["decoded"] < summary["windows"]
    # On a full disk run.json keeps its earlier content; where it could still be written, it
    # holds the summary and the failure.
    assert record["finished"] == (report["how"] != "tmpfs")


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


def test_an_engine_failing_mid_run_falls_back_to_the_ridge_decoder(calibrated, tmp_path):
    report = faults.engine_fails(calibrated, tmp_path, fail_after=30, seconds=4.0)
    assert report["exit_status"] == 0 and report["failures"] == []
    error = f"RuntimeError: {faults.FailingBackend.ERROR}"
    match = re.fullmatch(rf"ridge since window (\d+) because {re.escape(error)}",
                         report["fallback"])
    assert match, report["fallback"]
    since = int(match.group(1))
    assert report["operator_lines"] == [f"fallback: {report['fallback']}"]
    (warning,) = report["warnings"]
    assert warning == (f"the engine failed at window {since} ({error}): behaviour comes from the "
                       "bundle's ridge decoder for the rest of the run; predicted counts are the "
                       "bundle's training means")
    assert report["counters"]["engine_errors"] == 1
    assert report["counters"].get("engine_skipped", 0) == 0
    record = report["record"]
    assert_record_whole(record)
    assert record["decoded_sequence_gaps"] == 0 and report["decoded_finite"]
    # From that window on, and only then, predictions are the calibration's mean counts.
    assert report["first_window_at_mean_counts"] == since
    assert record["summary"]["loop"]["fallback"] == report["fallback"]


def test_an_engine_failing_without_a_fallback_stops_the_run_after_50_windows(untrained,
                                                                             tmp_path):
    report = faults.engine_fails(untrained, tmp_path, fail_after=20, seconds=20.0,
                                 decoder="auto")
    error = f"RuntimeError: {faults.FailingBackend.ERROR}"
    stop = (f"the engine failed {MAX_ENGINE_FAILURES} windows in a row (last: {error}) and "
            "the bundle has no ridge decoder to fall back to; run stopped")
    assert report["exit_status"] == 2
    assert report["error_line"] == f"rtnf: error: the run failed: {stop}"
    assert report["failures"] == [stop] and report["fallback"] is None
    first, last = report["warnings"]
    assert re.fullmatch(rf"the engine failed at window \d+ \({re.escape(error)}\): windows are "
                        rf"skipped while it fails \(the bundle has no ridge decoder to fall back "
                        rf"to\); {MAX_ENGINE_FAILURES} in a row stop the run", first), first
    assert last == stop
    assert report["counters"]["engine_skipped"] == MAX_ENGINE_FAILURES
    assert report["counters"]["engine_errors"] >= MAX_ENGINE_FAILURES
    record = report["record"]
    assert_record_whole(record)
    assert record["finished"] and record["records"]["decoded"] == report["windows"]
    assert record["summary"]["loop"]["failures"] == [stop]
    assert report["windows"] < 20 * 20 * 0.5  # stopped well before the 20 s


# ---------------------------------------------------------------------------------------------
# Signals and kill -9
# ---------------------------------------------------------------------------------------------


def test_sigterm_during_a_flush_leaves_a_finished_record(calibrated, tmp_path):
    report = faults.sigterm_during_flush(calibrated, tmp_path, np.random.default_rng(3))
    assert report["exit_status"] == 0, report["warnings"]
    record, summary = report["record"], report["summary"]
    assert_record_whole(record)
    assert record["finished"] and record["summary"]["failure"] is None
    assert record["records"]["decoded"] == summary["windows"] > 5
    flushed = record["summary"]["records"]
    assert all(flushed[kind] == count for kind, count in record["records"].items())
    assert record["summary"]["loop"]["windows"] == summary["windows"]


def test_sigterm_during_the_final_flush_does_not_cut_it_short(calibrated, tmp_path):
    report = faults.sigterm_during_final_flush(calibrated, tmp_path)
    assert report["exit_status"] == 0, report["stderr_tail"]
    record = report["record"]
    assert_record_whole(record)
    assert record["finished"] and record["records"]["decoded"] == report["summary"]["windows"]


def test_kill_9_at_random_points_loses_only_what_followed_the_last_flush(calibrated, tmp_path):
    rng = np.random.default_rng(8)
    for trial in range(4):
        report = faults.kill9_trial(calibrated, tmp_path, rng, longest_s=2.5)
        record = report["record"]
        assert report["exit_status"] == -9
        assert_record_whole(record)
        assert not record["finished"], trial
        assert record["windows_sent"] > 0 and record["gaps_are_skipped_windows"], record
        # Whatever was lost was sent in the last flush interval (plus the writer's turn).
        assert record["oldest_lost_s_before_kill"] <= record["flush_interval_s"] + 0.3, record
        assert record["records"]["decoded"] >= record["windows_sent"] - record["windows_lost"]


def test_a_calibration_killed_mid_write_leaves_the_previous_bundle(calibrated, animal,
                                                                   tmp_path):
    _, session = animal
    data = tmp_path / "session.npz"
    write_session(session, data)
    report = faults.calibration_kill_trial(calibrated, data, tmp_path, TINY,
                                           np.random.default_rng(5), mid_write=True)
    assert not report["finished_before_kill"], report
    assert report["verifies"], report
    assert report["holds"] == "previous", report
