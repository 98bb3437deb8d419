"""Evidence that the model learns: next-window prediction and connectivity on simulated rigs.

Two rigs of the simulated animal (`rtnf.data.sim`, seed 0), 3 sessions (days) each:
  2p     386 units, 4 minutes per session: deconvolved 2p events on 30 Hz imaging frames
  ephys  150 units, 4 minutes per session: sorted spikes
On each, rt-small is pretrained with `pretrain` and the default checkpoint's recipe
(`DEFAULT_RECIPE`, but for the number of steps), then judged on the held-out blocks (the
contiguous trailing 10% of each session, BENCHMARKS.md sections 3 and 4):

Next-window prediction, as bits/spike against each unit's mean count per window on the training
windows (0: no better than the mean). Scored windows: every held-out window whose next window is a
held-out window too; the target is each unit's spike count in that next window [t, t + 50 ms).
  rate head    the model's next-window rates, exp(log_rates), from the window ending at t;
  generation   the mean count over K = 8 next windows sampled with `generate_window` (top-p 0.95)
               from the window ending at t + 50 ms, whose history is [t - 150 ms, t). Empirical
               means of 8 samples are often 0, so they are floored at 1e-3 / K, and a unit that
               spikes where no sample did costs log2(mean / floor) bits: the figure measures
               the samples as a rate estimate, harshly. "shrunk" counts the training mean as a
               ninth sample, (sum of the 8 + mean) / 9, which needs no floor. For scale, the
               same two estimates from 8 Poisson samples of the (start, gain) oracle's rates
               ("oracle sampled"): what 8 samples of a perfect generator would score;
  oracle       the simulator's true rates, times a per-unit gain fitted on the training windows
               (observed / true expected counts), since 2p events are deconvolved calcium events,
               not spikes (missed, merged, spurious, and stamped at their imaging frame's start);
               also raw (gain 1). Two readings of "true rates over the next window":
                 start       the true rate in the window's first 10 ms bin times 50 ms: a forecast
                             from what happened before t (the true rates are conditional
                             intensities given every earlier spike);
                 integrated  the true rates summed over [t, t + 50 ms): these already react to
                             the window's own spikes (refractoriness: a spike lowers its unit's
                             later rate), so they are no forecast and can score below the mean.

Connectivity (BENCHMARKS.md section 4), per session: AUROC of the scores of true edges
(coupling != 0, off the diagonal) against those of absent edges, for
  attention    `attention_connectivity` of the first current self-attention block ("self") and
               of the first history cross-attention block ("history"), with queries counted for
               their own unit ("own") or for the unit they predict next ("next");
  correlation  the lagged Pearson correlation of binned counts (`correlation_connectivity`) at
               10 ms and at 50 ms bins, signed and absolute ("abs_": inhibitory edges are edges
               too, but on sparse counts the sign carries more of the signal).
"hub edges" scores the edges out of hub units against the same absent edges. Scored on the
held-out time (the benchmark's figure) and, for reference, on the whole session (training time
included: 10x the data). The target is attention ahead of correlation (the best of its four
variants) on held-out time; the rate head's target is bits/spike > 0. Both are recorded as met or
not, whatever the outcome.

Writes benchmarks/results/model_quality.json (machine, versions, configuration, seeds, training
summary with its loss curve, every figure) and prints markdown tables.

    python benchmarks/bench_model_quality.py [--steps N] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rtnf import __version__
from rtnf.config import Config, WindowsConfig, load_config
from rtnf.data.session import GroundTruth, Session
from rtnf.data.sim import simulate
from rtnf.model.checkpoint import TRAIN_STATE, load_checkpoint
from rtnf.model.connectivity import attention_connectivity, correlation_connectivity
from rtnf.model.generation import Sampling, generate_window
from rtnf.model.neuroformer import Neuroformer
from rtnf.tokens import absolute_bins, tokens_to_counts, window_ends
from rtnf.train.dataset import SessionWindows, TrainingData
from rtnf.train.metrics import auroc, bits_per_spike
from rtnf.train.pretrain import DEFAULT_RECIPE, pretrain

SEED = 0
SESSIONS = 3
MINUTES, QUICK_MINUTES = 4.0, 1.0
STEPS, QUICK_STEPS = 1500, 200
SAMPLES = 8  # sampled next windows per scored window
GENERATION_FLOOR = 1e-3 / SAMPLES
SAMPLING = Sampling()  # the paper's: temperature 1, top-p 0.95
EVAL_BATCH = 64
CORRELATION_BINS = (1, 5)  # correlation bin widths, in 10 ms dt bins


@dataclass(frozen=True)
class Rig:
    """A simulated recording set: how many units, which rig profile."""

    name: str
    n_units: int
    profile: str


RIGS = (Rig("2p", 386, "2p"), Rig("ephys", 150, "ephys"))


def recipe(rig: Rig, steps: int, minutes: float) -> Config:
    """rt-small with the default checkpoint's recipe, for `rig`, `steps` and `minutes`."""
    kept = [o for o in DEFAULT_RECIPE if not o.startswith("training.max_steps=")]
    return load_config(overrides=[
        "model.preset=rt-small", *kept, f"training.max_steps={steps}",
        f"simulation.sessions={SESSIONS}", f"simulation.seed={SEED}",
        f"simulation.neurons={rig.n_units}", f"simulation.minutes={minutes}",
        f"rig.profile={rig.profile}"])


def chunks(indices: np.ndarray) -> list[np.ndarray]:
    """`indices` in batches of EVAL_BATCH."""
    return [indices[i:i + EVAL_BATCH] for i in range(0, indices.size, EVAL_BATCH)]


# ---------------------------------------------------------------------------------------------
# Next-window prediction
# ---------------------------------------------------------------------------------------------


def scored_windows(block: SessionWindows) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the block's windows whose next window [t, t + next_window) is the current
    window of a window of the block, and the indices of those windows (ending at t + next)."""
    targets = block.ends + block.next_window
    following = np.minimum(np.searchsorted(block.ends, targets - 1e-6), len(block) - 1)
    found = np.isclose(block.ends[following], targets)
    return np.flatnonzero(found), following[found]


def integrated_true_counts(truth: GroundTruth, starts: np.ndarray, duration: float
                           ) -> np.ndarray:
    """The simulator's true rates summed over [start, start + duration) (B, N), on their grid
    (starts and duration are whole rate bins)."""
    per_bin = np.cumsum(truth.rates.astype(np.float64) * truth.rate_dt, axis=0)
    cumulative = np.vstack([np.zeros((1, per_bin.shape[1])), per_bin])
    first = np.rint((starts - truth.t0) / truth.rate_dt).astype(np.int64)
    return cumulative[first + round(duration / truth.rate_dt)] - cumulative[first]


def starting_true_counts(truth: GroundTruth, starts: np.ndarray, duration: float
                         ) -> np.ndarray:
    """The simulator's true rate in the rate bin starting at each start, held for `duration`
    (B, N): what the true process expects from the spikes before the start."""
    first = np.rint((starts - truth.t0) / truth.rate_dt).astype(np.int64)
    return truth.rates[first].astype(np.float64) * duration


ORACLES = {"oracle_start": starting_true_counts, "oracle_integrated": integrated_true_counts}


@torch.inference_mode()
def rate_head_counts(model: Neuroformer, block: SessionWindows, indices: np.ndarray
                     ) -> np.ndarray:
    """The rate head's expected next-window counts (B, N) of the windows at `indices`."""
    return np.concatenate([model(block.batch(chunk)[0]).log_rates.exp().numpy()
                           for chunk in chunks(indices)])


@torch.inference_mode()
def generated_counts(model: Neuroformer, block: SessionWindows, indices: np.ndarray,
                     generator: torch.Generator) -> np.ndarray:
    """Mean spike count (B, N) over SAMPLES current windows generated for the windows at
    `indices` (their own current tokens unseen)."""
    means = []
    for chunk in chunks(indices):
        inputs, _ = block.batch(chunk)
        context = model.context(inputs)
        total = 0
        for _ in range(SAMPLES):
            window = generate_window(model, inputs, SAMPLING, generator, context=context)
            total = total + tokens_to_counts(window.units.numpy(), window.dts.numpy(),
                                             block.spec).sum(axis=-1)
        means.append(total / SAMPLES)
    return np.concatenate(means)


def next_window_prediction(model: Neuroformer, data: TrainingData, generator: torch.Generator,
                           rng: np.random.Generator) -> dict[str, Any]:
    """Bits/spike of the rate head, generation and the oracles on every session's held-out
    block, pooled over sessions and per session."""
    forecasts: dict[str, list[np.ndarray]] = {}
    per_session = []
    for train, held_out in zip(data.train, data.validation):
        truth = held_out.session.ground_truth
        indices, following = scored_windows(held_out)
        train_counts = train.next_counts(np.arange(len(train)))
        session = {
            "counts": held_out.next_counts(indices),
            "baseline": np.broadcast_to(train_counts.mean(axis=0),
                                        (indices.size, train_counts.shape[1])),
            "rate_head": rate_head_counts(model, held_out, indices),
        }
        for name, oracle in ORACLES.items():
            expected = oracle(truth, train.ends, train.next_window).sum(axis=0)
            gain = train_counts.sum(axis=0) / np.maximum(expected, 1e-12)
            session[f"{name}_raw"] = oracle(truth, held_out.ends[indices], held_out.next_window)
            session[name] = session[f"{name}_raw"] * gain
        samples = {"generation": generated_counts(model, held_out, following, generator),
                   "oracle_sampled": rng.poisson(session["oracle_start"] * SAMPLES) / SAMPLES}
        for name, mean in samples.items():
            session[name] = np.maximum(mean, GENERATION_FLOOR)
            session[f"{name}_shrunk"] = (mean * SAMPLES + session["baseline"]) / (SAMPLES + 1)
        for name, values in session.items():
            forecasts.setdefault(name, []).append(values.ravel())
        per_session.append({"windows": int(indices.size),
                            "spikes": int(session["counts"].sum()),
                            **bits_of(session)})
    pooled = {name: np.concatenate(values) for name, values in forecasts.items()}
    return {"windows": sum(s["windows"] for s in per_session),
            "spikes": int(pooled["counts"].sum()),
            "bits_per_spike": bits_of(pooled), "per_session": per_session}


def bits_of(forecasts: dict[str, np.ndarray]) -> dict[str, float]:
    """Bits/spike of each forecast against the counts, over the baseline."""
    return {name: bits_per_spike(forecasts["counts"], values, forecasts["baseline"])
            for name, values in forecasts.items() if name not in ("counts", "baseline")}


# ---------------------------------------------------------------------------------------------
# Connectivity
# ---------------------------------------------------------------------------------------------


def held_out_counts(block: SessionWindows, bins_per_count: int) -> np.ndarray:
    """Spike counts (T, N) over the block's current windows, from the first one's start to the
    last one's end, in bins of `bins_per_count` dt bins on the tokenizer's bin grid."""
    session, n_units = block.session, block.session.n_units
    start = int(block.current_start_bin[0])
    n_counts = (int(block.current_start_bin[-1]) + block.spec.current.n_bins - start
                ) // bins_per_count
    bins = absolute_bins(session.spike_times, float(block.ends[0]), block.spec) - start
    inside = (bins >= 0) & (bins < n_counts * bins_per_count)
    cells = bins[inside] // bins_per_count * n_units + session.spike_unit_index[inside]
    return np.bincount(cells, minlength=n_counts * n_units).reshape(n_counts, n_units)


def whole_session(data: TrainingData, index: int, windows: WindowsConfig) -> SessionWindows:
    """Every window of session `index` of `data`, training and held-out time alike."""
    block = data.validation[index]
    session = block.session
    ends = window_ends(session.start_time, session.end_time - data.next_window, windows)
    return SessionWindows(session, ends, block.spec, block.dims, data.normalization,
                          block.unit_rows, int(block.session_row), data.next_window)


def connectivity_scores(model: Neuroformer, block: SessionWindows) -> dict[str, np.ndarray]:
    """Every connectivity score matrix (N, N) of the block's session, over the block's time."""
    n_units = block.session.n_units
    batches = [block.batch(chunk)[0] for chunk in chunks(np.arange(len(block)))]
    scores = {f"attention_{source}_{query_unit}":
              attention_connectivity(model, batches, n_units, source, query_unit)
              for source in ("self", "history") for query_unit in ("own", "next")}
    for width in CORRELATION_BINS:
        name = f"correlation_{round(width * block.spec.dt_resolution * 1000)}ms"
        scores[name] = correlation_connectivity(held_out_counts(block, width))
        scores[f"abs_{name}"] = np.abs(scores[name])
    return scores


def edge_aurocs(scores: np.ndarray, session: Session) -> dict[str, float]:
    """AUROC of `scores` for the true edges (off the diagonal), all and out of hubs only."""
    truth = session.ground_truth
    off_diagonal = ~np.eye(session.n_units, dtype=bool)
    edges = (truth.coupling != 0) & off_diagonal
    absent = ~edges & off_diagonal
    hub_edges = edges & np.isin(np.arange(session.n_units), truth.hubs)[None, :]
    hub_candidates = hub_edges | absent
    return {"all_edges": auroc(scores[off_diagonal], edges[off_diagonal]),
            "hub_edges": auroc(scores[hub_candidates], hub_edges[hub_candidates])}


def connectivity(model: Neuroformer, data: TrainingData, windows: WindowsConfig
                 ) -> dict[str, Any]:
    """Edge AUROCs of every score on held-out time and on the whole session, per session and
    averaged over sessions."""
    per_session = []
    for index, held_out in enumerate(data.validation):
        session = held_out.session
        off_diagonal = ~np.eye(session.n_units, dtype=bool)
        record: dict[str, Any] = {
            "edges": int(np.count_nonzero((session.ground_truth.coupling != 0) & off_diagonal)),
            "hubs": int(session.ground_truth.hubs.size)}
        for scope, block in (("held_out", held_out),
                             ("whole_session", whole_session(data, index, windows))):
            record[scope] = {
                "seconds_of_data": float(len(block) * data.next_window),
                "auroc": {name: edge_aurocs(matrix, session)
                          for name, matrix in connectivity_scores(model, block).items()}}
        per_session.append(record)
    mean = {scope: {name: {kind: float(np.mean([s[scope]["auroc"][name][kind]
                                                 for s in per_session]))
                           for kind in ("all_edges", "hub_edges")}
                    for name in per_session[0][scope]["auroc"]}
            for scope in ("held_out", "whole_session")}
    return {"auroc_mean": mean, "per_session": per_session}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def loss_curve(out: Path) -> list[dict[str, float]]:
    """Train / validation loss and validation bits/spike at every evaluation of a run."""
    evaluations = json.loads((out / TRAIN_STATE).read_text())["evaluations"]
    return [{"step": e["step"], "train_loss": e["train"].get("total", math.nan),
             "validation_loss": e["validation"].get("total", math.nan),
             "validation_bits_per_spike": e["validation"].get("bits_per_spike", math.nan)}
            for e in evaluations]


def targets(prediction: dict[str, Any], links: dict[str, Any]) -> dict[str, Any]:
    """Whether each target is met: rate head > 0 bits/spike; each attention score's held-out
    AUROC (all edges) above the best correlation variant's."""
    mean = links["auroc_mean"]["held_out"]
    best_correlation = max(auroc["all_edges"] for name, auroc in mean.items()
                           if "correlation_" in name)
    return {
        "rate_head_bits_per_spike_positive": prediction["bits_per_spike"]["rate_head"] > 0,
        "attention_ahead_of_correlation": {
            name.removeprefix("attention_"): auroc["all_edges"] > best_correlation
            for name, auroc in mean.items() if name.startswith("attention_")},
    }


def evaluate_rig(rig: Rig, steps: int, minutes: float) -> dict[str, Any]:
    """Simulate the rig's sessions, pretrain on them, and score the model and the baselines."""
    config = recipe(rig, steps, minutes)
    seconds = {}
    started = time.perf_counter()
    sessions = simulate(config.simulation, config.rig.profile)
    seconds["simulate"] = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        summary = pretrain(sessions, config, out)
        seconds["pretrain"] = time.perf_counter() - started
        curve = loss_curve(Path(out))
        checkpoint = load_checkpoint(out)
    model = checkpoint.model
    data = TrainingData(sessions, config, model.dims, checkpoint.vocabulary)
    started = time.perf_counter()
    prediction = next_window_prediction(model, data, torch.Generator().manual_seed(SEED),
                                        np.random.default_rng(SEED))
    seconds["next_window"] = time.perf_counter() - started
    started = time.perf_counter()
    links = connectivity(model, data, config.windows)
    seconds["connectivity"] = time.perf_counter() - started
    del summary["out"]
    return {
        "rig": asdict(rig),
        "config": config.to_dict(),
        "training": {**summary, "loss_curve": curve},
        "next_window": prediction,
        "connectivity": links,
        "targets": targets(prediction, links),
        "seconds": {name: round(value, 1) for name, value in seconds.items()},
    }


def run(steps: int, minutes: float) -> dict[str, Any]:
    """The whole report: machine, versions, settings and every rig's results."""
    return {
        "benchmark": "model_quality",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {"python": sys.version.split()[0], "numpy": np.__version__,
                     "torch": torch.__version__, "rtnf": __version__},
        "settings": {"steps": steps, "session_minutes": minutes, "sessions": SESSIONS,
                     "seeds": {"simulation": SEED, "training": SEED, "generation": SEED},
                     "generation_samples": SAMPLES, "generation_floor": GENERATION_FLOOR,
                     "sampling": asdict(SAMPLING),
                     "correlation_bins_in_dt_bins": list(CORRELATION_BINS)},
        "results": {rig.name: evaluate_rig(rig, steps, minutes) for rig in RIGS},
    }


def markdown_tables(report: dict[str, Any]) -> str:
    """The report's figures as markdown tables: prediction, sampled prediction, connectivity."""
    results = report["results"]
    lines = ["| rig | steps | train min | windows | spikes | rate head | oracle start "
             "| start raw | oracle integrated | integrated raw | rate head > 0 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        bits = r["next_window"]["bits_per_spike"]
        met = r["targets"]["rate_head_bits_per_spike_positive"]
        lines.append(
            f"| {name} | {r['training']['steps']} | {r['seconds']['pretrain'] / 60:.1f} "
            f"| {r['next_window']['windows']} | {r['next_window']['spikes']} "
            + "".join(f"| {bits[key]:.3f} " for key in
                      ("rate_head", "oracle_start", "oracle_start_raw", "oracle_integrated",
                       "oracle_integrated_raw"))
            + f"| {'met' if met else 'NOT met'} |")
    lines += ["", "Next-window bits/spike on held-out windows, vs each unit's training mean "
              "count (0 = the mean).", "",
              "| rig | generation | generation shrunk | oracle sampled "
              "| oracle sampled shrunk |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        bits = r["next_window"]["bits_per_spike"]
        lines.append(f"| {name} " + "".join(
            f"| {bits[key]:.3f} " for key in ("generation", "generation_shrunk",
                                               "oracle_sampled", "oracle_sampled_shrunk"))
            + "|")
    lines += ["", f"The same from {SAMPLES} samples per window: their mean floored at "
              f"{GENERATION_FLOOR:g}, or shrunk to the training mean.", "",
              "| rig | score | held-out AUROC all edges | hub edges | per session "
              "| whole-session AUROC all edges | hub edges | ahead of correlation |",
              "|---|---|---:|---:|---|---:|---:|---|"]
    for name, r in results.items():
        links = r["connectivity"]
        for score, held_out in links["auroc_mean"]["held_out"].items():
            whole = links["auroc_mean"]["whole_session"][score]
            each = ", ".join(f"{s['held_out']['auroc'][score]['all_edges']:.3f}"
                             for s in links["per_session"])
            ahead = r["targets"]["attention_ahead_of_correlation"].get(
                score.removeprefix("attention_"))
            verdict = "" if ahead is None else ("met" if ahead else "NOT met")
            lines.append(f"| {name} | {score} | {held_out['all_edges']:.3f} "
                         f"| {held_out['hub_edges']:.3f} | {each} | {whole['all_edges']:.3f} "
                         f"| {whole['hub_edges']:.3f} | {verdict} |")
    lines += ["", "Edge AUROC (0.5 = chance), mean over sessions; hub edges: edges out of hub "
              "units vs absent edges."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None,
                        help=f"pretraining steps per rig (default {STEPS}; {QUICK_STEPS} "
                             "with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_STEPS} steps, {QUICK_MINUTES:g}-minute "
                             "sessions")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "model_quality.json")
    args = parser.parse_args()
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    started = time.perf_counter()
    report = run(steps, QUICK_MINUTES if args.quick else MINUTES)
    report["seconds_total"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_tables(report))
    print(f"\n{report['seconds_total'] / 60:.1f} min in all; wrote {args.out}")


if __name__ == "__main__":
    main()
