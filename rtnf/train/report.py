"""The calibration report: metrics.json, report.md and PNG plots, for the operator at the rig.

report.md opens with the verdict in one line (GO: the model runs; NO-GO: the ridge fallback
runs, and why), then the tables: decoding on held-out time and on validation for Neuroformer
and every baseline, and next-window bits/spike. Plots (when matplotlib is installed, the
`report` extra): decoded vs true traces on held-out time for each target, and the finetuning
curve.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def _decoding_table(scores: dict[str, dict[str, Any]], targets: tuple[str, ...]) -> list[str]:
    header = "| decoder | " + " | ".join(f"{t} r | {t} R^2" for t in targets) + " | R^2 (weighted) |"
    lines = [header, "|---" * (2 * len(targets) + 2) + "|"]
    for name, score in scores.items():
        cells = " | ".join(f"{score['r'][t]:.3f} | {score['r2'][t]:.3f}" for t in targets)
        lines.append(f"| {name} | {cells} | {score['r2_weighted']:.3f} |")
    return lines


def markdown(metrics: dict[str, Any], targets: tuple[str, ...]) -> str:
    verdict = metrics["verdict"]
    session = metrics["session"]
    go = "GO: the Neuroformer decoder will run" if verdict["go"] else (
        "NO-GO: the ridge (Wiener filter) fallback will run instead of Neuroformer")
    bits = metrics["next_window_bits_per_spike"]
    lines = [
        "# Calibration report", "",
        f"**{go}.** {verdict['reason']}.", "",
        f"Session: {session['units']} units ({session['known_units']} known to the pretrained "
        f"model), {session['duration_s']:.1f} s; windows {session['windows']['train']} "
        f"training / {session['windows']['validation']} validation / "
        f"{session['windows']['holdout']} held out (contiguous, at the end). Method "
        f"`{metrics['method']}`, {metrics['finetune']['epochs']} epochs (best "
        f"{metrics['finetune']['best_epoch']}); {metrics['seconds']:.0f} s in all.", "",
        "## Decoding on held-out time", "", *_decoding_table(metrics["holdout"], targets), "",
        "## Decoding on the validation block (the verdict's basis)", "",
        *_decoding_table(metrics["validation"], targets), "",
        "## Next-window activity (bits per spike vs each unit's training mean)", "",
        "| predictor | bits/spike |", "|---|---:|",
        *(f"| {name} | {value:.3f} |" for name, value in bits.items() if name != "spikes"),
        "", f"{bits['spikes']} held-out spikes.",
    ]
    return "\n".join(lines) + "\n"


def _plots(directory: Path, metrics: dict[str, Any], ends: np.ndarray, predicted: np.ndarray,
           actual: np.ndarray, targets: tuple[str, ...]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for i, name in enumerate(targets):
        figure, axis = plt.subplots(figsize=(10, 3))
        axis.plot(ends, actual[:, i], color="black", linewidth=1, label="true")
        axis.plot(ends, predicted[:, i], color="tab:blue", linewidth=1, label="Neuroformer")
        r = metrics["holdout"]["neuroformer"]["r"][name]
        axis.set(xlabel="session time (s)", ylabel=name, title=f"{name}, held out (r = {r:.2f})")
        axis.legend(loc="upper right")
        figure.tight_layout()
        figure.savefig(directory / f"decoded_{name}.png", dpi=100)
        plt.close(figure)
        written.append(f"decoded_{name}.png")
    curve = metrics["finetune"]["curve"]
    figure, axis = plt.subplots(figsize=(6, 3))
    axis.plot([c["epoch"] for c in curve], [c["validation"] for c in curve], label="validation")
    trained = [c for c in curve if "train" in c]
    axis.plot([c["epoch"] for c in trained], [c["train"] for c in trained], label="training")
    axis.set(xlabel="epoch", ylabel="loss", title="finetuning")
    axis.legend()
    figure.tight_layout()
    figure.savefig(directory / "training_curve.png", dpi=100)
    plt.close(figure)
    return [*written, "training_curve.png"]


def write_report(directory: Path, metrics: dict[str, Any], ends: np.ndarray,
                 predicted: np.ndarray, actual: np.ndarray, targets: tuple[str, ...]) -> None:
    """metrics.json, report.md and the plots into `directory` (predictions in physical units)."""
    directory.mkdir(parents=True, exist_ok=True)
    plots = _plots(directory, metrics, ends, predicted, actual, targets)
    (directory / "metrics.json").write_text(json.dumps({**metrics, "plots": plots}, indent=2))
    text = markdown(metrics, targets)
    if not plots:
        text += "\nPlots skipped: matplotlib is not installed (pip install 'rtnf[report]').\n"
    (directory / "report.md").write_text(text)
