"""The real-time loop's parts: buffers, per-window decoding (equal to offline decoding), the loop
itself against a real LSL stream."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import psutil
import pytest
from rich.console import Console

from random_bundle import FRAMES, WINDOWS, write_bundle
from rtnf.bundle import load_bundle
from rtnf.config import EngineConfig, RealtimeConfig, SimulationConfig
from rtnf.data.sim import simulate
from rtnf.engine.select import open_engine
from rtnf.model.generation import Sampling
from rtnf.rt.buffers import BehaviorBuffer, FrameBuffer, SpikeBuffer
from rtnf.rt.decoder import WindowDecoder
from rtnf.rt.heap import HeapTrimmer
from rtnf.rt.loop import RealtimeLoop
from rtnf.rt.run import output_layout
from rtnf.errors import RtnfError
from rtnf.rt.priority import apply_process_settings
from rtnf.rt.telemetry import Histogram, LiveView, Telemetry
from rtnf.stream.sinks import TELEMETRY_COUNTERS
from rtnf.stream.window_output import STAGES
from rtnf.tokens import TokenSpec, window_ends
from rtnf.train.calibrate import predict
from rtnf.train.dataset import Normalization, SessionWindows


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def session():
    (s,) = simulate(SimulationConfig(neurons=40, minutes=0.3, seed=5), "ephys")
    return s


@pytest.fixture(scope="module")
def bundle(session, tmp_path_factory):
    return load_bundle(write_bundle(session, tmp_path_factory.mktemp("rt") / "b",
                                    behavior_inputs=()))


def test_spike_buffer_keeps_order_discards_and_compacts():
    buffer = SpikeBuffer(8)
    assert buffer.append(np.arange(5.0), np.arange(5)) == 5
    buffer.discard_before(3.0)
    assert len(buffer) == 2
    assert buffer.append(np.arange(5.0, 12.0), np.arange(5, 12)) == 6  # 2 live + 6 = capacity
    times, units = buffer.between(4.0, 9.5)
    np.testing.assert_array_equal(times, [4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
    np.testing.assert_array_equal(units, [4, 5, 6, 7, 8, 9])
    assert buffer.newest == 10.0


def test_frame_buffer_builds_clips_as_training_does():
    frames = FrameBuffer(5, (2, 2))
    assert frames.clip_before(1.0, 3).sum() == 0  # nothing shown yet: blank
    images = np.arange(1, 7, dtype=np.uint8)[:, None, None] * np.ones((6, 2, 2), np.uint8)
    frames.append(np.array([0.0]), images[:1])
    np.testing.assert_array_equal(frames.clip_before(0.5, 3)[0, :, 0, 0], [1, 1, 1])
    frames.append(np.arange(1.0, 6.0), images[1:])  # 6 frames into 5 slots
    np.testing.assert_array_equal(frames.clip_before(4.0, 3)[0, :, 0, 0], [2, 3, 4])
    np.testing.assert_array_equal(frames.clip_before(2.0, 3)[0, :, 0, 0], [2, 2, 2])


def test_behavior_buffer_gives_the_last_sample_before_an_end():
    behavior = BehaviorBuffer(4, 3)
    assert behavior.last_before(1.0) is None
    behavior.append(np.array([0.1, 0.2]), np.array([[1, 2, 3], [4, 5, 6]], np.float32))
    np.testing.assert_array_equal(behavior.last_before(0.2), [1, 2, 3])
    np.testing.assert_array_equal(behavior.last_before(0.3), [4, 5, 6])


def test_histogram_percentiles_are_close_to_exact_ones():
    rng = np.random.default_rng(0)
    values = rng.lognormal(0.5, 0.6, 5000)
    histogram = Histogram()
    for value in values:
        histogram.add(value)
    for q in (0.5, 0.99):
        assert histogram.percentile(q) == pytest.approx(np.quantile(values, q), rel=0.06)
    assert histogram.max == values.max()


def _fed_decoder(bundle, session, backend="torch", **options):
    decoder = WindowDecoder(bundle, open_engine(bundle, EngineConfig(backend=backend, threads=1),
                                                backend), **options)
    spikes = SpikeBuffer(session.spike_times.size)
    spikes.append(session.spike_times, session.spike_unit_index.astype(np.int64))
    return decoder, spikes


def test_window_decoder_equals_offline_decoding(bundle, session):
    """Hop by hop, with the history cached per spike and frames arriving as they are shown,
    the decoder gives what the model gives on the same windows offline."""
    ends = window_ends(session.start_time + 1.0, session.start_time + 4.0, WINDOWS)
    model = bundle.checkpoint.model
    spec = TokenSpec.from_config(WINDOWS, session.n_units)
    windows = SessionWindows(session, ends, spec, model.dims,
                             Normalization.from_dict(bundle.checkpoint.normalization),
                             bundle.unit_rows.numpy(), int(bundle.session_row), WINDOWS.current)
    offline_behavior, offline_expected = predict(model, windows)

    decoder, spikes = _fed_decoder(bundle, session)
    frames = FrameBuffer(FRAMES[0] + 4, FRAMES[1:])
    shown = 0
    for i, end in enumerate(ends):
        decoder.advance_history(end, spikes)
        arrived = int(np.searchsorted(session.frames.timestamps, end))
        frames.append(session.frames.timestamps[shown:arrived],
                      session.frames.images[shown:arrived])
        shown = arrived
        decoder.refresh_inputs(end, frames, None)
        behavior, expected = decoder.infer(end, decoder.tokenize(end, spikes), spikes)
        np.testing.assert_allclose(behavior, offline_behavior[i], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(expected, offline_expected[i], rtol=1e-4, atol=1e-6)


def test_outputs_are_smoothed_in_physical_units(bundle, session):
    decoder, _ = _fed_decoder(bundle, session)
    normalization = Normalization.from_dict(bundle.checkpoint.normalization)
    decoder.gains = np.full(3, 0.5)
    first = decoder.outputs(np.zeros(3))
    np.testing.assert_allclose(first, [normalization.mean[t] for t in decoder.targets],
                               rtol=1e-6)
    second = decoder.outputs(np.ones(3))  # halfway to +1 standard deviation
    expected = [normalization.mean[t] + 0.5 * normalization.std[t] for t in decoder.targets]
    np.testing.assert_allclose(second, expected, rtol=1e-5)


def test_generated_prediction_counts_sampled_spikes(bundle, session):
    decoder, spikes = _fed_decoder(bundle, session, prediction="generate",
                                   sampling=Sampling(greedy=False), seed=3)
    end = 2.0
    decoder.advance_history(end, spikes)
    frames = FrameBuffer(FRAMES[0], FRAMES[1:])
    decoder.refresh_inputs(end, frames, None)
    _, predicted = decoder.infer(end, decoder.tokenize(end, spikes), spikes)
    assert predicted.shape == (session.n_units,)
    assert np.all(predicted == np.round(predicted)) and predicted.sum() <= WINDOWS.current_capacity


def test_a_model_reading_frames_needs_a_frame_source(bundle, session):
    decoder, spikes = _fed_decoder(bundle, session)
    with pytest.raises(Exception, match="rig.sources.frames.kind"):
        decoder.refresh_inputs(1.0, None, None)



def test_process_settings_pin_the_loop_and_refuse_unknown_cores():
    process = psutil.Process()
    before = process.cpu_affinity()
    try:
        applied = apply_process_settings(RealtimeConfig(cpu_affinity=[before[0]]))
        assert process.cpu_affinity() == [before[0]]
        assert applied == {"cpu_affinity": [before[0]], "priority": "normal"}
    finally:
        process.cpu_affinity(before)
    with pytest.raises(RtnfError, match=r"realtime.cpu_affinity = \[999\]: no core 999"):
        apply_process_settings(RealtimeConfig(cpu_affinity=[999]))


def test_live_view_shows_decoded_values_latency_and_counters():
    telemetry = Telemetry(0.05, ("speed", "gaze_phi"))
    telemetry.window({stage: 0.5 for stage in STAGES}, 1.5, np.array([12.5, -3.25]))
    telemetry.reject("unknown unit", 3)
    telemetry.counters.update(engine_errors=4, engine_skipped=2)
    console = Console(file=io.StringIO(), width=200)
    console.print(LiveView(telemetry, "rtnf run: test")._table())
    shown = console.file.getvalue()
    for text in ("speed", "12.50", "-3.25", "p50 1.", "windows 1", "unknown unit: 3",
                 "engine_errors 4", "engine_skipped 2"):
        assert text in shown, shown


def test_the_telemetry_stream_carries_every_declared_counter():
    """What the loop hands the sinks is exactly the counters their channels declare,
    the engine's failures included."""
    telemetry = Telemetry(0.05, ("speed",))
    telemetry.window({stage: 0.5 for stage in STAGES}, 1.5, np.array([1.0]))
    telemetry.counters.update(late_spikes=5, reconnects=1, engine_errors=3, engine_skipped=2,
                              truncated_spikes=9)
    telemetry.reject("unknown unit", 3)
    telemetry.reject("not finite", 1)
    assert telemetry.counter_values() == {
        "windows": 1, "skipped": 0, "late_spikes": 5, "rejected": 4, "reconnects": 1,
        "engine_errors": 3, "engine_skipped": 2}
    assert tuple(telemetry.counter_values()) == TELEMETRY_COUNTERS


# The handler's moment of danger, made certain: the main thread holds the event's lock, as it
# does inside stop.wait(); a handler that called stop.set() itself would wait for it forever.
SIGNAL_INSIDE_WAIT = """
import signal, sys, threading
from rtnf.rt.stop_signals import stop_on_signals
sig = getattr(signal, sys.argv[1])
previous = signal.getsignal(sig)
stop = threading.Event()
with stop_on_signals(stop):
    with stop._cond:
        signal.raise_signal(sig)
    print("stopped" if stop.wait(10) else "not stopped")
print("restored" if signal.getsignal(sig) is previous else "not restored")
"""


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_inside_the_events_wait_sets_it_without_deadlock(name):
    """`rtnf run` and the overload benchmark's load generator stop this way."""
    result = subprocess.run([sys.executable, "-c", SIGNAL_INSIDE_WAIT, name],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["stopped", "restored"]


def test_the_window_grid_is_placed_before_steady_arrivals(bundle, session):
    """Frames every hop at phase 12 ms: window ends go just before them, so each frame comes
    a whole hop (less one step) before the end of the window that reads it; buffered times
    move with the grid. Arrivals at every phase leave the grid where it was."""
    decoder, _ = _fed_decoder(bundle, session)
    layout = output_layout(decoder, bundle.unit_ids)
    loop = RealtimeLoop(decoder, [], [], layout, lambda: 100.0)
    loop.origin = 100.0
    loop.spikes.append(np.array([5.0]), np.array([0]))
    loop._align(100.0 + 0.012 + 0.05 * np.arange(10))
    assert loop.origin == pytest.approx(100.0115, abs=1e-9)
    assert loop.spikes.newest == pytest.approx(5.0 - 0.0115)
    steady = RealtimeLoop(decoder, [], [], layout, lambda: 100.0)
    steady.origin = 100.0
    steady._align(100.0 + 0.0002 * np.arange(1000))
    assert steady.origin == 100.0


def test_the_heap_is_trimmed_at_most_once_per_interval():
    """glibc (the machines here): malloc_trim runs once the interval has passed, and again
    only after another interval."""
    now = [0.0]
    trimmer = HeapTrimmer(lambda: now[0], interval_s=10.0)
    assert trimmer.trim is not None
    assert trimmer.maybe_trim() is None
    now[0] = 10.0
    took = trimmer.maybe_trim()
    assert took is not None and took >= 0.0
    now[0] = 19.0
    assert trimmer.maybe_trim() is None
    now[0] = 20.0
    assert trimmer.maybe_trim() is not None
