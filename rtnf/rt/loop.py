"""The closed loop: sources in, one decision per window out, every stage bounded and counted.

Threads and bounds:

    source threads (one per source)  source.poll -> bounded input queue (INPUT_QUEUE batches;
                                     a full queue drops the batch and counts it)
    the loop thread (the caller)     input queue -> checks -> buffers (fixed capacity)
                                     window clock -> decoder -> rules -> sinks, recorder

Time: every source stamps its records on this machine's LSL clock (`clock`, pylsl.local_clock;
LSL inlets apply time correction, the other sources map their clocks onto it). The loop works on
that clock minus `origin` (the run's start, so bins stay small), and window k ends at
t_k = k * hop. Window k closes when the clock passes t_k + grace: every spike stamped before t_k
that arrived by then is in it; a spike stamped before t_k that arrives later is late (counted,
recorded, not decoded). Which spikes belong to a window is decided by their stamps only.

Per window: (close) drain the input queue; if the clock has already passed a later window's
close, skip to the newest closed window and count the skipped ones (no backlog ever builds);
(tokenize, infer) the decoder; (publish) rules, sinks, recorder, telemetry. Then, while
waiting for the next window, the decoder prepares it (history keys/values of the spikes that
entered its history, clip encoding when a frame arrives).

Input checks (rejected with a counted reason, never fatal): unit not in the bundle, spike time
going backwards, spike older than a closed window (late), a burst that does not fit the spike
buffer, a frame of the wrong size; the sources themselves reject malformed messages, NaN and
backwards timestamps. A source silent for `silence_s` is reported; when it delivers again
(LSL inlets recover, ZeroMQ reconnects) the reconnect is counted.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from rtnf.rt.buffers import BehaviorBuffer, FrameBuffer, SpikeBuffer
from rtnf.rt.decoder import WindowDecoder
from rtnf.rt.telemetry import Telemetry
from rtnf.stream.sources import Batch, Source
from rtnf.stream.window_output import STAGES, Command, OutputLayout, TelemetrySample, WindowOutput

log = logging.getLogger("rtnf.rt")

INPUT_QUEUE = 10_000  # batches waiting for the loop thread
SOURCE_POLL_S = 0.05  # a source thread's longest wait, so it notices a stop promptly
BEHAVIOR_SAMPLES = 64  # latest behaviour samples kept
FRAME_MARGIN = 4  # frames kept beyond a clip, for frames stamped after a window's end


@dataclass
class LoopSettings:
    grace_s: float = 0.001
    spike_capacity: int = 200_000  # spikes held (fixed memory)
    silence_s: float = 2.0  # a source quiet this long is reported as gone
    seconds: float | None = None  # stop after this long (None: until stopped)


class _SourceReader(threading.Thread):
    """Polls one source and hands its batches to the loop thread through the bounded queue."""

    def __init__(self, index: int, source: Source, inputs: queue.Queue, stop: threading.Event,
                 telemetry: Telemetry):
        super().__init__(name=f"rtnf-source-{source.name}", daemon=True)
        self.index, self.source, self.inputs, self.stop_event = index, source, inputs, stop
        self.telemetry = telemetry

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                batches = self.source.poll(SOURCE_POLL_S)
            except Exception as exc:  # a source must not take the loop down
                self.telemetry.reject(f"{self.source.name}: {type(exc).__name__}")
                log.warning("source %s failed (%s); retrying", self.source.name, exc)
                self.stop_event.wait(0.5)
                continue
            for batch in batches:
                try:
                    self.inputs.put_nowait((self.index, batch))
                except queue.Full:
                    self.telemetry.reject("input queue full", len(batch.timestamps))


class RealtimeLoop:
    def __init__(self, decoder: WindowDecoder, sources: list[Source], sinks: list,
                 layout: OutputLayout, clock: Callable[[], float], rules=None, recorder=None,
                 settings: LoopSettings = LoopSettings()):
        self.decoder, self.sources, self.sinks, self.layout = decoder, sources, sinks, layout
        self.clock, self.rules, self.recorder, self.settings = clock, rules, recorder, settings
        self.hop = decoder.windows.hop
        self.telemetry = Telemetry(self.hop, layout.targets)
        self.stop = threading.Event()
        self.inputs: queue.Queue = queue.Queue(maxsize=INPUT_QUEUE)
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
        self.ingest_s = 0.0

    # --------------------------------------------------------------------------------------
    # Input
    # --------------------------------------------------------------------------------------

    def _ingest(self, index: int, batch: Batch) -> None:
        started = self.clock()
        self._heard(index, started)
        if batch.kind == "spikes":
            self._ingest_spikes(batch)
        elif batch.kind == "behavior":
            self.behavior.append(batch.timestamps - self.origin, batch.records)
            self._record(batch)
        elif batch.kind == "frames":
            self._ingest_frames(batch)
        self.ingest_s += self.clock() - started

    def _record(self, batch: Batch) -> None:
        if self.recorder is not None:
            self.recorder.record_inputs(batch)

    def _reject(self, reason: str, count: int) -> None:
        if count:
            self.telemetry.reject(reason, count)
            if self.recorder is not None:
                self.recorder.record_rejected(reason, count, self.clock())

    def _ingest_spikes(self, batch: Batch) -> None:
        times = batch.timestamps - self.origin
        position = np.minimum(np.searchsorted(self.sorted_ids, batch.records),
                              self.sorted_ids.size - 1)
        known = self.sorted_ids[position] == batch.records
        units = self.sorted_index[position]
        self._reject("unknown unit", int((~known).sum()))
        before = np.maximum.accumulate(np.r_[self.spikes.newest, times])[:-1]
        in_order = times >= before
        self._reject("spike time went backwards", int((known & ~in_order).sum()))
        late = times < self.closed_until
        self.telemetry.counters["late_spikes"] += int((known & in_order & late).sum())
        keep = known & in_order & ~late
        if keep.any():
            fitted = self.spikes.append(times[keep], units[keep])
            self._reject("burst beyond the spike buffer", int(keep.sum()) - fitted)
        self._record(batch)

    def _ingest_frames(self, batch: Batch) -> None:
        if self.frames is None:
            return
        shape = self.frames.images.shape[1:]
        if batch.records.shape[1:] != shape:
            self._reject(f"frame size {batch.records.shape[1:]} is not {shape}",
                         len(batch.timestamps))
            return
        self.frames.append(batch.timestamps - self.origin, batch.records)
        self._record(batch)
        self.decoder.refresh_inputs(self.next_end, self.frames, self.behavior)

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

    def _drain(self) -> None:
        while True:
            try:
                self._ingest(*self.inputs.get_nowait())
            except queue.Empty:
                return

    # --------------------------------------------------------------------------------------
    # Windows
    # --------------------------------------------------------------------------------------

    def _prepare(self, k: int) -> None:
        """Get window k ready while waiting for it to close."""
        self.next_k, self.next_end = k, k * self.hop
        self.decoder.advance_history(self.next_end, self.spikes)
        self.decoder.refresh_inputs(self.next_end, self.frames, self.behavior)
        self.spikes.discard_before(self.next_end - self.decoder.span_s)

    def _process(self, k: int, closed: float) -> None:
        """Decode window k and send its outputs; `closed`: when the loop saw it close."""
        end = k * self.hop
        stage_ms = {"ingest": self.ingest_s * 1e3, "close": (closed - self.origin - end) * 1e3}
        self.ingest_s = 0.0
        started = self.clock()
        tokens = self.decoder.tokenize(end, self.spikes)
        tokenized = self.clock()
        behavior, predicted = self.decoder.infer(end, tokens, self.spikes)
        decoded = self.decoder.outputs(behavior)
        inferred = self.clock()
        self.telemetry.counters["truncated_spikes"] += int(tokens.truncated)
        window_end = self.origin + end
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
        stage_ms["publish"] = (self.clock() - inferred) * 1e3
        self.telemetry.window(stage_ms, latency_ms, decoded)
        sample = TelemetrySample(k, window_end, {s: stage_ms[s] for s in STAGES}, latency_ms,
                                 self.telemetry.counter_values())
        for sink in self.sinks:
            sink.publish_telemetry(sample)
        if self.recorder is not None:
            self.recorder.record_telemetry(sample)
        self.closed_until = end

    def run(self) -> dict:
        """Run until `stop` is set, `settings.seconds` have passed or every replayed source
        has finished; returns the telemetry summary."""
        settings = self.settings
        self.origin = math.floor(self.clock())
        started = self.clock()
        readers = [_SourceReader(i, source, self.inputs, self.stop, self.telemetry)
                   for i, source in enumerate(self.sources)]
        for reader in readers:
            reader.start()
        self._prepare(math.floor((started - self.origin) / self.hop) + 1)
        try:
            while not self.stop.is_set():
                now = self.clock()
                if settings.seconds is not None and now - started >= settings.seconds:
                    break
                if all(getattr(source, "finished", False) for source in self.sources):
                    break
                closing = self.origin + self.next_end + settings.grace_s
                if now < closing:
                    try:
                        self._ingest(*self.inputs.get(timeout=min(closing - now, 0.25)))
                    except queue.Empty:
                        self._check_silence(now)
                    continue
                closed = self.clock()
                self._drain()
                newest = math.floor((self.clock() - self.origin - settings.grace_s) / self.hop)
                if newest > self.next_k:  # fell behind: skip to the newest closed window
                    self.telemetry.counters["skipped"] += newest - self.next_k
                    self._prepare(newest)
                self._process(self.next_k, closed)
                self._prepare(self.next_k + 1)
        finally:
            self.stop.set()
            for reader in readers:
                reader.join(timeout=2.0)
        return self.telemetry.summary()
