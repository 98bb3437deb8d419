"""Spikes -> (unit, dt) tokens: microseconds to tokenize one window (current + history).

Three rigs, each a few minutes of the simulated rig (`rtnf.data.sim`, seed 0):
  2p-386     386 units, 2p profile: deconvolved events on 30 Hz imaging frames
  2p-2000    2000 units, 2p profile
  ephys-300  300 units, ephys profile: spike times on a 30 kHz sample clock
Windows: hop 50 ms, current 50 ms, history 150 ms, 10 ms bins, capacities 100 / 700.

The real-time path, `tokenize_window` at one window end, is timed with perf_counter_ns at every
window end of the session, the rigs interleaved window by window so that machine noise falls on all
of them alike; figures are the median, p99 and max over all those windows and repeats. The batch
path (`tokenize_windows` over every window end at once, as for a training set) is reported too, as
microseconds per window. Writes benchmarks/results/tokens.json and prints a markdown table.

    python benchmarks/bench_tokens.py [--repeats N] [--minutes M] [--out PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtnf.config import SimulationConfig, WindowsConfig
from rtnf.data.sim import simulate
from rtnf.tokens import TokenSpec, tokenize_window, tokenize_windows, window_ends

WINDOWS = WindowsConfig(hop=0.05, current=0.05, history=0.15, dt_resolution=0.01,
                        current_capacity=100, history_capacity=700)
SEED = 0


@dataclass(frozen=True)
class Rig:
    """A simulated recording: how many units, which rig profile."""

    name: str
    n_units: int
    profile: str


RIGS = (
    Rig("2p-386", 386, "2p"),
    Rig("2p-2000", 2000, "2p"),
    Rig("ephys-300", 300, "ephys"),
)


def simulated_spikes(rig: Rig, minutes: float) -> tuple[np.ndarray, np.ndarray]:
    """(spike times, unit indices) of one simulated session of `rig`."""
    (session,) = simulate(SimulationConfig(neurons=rig.n_units, minutes=minutes, seed=SEED),
                          rig.profile)
    return session.spike_times, session.spike_unit_index


def percentiles(samples_ns: np.ndarray) -> dict[str, float]:
    """Median, p99, max and mean of nanosecond samples, in microseconds."""
    us = samples_ns / 1e3
    return {"median_us": float(np.median(us)), "p99_us": float(np.percentile(us, 99)),
            "max_us": float(us.max()), "mean_us": float(us.mean())}


def run(repeats: int, minutes: float) -> dict:
    seconds = minutes * 60.0
    ends = window_ends(0.0, seconds, WINDOWS, full_history=True)
    sessions = {rig.name: simulated_spikes(rig, minutes) for rig in RIGS}
    specs = {rig.name: TokenSpec.from_config(WINDOWS, rig.n_units) for rig in RIGS}

    window_ns = {rig.name: np.empty((repeats, ends.size), dtype=np.int64) for rig in RIGS}
    for rig in RIGS:  # warm-up: first calls pay for imports and allocator growth
        tokenize_window(*sessions[rig.name], float(ends[0]), specs[rig.name])
    for repeat in range(repeats):
        for i, end in enumerate(ends.tolist()):
            for rig in RIGS:
                times, units = sessions[rig.name]
                start = time.perf_counter_ns()
                tokenize_window(times, units, end, specs[rig.name])
                window_ns[rig.name][repeat, i] = time.perf_counter_ns() - start

    results = {}
    for rig in RIGS:
        times, units = sessions[rig.name]
        batch = tokenize_windows(times, units, ends, specs[rig.name])  # warm-up; statistics below
        batch_ns = []
        for _ in range(repeats):
            start = time.perf_counter_ns()
            tokenize_windows(times, units, ends, specs[rig.name])
            batch_ns.append(time.perf_counter_ns() - start)
        results[rig.name] = {
            "rig": dataclasses.asdict(rig),
            "n_spikes": int(times.size),
            "mean_rate_hz_measured": times.size / rig.n_units / seconds,
            "mean_current_spikes": float(batch.current.n_spikes.mean()),
            "mean_history_spikes": float(batch.history.n_spikes.mean()),
            "windows_truncated": int(np.count_nonzero(batch.current.truncated
                                                      + batch.history.truncated)),
            "one_window": percentiles(window_ns[rig.name].ravel()),
            "batch_us_per_window": float(np.median(batch_ns)) / 1e3 / ends.size,
        }
    return {
        "benchmark": "tokens",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
            "numpy": np.__version__,
        },
        "config": {
            "windows": dataclasses.asdict(WINDOWS),
            "session_minutes": minutes,
            "n_windows": int(ends.size),
            "repeats": repeats,
            "timed_windows_per_rig": int(ends.size * repeats),
            "seed": SEED,
        },
        "results": results,
    }


def markdown_table(report: dict) -> str:
    lines = ["| rig | units | spikes / window (cur + hist) | windows truncated | median us "
             "| p99 us | max us | batch us / window |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["results"].items():
        one = r["one_window"]
        lines.append(
            f"| {name} | {r['rig']['n_units']} "
            f"| {r['mean_current_spikes']:.1f} + {r['mean_history_spikes']:.1f} "
            f"| {r['windows_truncated']} / {report['config']['n_windows']} "
            f"| {one['median_us']:.1f} | {one['p99_us']:.1f} | {one['max_us']:.1f} "
            f"| {r['batch_us_per_window']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3,
                        help="passes over every window end of the session (default 3)")
    parser.add_argument("--minutes", type=float, default=5.0,
                        help="length of each simulated session (default 5)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "tokens.json")
    args = parser.parse_args()
    report = run(args.repeats, args.minutes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(report))
    print(f"\n{report['config']['timed_windows_per_rig']} windows per rig; wrote {args.out}")


if __name__ == "__main__":
    main()
