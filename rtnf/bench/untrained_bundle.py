"""A bundle holding an untrained model (random weights) for a session: what speed and latency
benchmarks and tests run, where decoding skill does not matter but every shape does.

The model is the configured preset (or `spec`) sized for the session's units, frames and
behaviour (or `dims`); behaviour is normalised with the session's own statistics; no baselines,
no report. `rtnf compile` and `rtnf run` treat it like any calibrated bundle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rtnf.bundle import UNITS, BundleWriter, write_json
from rtnf.config import Config
from rtnf.data.session import Session
from rtnf.model.checkpoint import Checkpoint, save_checkpoint
from rtnf.model.neuroformer import Neuroformer
from rtnf.model.spec import ModelDims, ModelSpec, spec_from_config
from rtnf.model.vocabulary import Vocabulary
from rtnf.train.dataset import Normalization, dims_for_sessions


def write_untrained_bundle(session: Session, config: Config, out: str | Path,
                           spec: ModelSpec | None = None, dims: ModelDims | None = None,
                           seed: int = 0) -> Path:
    """Write the bundle to `out`; returns its path."""
    torch.manual_seed(seed)
    spec = spec or spec_from_config(config)
    dims = dims or dims_for_sessions([session], config, spec)
    vocabulary = Vocabulary()
    rows, session_row = vocabulary.add_session(session)
    model = Neuroformer(spec, dims, vocabulary.n_units, vocabulary.n_sessions).eval()
    normalization = Normalization.fit({name: channel.values for name, channel
                                       in session.behavior.items()})
    with BundleWriter(out, config, {"kind": "untrained", "session": session.metadata.get(
            "identifier", "")}) as staging:
        save_checkpoint(Checkpoint(model, vocabulary, normalization.to_dict(),
                                   config=config.to_dict()), staging)
        write_json(staging / UNITS, {"unit_ids": session.unit_ids.tolist(),
                                     "rows": [int(r) for r in rows],
                                     "session_row": int(session_row),
                                     "mean_next_counts": np.ones(session.n_units).tolist()})
    return Path(out)
