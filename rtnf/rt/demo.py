"""`rtnf demo`: the whole product on the built-in simulated rig, end to end, in a few minutes.

1. the pretrained checkpoint: the cached default one (pretrained on first use) or `pretrained`;
2. a day of a new animal the pretraining never saw (`DEMO_SEED`): its first
   `CALIBRATION_MINUTES` are the calibration session, the rest is streamed live, as on a rig
   where the morning's calibration precedes the experiment;
3. `rtnf calibrate` on the calibration part (`rtnf demo` uses the quick recipe), then
   `rtnf compile`;
4. three processes, as on a rig: the simulated rig streams the rest of the day over LSL
   (`rtnf simulate --stream lsl --from-minute`), `rtnf run` decodes it in closed loop with a
   control rule (running faster than the calibration's mean speed -> `running`, then
   `resting`), and this process receives rtnf's outputs with plain pylsl inlets, beside the
   rig's own behaviour stream (the ground truth);
5. the report: decoding r of each target against the ground truth (the last true sample before
   each window end, as calibration scores it; the first `WARMUP_S` are left out while the
   history and smoothing fill), the end-to-end latency the receiver measured, windows, missed
   (later than one hop), skipped, control commands received, and the run's own summary.

LSL stays on this machine (rig.lsl.config loopback) unless the configuration says otherwise;
the child processes inherit this process's LSL configuration, so they see each other.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from rtnf.config import Config
from rtnf.data.sim import simulate
from rtnf.engine.compile import compile_bundle
from rtnf.rt.closed_loop import free_tcp_port, run_against_simulated_rig
from rtnf.stream.lslconfig import import_pylsl
from rtnf.train.calibrate import calibrate

DEMO_SEED = 2026  # an animal the default checkpoint's pretraining (seed 0) never saw
CALIBRATION_MINUTES = 4.0
WARMUP_S = 3.0


def demo_rule(speed_threshold: float) -> dict[str, Any]:
    return {"name": "running", "when": [{"value": "decoded.speed", "above": speed_threshold,
                                         "hysteresis": 0.2 * speed_threshold}],
            "min_duration": 0.1, "refractory": 1.0, "command": "running",
            "release_command": "resting", "sinks": ["lsl", "zmq"]}


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 3 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def score_against_truth(end: np.ndarray, decoded: np.ndarray, targets: list[str],
                        truth_times: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Pearson r of each decoded target against the last true sample before each window end."""
    channels = {"speed": 0, "gaze_phi": 1, "gaze_theta": 2}
    keep = end >= end.min() + WARMUP_S if end.size else end.astype(bool)
    last = np.searchsorted(truth_times, end[keep], side="left") - 1
    valid = last >= 0
    return {f"{name}_r": _pearson(decoded[keep][valid, k], truth[last[valid], channels[name]])
            for k, name in enumerate(targets)}


def run_demo(config: Config, seconds: float, workdir: Path, pretrained: Path | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every step of the module docstring; returns the report."""
    started = time.monotonic()
    pylsl = import_pylsl(config.rig.lsl.config, config.rig.lsl.session_id)
    workdir.mkdir(parents=True, exist_ok=True)
    minutes = CALIBRATION_MINUTES + seconds / 60 + 1.0
    simulation = dataclasses.replace(config.simulation, seed=DEMO_SEED, sessions=1,
                                     minutes=minutes)
    log(f"simulating a new animal (seed {DEMO_SEED}): {simulation.neurons} units, "
        f"{config.rig.profile}; its first {CALIBRATION_MINUTES:g} minutes calibrate, the rest "
        f"streams live")
    (day,) = simulate(simulation, config.rig.profile)
    bundle = workdir / "bundle"
    metrics = calibrate(day.first(CALIBRATION_MINUTES * 60), config, bundle,
                        pretrained=pretrained, source={"kind": "simulated", "seed": DEMO_SEED},
                        log=log)
    log(f"calibrated in {metrics['seconds']:.0f} s: {metrics['verdict']['reason']}; the loop "
        f"decodes with {metrics['verdict']['use']}")
    engine = compile_bundle(bundle, config.engine)
    log(f"compiled for {engine['backend']}")

    speed = day.first(CALIBRATION_MINUTES * 60).behavior["speed"].values
    settings = {"rig": {"sources": {"frames": {"kind": "lsl"}}},
                "outputs": {"zmq": {"address": f"tcp://127.0.0.1:{free_tcp_port()}"}},
                "control": {"rules": [demo_rule(float(np.mean(speed)))]},
                "recording": {"directory": str(workdir / "runs")}}
    run_config = workdir / "demo-run.yaml"
    run_config.write_text(yaml.safe_dump(settings, sort_keys=False))

    simulated_rig = ["--seed", str(DEMO_SEED), "--sessions", "1", "--minutes", f"{minutes:g}",
                     "--neurons", str(simulation.neurons), "--profile", config.rig.profile,
                     "--from-minute", f"{CALIBRATION_MINUTES:g}"]
    received, (truth_times, truth), summary = run_against_simulated_rig(
        bundle, run_config, simulated_rig, seconds, workdir, pylsl, config.outputs.lsl.prefix)
    hop_ms = summary["started"]["hop_s"] * 1e3
    latency = received.latency_ms
    commands = [marker for _, marker, _ in received.control]
    return {
        "latency_ms": received.latency_summary(),
        "windows": int(received.sequence.size),
        "missed": int((latency > hop_ms).sum()),
        "skipped": int(summary["skipped"]),
        "lost_in_transit": max(received.gaps() - int(summary["skipped"]), 0),
        "decoding": score_against_truth(received.window_end, received.decoded,
                                        received.targets, truth_times, truth),
        "decoder": metrics["verdict"]["use"],
        "calibration": {"verdict": metrics["verdict"], "holdout": metrics["holdout"],
                        "seconds": metrics["seconds"]},
        "control": {"rule": settings["control"]["rules"][0],
                    "commands": {name: commands.count(name) for name in sorted(set(commands))}},
        "run": summary,
        "seconds": round(time.monotonic() - started, 1),
    }


def format_demo(report: dict[str, Any]) -> str:
    latency, decoding = report["latency_ms"], report["decoding"]
    return "\n".join([
        f"decoded with {report['decoder']}; r against the ground truth: "
        + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in decoding.items()),
        f"end-to-end latency (received - window end), {report['windows']} windows: p50 "
        f"{latency['p50']:.2f} ms, p99 {latency['p99']:.2f} ms, p99.9 {latency['p999']:.2f} ms, "
        f"max {latency['max']:.2f} ms; missed {report['missed']}, skipped {report['skipped']}",
        "control commands received: " + (", ".join(
            f"{k} x{v}" for k, v in report["control"]["commands"].items()) or "none"),
        f"demo took {report['seconds']:.0f} s"])
