"""Soak: `rtnf run` against the simulated rig for a long time (BENCHMARKS.md sections 5 and 6).

Three processes (`rtnf.rt.closed_loop.run_against_simulated_rig`): the simulated rig streams a
session over LSL, looping over it, `rtnf run` decodes it, and this process receives
`rtnf-decoded` (latency = arrival on the receiver's LSL clock - window end). Meanwhile
`RssSampler` reads the resident memory (RSS) of the `rtnf run` process every few seconds.

Reported: crashes (`rtnf run` ended with an error: 1, else 0), windows, skipped, missed (over one
hop), lost in transit; RSS growth from the first `span_s` after the warm-up to the last `span_s`
of the run (median RSS of each stretch) and a linear trend in MB/hour; latency p99 of the first
and of the last 10% of the windows after the warm-up. Targets: no crash, growth < 5%, last-10%
p99 within 1.5x the first-10% p99.

`prepare_rig` (shared with `rtnf.bench.overload`) writes an untrained bundle for a simulated
session, compiles it, and writes the run's configuration.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil
import yaml

from rtnf.bench.untrained_bundle import write_untrained_bundle
from rtnf.config import Config, load_config
from rtnf.data.session import Session
from rtnf.data.sim import simulate
from rtnf.engine.compile import compile_bundle
from rtnf.errors import RtnfError
from rtnf.rt.closed_loop import free_tcp_port, run_against_simulated_rig

if TYPE_CHECKING:
    from typing import Self

TARGETS = {"crashes": 0, "rss_growth": 0.05, "p99_last_over_first": 1.5}
STABILITY_FRACTION = 0.1  # the first and last 10% of the windows
INTERVAL_S = 10.0  # latency percentiles over time, in the report and the plot
MB = 1 << 20


@dataclass
class RigSetup:
    """A bundle compiled for a simulated session, and how to run against its rig."""

    bundle: Path
    run_config: Path
    rig_flags: list[str]  # `rtnf simulate --stream lsl` flags streaming that session, looped
    backend: str
    session: Session
    hop: float


def prepare_rig(config: Config, workdir: Path, profile: str, neurons: int, hop: float,
                minutes: float, seed: int, spike_stream: str = "rtnf-sim-spikes",
                bundle_writer: Callable[[Session, Path], Path] | None = None) -> RigSetup:
    """Simulate `minutes` of one session, write its untrained bundle (the configured preset,
    or `bundle_writer(session, out)`), compile it for the configured engine, and write a run
    configuration reading spikes from the LSL stream `spike_stream` (behaviour and frames
    from the simulated rig)."""
    overrides = [f"rig.profile={profile}", f"windows.hop={hop}", f"simulation.neurons={neurons}",
                 f"simulation.minutes={minutes}", f"simulation.seed={seed}",
                 "simulation.sessions=1"]
    rig_config = dataclasses.replace(load_config(overrides=overrides), model=config.model,
                                     engine=config.engine, realtime=config.realtime)
    (session,) = simulate(rig_config.simulation, profile)
    if bundle_writer is None:
        bundle = write_untrained_bundle(session, rig_config, workdir / "bundle")
    else:
        bundle = bundle_writer(session, workdir / "bundle")
    engine = compile_bundle(bundle, rig_config.engine)
    run_config = workdir / "run.yaml"
    run_config.write_text(yaml.safe_dump({
        "rig": {"profile": profile, "sources": {"spikes": {"lsl": {"name": spike_stream}},
                                                "frames": {"kind": "lsl"}}},
        "engine": dataclasses.asdict(config.engine),
        "realtime": dataclasses.asdict(config.realtime),
        "outputs": {"zmq": {"address": f"tcp://127.0.0.1:{free_tcp_port()}"}},
        "recording": {"directory": str(workdir / "runs")}}))
    flags = ["--seed", str(seed), "--neurons", str(neurons), "--profile", profile,
             "--minutes", f"{minutes:g}", "--sessions", "1", "--loop"]
    return RigSetup(bundle, run_config, flags, engine["backend"], session, hop)


def machine() -> dict[str, Any]:
    """What the figures were measured on, and how busy it was (1-minute load average)."""
    return {"platform": platform.platform(), "processor": platform.machine(),
            "cpus": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)}


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


@dataclass
class MemoryTrace:
    times: np.ndarray  # (n,) LSL clock seconds
    rss: np.ndarray  # (n,) bytes


def _is_run_process(process: psutil.Process) -> bool:
    """`python -m rtnf.cli run ...`, as `run_against_simulated_rig` starts it."""
    try:
        return process.cmdline()[1:4] == ["-m", "rtnf.cli", "run"]
    except psutil.Error:
        return False


class RssSampler:
    """Samples the RSS of this process's `rtnf run` child every `interval_s`, from a thread,
    while the `with` block runs (on `clock`, the LSL clock)."""

    def __init__(self, clock: Callable[[], float], interval_s: float):
        self.clock, self.interval_s = clock, interval_s
        self.samples: list[tuple[float, int]] = []
        self.runner: psutil.Process | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="rtnf-rss", daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5.0)

    def _run(self) -> None:
        while not self.stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        if self.runner is None:
            self.runner = next((child for child in psutil.Process().children()
                                if _is_run_process(child)), None)
        if self.runner is not None:
            try:
                self.samples.append((self.clock(), self.runner.memory_info().rss))
            except psutil.Error:  # it has ended
                pass

    def trace(self) -> MemoryTrace:
        times, rss = zip(*self.samples) if self.samples else ((), ())
        return MemoryTrace(np.asarray(times, dtype=np.float64), np.asarray(rss, dtype=np.int64))


def memory_growth(trace: MemoryTrace, warmup_s: float, span_s: float) -> dict[str, float]:
    """RSS growth from the first `span_s` after `warmup_s` (counted from the first sample) to
    the last `span_s` (median of each stretch); the linear trend after the warm-up; the peak."""
    after = trace.times >= (trace.times[0] if trace.times.size else 0.0) + warmup_s
    times, rss = trace.times[after], trace.rss[after].astype(np.float64)
    if times.size < 2:
        raise RtnfError(f"too few memory samples after a {warmup_s:g} s warm-up "
                        f"({times.size}): run longer or sample more often")
    reference = float(np.median(rss[times <= times[0] + span_s]))
    end = float(np.median(rss[times >= times[-1] - span_s]))
    slope = float(np.polyfit(times - times[0], rss, 1)[0])
    return {"warmup_s": warmup_s, "span_s": span_s, "reference_mb": reference / MB,
            "end_mb": end / MB, "peak_mb": float(trace.rss.max()) / MB,
            "growth": end / reference - 1, "trend_mb_per_hour": slope * 3600 / MB,
            "samples": int(trace.times.size)}


# ---------------------------------------------------------------------------------------------
# Latency
# ---------------------------------------------------------------------------------------------


def latency_stability(latency_ms: np.ndarray, fraction: float = STABILITY_FRACTION
                      ) -> dict[str, float]:
    """p50/p99 of the first and of the last `fraction` of the windows (in order)."""
    count = max(1, int(latency_ms.size * fraction))
    first, last = latency_ms[:count], latency_ms[-count:]
    p99_first, p99_last = float(np.percentile(first, 99)), float(np.percentile(last, 99))
    return {"windows_each": count, "p50_first": float(np.percentile(first, 50)),
            "p50_last": float(np.percentile(last, 50)), "p99_first": p99_first,
            "p99_last": p99_last, "p99_last_over_first": p99_last / p99_first}


def latency_by_interval(times: np.ndarray, latency_ms: np.ndarray, start: float,
                        interval_s: float = INTERVAL_S) -> list[dict[str, float]]:
    """Latency p50/p99/max of the windows ending in each `interval_s` from `start`."""
    bins = np.floor((times - start) / interval_s).astype(np.int64)
    rows = []
    for index in np.unique(bins):
        values = latency_ms[bins == index]
        rows.append({"t_s": float(index * interval_s), "windows": int(values.size),
                     "p50": float(np.percentile(values, 50)),
                     "p99": float(np.percentile(values, 99)), "max": float(values.max())})
    return rows


# ---------------------------------------------------------------------------------------------
# The soak
# ---------------------------------------------------------------------------------------------


def soak(rig: RigSetup, seconds: float, workdir: Path, pylsl: ModuleType, sample_every_s: float,
         warmup_s: float, span_s: float) -> dict[str, Any]:
    """Run the three processes for `seconds`; the figures (module docstring) and targets."""
    started_load = machine()
    with RssSampler(pylsl.local_clock, sample_every_s) as sampler:
        try:
            received, _, summary = run_against_simulated_rig(
                rig.bundle, rig.run_config, rig.rig_flags, seconds, workdir, pylsl)
        except RtnfError as exc:
            received, summary, error = None, None, str(exc)
    trace = sampler.trace()
    report: dict[str, Any] = {
        "benchmark": "soak", "seconds": seconds, "machine_at_start": started_load,
        "machine_at_end": machine(), "backend": rig.backend, "hop_s": rig.hop,
        "memory": memory_growth(trace, warmup_s, span_s),
        "rss_trace": {"t_s": np.round(trace.times - trace.times[0], 2).tolist(),
                      "rss_mb": np.round(trace.rss / MB, 2).tolist()}}
    if received is None:
        return report | {"crashes": 1, "error": error, "targets": _targets(report)}
    latency, ends = received.latency_ms, received.window_end
    settled = ends >= trace.times[0] + warmup_s
    report |= {
        "crashes": 0, "windows": int(received.sequence.size),
        "skipped": int(summary["skipped"]),
        "missed": int((latency > rig.hop * 1e3).sum()),
        "lost_in_transit": max(received.gaps() - int(summary["skipped"]), 0),
        "latency_ms": received.latency_summary(),
        "latency_stability": latency_stability(latency[settled]),
        "latency_by_interval": latency_by_interval(ends, latency, trace.times[0]),
        "loop": {key: summary[key] for key in ("latency_ms", "stages_ms", "counters",
                                               "rejected")}}
    return report | {"targets": _targets(report)}


def _targets(report: dict[str, Any]) -> dict[str, bool]:
    targets = {f"crashes == {TARGETS['crashes']}": report["crashes"] == TARGETS["crashes"],
               f"RSS growth < {TARGETS['rss_growth']:.0%}":
                   report["memory"]["growth"] < TARGETS["rss_growth"]}
    if "latency_stability" in report:
        ratio = report["latency_stability"]["p99_last_over_first"]
        targets[f"p99 last 10% <= {TARGETS['p99_last_over_first']}x first 10%"] = \
            ratio <= TARGETS["p99_last_over_first"]
    return targets


def format_table(report: dict[str, Any]) -> str:
    memory = report["memory"]
    lines = [(f"soak, {report['seconds'] / 60:.1f} min, {report['backend']}; load average "
              f"{report['machine_at_start']['load_average_1min']} -> "
              f"{report['machine_at_end']['load_average_1min']}"),
             f"crashes {report['crashes']}" + (f": {report['error']}" if report["crashes"] else
                                               ""),
             (f"RSS MB: after warm-up {memory['reference_mb']:.1f}, end {memory['end_mb']:.1f}, "
              f"peak {memory['peak_mb']:.1f}; growth {memory['growth']:+.2%}, trend "
              f"{memory['trend_mb_per_hour']:+.2f} MB/hour")]
    if not report["crashes"]:
        latency, stability = report["latency_ms"], report["latency_stability"]
        lines += [(f"windows {report['windows']}, skipped {report['skipped']}, missed "
                   f"{report['missed']}, lost in transit {report['lost_in_transit']}"),
                  (f"latency ms p50 {latency['p50']:.2f}, p99 {latency['p99']:.2f}, max "
                   f"{latency['max']:.2f}"),
                  (f"p99 first 10% {stability['p99_first']:.2f} ms, last 10% "
                   f"{stability['p99_last']:.2f} ms "
                   f"(x{stability['p99_last_over_first']:.2f})")]
    lines += [f"{'met' if ok else 'NOT met'}: {target}" for target, ok in
              report["targets"].items()]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path:
    """RSS and latency (p50, p99 per interval) over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, latency) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    trace = report["rss_trace"]
    memory.plot(np.asarray(trace["t_s"]) / 60, trace["rss_mb"], color="tab:purple")
    memory.axvline(report["memory"]["warmup_s"] / 60, color="grey", linestyle=":",
                   label="end of warm-up")
    memory.set_ylabel("rtnf run RSS, MB")
    memory.legend(loc="lower right")
    for key in ("p50", "p99") if "latency_by_interval" in report else ():
        rows = report["latency_by_interval"]
        latency.plot([row["t_s"] / 60 for row in rows], [row[key] for row in rows], label=key)
    latency.set_yscale("log")
    latency.set_ylabel(f"latency, ms (per {INTERVAL_S:g} s)")
    latency.set_xlabel("minutes since rtnf run started")
    latency.legend(loc="upper right")
    figure.suptitle(f"rtnf soak, {report['seconds'] / 60:.0f} min, {report['backend']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
