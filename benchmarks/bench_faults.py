"""Fault injection, long form (`rtnf.bench.faults`), written to benchmarks/results/faults.json.

    python benchmarks/bench_faults.py [--kill-trials 50] [--restarts 10] [--seconds 20]

Every fault of rtnf.bench.faults, injected for real, more often and for longer than
tests/test_faults.py does: spike sources restarted many times (ZeroMQ, LSL), the behaviour
stream gone, stalled output consumers, the Bpod port unplugged again and again, unwritable and
full disks, the engine failing (with and without a ridge decoder to fall back to), SIGTERM
during flushes, kill -9 of `rtnf run` at random points and of `rtnf calibrate` writing a bundle.
Per fault: trials, how many the run survived (the checks of the tests), what the operator saw
(the warning and error lines), the counters and the data lost. About 9 minutes with the
defaults on a 2-core machine. LSL stays on this machine (LSLAPICFG points at the loopback-only
configuration before pylsl loads).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
LOOPBACK = Path(__file__).parents[1] / "tests" / "lsl-loopback.cfg"
# The calibration of tests/test_faults.py: small, from scratch, with baselines.
TINY = ["simulation.sessions=1", "simulation.neurons=30", "simulation.minutes=1.2",
        "simulation.seed=7", "model.n_embd=32", "model.n_head=2", "model.n_current_layers=1",
        "model.n_history_layers=1", "model.n_frame_encoder_layers=1", "model.n_frame_layers=1",
        "model.n_decoder_layers=1", "training.batch_size=16", "training.max_steps=20",
        "training.eval_every=20", "calibration.max_epochs=2", "calibration.patience=1",
        "calibration.method=scratch"]
Report = dict[str, Any]


def _bundles(workdir: Path) -> dict[str, Any]:
    """The bundles the faults run on (as tests/test_faults.py's fixtures)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from random_bundle import write_bundle

    from rtnf.bench.untrained_bundle import write_untrained_bundle
    from rtnf.bundle import load_bundle
    from rtnf.config import load_config
    from rtnf.data.io import write_session
    from rtnf.data.sim import simulate
    from rtnf.train.calibrate import calibrate

    config = load_config(overrides=TINY)
    (session,) = simulate(config.simulation, config.rig.profile)
    calibrate(session, config, workdir / "calibrated", source={"kind": "bench"},
              log=lambda _: None)
    write_session(session, workdir / "session.npz")
    (wide_session,) = simulate(load_config(overrides=["simulation.neurons=400",
                                                      "simulation.minutes=0.1"]).simulation,
                               "ephys")
    return {
        "calibrated": workdir / "calibrated", "session": workdir / "session.npz",
        "untrained": write_untrained_bundle(session, config, workdir / "untrained"),
        "frameless": load_bundle(write_bundle(session, workdir / "frameless",
                                              behavior_inputs=(), frames=False)),
        "behaving": load_bundle(write_bundle(session, workdir / "behaving",
                                             behavior_inputs=("speed",), frames=False)),
        "wide": load_bundle(write_bundle(wide_session, workdir / "wide", behavior_inputs=(),
                                         frames=False)),
    }


def _whole(record: Report) -> bool:
    return bool(record.get("opens") and record["inputs_numbered_in_order"]
                and record["outputs_in_step"] and record["decoded_sequence_increasing"])


def _entry(fault: str, reports: list[Report], survived: Callable[[Report], bool],
           lost: Callable[[Report], Any] = lambda _: None) -> Report:
    """One fault's figures over its trials."""
    seen: list[str] = []
    for report in reports:
        errors = report.get("sink_errors", {})
        reasons = [reason for counts in errors.values() if isinstance(counts, dict)
                   for reason in counts] + [reason for reason, count in errors.items()
                                            if isinstance(count, int)]
        for line in report.get("warnings", []) + [report.get("error_line") or ""] + reasons:
            line = re.sub(r"\d+(\.\d+)?", "N", line)  # one line per kind of message
            if line and line not in seen:
                seen.append(line)
    return {"fault": fault, "trials": len(reports),
            "survived": sum(bool(survived(report)) for report in reports),
            "operator_saw": seen, "data_lost": [lost(report) for report in reports],
            "reports": reports}


def _cli_error(arguments: list[str]) -> Report:
    """`rtnf run` in this process: its exit status and last error line."""
    from rtnf.cli import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        status = main(arguments)
    return {"exit_status": status, "error_line": stderr.getvalue().strip().splitlines()[-1]}


def _unwritable(calibrated: Path, workdir: Path) -> list[Report]:
    from rtnf.bench import faults

    (workdir / "a-file").write_text("not a directory")
    reports = []
    for where in (workdir / "a-file" / "runs", Path("/proc/rtnf-runs")):
        config = faults.run_config(workdir, recording=where)
        reports.append(_cli_error(faults.run_arguments(calibrated, config, where / "run",
                                                       "--seconds", "2")) | {"where": str(where)})
    return reports


def run(args: argparse.Namespace, workdir: Path) -> list[Report]:
    import numpy as np

    from rtnf.bench import faults

    bundles = _bundles(workdir)
    rng = np.random.default_rng(args.seed)
    calibrated = bundles["calibrated"]
    entries = []

    def timed(name: str, make: Callable[[], list[Report]]) -> list[Report]:
        started = time.monotonic()
        reports = make()
        print(f"{name}: {len(reports)} trials in {time.monotonic() - started:.0f} s", flush=True)
        return reports

    for transport, restarts in (("zmq", args.restarts), ("lsl", max(2, args.restarts // 3))):
        reports = timed(f"{transport} restarts", lambda t=transport, n=restarts: [
            faults.source_restarts(bundles["frameless"], t, n, workdir)])
        entries.append(_entry(
            f"spike source killed and restarted {restarts}x ({transport})", reports,
            # LSL: liblsl may hand over a last chunk of the old stream while it re-attaches
            # (silent, back, silent, back): up to two closed gaps per restart (as the test).
            lambda r, n=restarts, t=transport: (
                r["counters"].get("reconnects") == r["counters"].get("source_gaps")
                and n <= r["counters"].get("reconnects", 0) <= (n if t == "zmq" else 2 * n)
                and _whole(r["record"])
                and r["record"]["decoded_sequence_gaps"] == r["skipped"]
                and r["windows_after_last_restart"] > 0),
            lambda r: {"windows_skipped": r["skipped"],
                       "late_spikes": r["counters"].get("late_spikes", 0)}))
    reports = timed("behaviour gone", lambda: [faults.behavior_disappears(
        bundles["behaving"], workdir, seconds=args.seconds / 2)])
    entries.append(_entry("behaviour stream disappeared", reports, lambda r: (
        r["counters"]["source_gaps"] == 1 and r["windows_after_gap"] > 0
        and r["decoded_finite_after_gap"] and _whole(r["record"])),
        lambda r: {"behavior_samples_after_gap": r["behavior_recorded_after_gap"]}))
    reports = timed("stalled consumers", lambda: [faults.stalled_consumers(
        bundles["wide"], workdir, seconds=args.seconds)])
    entries.append(_entry("output consumers stopped reading", reports, lambda r: (
        r["latency_ms"]["p99"] < r["hop_ms"] and r["skipped"] == 0),
        lambda r: {"zmq_dropped": sum(r["sink_errors"]["zmq"].values()),
                   "latency_p99_ms": r["latency_ms"]["p99"],
                   "publish_max_ms": r["publish_ms"]["max"]}))
    reports = timed("bpod port", lambda: [faults.bpod_port_returns(
        bundles["frameless"], workdir, vanishes=args.restarts // 2)])
    entries.append(_entry("Bpod App port vanished and returned", reports, lambda r: (
        all(count > 0 for count in r["bytes_per_plug_in"]) and r["all_bytes_are_the_soft_code"]
        and r["skipped"] == 0),
        lambda r: {"commands_dropped": sum(count for reason, count in r["sink_errors"].items()
                                           if "dropped" in reason)}))
    reports = timed("unwritable", lambda: _unwritable(calibrated, workdir))
    entries.append(_entry("unwritable run directory", reports, lambda r: (
        r["exit_status"] == 2 and "recording.directory: cannot record into" in r["error_line"])))
    reports = timed("disk full", lambda: [faults.disk_full(calibrated, workdir, 64 * 1024,
                                                           max(6.0, args.seconds / 2))])
    entries.append(_entry("disk full mid-run", reports, lambda r: (
        r["exit_status"] == 2 and len(r["warnings"]) == 1 and _whole(r["record"])),
        lambda r: {"dropped": r["summary"]["recording"]["dropped"],
                   "written": r["record"]["records"], "how": r["how"]}))
    reports = timed("engine", lambda: [
        faults.engine_fails(calibrated, workdir, 30, args.seconds / 2),
        faults.engine_fails(bundles["untrained"], workdir, 30, args.seconds, "auto")])
    entries.append(_entry("engine raised mid-run (ridge fallback, then none)", reports,
                          lambda r: (r["fallback"] is not None and r["exit_status"] == 0)
                          or (r["fallback"] is None and r["exit_status"] == 2
                              and len(r["failures"]) == 1),
                          lambda r: {"windows_skipped": r["counters"].get("engine_skipped", 0)}))
    reports = timed("sigterm", lambda: [faults.sigterm_during_flush(calibrated, workdir, rng)
                                        for _ in range(args.sigterm_trials)])
    reports += timed("sigterm final flush", lambda: [
        faults.sigterm_during_final_flush(calibrated, workdir) for _ in range(3)])
    entries.append(_entry("SIGTERM during a flush (last 3: during the final flush)", reports,
                          lambda r: r["exit_status"] == 0 and r["record"]["finished"]
                          and _whole(r["record"])))
    reports = timed("kill -9", lambda: [faults.kill9_trial(calibrated, workdir, rng, 4.0)
                                        for _ in range(args.kill_trials)])
    entries.append(_entry("kill -9 of rtnf run at a random point", reports, lambda r: (
        _whole(r["record"]) and r["record"]["gaps_are_skipped_windows"]
        and r["record"]["oldest_lost_s_before_kill"] <= r["record"]["flush_interval_s"] + 0.3),
        lambda r: {"windows_lost": r["record"]["windows_lost"],
                   "oldest_lost_s_before_kill": r["record"]["oldest_lost_s_before_kill"]}))
    reports = timed("calibration kill", lambda: [faults.calibration_kill_trial(
        calibrated, bundles["session"], workdir, TINY, rng, mid_write=k % 2 == 0)
        for k in range(args.calibration_trials)])
    entries.append(_entry("calibration killed (even trials: mid-write)", reports,
                          lambda r: r["verifies"], lambda r: r.get("holds")))
    return entries


def format_table(entries: list[Report]) -> str:
    lines = ["| fault | trials | survived | the operator saw (first line) | data lost |",
             "|---|---:|---:|---|---|"]
    for entry in entries:
        saw = (entry["operator_saw"] or ["(nothing)"])[0]
        lost = [item for item in entry["data_lost"] if item is not None]
        lost_text = _lost_summary(lost) if lost else "-"
        lines.append(f"| {entry['fault']} | {entry['trials']} | {entry['survived']} | "
                     f"{saw[:90]} | {lost_text} |")
    return "\n".join(lines)


def _lost_summary(lost: list[Any]) -> str:
    """Numbers: median and max over trials; anything else: the distinct values."""
    if all(isinstance(item, dict) for item in lost):
        keys = lost[0].keys()
        parts = []
        for key in keys:
            values = [item[key] for item in lost]
            if all(isinstance(v, (int, float)) for v in values):
                ordered = sorted(values)
                parts.append(f"{key} median {ordered[len(ordered) // 2]:g} max {ordered[-1]:g}")
            else:
                parts.append(f"{key} {values[0]}")
        return "; ".join(parts)
    return ", ".join(sorted({str(item) for item in lost}))


def main() -> None:
    os.environ.setdefault("LSLAPICFG", str(LOOPBACK))
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-trials", type=int, default=50)
    parser.add_argument("--calibration-trials", type=int, default=10)
    parser.add_argument("--sigterm-trials", type=int, default=10)
    parser.add_argument("--restarts", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rtnf-faults-") as scratch:
        entries = run(args, Path(scratch))
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": platform.python_version()},
              "settings": vars(args), "minutes": round((time.monotonic() - started) / 60, 1),
              "faults": entries}
    out = RESULTS / "faults.json"
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(format_table(entries), f"\nwrote {out}", sep="")


if __name__ == "__main__":
    main()
