"""Engine speed for both presets (`rtnf bench engine`), written to benchmarks/results/.

    python benchmarks/bench_engine_speed.py [--repeats N] [--threads T]

Runs `rtnf.bench.engine_speed` for rt-small and paper in turn (every CPU backend available here
against torch eager without caching) and writes benchmarks/results/engine_speed_<preset>.json;
the table of each is printed. On a GPU machine the same command measures the GPU backends.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rtnf.bench.engine_speed import format_table, run
from rtnf.config import load_config

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--presets", nargs="+", default=["rt-small", "paper"])
    args = parser.parse_args()
    for preset in args.presets:
        config = load_config(overrides=[f"model.preset={preset}",
                                        f"engine.threads={args.threads}"])
        report = run(config, repeats=args.repeats)
        out = RESULTS / f"engine_speed_{preset}.json"
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(format_table(report), f"\nwrote {out}\n", sep="")


if __name__ == "__main__":
    main()
