"""`rtnf bench latency`: decision latency end to end (BENCHMARKS.md section 1).

Three processes per configuration (`rtnf.rt.closed_loop`): the simulated rig streams spikes,
behaviour and frames over LSL in real time, each spike stamped with its own time; `rtnf run`
decodes it with the configured preset (untrained weights: latency does not depend on them) on
the configured CPU backend; this process receives `rtnf-decoded` with a plain pylsl inlet. For
window k ending at t_k, latency = the receiver's LSL clock at arrival - t_k.

Configurations: 2p 386 units 50 ms hop; 2p 2000 units 50 ms hop; ephys 300 units 20 ms hop
(150 ms history throughout). Reported per configuration: latency p50/p99/p99.9/max, windows
received, missed (latency over one hop), skipped (the loop fell behind and moved on), lost in
transit (sequence gaps not explained by skips), late spikes, and the loop's own stage times.
"""

from __future__ import annotations

import dataclasses
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rtnf.bench.untrained_bundle import write_untrained_bundle
from rtnf.config import Config, load_config
from rtnf.data.sim import simulate
from rtnf.engine.compile import compile_bundle
from rtnf.rt.closed_loop import free_tcp_port, run_against_simulated_rig
from rtnf.stream.lslconfig import import_pylsl

CONFIGURATIONS = {
    "2p-386": {"profile": "2p", "neurons": 386, "hop": 0.05},
    "2p-2000": {"profile": "2p", "neurons": 2000, "hop": 0.05},
    "ephys-300": {"profile": "ephys", "neurons": 300, "hop": 0.02},
}
TARGETS = {"2p-386": {"p50": 2.0, "p99": 5.0, "missed": 0}, "2p-2000": {"p99": 10.0}}
SEED = 11


def measure(config: Config, name: str, seconds: float, workdir: Path) -> dict[str, Any]:
    """One configuration: bundle, compile, three processes, the figures."""
    setup = CONFIGURATIONS[name]
    minutes = seconds / 60 + 0.75
    overrides = [f"rig.profile={setup['profile']}", f"windows.hop={setup['hop']}",
                 f"simulation.neurons={setup['neurons']}", f"simulation.minutes={minutes}",
                 f"simulation.seed={SEED}", "simulation.sessions=1"]
    bench_config = load_config(overrides=overrides)
    bench_config = dataclasses.replace(bench_config, model=config.model, engine=config.engine,
                                       realtime=config.realtime)
    (session,) = simulate(bench_config.simulation, setup["profile"])
    bundle = write_untrained_bundle(session, bench_config, workdir / "bundle")
    engine = compile_bundle(bundle, bench_config.engine)
    run_config = workdir / "run.yaml"
    run_config.write_text(yaml.safe_dump({
        "rig": {"profile": setup["profile"], "sources": {"frames": {"kind": "lsl"}}},
        "engine": dataclasses.asdict(config.engine),
        "realtime": dataclasses.asdict(config.realtime),
        "outputs": {"zmq": {"address": f"tcp://127.0.0.1:{free_tcp_port()}"}},
        "recording": {"directory": str(workdir / "runs")}}))
    pylsl = import_pylsl(config.rig.lsl.config, config.rig.lsl.session_id)
    rig = ["--seed", str(SEED), "--neurons", str(setup["neurons"]), "--profile",
           setup["profile"], "--minutes", f"{minutes:g}", "--sessions", "1"]
    received, _, summary = run_against_simulated_rig(bundle, run_config, rig, seconds, workdir,
                                                     pylsl)
    latency = received.latency_ms
    return {
        "setup": {**setup, "history_s": bench_config.windows.history, "seconds": seconds},
        "backend": engine["backend"],
        "latency_ms": received.latency_summary(),
        "windows": int(received.sequence.size),
        "missed": int((latency > setup["hop"] * 1e3).sum()),
        "skipped": int(summary["skipped"]),
        "lost_in_transit": max(received.gaps() - int(summary["skipped"]), 0),
        "late_spikes": int(summary["counters"].get("late_spikes", 0)),
        "truncated_spikes": int(summary["counters"].get("truncated_spikes", 0)),
        "loop": {"latency_ms": summary["latency_ms"], "stages_ms": summary["stages_ms"]},
        "latencies_ms": np.round(latency, 4).tolist(),
    }


def run(config: Config, seconds: float = 120.0, names: tuple[str, ...] = tuple(CONFIGURATIONS)
        ) -> dict[str, Any]:
    results = {}
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"rtnf-latency-{name}-") as directory:
            results[name] = measure(config, name, seconds, Path(directory))
    targets = {}
    for name, bounds in TARGETS.items():
        if name in results:
            figures = {**results[name]["latency_ms"], "missed": results[name]["missed"]}
            targets |= {f"{name} {key} <= {bound}": figures[key] <= bound
                        for key, bound in bounds.items()}
    return {"benchmark": "latency", "preset": config.model.preset,
            "machine": {"platform": platform.platform(), "processor": platform.machine(),
                        "threads": config.engine.threads,
                        "cpu_affinity": config.realtime.cpu_affinity,
                        "priority": config.realtime.priority},
            "configurations": results, "targets": targets}


def format_table(report: dict[str, Any]) -> str:
    lines = [f"end-to-end latency, {report['preset']}, ms (receiver clock - window end)",
             "| configuration | backend | windows | p50 | p99 | p99.9 | max | missed | skipped |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, result in report["configurations"].items():
        latency = result["latency_ms"]
        lines.append(f"| {name} | {result['backend']} | {result['windows']} | "
                     f"{latency['p50']:.2f} | {latency['p99']:.2f} | {latency['p999']:.2f} | "
                     f"{latency['max']:.2f} | {result['missed']} | {result['skipped']} |")
    lines += [f"{'met' if ok else 'NOT met'}: {target}" for target, ok in report["targets"].items()]
    return "\n".join(lines)


def plot_histograms(report: dict[str, Any], path: Path) -> Path:
    """A latency histogram per configuration (log-spaced bins)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    every = np.concatenate([r["latencies_ms"] for r in report["configurations"].values()])
    bins = np.geomspace(max(every.min(), 0.05), every.max() * 1.05, 60)
    for name, result in report["configurations"].items():
        axis.hist(result["latencies_ms"], bins=bins, histtype="step", label=name)
    axis.set_xscale("log")
    ticks = [t for t in (0.5, 1, 2, 3, 5, 10, 20, 50, 100) if bins[0] <= t <= bins[-1]]
    axis.set_xticks(ticks, [f"{t:g}" for t in ticks])
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.set_xlabel("latency, ms (window end -> output received)")
    axis.set_ylabel("windows")
    axis.set_title(f"rtnf end-to-end latency, {report['preset']}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
