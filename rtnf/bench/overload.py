"""Overload: CPU contention and spike bursts on one closed-loop run, then recovery (BENCHMARKS.md
section 6; `benchmarks/bench_overload.py`).

Processes, all on this machine (LSL discovery on loopback):

- the simulated rig (`rtnf simulate --stream lsl --loop`): behaviour and stimulus frames;
- the load generator (this module run as `python -m rtnf.bench.overload PLAN.json`): streams the
  same session's spikes, looped, on the LSL stream `rtnf-overload-spikes`, each spike stamped
  with its own time. During a burst phase of factor k every spike goes out k times with the
  same stamp: once for its own unit and k - 1 times for units drawn at random from the
  session's units, so the rate is k times the normal rate with the normal timing (two-photon
  frames stay bursts at the imaging rate). During the contention phase it starts one busy-loop
  process per core this process may use, each pinned to its core, at normal priority;
- `rtnf run --stream lsl` with the spikes taken from `rtnf-overload-spikes`
  (`rtnf.rt.closed_loop.run_against_simulated_rig`), recording on;
- this process: the receiver of `rtnf-decoded` (latency = arrival - window end, LSL clock) and
  `RssSampler` (the run's resident memory, every RSS_EVERY_S).

The generator starts its schedule WARMUP_S after `rtnf-decoded` appears and writes it (phase
boundaries on the LSL clock) to a file; windows are assigned to phases by their end. Per phase:
latency p50/p99/max, windows, skipped (sequence gaps, checked against the run's own count),
missed (over one hop), spikes received per second and rejected inputs by reason (from the run's
record), truncated spikes (estimated from the recorded spikes: those of each window beyond the
token capacity; the run's total is reported beside it), RSS at its start, peak and end.
Recovery: after each load, the p99 of a normal phase without its first SETTLE_S must be within
RECOVERY_FACTOR of the baseline p99. Memory bounded: the peak RSS under load within
PEAK_MEMORY_FACTOR of the baseline's end, and no growth once the load has ended (the last
phase ends within RECOVERY_MEMORY_GROWTH of its start; what the allocator keeps from the bursts
is reported as `retained_after_load`).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import psutil

from rtnf.bench.soak import MB, MemoryTrace, RssSampler, machine, prepare_rig
from rtnf.bundle import load_bundle
from rtnf.config import Config
from rtnf.data.io import read_session, write_session
from rtnf.errors import RtnfError
from rtnf.rt.closed_loop import START_TIMEOUT_S, run_against_simulated_rig
from rtnf.rt.recorder import read_run
from rtnf.rt.stop_signals import stop_on_signals
from rtnf.stream.lslconfig import import_pylsl
from rtnf.stream.receiver import ReceivedOutputs


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    multiplier: int = 1  # spikes sent per spike of the session
    contention: bool = False  # one busy loop per core


PHASES = (Phase("baseline", 60), Phase("cpu_contention", 45, contention=True), Phase("calm", 20),
          Phase("burst_10x", 40, multiplier=10), Phase("burst_100x", 40, multiplier=100),
          Phase("recovery", 60))
RIG = {"profile": "2p", "neurons": 386, "hop": 0.05, "minutes": 3.0, "seed": 11}
LOAD_STREAM = "rtnf-overload-spikes"
WARMUP_S = 10.0  # after the run's outputs appear, before the baseline
END_MARGIN_S = 3.0  # the run lasts this much longer than the schedule
RSS_EVERY_S = 1.0
SETTLE_S = 5.0  # the start of a normal phase after a load, not judged (backlogs drain)
RECOVERY_FACTOR = 1.5
PEAK_MEMORY_FACTOR = 2.0
RECOVERY_MEMORY_GROWTH = 0.02
MIN_PUSH_S = 0.001  # at least this long between two pushes of the generator
BUSY_LOOP = ("import time\nend = time.monotonic() + {seconds}\n"
             "while time.monotonic() < end:\n    pass\n")


# ---------------------------------------------------------------------------------------------
# The load generator (a process of its own)
# ---------------------------------------------------------------------------------------------


def multiplied(stamps: np.ndarray, units: np.ndarray, factor: int, unit_ids: np.ndarray,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each spike `factor` times with its stamp: its own unit, then random units of `unit_ids`
    (stamps stay in order)."""
    if factor == 1:
        return stamps, units
    others = rng.choice(unit_ids, size=(units.size, factor - 1))
    return np.repeat(stamps, factor), np.column_stack([units, others]).ravel()


class SpikeStreamer(threading.Thread):
    """Pushes a session's spikes (`times` in seconds from the session's start) to an LSL outlet
    as the clock passes them, looping over the session; `factor` (set from another thread)
    multiplies them."""

    def __init__(self, outlet: Any, clock: Callable[[], float], times: np.ndarray,
                 units: np.ndarray, unit_ids: np.ndarray, duration: float, seed: int = 0):
        super().__init__(name="rtnf-overload-spikes", daemon=True)
        self.outlet, self.clock, self.unit_ids, self.duration = outlet, clock, unit_ids, duration
        self.times, self.units = times, units.astype(np.int32)
        self.rng = np.random.default_rng(seed)
        self.factor = 1
        self.stop = threading.Event()

    def run(self) -> None:
        start, cursor, offset = self.clock(), 0, 0.0  # offset: session time of this pass
        while not self.stop.is_set():
            end = int(np.searchsorted(self.times, self.clock() - start - offset, side="right"))
            if end > cursor:
                stamps, units = multiplied(start + offset + self.times[cursor:end],
                                           self.units[cursor:end], self.factor, self.unit_ids,
                                           self.rng)
                self.outlet.push_chunk(units.reshape(-1, 1), stamps.tolist())
                cursor = end
            if cursor == self.times.size:
                cursor, offset = 0, offset + self.duration
                continue
            due = start + offset + self.times[cursor]
            self.stop.wait(max(MIN_PUSH_S, due - self.clock()))


def busy_cores(seconds: float) -> list[subprocess.Popen]:
    """One busy-loop process per core this process may run on, pinned there; each ends by
    itself after `seconds` even if nobody stops it."""
    hogs = []
    for core in psutil.Process().cpu_affinity():
        hog = subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(seconds=seconds)])
        psutil.Process(hog.pid).cpu_affinity([core])
        hogs.append(hog)
    return hogs


def stop_all(processes: list[subprocess.Popen]) -> None:
    """Terminate the processes (killed if they do not end within 10 s)."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def schedule_phases(phases: list[Phase], start: float) -> list[dict[str, Any]]:
    """Each phase with its start and end on the LSL clock, one after the other from `start`."""
    schedule = []
    for phase in phases:
        schedule.append({**asdict(phase), "start": start, "end": start + phase.seconds})
        start += phase.seconds
    return schedule


def generate_load(plan: dict[str, Any]) -> None:
    """The generator's life: stream spikes at once (rtnf run resolves the stream when it
    starts), wait for rtnf's outputs, then play the schedule and keep streaming until
    SIGTERM (or SIGINT) stops the streamer."""
    pylsl = import_pylsl()  # the LSL configuration inherited from the parent (loopback)
    session = read_session(plan["session"])
    info = pylsl.StreamInfo(LOAD_STREAM, "Spikes", 1, pylsl.IRREGULAR_RATE, pylsl.cf_int32,
                            LOAD_STREAM)
    streamer = SpikeStreamer(pylsl.StreamOutlet(info), pylsl.local_clock,
                             session.spike_times - session.start_time,
                             session.unit_ids[session.spike_unit_index], session.unit_ids,
                             session.duration)
    with stop_on_signals(streamer.stop):
        streamer.start()
        print("streaming", flush=True)
        if not pylsl.resolve_bypred(f"name='{plan['decoded']}'", 1, START_TIMEOUT_S):
            raise RtnfError(f"{plan['decoded']} did not appear within {START_TIMEOUT_S:g} s")
        schedule = schedule_phases([Phase(**p) for p in plan["phases"]],
                                   pylsl.local_clock() + plan["warmup_s"])
        Path(plan["schedule"]).write_text(json.dumps(schedule, indent=1))
        for phase in schedule:
            if streamer.stop.wait(max(0.0, phase["start"] - pylsl.local_clock())):
                break
            hogs = busy_cores(phase["seconds"] + 1.0) if phase["contention"] else []
            streamer.factor = phase["multiplier"]
            streamer.stop.wait(max(0.0, phase["end"] - pylsl.local_clock()))
            streamer.factor = 1
            stop_all(hogs)
        streamer.join()


# ---------------------------------------------------------------------------------------------
# The run and its figures
# ---------------------------------------------------------------------------------------------


def _start_generator(plan_path: Path, workdir: Path) -> subprocess.Popen:
    log = workdir / "generator.log"
    generator = subprocess.Popen([sys.executable, "-m", "rtnf.bench.overload", str(plan_path)],
                                 stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                                 env=dict(os.environ))
    if generator.stdout.readline().strip() != "streaming":
        generator.kill()
        raise RtnfError(f"the load generator did not start:\n{log.read_text()[-2000:]}")
    return generator


def run(config: Config, workdir: Path, phases: tuple[Phase, ...] = PHASES,
        pylsl: ModuleType | None = None) -> dict[str, Any]:
    """Prepare the rig, run the schedule on one closed-loop run, and compute the figures."""
    pylsl = pylsl or import_pylsl(config.rig.lsl.config, config.rig.lsl.session_id)
    rig = prepare_rig(config, workdir, RIG["profile"], RIG["neurons"], RIG["hop"],
                      RIG["minutes"], RIG["seed"], spike_stream=LOAD_STREAM)
    write_session(rig.session, workdir / "session.npz")
    plan = {"session": str(workdir / "session.npz"), "decoded": "rtnf-decoded",
            "warmup_s": WARMUP_S, "schedule": str(workdir / "schedule.json"),
            "phases": [asdict(phase) for phase in phases]}
    (workdir / "plan.json").write_text(json.dumps(plan))
    seconds = WARMUP_S + sum(phase.seconds for phase in phases) + END_MARGIN_S
    at_start = machine()
    generator = _start_generator(workdir / "plan.json", workdir)
    try:
        with RssSampler(pylsl.local_clock, RSS_EVERY_S) as sampler:
            received, _, summary = run_against_simulated_rig(
                rig.bundle, rig.run_config, rig.rig_flags, seconds, workdir, pylsl)
    finally:
        stop_all([generator])
    if not (workdir / "schedule.json").is_file():
        raise RtnfError("the load generator wrote no schedule:\n"
                        f"{(workdir / 'generator.log').read_text()[-2000:]}")
    schedule = json.loads((workdir / "schedule.json").read_text())
    recording = read_run(summary["started"]["run_dir"])
    windows = load_bundle(rig.bundle).config.windows
    inputs = RecordedInputs(np.sort(recording.spikes["timestamp"]), recording.rejected,
                            windows.current, windows.current_capacity - 2)
    trace = sampler.trace()
    gaps = np.r_[0, np.diff(received.sequence) - 1]
    figures = {phase["name"]: phase_figures(phase, received, gaps, inputs, trace, rig.hop)
               for phase in schedule}
    report = {
        "benchmark": "overload", "rig": RIG, "preset": config.model.preset,
        "backend": rig.backend, "machine_at_start": at_start, "machine_at_end": machine(),
        "method": "spike bursts: each spike sent k times with its stamp (its unit + k-1 random "
                  "units); contention: one pinned busy loop per core",
        "phases": figures,
        "recovery": recovery(figures, received, schedule),
        "memory": memory_summary(figures),
        "run": {"windows": summary["windows"], "skipped": summary["skipped"],
                "sequence_gaps": received.gaps(), "missed": summary["missed"],
                "truncated_spikes": summary["counters"].get("truncated_spikes", 0),
                "latency_ms": summary["latency_ms"], "rejected": summary["rejected"],
                "recorder_dropped": recording.info.get("summary", {}).get("dropped")},
        "trace": _trace(schedule, received, trace)}
    report["targets"] = targets(report)
    return report


def _between(times: np.ndarray, phase: dict[str, Any]) -> np.ndarray:
    return (times >= phase["start"]) & (times < phase["end"])


@dataclass
class RecordedInputs:
    """What the run's record says about its inputs."""

    spike_times: np.ndarray  # (n,) sorted stamps of every spike received
    rejected: np.ndarray  # the record's rejections: time, count, reason
    current_s: float  # a window's length
    spikes_per_window: int  # spikes that fit one window's tokens


def phase_figures(phase: dict[str, Any], received: ReceivedOutputs, gaps: np.ndarray,
                  inputs: RecordedInputs, trace: MemoryTrace, hop: float) -> dict[str, Any]:
    """One phase's figures (module docstring); `gaps[i]`: windows missing before window i."""
    windows = _between(received.window_end, phase)
    latency = received.latency_ms[windows]
    ends = received.window_end[windows]
    in_window = (np.searchsorted(inputs.spike_times, ends)
                 - np.searchsorted(inputs.spike_times, ends - inputs.current_s))
    rejected: dict[str, int] = {}
    for row in inputs.rejected[_between(inputs.rejected["time"], phase)]:
        reason = row["reason"].decode(errors="replace")
        rejected[reason] = rejected.get(reason, 0) + int(row["count"])
    rss = trace.rss[_between(trace.times, phase)] / MB
    return {"seconds": phase["seconds"], "multiplier": phase["multiplier"],
            "contention": phase["contention"], "windows": int(windows.sum()),
            "latency_ms": _percentiles(latency), "skipped": int(gaps[windows].sum()),
            "missed": int((latency > hop * 1e3).sum()),
            "spikes_per_s": int(_between(inputs.spike_times, phase).sum()) / phase["seconds"],
            "truncated_spikes_estimate": int(np.maximum(in_window - inputs.spikes_per_window,
                                                        0).sum()),
            "rejected": rejected,
            "rss_mb": {"start": float(rss[0]), "peak": float(rss.max()), "end": float(rss[-1])}
            if rss.size else {"start": None, "peak": None, "end": None}}


def _percentiles(latency: np.ndarray) -> dict[str, float | None]:
    if latency.size == 0:
        return {"p50": None, "p99": None, "max": None}
    return {"p50": float(np.percentile(latency, 50)), "p99": float(np.percentile(latency, 99)),
            "max": float(latency.max())}


def recovery(figures: dict[str, Any], received: ReceivedOutputs,
             schedule: list[dict[str, Any]]) -> dict[str, Any]:
    """For each normal phase after a load: p99 without its first SETTLE_S against the
    baseline's, and the time until the first window as fast as the baseline's p99."""
    baseline_p99 = figures["baseline"]["latency_ms"]["p99"]
    result = {}
    for previous, phase in itertools.pairwise(schedule):
        loaded = previous["multiplier"] > 1 or previous["contention"]
        if not loaded or phase["multiplier"] > 1 or phase["contention"]:
            continue
        windows = _between(received.window_end, phase)
        ends, latency = received.window_end[windows], received.latency_ms[windows]
        settled = latency[ends >= phase["start"] + SETTLE_S]
        normal = np.flatnonzero(latency <= baseline_p99)
        p99 = float(np.percentile(settled, 99)) if settled.size else float("nan")
        result[phase["name"]] = {
            "after": previous["name"], "p99_settled_ms": p99,
            "p99_over_baseline": p99 / baseline_p99,
            "time_to_normal_s": float(ends[normal[0]] - phase["start"]) if normal.size else None}
    return result


def memory_summary(figures: dict[str, Any]) -> dict[str, float]:
    """The run's RSS under load and after it, against the baseline's end."""
    baseline = figures["baseline"]["rss_mb"]["end"]
    last = figures[list(figures)[-1]]["rss_mb"]
    peak = max(f["rss_mb"]["peak"] for f in figures.values())
    return {"baseline_mb": baseline, "peak_mb": peak, "end_mb": last["end"],
            "peak_over_baseline": peak / baseline,
            "retained_after_load": last["end"] / baseline - 1,
            "growth_after_load": last["end"] / last["start"] - 1}


def targets(report: dict[str, Any]) -> dict[str, bool]:
    result = {f"{name} p99 (after {SETTLE_S:g} s) <= {RECOVERY_FACTOR}x baseline p99":
              figures["p99_over_baseline"] <= RECOVERY_FACTOR
              for name, figures in report["recovery"].items()}
    memory = report["memory"]
    result[f"peak RSS under load <= {PEAK_MEMORY_FACTOR}x the baseline's"] = \
        memory["peak_over_baseline"] <= PEAK_MEMORY_FACTOR
    result[f"no RSS growth after the load (< {RECOVERY_MEMORY_GROWTH:.0%})"] = \
        memory["growth_after_load"] < RECOVERY_MEMORY_GROWTH
    result["every sequence gap counted as skipped"] = \
        report["run"]["sequence_gaps"] <= report["run"]["skipped"]
    return result


def _trace(schedule: list[dict[str, Any]], received: ReceivedOutputs, trace: MemoryTrace
           ) -> dict[str, list[float]]:
    """Per-window latency and RSS samples, in seconds from the baseline's start (the plot)."""
    origin = schedule[0]["start"]
    return {"window_t_s": np.round(received.window_end - origin, 3).tolist(),
            "latency_ms": np.round(received.latency_ms, 3).tolist(),
            "rss_t_s": np.round(trace.times - origin, 2).tolist(),
            "rss_mb": np.round(trace.rss / MB, 2).tolist(),
            "phases": [{"name": p["name"], "start_s": p["start"] - origin,
                        "end_s": p["end"] - origin} for p in schedule]}


def format_table(report: dict[str, Any]) -> str:
    lines = [(f"overload, {report['preset']} on {report['backend']}, 2p {RIG['neurons']} "
              f"units, {RIG['hop'] * 1e3:g} ms hop; load average "
              f"{report['machine_at_start']['load_average_1min']} -> "
              f"{report['machine_at_end']['load_average_1min']}"),
             ("| phase | s | windows | p50 ms | p99 ms | max ms | skipped | missed | spikes/s | "
              "truncated (est.) | rejected | RSS peak MB |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, f in report["phases"].items():
        latency = {key: "-" if value is None else f"{value:.2f}"
                   for key, value in f["latency_ms"].items()}
        peak = f["rss_mb"]["peak"]
        lines.append(f"| {name} | {f['seconds']:g} | {f['windows']} | {latency['p50']} | "
                     f"{latency['p99']} | {latency['max']} | {f['skipped']} | {f['missed']} | "
                     f"{f['spikes_per_s']:.0f} | {f['truncated_spikes_estimate']} | "
                     f"{sum(f['rejected'].values())} | "
                     f"{'-' if peak is None else f'{peak:.1f}'} |")
    for name, r in report["recovery"].items():
        lines.append(f"{name} after {r['after']}: p99 (after {SETTLE_S:g} s) "
                     f"{r['p99_settled_ms']:.2f} ms = {r['p99_over_baseline']:.2f}x baseline; "
                     f"first window within the baseline p99 after "
                     f"{r['time_to_normal_s']:.2f} s")
    memory = report["memory"]
    lines.append(f"RSS MB: baseline {memory['baseline_mb']:.1f}, peak {memory['peak_mb']:.1f} "
                 f"({memory['peak_over_baseline']:.2f}x), end {memory['end_mb']:.1f} (retained "
                 f"{memory['retained_after_load']:+.1%}, growth after the load "
                 f"{memory['growth_after_load']:+.1%})")
    run_figures = report["run"]
    lines.append(f"run: {run_figures['windows']} windows, skipped {run_figures['skipped']} "
                 f"(sequence gaps {run_figures['sequence_gaps']}), truncated spikes "
                 f"{run_figures['truncated_spikes']}, recorder dropped "
                 f"{run_figures['recorder_dropped']}")
    lines += [f"{'met' if ok else 'NOT met'}: {target}" for target, ok in
              report["targets"].items()]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path:
    """Latency per window and the run's RSS over time, phases shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace = report["trace"]
    figure, (latency, memory) = plt.subplots(2, 1, figsize=(10, 6), sharex=True,
                                             gridspec_kw={"height_ratios": [2, 1]})
    latency.plot(trace["window_t_s"], trace["latency_ms"], ".", markersize=2, color="tab:blue")
    latency.axhline(report["phases"]["baseline"]["latency_ms"]["p99"] * RECOVERY_FACTOR,
                    color="tab:red", linestyle=":", label=f"{RECOVERY_FACTOR}x baseline p99")
    latency.set_yscale("log")
    latency.set_ylabel("latency, ms")
    latency.legend(loc="upper left")
    memory.plot(trace["rss_t_s"], trace["rss_mb"], color="tab:purple")
    memory.set_ylabel("rtnf run RSS, MB")
    memory.set_xlabel("seconds from the baseline's start")
    for index, phase in enumerate(trace["phases"]):
        for axis in (latency, memory):
            axis.axvspan(phase["start_s"], phase["end_s"], alpha=0.12,
                         color=("tab:grey", "tab:orange")[index % 2])
        latency.text((phase["start_s"] + phase["end_s"]) / 2, 1.01, phase["name"],
                     transform=latency.get_xaxis_transform(), ha="center", va="bottom",
                     fontsize=8)
    figure.suptitle(f"rtnf under overload ({report['preset']}, {report['backend']})", y=0.995)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


if __name__ == "__main__":
    generate_load(json.loads(Path(sys.argv[1]).read_text()))
