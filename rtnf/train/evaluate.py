"""`rtnf evaluate`: decode another session (or a part of one) with a bundle, scored as calibration
scores its held-out block.

The session is seen through the bundle's unit list (`Session.with_units`): units the bundle was
calibrated on but the session lacks are silent, units the bundle does not know are left out,
and both are counted in the result. Every window of the chosen span is decoded by the bundle's
Neuroformer and by each baseline decoder saved with it, each output smoothed as calibration
chose (smoothing.json); the behaviour targets are standardised with the bundle's
normalisation; next-window bits/spike are measured against each unit's mean on the
calibration's training windows (kept in units.json), and on simulated sessions the
oracle (true rates, scaled per unit to the observed spike counts) is given beside them.
The result has the shape of the bundle's report/metrics.json (`models`, `heldout_s`,
`verdict`).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from rtnf.bundle import SMOOTHING, UNITS, Bundle
from rtnf.data.session import Session
from rtnf.errors import RtnfError
from rtnf.tokens import TokenSpec, window_ends
from rtnf.train.baselines import BASELINES, decoding_scores, load_baselines
from rtnf.train.calibrate import model_table, oracle_counts, predict
from rtnf.train.dataset import Normalization, SessionWindows
from rtnf.train.metrics import bits_per_spike
from rtnf.train.smoothing import smooth


def evaluate_bundle(bundle: Bundle, session: Session, start_s: float | None = None,
                    end_s: float | None = None) -> dict[str, Any]:
    """Scores of the bundle's models on the windows of `session` in [start_s, end_s)."""
    config, model = bundle.config, bundle.checkpoint.model
    targets = tuple(model.dims.behavior_targets)
    missing_targets = [name for name in targets if name not in session.behavior]
    if missing_targets:
        raise RtnfError(f"the session has no behaviour channel {missing_targets[0]!r}, which "
                        f"the bundle decodes (it has: {', '.join(session.behavior) or 'none'})")
    start = session.start_time if start_s is None else max(start_s, session.start_time)
    stop = session.end_time if end_s is None else min(end_s, session.end_time)
    next_window = config.windows.current
    ends = window_ends(start, stop - next_window, config.windows)
    if ends.size < 2:
        raise RtnfError(f"{stop - start:.2f} s of session from {start:.2f} s hold fewer than "
                        f"2 windows to evaluate")
    known = set(bundle.unit_ids.tolist())
    present = [int(unit) for unit in session.unit_ids if int(unit) in known]
    seen = session.with_units(bundle.unit_ids)
    normalization = Normalization.from_dict(bundle.checkpoint.normalization)
    windows = SessionWindows(seen, ends, TokenSpec.from_config(config.windows, seen.n_units),
                             model.dims, normalization, bundle.unit_rows.numpy(),
                             int(bundle.session_row), next_window)

    behavior, expected = predict(model, windows)
    decoded = {"neuroformer": behavior}
    for kind, decoder in load_baselines(bundle.directory / BASELINES).items():
        decoded[kind] = decoder.predict(decoder.features(seen, ends))
    taus = _smoothing(bundle, targets)
    actual = windows.behavior_targets
    scores = {kind: decoding_scores(smooth(values, taus.get(kind, np.zeros(len(targets))),
                                           config.windows.hop), actual, targets)
              for kind, values in decoded.items()}

    counts = windows.next_counts(np.arange(len(windows)))
    mean = bundle.mean_next_counts
    if mean is None:
        raise RtnfError(f"bundle {bundle.directory}: {UNITS} has no mean_next_counts (written by "
                        f"an older rtnf); calibrate again to evaluate it")
    bits = {"model": bits_per_spike(counts, expected, mean), "spikes": int(counts.sum())}
    truth = oracle_counts(seen, ends, next_window)
    if truth is not None:
        gain = counts.sum(axis=0) / np.maximum(truth.sum(axis=0), 1e-9)
        bits["oracle"] = bits_per_spike(counts, truth * gain, mean)
    return {
        "models": model_table(scores, targets, bits["model"]),
        "heldout_s": float(ends[-1] - ends[0] + config.windows.hop),
        "verdict": bundle.manifest.get("verdict"),
        "evaluated": {"start_s": float(ends[0] - next_window), "end_s": float(ends[-1]),
                      "windows": int(ends.size)},
        "units": {"bundle": int(bundle.unit_ids.size), "present": len(present),
                  "silent": int(bundle.unit_ids.size) - len(present),
                  "unknown_left_out": session.n_units - len(present)},
        "next_window_bits_per_spike": bits,
    }


def _smoothing(bundle: Bundle, targets: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Each decoder's output time constants from the bundle (none in older bundles)."""
    path = bundle.directory / SMOOTHING
    if not path.is_file():
        return {}
    recorded = json.loads(path.read_text())
    return {kind: np.array([float(taus.get(t, 0.0)) for t in targets])
            for kind, taus in recorded.items()}


def format_evaluation(result: dict[str, Any]) -> str:
    """A table for the operator: one row per model, r and R^2 per target, bits/spike."""
    models = result["models"]
    targets = [key for key, value in models["neuroformer"].items() if isinstance(value, dict)]
    units = result["units"]
    lines = [f"evaluated {result['heldout_s']:.1f} s ({result['evaluated']['windows']} windows); "
             f"units: {units['present']} of the bundle's {units['bundle']} present"
             + (f", {units['silent']} silent" if units["silent"] else "")
             + (f", {units['unknown_left_out']} unknown left out"
                if units["unknown_left_out"] else ""),
             "| model | " + " | ".join(f"{t} r | {t} R^2" for t in targets) + " | bits/spike |",
             "|---|" + "---:|" * (2 * len(targets) + 1)]
    for name, scores in models.items():
        cells = [f"{scores[t]['r']:.3f} | {scores[t]['r2']:.3f}" for t in targets]
        bits = scores.get("bits_per_spike")
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {'-' if bits is None else f'{bits:.3f}'} |")
    bits = result["next_window_bits_per_spike"]
    if "oracle" in bits:
        lines.append(f"next-window bits/spike: model {bits['model']:.3f}, oracle "
                     f"{bits['oracle']:.3f} (true rates)")
    return "\n".join(lines)
