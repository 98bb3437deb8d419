"""Soak: `rtnf run` against the simulated rig for a long time, written to benchmarks/results/.

    python benchmarks/bench_soak.py [--minutes 60]

Three processes (the simulated rig over LSL, looping over a 3-minute session; `rtnf run`;
a receiver here) on a 2p rig, 386 units, 50 ms hop, rt-small with untrained weights on ONNX
Runtime (1 thread), recording on. The RSS of `rtnf run` is sampled every 5 s. Reported: crashes,
windows, skipped, missed, RSS growth from the minute after the first (warm-up) to the end
(median of 30 s at each end; target < 5%) and its trend, latency p99 of the first vs the last
10% of the windows after the warm-up (target: within 1.5x). Writes benchmarks/results/soak.json
and soak.png (RSS and latency over the run) and prints the table; exits 1 if a target is not
met. The CI-sized form is tests/test_soak.py. LSL stays on this machine (as bench_overload.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from bench_overload import RESULTS, loopback_only

SAMPLE_EVERY_S = 5.0
WARMUP_S = 60.0
SPAN_S = 30.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rtnf-soak-") as directory:
        workdir = Path(directory)
        loopback_only(workdir)
        from rtnf.bench.soak import format_table, plot, prepare_rig, soak
        from rtnf.config import EngineConfig, load_config
        from rtnf.stream.lslconfig import import_pylsl

        config = dataclasses.replace(load_config(),
                                     engine=EngineConfig(backend="onnxruntime", threads=1))
        rig = prepare_rig(config, workdir, profile="2p", neurons=386, hop=0.05, minutes=3.0,
                          seed=11)
        report = soak(rig, args.minutes * 60, workdir, import_pylsl(), SAMPLE_EVERY_S,
                      WARMUP_S, SPAN_S)
    report["preset"] = config.model.preset
    out = RESULTS / "soak.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, RESULTS / "soak.png")
    print(format_table(report), f"\nwrote {out} and {RESULTS / 'soak.png'}", sep="")
    sys.exit(0 if all(report["targets"].values()) else 1)


if __name__ == "__main__":
    main()
