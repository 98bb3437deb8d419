"""`rtnf calibrate`: finetune on a short session, judge it honestly, write a bundle.

Stages, in order:
1. split the session in time: training | validation | held-out (the last
   `holdout_fraction`), contiguous blocks with gaps between them, never interleaved windows;
2. the model: the pretrained checkpoint (the cached default one when none is given) with its
   unit and session tables extended for this session (units it knows keep their rows, new
   units get new rows), or a fresh one for `scratch`;
3. finetuning (`rtnf.train.finetune`) with early stopping on the validation block;
4. the baselines (ridge / Wiener filter, MLP, GRU) fitted on exactly the same training windows;
   every decoder's output then gets its causal smoothing (`rtnf.train.smoothing`), picked on
   the validation block by the same rule for all;
5. evaluation on held-out time (smoothed; the unsmoothed scores are kept too): per target
   Pearson r and R^2 (variance-weighted over targets), next-window bits/spike against each
   unit's training mean, and on simulated sessions the oracle (the true rates);
6. the verdict: the model is used only if it beats the best baseline on the validation block
   (when `require_beats_baseline`); otherwise the ridge decoder is recorded as the fallback;
7. the bundle, written atomically (`rtnf.bundle`), with the report.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from rtnf.bundle import SMOOTHING, UNITS, BundleWriter, write_json
from rtnf.config import Config
from rtnf.data.session import Session
from rtnf.errors import RtnfError
from rtnf.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from rtnf.model.neuroformer import Neuroformer
from rtnf.model.spec import spec_from_config
from rtnf.model.vocabulary import Vocabulary
from rtnf.tokens import TokenSpec, window_ends
from rtnf.train.baselines import BASELINES, decoding_scores, fit_baselines, save_baselines
from rtnf.train.dataset import (Normalization, SessionWindows, behavior_before,
                                contiguous_split, dims_for_sessions)
from rtnf.train.finetune import finetune
from rtnf.train.metrics import bits_per_spike
from rtnf.train.pretrain import default_checkpoint, initialise_rate_bias
from rtnf.train.report import write_report
from rtnf.train.smoothing import fit_taus, smooth


@dataclass
class Blocks:
    """Window ends of the three contiguous blocks of a calibration session."""

    train: np.ndarray
    validation: np.ndarray
    holdout: np.ndarray


def split_session(session: Session, config: Config) -> Blocks:
    """Training, validation and held-out window ends, in that order in time, with gaps."""
    windows, calibration = config.windows, config.calibration
    next_window = windows.current
    ends = window_ends(session.start_time, session.end_time - next_window, windows)
    rest, holdout = contiguous_split(ends, calibration.holdout_fraction, windows, next_window)
    share = calibration.validation_fraction / max(1e-9, 1.0 - calibration.holdout_fraction)
    train, validation = contiguous_split(rest, share, windows, next_window)
    if min(train.size, validation.size, holdout.size) < 2:
        raise RtnfError(f"session of {session.duration:.1f} s is too short to calibrate: "
                        f"{train.size} training, {validation.size} validation and "
                        f"{holdout.size} held-out windows (need at least 2 each)")
    return Blocks(train, validation, holdout)


@dataclass
class PreparedModel:
    model: Neuroformer
    vocabulary: Vocabulary
    unit_rows: np.ndarray
    session_row: int
    known_units: int  # units of the session the pretrained model already had rows for


def prepare_model(session: Session, config: Config, pretrained: Neuroformer | None,
                  vocabulary: Vocabulary | None) -> PreparedModel:
    """The model to finetune, with rows for every unit of `session` (see stage 2)."""
    if pretrained is None:
        spec = spec_from_config(config)
        dims = dims_for_sessions([session], config, spec)
        vocabulary = Vocabulary()
        rows, session_row = vocabulary.add_session(session)
        torch.manual_seed(config.training.seed)
        model = Neuroformer(spec, dims, vocabulary.n_units, vocabulary.n_sessions)
        return PreparedModel(model, vocabulary, rows, session_row, 0)
    model, vocabulary = copy.deepcopy(pretrained), copy.deepcopy(vocabulary)
    _require_compatible(model, session, config)
    _, known, _ = vocabulary.rows_of(session)
    rows, session_row = vocabulary.add_session(session)
    model.extend(vocabulary.n_units, vocabulary.n_sessions)
    return PreparedModel(model, vocabulary, rows, session_row, int(known.sum()))


def _require_compatible(model: Neuroformer, session: Session, config: Config) -> None:
    """The pretrained model's windows and stimulus must be this configuration's and session's."""
    expected = dims_for_sessions([session], config, model.spec)
    dims = model.dims
    for name in ("current_bins", "history_bins", "frame_shape", "behavior_targets",
                 "behavior_inputs", "objective"):
        if getattr(dims, name) != getattr(expected, name):
            raise RtnfError(f"the pretrained model was trained with {name} = "
                            f"{getattr(dims, name)}, but this session and configuration give "
                            f"{getattr(expected, name)}; pretrain for these settings or use "
                            "calibration.method=scratch")


def session_windows(session: Session, ends: np.ndarray, prepared: PreparedModel,
                    normalization: Normalization, config: Config) -> SessionWindows:
    spec = TokenSpec.from_config(config.windows, session.n_units)
    return SessionWindows(session, ends, spec, prepared.model.dims, normalization,
                          prepared.unit_rows, prepared.session_row, config.windows.current)


@torch.no_grad()
def predict(model: Neuroformer, windows: SessionWindows, batch_size: int = 64
            ) -> tuple[np.ndarray, np.ndarray]:
    """Behaviour (standardised, (n, targets)) and expected next-window counts (n, N)."""
    model.eval()
    behavior, expected = [], []
    for start in range(0, len(windows), batch_size):
        inputs, _ = windows.batch(np.arange(start, min(start + batch_size, len(windows))))
        output = model(inputs)
        behavior.append(output.behavior.numpy())
        expected.append(output.log_rates.exp().numpy())
    return np.concatenate(behavior), np.concatenate(expected)


def oracle_counts(session: Session, ends: np.ndarray, next_window: float) -> np.ndarray | None:
    """The simulator's forecast of each unit's spikes in [t, t + next_window) (None for recorded
    sessions): its true rate at t times the window. The true rates are conditional intensities
    given every earlier spike, so the rate at t is what a perfect model could know at t (summing
    them over the window would use the window's own spikes through refractoriness)."""
    truth = session.ground_truth
    if truth is None:
        return None
    bins = np.clip(np.floor((ends - truth.t0) / truth.rate_dt + 1e-6).astype(np.int64), 0,
                   truth.rates.shape[0] - 1)
    return truth.rates[bins].astype(np.float64) * next_window


def next_window_scores(session: Session, windows: dict[str, SessionWindows],
                       expected: np.ndarray, next_window: float) -> dict[str, float]:
    """Held-out bits/spike of the model's expected counts against each unit's training mean;
    on simulated sessions also the oracle's: the true expected counts, scaled per unit by the
    ratio of observed to true spikes on the training windows (2p events are deconvolved
    calcium, not spikes), and unscaled."""
    train, holdout = windows["train"], windows["holdout"]
    counts = holdout.next_counts(np.arange(len(holdout)))
    mean = train.mean_next_counts()
    scores = {"model": bits_per_spike(counts, expected, mean), "spikes": int(counts.sum())}
    truth_train = oracle_counts(session, train.ends, next_window)
    if truth_train is not None:
        truth = oracle_counts(session, holdout.ends, next_window)
        observed = train.next_counts(np.arange(len(train))).sum(axis=0)
        gain = observed / np.maximum(truth_train.sum(axis=0), 1e-9)
        scores["oracle"] = bits_per_spike(counts, truth * gain, mean)
        scores["oracle_unscaled"] = bits_per_spike(counts, truth, mean)
    return scores


def model_table(scores: dict[str, dict[str, Any]], targets: tuple[str, ...],
                bits_per_spike: float) -> dict[str, dict[str, Any]]:
    """The `models` table of report/metrics.json and `rtnf evaluate --json`: per model, per
    target r and R^2, the weighted R^2, and the Neuroformer's next-window bits/spike."""
    models = {name: {**{target: {"r": score["r"][target], "r2": score["r2"][target]}
                        for target in targets}, "r2_weighted": score["r2_weighted"]}
              for name, score in scores.items()}
    models["neuroformer"]["bits_per_spike"] = bits_per_spike
    return models


def calibrate(session: Session, config: Config, out: str | Path,
              pretrained: str | Path | None = None, source: dict[str, Any] | None = None,
              log: Callable[[str], None] = print,
              extra_files: dict[str, Path] | None = None) -> dict[str, Any]:
    """Run every stage of the module docstring; return the metrics written to the bundle.
    `extra_files` (bundle path -> file) are copied into the bundle, e.g. a live capture."""
    started = time.monotonic()
    calibration, targets = config.calibration, tuple(config.decoding.targets)
    blocks = split_session(session, config)
    log(f"windows: {blocks.train.size} training, {blocks.validation.size} validation, "
        f"{blocks.holdout.size} held out (last {calibration.holdout_fraction:.0%} of the session)")

    checkpoint, checkpoint_dir = None, None
    if calibration.method != "scratch":
        checkpoint_dir = Path(pretrained) if pretrained else default_checkpoint(config)
        checkpoint = load_checkpoint(checkpoint_dir)
    prepared = prepare_model(session, config, checkpoint.model if checkpoint else None,
                             checkpoint.vocabulary if checkpoint else None)
    dims, model = prepared.model.dims, prepared.model
    log(f"units: {session.n_units} ({prepared.known_units} known to the pretrained model, "
        f"{session.n_units - prepared.known_units} new); method {calibration.method}")
    normalization = Normalization.fit(
        behavior_before(session, (*dims.behavior_targets, *dims.behavior_inputs), blocks.train,
                        config.windows.dt_resolution),
        classified=dims.behavior_targets if dims.objective == "classification" else (),
        n_classes=dims.n_classes)
    windows = {name: session_windows(session, getattr(blocks, name), prepared, normalization,
                                     config) for name in ("train", "validation", "holdout")}
    initialise_rate_bias(model, [windows["train"]])
    tuned = finetune(model, windows["train"], windows["validation"], calibration,
                     config.training, log)
    log(f"finetuned: {tuned.epochs} epochs, best validation loss "
        f"{tuned.best_validation_loss:.3f} at epoch {tuned.best_epoch}")

    baselines = fit_baselines(session, blocks.train, blocks.validation, targets,
                              dt_resolution=config.windows.dt_resolution)
    actual = {name: windows[name].behavior_targets for name in ("validation", "holdout")}
    (validation_behavior, _), (holdout_raw, holdout_expected) = (
        predict(model, windows[name]) for name in ("validation", "holdout"))
    raw = {"neuroformer": {"validation": validation_behavior, "holdout": holdout_raw}}
    for kind, decoder in baselines.decoders.items():
        raw[kind] = {name: decoder.predict(decoder.features(session, getattr(blocks, name)))
                     for name in ("validation", "holdout")}
    hop = config.windows.hop
    taus = {kind: fit_taus(blocks_["validation"], actual["validation"], hop)
            for kind, blocks_ in raw.items()}
    decoded = {kind: {name: smooth(values, taus[kind], hop) for name, values in blocks_.items()}
               for kind, blocks_ in raw.items()}
    validation, holdout = ({kind: decoding_scores(decoded[kind][name], actual[name], targets)
                            for kind in decoded} for name in ("validation", "holdout"))
    holdout_unsmoothed = {kind: decoding_scores(raw[kind]["holdout"], actual["holdout"], targets)
                          for kind in raw}
    holdout_behavior, holdout_targets = decoded["neuroformer"]["holdout"], actual["holdout"]
    best_baseline = max(baselines.decoders, key=lambda k: validation[k]["r2_weighted"])
    beats = (validation["neuroformer"]["r2_weighted"]
             > validation[best_baseline]["r2_weighted"])
    use_model = beats or not calibration.require_beats_baseline
    verdict = {
        "use": "neuroformer" if use_model else "ridge",
        "go": bool(use_model),
        "beats_best_baseline": bool(beats),
        "best_baseline": best_baseline,
        "reason": (f"Neuroformer's validation R^2 {validation['neuroformer']['r2_weighted']:.3f} "
                   f"{'beats' if beats else 'does not beat'} the best baseline "
                   f"({best_baseline}, {validation[best_baseline]['r2_weighted']:.3f})"),
    }
    bits = next_window_scores(session, windows, holdout_expected, config.windows.current)
    models = model_table(holdout, targets, bits["model"])
    metrics = {
        "models": models,
        "heldout_s": float(blocks.holdout[-1] - blocks.holdout[0] + config.windows.hop),
        "session": {"source": source or {}, "units": session.n_units,
                    "known_units": prepared.known_units, "duration_s": session.duration,
                    "windows": {k: int(getattr(blocks, k).size)
                                for k in ("train", "validation", "holdout")}},
        "method": calibration.method,
        "pretrained": str(checkpoint_dir) if checkpoint_dir else None,
        "finetune": {"epochs": tuned.epochs, "best_epoch": tuned.best_epoch,
                     "curve": tuned.curve},
        "validation": validation,
        "holdout": holdout,
        "holdout_unsmoothed": holdout_unsmoothed,
        "smoothing_tau_s": {kind: dict(zip(targets, map(float, values)))
                            for kind, values in taus.items()},
        "next_window_bits_per_spike": bits,
        "verdict": verdict,
        "seconds": round(time.monotonic() - started, 1),
    }
    _write_bundle(out, config, source or {}, metrics, prepared, normalization, baselines,
                  holdout_behavior, holdout_targets, windows["holdout"].ends, targets,
                  session.unit_ids, windows["train"].mean_next_counts(), extra_files or {})
    return metrics


def _write_bundle(out: str | Path, config: Config, source: dict[str, Any],
                  metrics: dict[str, Any], prepared: PreparedModel,
                  normalization: Normalization, baselines: Any, holdout_behavior: np.ndarray,
                  holdout_targets: np.ndarray, holdout_ends: np.ndarray,
                  targets: tuple[str, ...], unit_ids: np.ndarray,
                  mean_next_counts: np.ndarray, extra_files: dict[str, Path]) -> None:
    """The bundle of DESIGN.md: model, unit map, normalisation, the baselines, report."""
    with BundleWriter(out, config, source, {"verdict": metrics["verdict"]}) as staging:
        for relative, path in extra_files.items():
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, staging / relative)
        save_checkpoint(Checkpoint(prepared.model, prepared.vocabulary, normalization.to_dict(),
                                   config.to_dict(), {"calibration": metrics["verdict"]}),
                        staging)
        write_json(staging / UNITS, {
            "unit_ids": [int(u) for u in unit_ids],
            "rows": [int(r) for r in prepared.unit_rows],
            "session_row": int(prepared.session_row),
            "known_units": prepared.known_units,
            "mean_next_counts": [float(c) for c in mean_next_counts]})
        write_json(staging / "normalization.json", normalization.to_dict())
        write_json(staging / SMOOTHING, metrics["smoothing_tau_s"])
        save_baselines(staging / BASELINES, baselines.decoders)
        scale = np.array([normalization.std[name] for name in targets])
        offset = np.array([normalization.mean[name] for name in targets])
        write_report(staging / "report", metrics, holdout_ends,
                     holdout_behavior * scale + offset, holdout_targets * scale + offset, targets)
