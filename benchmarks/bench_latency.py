"""Decision latency end to end (`rtnf bench latency`), written to benchmarks/results/.

    python benchmarks/bench_latency.py [--seconds 120] [--configurations 2p-386 2p-2000 ephys-300]

Three processes per configuration (the simulated rig over LSL, `rtnf run`, a receiver) for
`--seconds` each; writes benchmarks/results/latency.json (every latency sample included) and
latency.png (a histogram per configuration), and prints the table. LSL stays on this machine
(LSLAPICFG is pointed at the loopback-only configuration before pylsl loads).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
LOOPBACK = Path(__file__).parents[1] / "tests" / "lsl-loopback.cfg"


def main() -> None:
    os.environ.setdefault("LSLAPICFG", str(LOOPBACK))
    from rtnf.bench.latency import CONFIGURATIONS, format_table, plot_histograms, run
    from rtnf.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--configurations", nargs="+", default=list(CONFIGURATIONS))
    args = parser.parse_args()
    report = run(load_config(), args.seconds, tuple(args.configurations))
    out = RESULTS / "latency.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot_histograms(report, RESULTS / "latency.png")
    print(format_table(report), f"\nwrote {out} and {RESULTS / 'latency.png'}", sep="")


if __name__ == "__main__":
    main()
