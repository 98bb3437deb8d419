"""Fuzzing, long form: the properties of tests/test_fuzz.py (targets, inputs and contract in
tests/fuzz_targets.py) with many more inputs per parser, every outcome counted.

Per parser: inputs tried, valid, rejected (by error type and reason), crashes (any other
exception, or a broken contract: an unclear error, a wrong result, code run from the input, a
runaway allocation), hangs (over fuzz_targets.HANG_S seconds), wall time and the slowest input.
Crashes and hangs are kept with the input that caused them (shortened). Inputs come from a
seeded hypothesis run (generation only, no shrinking), so a figure is reproduced with the same
command. Writes benchmarks/results/fuzz.json and prints a table.

    python benchmarks/bench_fuzz.py [--examples 20000] [--file-examples 500] [--seed 0]
                                    [--targets zmq_csv,openephys] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("LSLAPICFG", str(REPO / "tests" / "lsl-loopback.cfg"))

import hypothesis
from fuzz_targets import TARGETS_BY_NAME, Hang, Target, check
from hypothesis import HealthCheck, Phase, given, settings

KEPT_FAILURES = 5
SHOWN_CHARS = 300


def fuzz(target: Target, examples: int, seed: int) -> dict[str, Any]:
    """Run `examples` inputs through `target` and count what happened."""
    outcomes: Counter = Counter()
    failures: list[dict[str, str]] = []
    slowest = [0.0, ""]

    def failed(kind: str, error: BaseException, value: object) -> None:
        outcomes[f"{kind}: {type(error).__name__}"] += 1
        if len(failures) < KEPT_FAILURES:
            failures.append({"kind": kind, "error": f"{type(error).__name__}: {error}"[:500],
                             "input": repr(value)[:SHOWN_CHARS]})

    @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @hypothesis.seed(seed)
    @given(target.inputs)
    def one_input(value: object) -> None:
        started = time.perf_counter()
        try:
            outcomes[check(target, value)] += 1
        except Hang as error:
            failed("hang", error, value)
        except Exception as error:  # noqa: BLE001 (ContractViolation too): counted, not fatal
            failed("crash", error, value)
        elapsed = time.perf_counter() - started
        if elapsed > slowest[0]:
            slowest[:] = [elapsed, repr(value)[:SHOWN_CHARS]]

    started = time.perf_counter()
    one_input()
    wall = time.perf_counter() - started
    tried = sum(outcomes.values())
    crashes = sum(n for label, n in outcomes.items() if label.startswith("crash: "))
    hangs = sum(n for label, n in outcomes.items() if label.startswith("hang: "))
    return {
        "inputs": tried, "valid": outcomes["valid"],
        "rejected": tried - outcomes["valid"] - crashes - hangs,
        "crashes": crashes, "hangs": hangs, "wall_s": round(wall, 2),
        "inputs_per_s": round(tried / wall, 1) if wall else None,
        "slowest_input_ms": round(slowest[0] * 1e3, 2), "slowest_input": slowest[1],
        "rejected_by_reason": dict(sorted(
            (label, n) for label, n in outcomes.items()
            if label != "valid" and not label.startswith(("crash: ", "hang: ")))),
        "failures": failures,
    }


def table(results: dict[str, dict]) -> str:
    lines = [("| parser | inputs | valid | rejected | reasons | crashes | hangs | wall s "
              "| slowest ms |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, result in results.items():
        lines.append(f"| {name} | {result['inputs']} | {result['valid']} | "
                     f"{result['rejected']} | {len(result['rejected_by_reason'])} | "
                     f"{result['crashes']} | {result['hangs']} | {result['wall_s']} | "
                     f"{result['slowest_input_ms']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20000,
                        help="inputs per in-memory parser (messages)")
    parser.add_argument("--file-examples", type=int, default=500,
                        help="inputs per file reader (sessions, config, manifest, run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", default=",".join(TARGETS_BY_NAME),
                        help="comma-separated parsers, of: " + ", ".join(TARGETS_BY_NAME))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fuzz.json")
    args = parser.parse_args()
    command = "python benchmarks/bench_fuzz.py " + " ".join(sys.argv[1:])
    results = {}
    for name in args.targets.split(","):
        target = TARGETS_BY_NAME[name]
        examples = args.file_examples if target.file_based else args.examples
        results[name] = fuzz(target, examples, args.seed)
        print(f"{name}: {results[name]['inputs']} inputs, {results[name]['crashes']} crashes, "
              f"{results[name]['hangs']} hangs, {results[name]['wall_s']} s", flush=True)
    report = {
        "command": command.strip(), "seed": args.seed,
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version()},
        "versions": {"hypothesis": hypothesis.__version__},
        "totals": {key: sum(result[key] for result in results.values())
                   for key in ("inputs", "valid", "rejected", "crashes", "hangs")},
        "parsers": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(results))
    print(f"totals: {report['totals']}; wrote {args.out}")
    return 1 if report["totals"]["crashes"] or report["totals"]["hangs"] else 0


if __name__ == "__main__":
    sys.exit(main())
