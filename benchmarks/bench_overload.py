"""Overload and recovery on one closed-loop run, written to benchmarks/results/.

    python benchmarks/bench_overload.py [--scale 1.0]

Phases (rtnf.bench.overload.PHASES; --scale multiplies their lengths): baseline 60 s, CPU
contention 45 s (one pinned busy loop per core), calm 20 s, spike bursts at 10x (40 s) and 100x
(40 s) the session's rate, recovery 60 s; 2p rig, 386 units, 50 ms hop, rt-small with untrained
weights on ONNX Runtime (1 thread). About 6 minutes. Writes benchmarks/results/overload.json and
overload.png (latency per window and the run's RSS, phases shaded) and prints the table. LSL
stays on this machine: LSLAPICFG points at a copy of tests/lsl-loopback.cfg with a session id of
its own (so a concurrent test or benchmark cannot see these streams) before pylsl loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import uuid
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
LOOPBACK = Path(__file__).parents[1] / "tests" / "lsl-loopback.cfg"


def loopback_only(workdir: Path) -> None:
    """LSL discovery on this machine only, in a session of this run's own."""
    config = workdir / "lsl.cfg"
    config.write_text(LOOPBACK.read_text().replace(
        "SessionID = rtnf-tests", f"SessionID = rtnf-bench-{uuid.uuid4().hex[:8]}"))
    os.environ["LSLAPICFG"] = str(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="phase length factor")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rtnf-overload-") as directory:
        workdir = Path(directory)
        loopback_only(workdir)
        from rtnf.bench.overload import PHASES, format_table, plot, run
        from rtnf.config import EngineConfig, load_config

        config = dataclasses.replace(load_config(),
                                     engine=EngineConfig(backend="onnxruntime", threads=1))
        phases = tuple(dataclasses.replace(p, seconds=p.seconds * args.scale) for p in PHASES)
        report = run(config, workdir, phases)
    out = RESULTS / "overload.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, RESULTS / "overload.png")
    print(format_table(report), f"\nwrote {out} and {RESULTS / 'overload.png'}", sep="")


if __name__ == "__main__":
    main()
