"""Calibration curve: held-out decoding r against minutes of calibration data.

    python benchmarks/bench_calibration_curve.py [--rigs 2p ephys] [--seeds 0 1 2]
                                                 [--minutes 0.5 1 2 5] [--budget 1.0]

Per rig (2p: 386 units; ephys: 150 units) and seed: simulate four days of one animal (8 minutes
each); pretrain rt-small on days 1-3 (the default checkpoint's recipe); then, on day 4, which
pretraining never saw, calibrate on its first M minutes with each method (pretrained +
`embeddings`, pretrained + `full`, `scratch`) and score every model on the same test block, day
4's last 2 minutes (`rtnf evaluate`'s code), so every point of the curve is measured on the same
held-out time. Ridge and GRU are fitted by each calibration on exactly its training windows;
they are reported from the `embeddings` runs (the other runs fit the same). Finetuning runs
within `--budget` minutes (calibration.max_minutes).

Writes benchmarks/results/calibration_curve.json (every run and the mean and spread over seeds)
and calibration_curve.png, and prints a table of mean r per target.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rtnf import __version__
from rtnf.bundle import load_bundle
from rtnf.config import Config, load_config
from rtnf.data.sim import simulate
from rtnf.train.calibrate import calibrate
from rtnf.train.evaluate import evaluate_bundle
from rtnf.train.pretrain import DEFAULT_RECIPE, pretrain

RESULTS = Path(__file__).parent / "results"
RIGS = {"2p": ("2p", 386), "ephys": ("ephys", 150)}
METHODS = ("embeddings", "full", "scratch")
BASELINES = ("ridge", "gru")
TARGETS = ("speed", "gaze_phi", "gaze_theta")
DAY_MINUTES, TEST_MINUTES = 8.0, 2.0


def animal_config(rig: str, seed: int) -> Config:
    profile, units = RIGS[rig]
    return load_config(overrides=[
        "model.preset=rt-small", *DEFAULT_RECIPE, "simulation.sessions=4",
        f"simulation.minutes={DAY_MINUTES}", f"simulation.neurons={units}",
        f"simulation.seed={seed}", f"rig.profile={profile}", f"training.seed={seed}"])


def run_animal(rig: str, seed: int, minutes: list[float], budget: float, work: Path,
               log) -> list[dict]:
    """Every (minutes, method) calibration of one animal, scored on day 4's test block."""
    config = animal_config(rig, seed)
    days = simulate(config.simulation, config.rig.profile)
    pretrained = work / f"{rig}-{seed}-pretrained"
    started = time.monotonic()
    pretrain(days[:3], config, pretrained, show_progress=False)
    log(f"{rig} seed {seed}: pretrained on days 1-3 in {time.monotonic() - started:.0f} s")
    day = days[3]
    test_start = day.end_time - TEST_MINUTES * 60
    runs = []
    for length in minutes:
        for method in METHODS:
            calibration = load_config(overrides=[
                "model.preset=rt-small", f"rig.profile={config.rig.profile}",
                f"calibration.method={method}", f"calibration.max_minutes={budget}",
                f"training.seed={seed}"])
            out = work / f"{rig}-{seed}-{length:g}-{method}"
            started = time.monotonic()
            calibrate(day.first(length * 60), calibration, out,
                      pretrained=None if method == "scratch" else pretrained,
                      log=lambda _: None)
            result = evaluate_bundle(load_bundle(out), day, start_s=test_start)
            models = result["models"]
            run = {"rig": rig, "seed": seed, "minutes": length, "method": method,
                   "seconds": round(time.monotonic() - started, 1),
                   "r": {name: {t: models[name][t]["r"] for t in TARGETS}
                         for name in ("neuroformer", *BASELINES)},
                   "test_s": result["heldout_s"]}
            runs.append(run)
            log(f"  {length:g} min {method:10s}: speed r {run['r']['neuroformer']['speed']:.3f} "
                f"(ridge {run['r']['ridge']['speed']:.3f}, gru {run['r']['gru']['speed']:.3f})"
                f" in {run['seconds']:.0f} s")
    return runs


def curves(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of r, per rig, series, minutes and target."""
    series: dict = {}
    for run in runs:
        entries = [(f"pretrained+{run['method']}" if run["method"] != "scratch" else "scratch",
                    run["r"]["neuroformer"])]
        if run["method"] == "embeddings":
            entries += [(name, run["r"][name]) for name in BASELINES]
        for name, r in entries:
            point = series.setdefault(run["rig"], {}).setdefault(name, {}).setdefault(
                f"{run['minutes']:g}", {t: [] for t in TARGETS})
            for target in TARGETS:
                point[target].append(r[target])
    return {rig: {name: {length: {t: {"mean": float(np.mean(v)), "std": float(np.std(v)),
                                      "seeds": len(v)} for t, v in point.items()}
                         for length, point in by_length.items()}
                  for name, by_length in by_name.items()}
            for rig, by_name in series.items()}


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rigs = list(summary)
    figure, axes = plt.subplots(len(rigs), len(TARGETS), figsize=(4 * len(TARGETS),
                                                                   3.2 * len(rigs)),
                                squeeze=False)
    for row, rig in enumerate(rigs):
        for column, target in enumerate(TARGETS):
            axis = axes[row][column]
            for name, by_length in summary[rig].items():
                lengths = sorted(by_length, key=float)
                mean = [by_length[m][target]["mean"] for m in lengths]
                spread = [by_length[m][target]["std"] for m in lengths]
                axis.errorbar([float(m) for m in lengths], mean, yerr=spread, marker="o",
                              capsize=3, label=name)
            axis.set_xscale("log")
            axis.minorticks_off()
            ticks = sorted({float(m) for by_length in summary[rig].values() for m in by_length})
            axis.set_xticks(ticks, [f"{tick:g}" for tick in ticks])
            axis.set_xlabel("calibration data (minutes)")
            axis.set_ylabel(f"{target} r (test block)")
            axis.set_title(f"{rig}: {target}")
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def table(summary: dict) -> str:
    lines = []
    for rig, by_name in summary.items():
        lengths = sorted(next(iter(by_name.values())), key=float)
        lines += [f"{rig}: mean r on the test block (speed / gaze_phi / gaze_theta)",
                  "| series | " + " | ".join(f"{m} min" for m in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for name, by_length in by_name.items():
            cells = [" / ".join(f"{by_length[m][t]['mean']:.2f}" for t in TARGETS)
                     for m in lengths]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rigs", nargs="+", default=list(RIGS), choices=list(RIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--minutes", nargs="+", type=float, default=[0.5, 1.0, 2.0, 5.0])
    parser.add_argument("--budget", type=float, default=1.0,
                        help="finetuning minutes per calibration (calibration.max_minutes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "calibration_curve.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as work:
        for rig in args.rigs:
            for seed in args.seeds:
                runs += run_animal(rig, seed, args.minutes, args.budget, Path(work),
                                   lambda line: print(line, flush=True))
    summary = curves(runs)
    report = {"benchmark": "calibration_curve", "rtnf": __version__,
              "machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": args.threads},
              "setup": {"rigs": {r: {"profile": RIGS[r][0], "units": RIGS[r][1]}
                                 for r in args.rigs},
                        "seeds": args.seeds, "minutes": args.minutes,
                        "finetune_budget_min": args.budget, "day_minutes": DAY_MINUTES,
                        "test_block_min": TEST_MINUTES, "preset": "rt-small"},
              "summary": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(summary, args.out.with_suffix(".png"))
    print(table(summary), f"\nwrote {args.out} and {args.out.with_suffix('.png')}", sep="\n")


if __name__ == "__main__":
    main()
