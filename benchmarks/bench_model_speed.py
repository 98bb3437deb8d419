"""Model speed for both presets (`rtnf bench model`), written to benchmarks/results/.

    python benchmarks/bench_model_speed.py [--repeats N]

Runs `rtnf.bench.model_speed` for rt-small and paper in turn and writes
benchmarks/results/model_speed_<preset>.json; the table of each is printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rtnf.bench.model_speed import format_table, run
from rtnf.config import load_config

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for preset in ("rt-small", "paper"):
        report = run(load_config(overrides=[f"model.preset={preset}"]), repeats=args.repeats)
        out = RESULTS / f"model_speed_{preset}.json"
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(format_table(report), f"\nwrote {out}\n", sep="")


if __name__ == "__main__":
    main()
