"""A small random-weight bundle for engine and loop tests (no training: speed, not skill)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rtnf.bench.untrained_bundle import write_untrained_bundle
from rtnf.config import WindowsConfig, load_config
from rtnf.data.session import Session
from rtnf.model.spec import PRESETS, ModelDims

SPEC = dataclasses.replace(PRESETS["rt-small"], n_embd=32, n_head=2, n_current_layers=1,
                           n_history_layers=2, n_frame_encoder_layers=1, n_frame_layers=1,
                           n_behavior_layers=1, n_decoder_layers=1, dropout=0.0,
                           temporal_hidden=16)
WINDOWS = WindowsConfig(hop=0.05, current=0.05, history=0.15, current_capacity=40,
                        history_capacity=30)
FRAMES = (3, 24, 32)


def write_bundle(session: Session, out: Path, behavior_inputs: tuple[str, ...] = ("speed",),
                 targets: tuple[str, ...] = ("speed", "gaze_phi", "gaze_theta"),
                 frames: bool = True) -> Path:
    """A bundle holding a small random model with a frame stage (unless not `frames`) and
    behaviour inputs."""
    dims = ModelDims(current_bins=5, history_bins=15, current_capacity=WINDOWS.current_capacity,
                     history_capacity=WINDOWS.history_capacity,
                     frame_shape=FRAMES if frames else None,
                     behavior_targets=targets, behavior_inputs=behavior_inputs)
    config = load_config(overrides=[f"windows.current_capacity={WINDOWS.current_capacity}",
                                    f"windows.history_capacity={WINDOWS.history_capacity}"])
    return write_untrained_bundle(session, config, out, SPEC, dims)
