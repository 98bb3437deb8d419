"""The closed loop: sources in, one decision per window out, every stage bounded and counted.

One thread, every stage bounded:

    poll        every POLL_S, and at each window's close, each source is polled without
                waiting (LSL inlets and ZeroMQ sockets hold what arrived in between, bounded
                by their own buffers) -> checks -> buffers (fixed capacity)
    close       window clock -> decoder -> rules -> sinks, recorder, telemetry

The loop thread alone touches the buffers and the engine. Sources are polled without waiting;
those that must be read all the time read on their own threads into queues bounded in bytes
(LSL inlets, whose pulls liblsl blocks for a second or two while it re-attaches a restarted
outlet; ZeroMQ subscribers), the others (replay, simulator) are read by the poll itself.

Time: every source stamps its records on this machine's LSL clock (`clock`, pylsl.local_clock;
LSL inlets apply time correction, the other sources map their clocks onto it). The loop works on
that clock minus `origin` (the run's start, so bins stay small), times `speed` when a file is
replayed faster than real time (so windows stay windows of the session's time), and window k ends
at t_k = k * hop. Window k closes as soon as a spike stamped at or after t_k has arrived (the spike
stream is in time order, so nothing before t_k is still to come), or when the clock passes
t_k + grace, whichever is first. A spike stamped before t_k that arrives after the close is late
(counted, recorded, not decoded). Which spikes belong to a window is decided by their stamps only.

Work ahead: while waiting for t_k, whenever spikes of window k arrive, the loop decodes the window
as it stands (at most `SPECULATIONS` times per window, and only while that keeps paying off). If nothing that window k reads changed before it
closed (its spike count, its clip), that result is the window's result, bit for bit; otherwise
it is computed again at the close. On a two-photon rig, whose events arrive once per imaging
frame, the decision is then ready at the close; for that, the window grid is placed at the start
(`_align`) so that inputs arriving at a steady cadence come well before each window's end.

Per window: (close) poll every source once more; if the clock has already passed a later window's
close, skip to the newest closed window and count the skipped ones (no backlog ever builds);
(tokenize, infer) the decoder; (publish) rules, sinks, recorder, telemetry. Then, while
waiting for the next window, the decoder prepares it (history keys/values of the spikes that
entered its history, clip encoding when a frame arrives), and every TRIM_INTERVAL_S the C heap's
free memory is returned to the system (`rtnf.rt.heap`; timed in the summary's `heap_trim_ms`).

Input checks (rejected with a counted reason, never fatal): unit not in the bundle, spike time
going backwards, spike older than a closed window (late), a burst that does not fit the spike
buffer, a frame of the wrong size; the sources themselves reject malformed messages, NaN and
backwards timestamps. A source silent for `silence_s` is reported; when it delivers again
(LSL inlets recover, ZeroMQ reconnects) the reconnect is counted.

Faults that must not stop an experiment (each said once in a warning line, and counted):

    engine      the engine raising (`InferenceError`) is counted in `engine_errors`. If the
                bundle has a decoder to fall back to (the baseline in use, else its ridge
                decoder), behaviour comes from it for the rest of the run, predicted counts are
                the bundle's training means, and the summary's `fallback` says "<decoder>
                since window k because <error>". Without one, each failing window is skipped
                (`engine_skipped`, a gap in the sequence numbers) and the engine tried again;
                MAX_ENGINE_FAILURES windows failing in a row stop the run, with the reason in
                the summary's `failures` (an experiment is never silently stalled).
    recording   the recorder's disk failing (full, gone): the loop goes on without recording;
                `rtnf run` reports it at the end and exits with an error.
    sources     a source that raises is left alone for SOURCE_RETRY_S; one that falls silent
                is waited for (above).
    sinks       sinks never block nor raise; what they drop they count in their `errors`.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from rtnf.rt.buffers import BehaviorBuffer, FrameBuffer, SpikeBuffer
from rtnf.rt.decoder import InferenceError, WindowDecoder
from rtnf.rt.heap import HeapTrimmer
from rtnf.rt.recorder import Recorder
from rtnf.rt.rules import Rules
from rtnf.rt.telemetry import Telemetry
from rtnf.stream.sinks import Sink
from rtnf.stream.sources import Batch, Source
from rtnf.tokens import WindowTokens
from rtnf.stream.window_output import STAGES, Command, OutputLayout, TelemetrySample, WindowOutput

log = logging.getLogger("rtnf.rt")

POLL_S = 0.001  # sources are polled this often while the loop waits for a window to close
SOURCE_RETRY_S = 0.5  # a source whose poll failed is left alone this long
BEHAVIOR_SAMPLES = 64  # latest behaviour samples kept
FRAME_MARGIN = 4  # frames kept beyond a clip, for frames stamped after a window's end
SPECULATIONS = 3  # early decodes of one window at most
EARLY_WINDOWS = 20  # windows over which early decoding's success is judged
EARLY_MIN_HIT_RATE = 0.25  # below it, early decoding is only tried once every EARLY_WINDOWS
FUTURE_S = 1.0  # a spike stamped further ahead of this machine's clock is refused
SETTLE_S = 1.0  # longest wait for every source's first delivery before the first window
ALIGN_S = 0.3  # what arrives in the first ALIGN_S places the window grid (`_align`)
ALIGN_STEP_S = 0.0005  # resolution of the window grid's placement
JUDGED_AFTER = 20  # windows after which the loop says whether inference fits the hop
MAX_ENGINE_FAILURES = 50  # windows in a row the engine may fail (no fallback) before a stop


@dataclass
class EarlyDecode:
    key: tuple  # what the window's result depends on, when it was decoded (`_window_key`)
    tokens: WindowTokens
    behavior: np.ndarray
    predicted: np.ndarray


@dataclass
class LoopSettings:
    grace_s: float = 0.001
    spike_capacity: int = 200_000  # spikes held (fixed memory)
    silence_s: float = 2.0  # a source quiet this long is reported as gone
    seconds: float | None = None  # stop after this long (None: until stopped)
    speed: float = 1.0  # session seconds per clock second (a file replayed faster, e.g. 4)


class RealtimeLoop:
    def __init__(self, decoder: WindowDecoder, sources: list[Source], sinks: list[Sink],
                 layout: OutputLayout, clock: Callable[[], float], rules: Rules | None = None,
                 recorder: Recorder | None = None, settings: LoopSettings = LoopSettings(),
                 stop: threading.Event | None = None):
        """`stop`: set to end the run (the loop makes its own when not given)."""
        self.decoder, self.sources, self.sinks, self.layout = decoder, sources, sinks, layout
        self.clock, self.rules, self.recorder, self.settings = clock, rules, recorder, settings
        self.hop = decoder.windows.hop
        self.telemetry = Telemetry(self.hop, layout.targets)
        self.stop = threading.Event() if stop is None else stop
        self.heap = HeapTrimmer(clock)
        self.retry_at = [0.0] * len(sources)  # a failed source is polled again from then
        order = np.argsort(layout.unit_ids)
        self.sorted_ids, self.sorted_index = np.asarray(layout.unit_ids)[order], order
        self.spikes = SpikeBuffer(settings.spike_capacity)
        self.frames: FrameBuffer | None = None
        if decoder.dims.frame_shape is not None:
            length, *shape = decoder.dims.frame_shape
            self.frames = FrameBuffer(length + FRAME_MARGIN, tuple(shape))
        self.behavior = BehaviorBuffer(BEHAVIOR_SAMPLES, 3)
        self.last_heard: list[float | None] = [None] * len(sources)
        self.silent = [False] * len(sources)
        self.closed_until = -math.inf  # end of the newest processed window (loop time)
        self.next_k: int | None = None  # the window being waited for, and its end (loop time)
        self.next_end: float | None = None
        self.arrivals: list[np.ndarray] | None = None  # stamps seen while the grid is placed
        self.ingest_s = 0.0
        self.changed = False  # spikes of the next window arrived since its last early decode
        self.early: EarlyDecode | None = None
        self.early_count = 0
        self.early_hits: deque[bool] = deque(maxlen=EARLY_WINDOWS)  # did it decide the window?
        self.engine_streak = 0  # windows in a row whose decode failed (no fallback decoder)
        self.engine_failing = False  # the engine failed since the last window it decoded
        self.fallback: str | None = None  # "<decoder> since window k because <error>"
        self.failures: list[str] = []  # why the run failed (the summary's `failures`)
        self.recording_failed = False  # the recorder's disk failure has been reported

    # --------------------------------------------------------------------------------------
    # Input
    # --------------------------------------------------------------------------------------

    def _ingest(self, index: int, batch: Batch) -> None:
        started = self.clock()
        self._heard(index, started)
        if self.arrivals is not None and batch.kind in ("spikes", "frames"):
            self.arrivals.append(batch.timestamps)
        if batch.kind == "spikes":
            self._ingest_spikes(batch, started)
        elif batch.kind == "behavior":
            self.behavior.append(self._loop_time(batch.timestamps), batch.records)
            self._record(batch)
            if self.decoder.input_columns:
                self._inputs_arrived()
        elif batch.kind == "frames":
            self._ingest_frames(batch)
        self.ingest_s += self.clock() - started

    def _loop_time(self, stamps):
        """Stream-clock stamps -> the loop's time axis (session time for a sped-up replay)."""
        return (stamps - self.origin) * self.settings.speed

    def _stamp(self, loop_time: float) -> float:
        """The loop's time -> the stream clock (what outputs are stamped with)."""
        return self.origin + loop_time / self.settings.speed

    def _record(self, batch: Batch) -> None:
        if self.recorder is not None:
            self.recorder.record_inputs(batch)

    def _reject(self, reason: str, count: int) -> None:
        if count:
            self.telemetry.reject(reason, count)
            if self.recorder is not None:
                self.recorder.record_rejected(reason, count, self.clock())

    def _ingest_spikes(self, batch: Batch, now: float) -> None:
        """Map units, refuse what cannot be decoded (counted by reason), buffer the rest."""
        times = self._loop_time(batch.timestamps)
        position = np.minimum(np.searchsorted(self.sorted_ids, batch.records),
                              self.sorted_ids.size - 1)
        known = self.sorted_ids[position] == batch.records
        units = self.sorted_index[position]
        self._reject("unknown unit", int((~known).sum()))
        future = known & (times > self._loop_time(now) + FUTURE_S)
        self._reject("spike stamped in the future", int(future.sum()))
        candidate = known & ~future
        before = np.maximum.accumulate(np.r_[self.spikes.newest,
                                             np.where(candidate, times, -np.inf)])[:-1]
        backwards = candidate & (times < before)
        self._reject("spike time went backwards", int(backwards.sum()))
        late = candidate & ~backwards & (times < self.closed_until)
        self.telemetry.counters["late_spikes"] += int(late.sum())
        keep = candidate & ~backwards & ~late
        if keep.any():
            fitted = self.spikes.append(times[keep], units[keep])
            self._reject("burst beyond the spike buffer", int(keep.sum()) - fitted)
            self.changed = True
        self._record(batch)

    def _ingest_frames(self, batch: Batch) -> None:
        if self.frames is None:
            return
        shape = self.frames.images.shape[1:]
        if batch.records.shape[1:] != shape:
            self._reject(f"frame size {batch.records.shape[1:]} is not {shape}",
                         len(batch.timestamps))
            return
        self.frames.append(self._loop_time(batch.timestamps), batch.records)
        self._record(batch)
        self._inputs_arrived()

    def _inputs_arrived(self) -> None:
        """A frame or behaviour sample arrived: encode the waited-for window's inputs now."""
        if self.next_end is not None:
            self._on_engine(self.next_k, lambda: self.decoder.refresh_inputs(
                self.next_end, self.frames, self.behavior))
            self.changed = True

    def _heard(self, index: int, now: float) -> None:
        if self.silent[index]:
            self.silent[index] = False
            self.telemetry.counters["reconnects"] += 1
            log.warning("source %s is back after %.1f s", self.sources[index].name,
                        now - self.last_heard[index])
        self.last_heard[index] = now

    def _check_silence(self, now: float) -> None:
        for index, heard in enumerate(self.last_heard):
            if heard is not None and not self.silent[index] and \
                    now - heard > self.settings.silence_s:
                self.silent[index] = True
                self.telemetry.counters["source_gaps"] += 1
                log.warning("source %s silent for %.1f s; waiting for it to come back",
                            self.sources[index].name, now - heard)

    def _poll(self) -> None:
        """Take whatever every source holds now, without waiting."""
        for index, source in enumerate(self.sources):
            if self.clock() < self.retry_at[index]:
                continue
            try:
                batches = source.poll(0.0)
            except Exception as exc:  # a source must not take the loop down
                self.telemetry.reject(f"{source.name}: {type(exc).__name__}")
                log.warning("source %s failed (%s); retrying", source.name, exc)
                self.retry_at[index] = self.clock() + SOURCE_RETRY_S
                continue
            for batch in batches:
                self._ingest(index, batch)

    # --------------------------------------------------------------------------------------
    # Windows
    # --------------------------------------------------------------------------------------

    def _prepare(self, k: int) -> None:
        """Get window k ready while waiting for it to close."""
        self.next_k, self.next_end = k, k * self.hop
        self._on_engine(k, lambda: self.decoder.advance_history(self.next_end, self.spikes))
        self._on_engine(k, lambda: self.decoder.refresh_inputs(self.next_end, self.frames,
                                                               self.behavior))
        self.spikes.discard_before(self.next_end - self.decoder.span_s)
        self.early, self.early_count, self.changed = None, 0, True

    def _window_key(self, end: float) -> tuple:
        """What a window's result depends on beyond its prepared history: its spikes (the
        buffer only grows in time order, so their count says it) and its encoded inputs."""
        times, _ = self.spikes.between(end - self.decoder.windows.current, end)
        return times.size, self.decoder.inputs_key

    def _decode_early(self) -> None:
        """Decode the next window as it stands. Started any time before the close, it pays
        when nothing more arrives for the window: the close then finds its result ready (or
        waits for the rest of it) instead of starting a decode."""
        if not self.changed or self.early_count >= SPECULATIONS or not self._early_pays():
            return
        end = self.next_end
        key = self._window_key(end)
        tokens = self.decoder.tokenize(end, self.spikes)
        try:
            self.early = EarlyDecode(key, tokens, *self.decoder.infer(end, tokens, self.spikes))
        except InferenceError as error:
            self._engine_failed(self.next_k, error)
        self.early_count += 1
        self.changed = False

    def _early_pays(self) -> bool:
        """Early decoding costs a decode each time; keep at it only where it decides windows
        (a rig whose spikes arrive in bursts, like two-photon imaging frames), and otherwise
        try it again once every EARLY_WINDOWS windows (spikes arriving all the time, as on an
        ephys rig, change the window until it closes)."""
        hits = self.early_hits
        return (len(hits) < hits.maxlen or sum(hits) >= EARLY_MIN_HIT_RATE * len(hits)
                or self.next_k % EARLY_WINDOWS == 0)

    def _process(self, k: int, closed: float) -> None:
        """Decode window k and send its outputs; `closed`: when the loop saw it close."""
        end = k * self.hop
        window_end = self._stamp(end)
        stage_ms = {"ingest": self.ingest_s * 1e3, "close": (closed - window_end) * 1e3}
        self.ingest_s = 0.0
        started = self.clock()
        try:
            tokens, tokenized, behavior, predicted = self._decode(end)
        except InferenceError as error:
            if not self._engine_failed(k, error):
                self._skip_failed(k, error)
                return
            tokens, tokenized, behavior, predicted = self._decode(end)  # the fallback's
        self.engine_streak, self.engine_failing = 0, False
        decoded = self.decoder.outputs(behavior)
        inferred = self.clock()
        self.telemetry.counters["truncated_spikes"] += int(tokens.truncated)
        commands: tuple[Command, ...] = ()
        if self.rules is not None:
            commands = self.rules.evaluate(k, window_end, decoded, predicted)
        output = WindowOutput(k, window_end, decoded, predicted, commands)
        for sink in self.sinks:
            sink.publish(output)
        sent = self.clock()
        latency_ms = (sent - window_end) * 1e3
        stage_ms |= {"tokenize": (tokenized - started) * 1e3,
                     "infer": (inferred - tokenized) * 1e3}
        if self.recorder is not None:
            self.recorder.record_output(output, sent)
            self._check_recording()
        stage_ms["publish"] = (self.clock() - inferred) * 1e3
        self.telemetry.window(stage_ms, latency_ms, decoded)
        if self.telemetry.counters["windows"] == JUDGED_AFTER:
            self._judge_speed()
        sample = TelemetrySample(k, window_end, {s: stage_ms[s] for s in STAGES}, latency_ms,
                                 self.telemetry.counter_values())
        for sink in self.sinks:
            sink.publish_telemetry(sample)
        if self.recorder is not None:
            self.recorder.record_telemetry(sample)
        self.closed_until = end

    def _decode(self, end: float) -> tuple[WindowTokens, float, np.ndarray, np.ndarray]:
        """The window's tokens, when tokenizing ended, its behaviour and predicted counts: its
        early decode's if nothing the window reads changed since, otherwise decoded now."""
        decided_early = self.early is not None and self.early.key == self._window_key(end)
        if self.early is not None:
            self.early_hits.append(decided_early)
        if decided_early:
            self.telemetry.counters["decided_early"] += 1
            return self.early.tokens, self.clock(), self.early.behavior, self.early.predicted
        tokens = self.decoder.tokenize(end, self.spikes)
        tokenized = self.clock()
        return (tokens, tokenized, *self.decoder.infer(end, tokens, self.spikes))

    # --------------------------------------------------------------------------------------
    # Faults
    # --------------------------------------------------------------------------------------

    def _on_engine(self, k: int, work: Callable[[], None]) -> None:
        """Do `work`, the decoder preparing window k on the engine; an engine failure is
        counted (and may switch behaviour to the fallback decoder)."""
        try:
            work()
        except InferenceError as error:
            self._engine_failed(k, error)

    def _engine_failed(self, k: int, error: InferenceError) -> bool:
        """Count an engine failure met at window k and give the engine up for the rest of the
        run if the bundle has a decoder to fall back to; True if it has (the window is then
        decoded by the fallback), False if the window cannot be decoded."""
        self.telemetry.counters["engine_errors"] += 1
        if self.decoder.fall_back(str(error)):
            self.early = None  # the engine's, and the engine is given up
            name = self.decoder.fallback_name
            self.fallback = f"{name} since window {k} because {error}"
            counts = ("the bundle's training means" if np.isfinite(
                self.decoder.mean_next_counts).all() else "NaN (the bundle keeps no means)")
            log.warning("the engine failed at window %d (%s): behaviour comes from the bundle's "
                        "%s decoder for the rest of the run; predicted counts are %s", k, error,
                        name, counts)
            return True
        if not self.engine_failing:
            self.engine_failing = True
            log.warning("the engine failed at window %d (%s): windows are skipped while it "
                        "fails (the bundle has no ridge decoder to fall back to); %d in a row "
                        "stop the run", k, error, MAX_ENGINE_FAILURES)
        return False

    def _skip_failed(self, k: int, error: InferenceError) -> None:
        """Window k could not be decoded: skip it; stop the run after MAX_ENGINE_FAILURES."""
        self.telemetry.counters["engine_skipped"] += 1
        self.engine_streak += 1
        self.closed_until = k * self.hop
        if self.engine_streak >= MAX_ENGINE_FAILURES:
            message = (f"the engine failed {self.engine_streak} windows in a row (last: "
                       f"{error}) and the bundle has no ridge decoder to fall back to; run "
                       "stopped")
            log.error(message)
            self.failures.append(message)
            self.stop.set()

    def _check_recording(self) -> None:
        """Say once that the recorder's disk failed: the loop goes on, unrecorded."""
        if self.recorder.failure is not None and not self.recording_failed:
            self.recording_failed = True
            log.warning("recording to %s failed (%s): the loop goes on, but nothing more is "
                        "recorded (what was flushed before is kept)", self.recorder.directory,
                        self.recorder.failure)

    # --------------------------------------------------------------------------------------
    # Running
    # --------------------------------------------------------------------------------------

    def _judge_speed(self) -> None:
        """Say once, early, if inference does not fit the hop (windows will be skipped), with
        what to do about it."""
        infer_ms = self.telemetry.stages["infer"].percentile(0.5)
        hop_ms = self.hop / self.settings.speed * 1e3
        if infer_ms > 0.8 * hop_ms:
            advice = ("predict with the rate head (--prediction rates)"
                      if self.decoder.prediction == "generate" else
                      "use a faster backend or preset, or a longer hop")
            log.warning("inference takes %.1f ms per window, near or over the %.1f ms hop: "
                        "windows will be skipped; %s", infer_ms, hop_ms, advice)

    def _settle(self, started: float) -> None:
        """Take what the sources held before the run began (an inlet's first chunk can hold
        the last second: history, not late spikes) until each has delivered once and ALIGN_S
        have passed, or SETTLE_S; meanwhile note when spikes and frames come."""
        self.arrivals = []
        while not self.stop.is_set() and self.clock() < started + SETTLE_S and (
                None in self.last_heard or self.clock() < started + ALIGN_S):
            self._poll()
            self.stop.wait(POLL_S)
        arrivals, self.arrivals = self.arrivals, None
        if arrivals:
            self._align(np.unique(np.round(np.concatenate(arrivals), 4)))

    def _align(self, stamps: np.ndarray) -> None:
        """Place the window grid (the origin's phase within a hop) so that spikes and frames,
        where they come at a steady cadence (a two-photon rig's imaging frames, a stimulus's
        frames), arrive as long as possible before the next window end: each window's inputs
        are then complete, and decoded, well before it closes. Data arriving all the time (an
        ephys rig) leaves every phase alike, and the grid where it was."""
        hop_s = self.hop / self.settings.speed
        phases = np.arange(0.0, hop_s, ALIGN_STEP_S)
        lead = np.mod(phases[:, None] - (stamps[None, :] - self.origin), hop_s).min(axis=1)
        if lead.max() - lead[0] < ALIGN_STEP_S:
            return
        shift = float(phases[int(np.argmax(lead))])
        self.origin += shift
        moved = shift * self.settings.speed  # on the loop's time axis
        self.spikes.times[self.spikes.start:self.spikes.stop] -= moved
        self.behavior.times -= moved
        if self.frames is not None:
            self.frames.times -= moved
        self.telemetry.counters["grid_phase_us"] = round(shift * 1e6)

    def run(self) -> dict:
        """Run until `stop` is set, `settings.seconds` have passed or every replayed source
        has finished; returns the telemetry summary, with `fallback` (None, or which decoder
        took over from the engine, since when and why) and `failures` (what makes the run
        fail: empty when nothing did)."""
        settings = self.settings
        self.origin = math.floor(self.clock())
        started = self.clock()
        self._settle(started)
        self._prepare(math.floor(self._loop_time(self.clock()) / self.hop) + 1)
        while not self.stop.is_set():
            now = self.clock()
            if settings.seconds is not None and now - started >= settings.seconds:
                break
            if all(getattr(source, "finished", False) for source in self.sources):
                break
            due = self._stamp(self.next_end)
            closing = due + settings.grace_s
            if now < closing and not (now >= due and self.spikes.newest >= self.next_end):
                self.stop.wait(min(closing - now, POLL_S))
                self._poll()
                self._decode_early()
                self._check_silence(now)
                continue
            closed = self.clock()
            self._poll()
            newest = math.floor(self._loop_time(self.clock() - settings.grace_s) / self.hop)
            if newest > self.next_k:  # fell behind: skip to the newest closed window
                self.telemetry.counters["skipped"] += newest - self.next_k
                self._prepare(newest)
            self._process(self.next_k, closed)
            self._prepare(self.next_k + 1)
            trimmed_ms = self.heap.maybe_trim()
            if trimmed_ms is not None:
                self.telemetry.heap_trim.add(trimmed_ms)
        return self.telemetry.summary() | {"fallback": self.fallback,
                                           "failures": list(self.failures)}
