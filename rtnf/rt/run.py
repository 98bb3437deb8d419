"""`rtnf run`: a bundle, the rig's sources and the configured outputs, wired into the loop.

`run_closed_loop` opens everything in the order that fails fastest and cheapest (bundle and
rules, then the engine, then the sources, sinks and the recorder), applies the process's CPU
settings, runs the loop until it is stopped (SIGINT / SIGTERM, `seconds`, or the end of a
replayed file), then closes everything in reverse, flushing the recorder last, and returns the
run's summary. Anything that cannot start is an `RtnfError` naming what to fix; nothing that
was opened is left open.

What went wrong during the run does not raise: the summary's `failures` lists what makes the
run a failure (the engine failing too long with nothing to fall back to, the recording's disk
failing), `fallback` says which decoder took over from a failed engine, and `recording` what
the record holds; `fault_lines` puts them in words for the operator, and `rtnf run` exits
with an error when `failures` is not empty.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from rtnf import __version__
from rtnf.bundle import load_bundle
from rtnf.config import Config, RigConfig
from rtnf.data.session import BEHAVIOR_UNITS
from rtnf.engine.select import open_engine
from rtnf.errors import RtnfError
from rtnf.rt.decoder import Prediction, WindowDecoder
from rtnf.rt.loop import LoopSettings, RealtimeLoop
from rtnf.rt.priority import apply_process_settings
from rtnf.rt.recorder import Recorder
from rtnf.rt.rules import Rules
from rtnf.rt.stop_signals import stop_on_signals
from rtnf.rt.telemetry import LiveView
from rtnf.stream.lslconfig import import_pylsl
from rtnf.stream.sinks import open_sinks
from rtnf.stream.sources import open_sources
from rtnf.stream.window_output import OutputLayout

log = logging.getLogger("rtnf.rt")


@dataclass
class RunOptions:
    bundle: Path
    transport: str | None = None  # replaces every configured source kind (lsl, zmq, ...)
    backend: str | None = None  # default: engine.backend
    decoder: str = "auto"  # auto (the calibration verdict's), neuroformer, or a baseline
    prediction: Prediction = "rates"
    seconds: float | None = None
    run_dir: Path | None = None  # default: recording.directory/<time>
    live_view: bool = False


def output_layout(decoder: WindowDecoder, unit_ids) -> OutputLayout:
    return OutputLayout(decoder.targets, tuple(BEHAVIOR_UNITS[t] for t in decoder.targets),
                        unit_ids, decoder.windows.current, decoder.windows.hop)


def _rig_for(config: Config, decoder: WindowDecoder) -> RigConfig:
    """The rig's sources as the bundle needs them: frames only for a model that reads them."""
    frames = config.rig.sources.frames
    if decoder.dims.frame_shape is None:
        frames = dataclasses.replace(frames, kind="none")
    elif frames.kind == "none":
        raise RtnfError("the bundle's model reads stimulus frames, and rig.sources.frames.kind "
                        "is none: set it to the rig's frame stream")
    rig = dataclasses.replace(config.rig, sources=dataclasses.replace(config.rig.sources,
                                                                      frames=frames))
    return rig


def _replay_speed(rig: RigConfig, transport: str | None) -> float:
    """How much faster than real time the sources play (replayed files and the simulator; the
    kinds `transport` gives them): the loop scales its clock by it. Live sources and sped-up
    replays cannot be mixed."""
    used = {kind: getattr(rig.sources, kind) for kind in ("spikes", "behavior", "frames")
            if getattr(rig.sources, kind).kind != "none"}
    kinds = {kind: transport or source.kind for kind, source in used.items()}
    speeds = {source.speed if kinds[kind] in ("replay", "sim") else 1.0
              for kind, source in used.items()}
    if len(speeds) > 1:
        listed = ", ".join(f"rig.sources.{kind} ({kinds[kind]}, speed {source.speed:g})"
                           for kind, source in used.items())
        raise RtnfError(f"sources play at different speeds: {listed}; a sped-up replay needs "
                        f"every source replayed at the same speed")
    return speeds.pop()


def _run_directory(config: Config, options: RunOptions) -> Path:
    if options.run_dir is not None:
        return options.run_dir
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(config.recording.directory) / f"{config.rig.name}-{stamp}"


def _check_sinks_of_rules(config: Config) -> None:
    """A rule that sends to an output that is switched off is a mistake: say so at start."""
    enabled = {"lsl": config.outputs.lsl.enabled, "zmq": config.outputs.zmq.enabled,
               "bpod_serial": bool(config.outputs.bpod.serial_port),
               "bpod_udp": config.outputs.bpod.net_port > 0}
    keys = {"lsl": "outputs.lsl.enabled", "zmq": "outputs.zmq.enabled",
            "bpod_serial": "outputs.bpod.serial_port", "bpod_udp": "outputs.bpod.net_port"}
    for index, rule in enumerate(config.control.rules):
        for sink in rule.get("sinks", ()):
            if sink in enabled and not enabled[sink]:
                raise RtnfError(f"control.rules[{index}].sinks lists {sink}, which is off "
                                f"({keys[sink]}); turn it on or remove it from the rule")


def run_closed_loop(config: Config, options: RunOptions,
                    on_started: Callable[[dict[str, Any]], None] | None = None
                    ) -> dict[str, Any]:
    """Run the loop as configured; returns the summary (also written to the run's record)."""
    bundle = load_bundle(options.bundle)
    if bundle.config.windows != config.windows:
        log.info("windows come from the bundle (hop %.3f s, current %.3f s, history %.3f s)",
                 bundle.config.windows.hop, bundle.config.windows.current,
                 bundle.config.windows.history)
    pylsl = import_pylsl(config.rig.lsl.config, config.rig.lsl.session_id)
    stop = threading.Event()
    with ExitStack() as stack:
        engine = open_engine(bundle, config.engine, options.backend)
        decoder = WindowDecoder(bundle, engine, options.decoder, options.prediction,
                                seed=config.training.seed)
        layout = output_layout(decoder, bundle.unit_ids)
        rules = Rules.from_config(config.control.rules, layout)
        _check_sinks_of_rules(config)
        rig = _rig_for(config, decoder)
        sources = open_sources(rig, options.transport, simulation=config.simulation,
                               max_message_bytes=config.realtime.max_message_bytes)
        for source in sources:
            stack.callback(source.close)
        sinks = open_sinks(config.outputs, layout, config.rig.name, config.rig.lsl.config)
        for sink in sinks:
            stack.callback(sink.close)
        # From the recording's start to its summary, SIGINT/SIGTERM only ask the loop to stop:
        # a signal during the final flush does not cut it short.
        stack.enter_context(stop_on_signals(stop))
        recorder = None
        run_dir = None
        if config.recording.enabled:
            run_dir = _run_directory(config, options)
            recorder = stack.enter_context(Recorder(
                run_dir, layout, config.recording.flush_interval,
                {"bundle": str(options.bundle), "rig": config.rig.name, "rtnf": __version__,
                 "sources": [source.name for source in sources],
                 "decoder": decoder.decoder_name, "backend": engine.backend.describe()}))
        process = apply_process_settings(config.realtime)
        loop = RealtimeLoop(decoder, sources, sinks, layout, pylsl.local_clock, rules, recorder,
                            LoopSettings(grace_s=config.realtime.grace, seconds=options.seconds,
                                         speed=_replay_speed(rig, options.transport)), stop)
        started = {"bundle": str(options.bundle), "hop_s": decoder.windows.hop,
                   "decoder": decoder.decoder_name,
                   "backend": engine.backend.describe(), "sources": [s.name for s in sources],
                   "sinks": [s.name for s in sinks], "rules": rules.describe(),
                   "run_dir": None if run_dir is None else str(run_dir), "process": process}
        if on_started is not None:
            on_started(started)
        with ExitStack() as view:
            if options.live_view:
                view.enter_context(LiveView(loop.telemetry, f"rtnf run: {options.bundle}"))
            summary = loop.run()
        summary |= {"started": started,
                    "sink_errors": {s.name: dict(s.errors) for s in sinks if s.errors},
                    "rule_errors": dict(rules.errors),
                    "source_rejected": {s.name: dict(s.rejected) for s in sources
                                        if s.rejected}}
        if recorder is not None:
            summary["recording"] = _close_recording(recorder, summary)
        return summary


def _close_recording(recorder: Recorder, summary: dict[str, Any]) -> dict[str, Any]:
    """Close the recorder with the run's summary; what it holds, and its failure (also added
    to the summary's `failures`)."""
    try:
        recorder.close(summary)
    except RtnfError as error:
        summary["failures"].append(str(error))
    return {"directory": str(recorder.directory), "records": dict(recorder.flushed),
            "dropped": {kind: count for kind, count in recorder.dropped.items() if count},
            "failure": recorder.failure}


def fault_lines(summary: dict[str, Any]) -> list[str]:
    """What the operator is told, after the run's figures, about what went wrong."""
    lines = [f"output {sink}: {reason}: {count}"
             for sink, errors in summary.get("sink_errors", {}).items()
             for reason, count in errors.items()]
    if summary.get("fallback"):
        lines.append(f"fallback: {summary['fallback']}")
    recording = summary.get("recording") or {}
    if recording.get("dropped"):
        dropped = ", ".join(f"{kind} {count}" for kind, count in recording["dropped"].items())
        lines.append(f"recording {recording['directory']}: records not written: {dropped}")
    lines.extend(f"failed: {failure}" for failure in summary.get("failures", ()))
    return lines
