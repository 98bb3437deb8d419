"""The run recorder (rtnf.rt.recorder) and its NWB export (rtnf.rt.export), on real files:
round trips of every record kind, reading a run while it grows, a SIGKILLed writer, torn
records, a full queue, and the NWB file pynwb reads back."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rtnf.errors import RtnfError
from rtnf.rt import recorder as recorder_module
from rtnf.rt.recorder import INFO_FILE, Recorder, read_run
from rtnf.stream.sources import Batch
from rtnf.stream.window_output import STAGES, Command, OutputLayout, TelemetrySample, WindowOutput

REPO = Path(__file__).resolve().parents[1]
LAYOUT = OutputLayout(targets=("speed", "gaze_phi", "gaze_theta"),
                      target_units=("cm/s", "degrees", "degrees"),
                      unit_ids=np.array([3, 7, 11, 20], dtype=np.int64), window=0.05, hop=0.05)


def make_run(rng: np.random.Generator, windows: int = 6) -> dict:
    """Seeded inputs and outputs of a short run, in the order the loop would record them."""
    spike_times = np.sort(rng.uniform(0, 0.3, 40))
    behavior_times = np.arange(12) * 0.025
    frame_times = np.arange(5) * 0.06
    outputs, samples = [], []
    for k in range(windows):
        sequence = k + (2 if k >= 3 else 0)  # windows 3 and 4 skipped
        commands = ((Command("fast", "reward", ("lsl", "bpod_serial"), soft_code=5),
                     Command("gaze-left", "flash", ("zmq",))) if k % 2 else ())
        outputs.append(WindowOutput(sequence, 0.05 * (sequence + 1),
                                    rng.normal(size=3).astype(np.float32),
                                    rng.gamma(2.0, size=4).astype(np.float32), commands))
        stage_ms = {stage: float(rng.uniform(0, 3)) for stage in STAGES[:-1]}
        samples.append(TelemetrySample(sequence, 0.05 * (sequence + 1), stage_ms,
                                       latency_ms=float(rng.uniform(1, 9))))
    behavior = rng.normal(size=(12, 3)).astype(np.float32)
    behavior[:, 2] = np.nan  # a rig without gaze theta
    return {
        "spikes": [Batch("spikes", spike_times[:25], rng.choice(LAYOUT.unit_ids, 25)),
                   Batch("spikes", spike_times[25:], rng.choice(LAYOUT.unit_ids, 15))],
        "behavior": [Batch("behavior", behavior_times, behavior)],
        "frames": [Batch("frames", frame_times,
                         rng.integers(0, 256, (5, 6, 8), dtype=np.uint8))],
        "outputs": outputs, "telemetry": samples,
    }


def record(recorder: Recorder, run: dict) -> None:
    for batch in run["spikes"] + run["behavior"] + run["frames"]:
        recorder.record_inputs(batch)
    for output, sample in zip(run["outputs"], run["telemetry"]):
        recorder.record_output(output, sent_time=output.window_end + 0.002)
        recorder.record_telemetry(sample)
    recorder.record_rejected("unknown_unit", 3, 0.125)
    recorder.record_rejected("nan", 1, 0.25)


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_every_kind_round_trips_exactly(tmp_path):
    run = make_run(np.random.default_rng(0))
    with Recorder(tmp_path / "run", LAYOUT, flush_interval=0.1,
                  metadata={"rig": "test"}) as recorder:
        record(recorder, run)
    recording = read_run(tmp_path / "run")

    spikes = np.concatenate([batch.records for batch in run["spikes"]])
    assert recording.spikes["number"].tolist() == list(range(40))
    assert recording.spikes["batch"].tolist() == [0] * 25 + [1] * 15
    np.testing.assert_array_equal(recording.spikes["unit"], spikes)
    np.testing.assert_array_equal(recording.spikes["timestamp"],
                                  np.concatenate([b.timestamps for b in run["spikes"]]))
    np.testing.assert_array_equal(recording.behavior["values"], run["behavior"][0].records)
    assert recording.behavior["batch"].tolist() == [2] * 12
    np.testing.assert_array_equal(recording.frames["image"], run["frames"][0].records)
    np.testing.assert_array_equal(recording.frames["timestamp"], run["frames"][0].timestamps)

    outputs = run["outputs"]
    assert recording.decoded["sequence"].tolist() == [0, 1, 2, 5, 6, 7]
    np.testing.assert_array_equal(recording.decoded["values"], [o.decoded for o in outputs])
    np.testing.assert_array_equal(recording.decoded["sent_time"],
                                  [o.window_end + 0.002 for o in outputs])
    np.testing.assert_array_equal(recording.predicted["values"], [o.predicted for o in outputs])
    np.testing.assert_array_equal(recording.predicted["window_end"],
                                  [o.window_end for o in outputs])
    assert recording.control["sequence"].tolist() == [1, 1, 5, 5, 7, 7]
    assert recording.control["command"].tolist() == [b"reward", b"flash"] * 3
    assert recording.control["rule"].tolist() == [b"fast", b"gaze-left"] * 3
    assert recording.control["soft_code"].tolist() == [5, -1] * 3
    assert [recorder_module.sinks_of_mask(m) for m in recording.control["sinks"][:2]] == [
        ("lsl", "bpod_serial"), ("zmq",)]
    samples = run["telemetry"]
    np.testing.assert_array_equal(recording.telemetry["latency_ms"],
                                  [s.latency_ms for s in samples])
    np.testing.assert_array_equal(recording.telemetry["stage_ms"][:, :-1],
                                  [[s.stage_ms[stage] for stage in STAGES[:-1]] for s in samples])
    assert np.isnan(recording.telemetry["stage_ms"][:, -1]).all()  # "publish" never reported
    assert recording.rejected["reason"].tolist() == [b"unknown_unit", b"nan"]
    assert recording.rejected["count"].tolist() == [3, 1]

    info = recording.info
    assert recording.finished and info["metadata"] == {"rig": "test"}
    assert info["frame_shape"] == [6, 8] and info["layout"]["unit_ids"] == [3, 7, 11, 20]
    assert info["summary"]["records"] == {"spikes": 40, "behavior": 12, "frames": 5,
                                          "decoded": 6, "predicted": 6, "control": 6,
                                          "telemetry": 6, "rejected": 2}
    assert sum(info["summary"]["dropped"].values()) == 0
    np.testing.assert_array_equal(recording.layout.unit_ids, LAYOUT.unit_ids)


def test_reader_sees_the_records_of_each_flush_while_the_run_grows(tmp_path):
    directory = tmp_path / "run"
    with Recorder(directory, LAYOUT, flush_interval=0.1) as recorder:
        for step in range(3):
            recorder.record_inputs(Batch("spikes", np.arange(10) + 10.0 * step,
                                         np.full(10, 7)))
            expected = 10 * (step + 1)
            wait_until(lambda: recorder.flushed["spikes"] == expected)  # noqa: B023 (waits now)
            growing = read_run(directory)
            assert not growing.finished
            assert growing.spikes["number"].tolist() == list(range(10 * (step + 1)))
            assert growing.spikes["timestamp"][-1] == 10.0 * step + 9


CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from rtnf.rt.recorder import Recorder
    from rtnf.stream.sources import Batch
    from rtnf.stream.window_output import OutputLayout

    layout = OutputLayout(("speed",), ("cm/s",), np.arange(3), 0.05, 0.05)
    recorder = Recorder(sys.argv[1], layout, flush_interval=0.2)
    sent, reported = 0, 0
    while True:
        recorder.record_inputs(Batch("spikes", np.array([sent * 0.001]), np.array([sent % 3])))
        sent += 1
        if recorder.flushed["spikes"] != reported:
            reported = recorder.flushed["spikes"]
            print(reported, sent, flush=True)
        time.sleep(0.0005)
""")


def test_sigkill_loses_at_most_what_came_after_the_last_flush(tmp_path):
    directory = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(directory)], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    reports: list[tuple[int, int]] = []
    try:
        deadline = time.monotonic() + 20
        while len(reports) < 3:
            ready, _, _ = select.select([child.stdout], [], [], deadline - time.monotonic())
            assert ready, "the child reported no flush in time"
            flushed, sent = map(int, child.stdout.readline().split())
            reports.append((flushed, sent))
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL

    recording = read_run(directory)
    last_flushed = reports[-1][0]
    count = len(recording.spikes)
    assert count >= last_flushed > reports[0][0] > 0
    assert recording.spikes["number"].tolist() == list(range(count))  # nothing missing or torn
    np.testing.assert_array_equal(recording.spikes["timestamp"], np.arange(count) * 0.001)
    np.testing.assert_array_equal(recording.spikes["unit"], np.arange(count) % 3)
    assert not recording.finished


def test_a_program_that_ends_without_close_keeps_its_records(tmp_path):
    code = textwrap.dedent("""
        import sys, time
        import numpy as np
        from rtnf.rt.recorder import Recorder
        from rtnf.stream.sources import Batch
        from rtnf.stream.window_output import OutputLayout

        layout = OutputLayout(("speed",), ("cm/s",), np.arange(3), 0.05, 0.05)
        recorder = Recorder(sys.argv[1], layout, flush_interval=60.0)
        recorder.record_inputs(Batch("spikes", np.arange(100) * 0.01, np.arange(100) % 3))
        time.sleep(0.3)  # the writer has stored them and waits for more
    """)
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], cwd=REPO, check=True,
                   timeout=30)
    recording = read_run(tmp_path / "run")
    assert recording.spikes["number"].tolist() == list(range(100))
    assert not recording.finished  # no summary: close() was never called


def test_a_torn_trailing_record_is_ignored(tmp_path):
    directory = tmp_path / "run"
    with Recorder(directory, LAYOUT) as recorder:
        recorder.record_inputs(Batch("spikes", np.arange(5) * 0.01, np.array([3, 7, 11, 20, 3])))
    spikes_file = directory / "spikes.bin"
    with open(spikes_file, "r+b") as file:
        file.truncate(spikes_file.stat().st_size - 3)
    recording = read_run(directory)
    assert recording.spikes["number"].tolist() == [0, 1, 2, 3]
    assert recording.spikes["unit"].tolist() == [3, 7, 11, 20]


def hold_the_writer(monkeypatch) -> threading.Event:
    """Make the writer thread wait before storing anything until the returned event is set."""
    release = threading.Event()
    store = Recorder._store

    def held_store(self, chunk):
        release.wait(10)
        store(self, chunk)

    monkeypatch.setattr(Recorder, "_store", held_store)
    return release


def test_a_full_queue_counts_drops_and_never_blocks(tmp_path, monkeypatch):
    release = hold_the_writer(monkeypatch)
    recorder = Recorder(tmp_path / "run", LAYOUT, flush_interval=0.05, queue_items=2)
    started = time.monotonic()
    for k in range(10):
        recorder.record_inputs(Batch("spikes", np.array([k, k + 0.5]), np.array([3, 7])))
    assert time.monotonic() - started < 0.5
    release.set()
    summary = recorder.close()

    recording = read_run(tmp_path / "run")
    written, dropped = len(recording.spikes), recorder.dropped["spikes"]
    assert written + dropped == 20 and dropped >= 14  # at most 1 being stored + 2 queued
    assert summary["dropped"]["spikes"] == dropped and summary["records"]["spikes"] == written
    numbers = recording.spikes["number"]
    assert numbers.tolist() == sorted(set(numbers.tolist()))  # receive order, no repeats
    assert numbers[0] == 0 and len(set(range(20)) - set(numbers.tolist())) == dropped  # gaps
    np.testing.assert_array_equal(recording.spikes["timestamp"], numbers / 2)


def test_the_queue_is_bounded_in_bytes_too(tmp_path, monkeypatch):
    release = hold_the_writer(monkeypatch)
    frame_bytes = 64 * 64 + 24
    recorder = Recorder(tmp_path / "run", LAYOUT, queue_bytes=3 * frame_bytes)
    images = np.zeros((1, 64, 64), np.uint8)
    for k in range(10):
        recorder.record_inputs(Batch("frames", np.array([float(k)]), images))
    release.set()
    recorder.close()
    assert len(read_run(tmp_path / "run").frames) <= 4
    assert recorder.dropped["frames"] >= 6


def test_frames_of_another_shape_are_rejected_and_counted(tmp_path):
    with Recorder(tmp_path / "run", LAYOUT) as recorder:
        recorder.record_inputs(Batch("frames", np.array([0.0]), np.zeros((1, 4, 4), np.uint8)))
        recorder.record_inputs(Batch("frames", np.array([1.0, 2.0]),
                                     np.zeros((2, 5, 4), np.uint8)))
    recording = read_run(tmp_path / "run")
    assert len(recording.frames) == 1 and recording.info["frame_shape"] == [4, 4]
    assert recording.rejected["reason"].tolist() == [b"frame_shape"]
    assert recording.rejected["count"].tolist() == [2]


def test_close_is_idempotent_and_keeps_the_loops_summary(tmp_path):
    recorder = Recorder(tmp_path / "run", LAYOUT)
    recorder.record_rejected("nan", 1, 0.5)
    first = recorder.close(summary={"windows": np.int64(12), "skipped": 1,
                                    "latency_ms": np.array([1.5, 2.0]), "bundle": Path("b")})
    assert recorder.close() == first
    info = json.loads((tmp_path / "run" / INFO_FILE).read_text())
    assert info["summary"]["loop"] == {"windows": 12, "skipped": 1, "latency_ms": [1.5, 2.0],
                                       "bundle": "b"}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["rejected.bin", INFO_FILE]
    with pytest.raises(RtnfError, match="closed"):
        recorder.record_rejected("nan", 1, 0.6)


def test_a_failing_disk_is_reported_at_close(tmp_path, monkeypatch):
    def disk_full(descriptor):
        raise OSError(28, "No space left on device")

    recorder = Recorder(tmp_path / "run", LAYOUT, flush_interval=0.05)
    monkeypatch.setattr(recorder_module.os, "fsync", disk_full)
    recorder.record_inputs(Batch("spikes", np.array([0.0]), np.array([3])))
    wait_until(lambda: recorder.failure is not None)
    monkeypatch.undo()
    with pytest.raises(RtnfError, match="No space left on device"):
        recorder.close()
    assert json.loads((tmp_path / "run" / INFO_FILE).read_text())["summary"]["failure"]


def test_an_existing_non_empty_run_directory_is_refused(tmp_path):
    directory = tmp_path / "run"
    directory.mkdir()
    (directory / "spikes.bin").write_bytes(b"earlier run")
    with pytest.raises(RtnfError, match=r"run.*not empty.*spikes\.bin.*never overwritten"):
        Recorder(directory, LAYOUT)
    assert (directory / "spikes.bin").read_bytes() == b"earlier run"
    Recorder(tmp_path / "empty", LAYOUT).close()  # an empty (or new) directory is fine


def test_a_missing_or_garbled_run_json_is_named(tmp_path):
    directory = tmp_path / "run"
    Recorder(directory, LAYOUT).close()
    info_file = directory / INFO_FILE
    info_file.write_text('{"format": "rtnf-run", "format_vers')
    with pytest.raises(RtnfError, match=r"run\.json: cannot read"):
        read_run(directory)
    info_file.unlink()
    with pytest.raises(RtnfError, match=r"run\.json: not found"):
        read_run(directory)


def test_export_nwb_holds_inputs_and_outputs(tmp_path):
    pynwb = pytest.importorskip("pynwb")
    from rtnf.data.io import read_session
    from rtnf.rt.export import export_nwb

    run = make_run(np.random.default_rng(1))
    with Recorder(tmp_path / "run", LAYOUT) as recorder:
        record(recorder, run)
    out = export_nwb(tmp_path / "run", tmp_path / "run.nwb")

    outputs = run["outputs"]
    window_ends = [o.window_end for o in outputs]
    with pynwb.NWBHDF5IO(str(out), "r") as io:
        nwbfile = io.read()
        units = nwbfile.units
        assert units.id.data[:].tolist() == [3, 7, 11, 20]
        spikes = np.concatenate([b.records for b in run["spikes"]])
        times = np.concatenate([b.timestamps for b in run["spikes"]])
        for row, unit in enumerate([3, 7, 11, 20]):
            np.testing.assert_array_equal(units.get_unit_spike_times(row),
                                          np.sort(times[spikes == unit]))
        decoded = nwbfile.processing["decoded"]
        for column, target in enumerate(LAYOUT.targets):
            np.testing.assert_array_equal(decoded[target].data[:],
                                          [o.decoded[column] for o in outputs])
            np.testing.assert_array_equal(decoded[target].timestamps[:], window_ends)
            assert decoded[target].unit == LAYOUT.target_units[column]
        assert decoded["windows"]["sequence"].data[:].tolist() == [0, 1, 2, 5, 6, 7]
        predicted = nwbfile.processing["predicted"]["predicted"]
        np.testing.assert_array_equal(predicted.data[:], [o.predicted for o in outputs])
        assert "3, 7, 11, 20" in predicted.description
        commands = nwbfile.processing["control"]["commands"]
        assert list(commands["command"].data[:]) == ["reward", "flash"] * 3
        assert list(commands["rule"].data[:]) == ["fast", "gaze-left"] * 3
        assert commands["sequence"].data[:].tolist() == [1, 1, 5, 5, 7, 7]
        assert list(commands["sinks"].data[:]) == ["lsl+bpod_serial", "zmq"] * 3
        latency = nwbfile.processing["telemetry"]["latency"]
        np.testing.assert_array_equal(latency.data[:], [s.latency_ms for s in run["telemetry"]])

    session = read_session(out)  # the inputs are an ordinary rtnf session
    np.testing.assert_array_equal(session.frames.images, run["frames"][0].records)
    assert set(session.behavior) == {"speed", "gaze_phi"}
    np.testing.assert_array_equal(session.behavior["speed"].values,
                                  run["behavior"][0].records[:, 0])


def test_export_refuses_to_overwrite_unless_asked(tmp_path):
    pytest.importorskip("pynwb")
    from rtnf.rt.export import export_nwb

    with Recorder(tmp_path / "run", LAYOUT) as recorder:
        recorder.record_inputs(Batch("spikes", np.array([0.5]), np.array([7])))
    out = tmp_path / "run.nwb"
    out.write_bytes(b"someone's file")
    with pytest.raises(RtnfError, match=r"run\.nwb: already exists"):
        export_nwb(tmp_path / "run", out)
    assert out.read_bytes() == b"someone's file"
    export_nwb(tmp_path / "run", out, overwrite=True)
    assert out.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.nwb"]
