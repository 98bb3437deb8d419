"""`rtnf pretrain`: sessions in, a checkpoint out; and the default checkpoint of the simulated rig.

`pretrain` builds the model of the configured preset for the sessions' data shapes, trains it
(`rtnf.train.loop`) and leaves `model.safetensors` + `model.json` in the output directory.
`default_checkpoint` is the checkpoint `rtnf calibrate` starts from when none is given: it is
pretrained on simulated sessions the first time it is needed and cached (see `DEFAULT_RECIPE`;
`rtnf pretrain --simulated` with the same settings reproduces it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from rtnf import __version__
from rtnf.config import Config, load_config
from rtnf.data.io import read_session
from rtnf.data.session import Session
from rtnf.data.sim import simulate
from rtnf.errors import RtnfError
from rtnf.model.checkpoint import Checkpoint, load_checkpoint
from rtnf.model.neuroformer import Neuroformer
from rtnf.model.spec import spec_from_config
from rtnf.train.dataset import SessionWindows, TrainingData, dims_for_sessions
from rtnf.train.loop import Distributed, train

SESSION_SUFFIXES = (".nwb", ".npz", ".xdf")

# The default pretrained checkpoint: 3 simulated days of one 2p animal, trained for a few
# minutes on a 2-core CPU. Changing any of this changes the cache key.
DEFAULT_RECIPE = [
    "simulation.sessions=3", "simulation.neurons=386", "simulation.minutes=4", "simulation.seed=0",
    "rig.profile=2p", "training.max_steps=600", "training.eval_every=200",
    "training.warmup_steps=50", "training.learning_rate=0.001",
]


def session_files(paths: Sequence[str | Path]) -> list[Path]:
    """The session files named by `paths` (files, or directories searched for session files)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in SESSION_SUFFIXES)
            if not found:
                raise RtnfError(f"{path}: no session files ({', '.join(SESSION_SUFFIXES)}) in "
                                "this directory")
            files.extend(found)
        else:
            files.append(path)
    return files


def load_sessions(paths: Sequence[str | Path], config: Config) -> list[Session]:
    return [read_session(path, nwb_names=config.rig.nwb, xdf_names=config.rig.xdf)
            for path in session_files(paths)]


def pretrain(sessions: Sequence[Session], config: Config, out: str | Path, resume: bool = False,
             distributed: Distributed | None = None, show_progress: bool = True,
             should_stop: Callable[[int], bool] | None = None) -> dict[str, Any]:
    """Train the configured preset on `sessions`; return the run's summary (also in model.json)."""
    if not sessions:
        raise RtnfError("rtnf pretrain: no sessions to train on")
    out = Path(out)
    spec = spec_from_config(config)
    dims = dims_for_sessions(sessions, config, spec)
    previous = load_checkpoint(out) if resume and (out / "model.json").is_file() else None
    data = TrainingData(sessions, config, dims,
                        vocabulary=previous.vocabulary if previous else None)
    torch.manual_seed(config.training.seed)
    model = Neuroformer(spec, dims, data.vocabulary.n_units, data.vocabulary.n_sessions)
    if previous is not None:
        model.load_state_dict(previous.model.state_dict())
    else:
        initialise_rate_bias(model, data.train)

    def describe(record: dict[str, Any]) -> Checkpoint:
        summary = {"preset": config.model.preset, "parameters": model.parameter_count(),
                   "sessions": [s.metadata.get("identifier", "") for s in sessions], **record}
        return Checkpoint(model, data.vocabulary, data.normalization.to_dict(),
                          config.to_dict(), summary)

    result = train(model, data, config.training, out, describe, resume=resume,
                   distributed=distributed, show_progress=show_progress,
                   should_stop=should_stop)
    return {
        "out": str(out), "preset": config.model.preset, "parameters": model.parameter_count(),
        "sessions": len(sessions), "steps": result.steps, "stopped_by": result.stopped_by,
        "tokens_seen": result.tokens_seen, "seconds": round(result.seconds, 2),
        "train_loss": result.train_loss,
        "validation_loss": result.validation.get("total", float("nan")),
        "validation_bits_per_spike": result.validation.get("bits_per_spike", float("nan")),
        "validation": result.validation,
        "world_size": result.world_size, "replicas_agree": result.replicas_agree,
    }


def initialise_rate_bias(model: Neuroformer, blocks: Iterable[SessionWindows]) -> None:
    """Start each unit's next-window rate at its training mean (log expected count), so the
    rate head begins at the mean-rate forecast instead of one spike per window."""
    with torch.no_grad():
        for block in blocks:
            if len(block):
                mean = torch.as_tensor(block.mean_next_counts(), dtype=torch.float32)
                model.unit_rate.weight[block.unit_rows, -1] = torch.log(mean + 1e-3)


def format_summary(summary: dict[str, Any]) -> str:
    return (f"pretrained {summary['preset']} ({summary['parameters'] / 1e6:.2f}M parameters) on "
            f"{summary['sessions']} session(s): {summary['steps']} steps in "
            f"{summary['seconds'] / 60:.1f} min ({summary['stopped_by']}), train loss "
            f"{summary['train_loss']:.3f}, validation loss {summary['validation_loss']:.3f}, "
            f"next-window {summary['validation_bits_per_spike']:.3f} bits/spike; "
            f"wrote {summary['out']}")


def default_recipe(config: Config) -> Config:
    """The configuration the default checkpoint is trained with: `config`'s preset and windows,
    the rest from `DEFAULT_RECIPE`."""
    recipe = load_config(overrides=[f"model.preset={config.model.preset}", *DEFAULT_RECIPE])
    return dataclasses.replace(recipe, windows=config.windows)


# The configuration sections a pretrained checkpoint depends on (the cache key covers these only,
# so that e.g. calibration or engine settings never cause a rebuild).
CHECKPOINT_SECTIONS = ("rig", "simulation", "windows", "model", "decoding", "training")


def default_checkpoint_dir(config: Config) -> Path:
    """Where the default checkpoint for `config`'s preset and windows lives (cache key in name)."""
    recipe = default_recipe(config).to_dict()
    relevant = {section: recipe[section] for section in CHECKPOINT_SECTIONS}
    relevant["rig"] = {"profile": recipe["rig"]["profile"]}
    key = hashlib.sha256(json.dumps({"rtnf": __version__, "config": relevant},
                                    sort_keys=True).encode()).hexdigest()[:12]
    root = Path(os.environ.get("RTNF_CACHE", Path.home() / ".cache" / "rtnf"))
    return root / "pretrained" / f"sim-{config.model.preset}-{key}"


def default_checkpoint(config: Config, show_progress: bool = True) -> Path:
    """The default pretrained checkpoint for `config`'s preset and windows, built on first use
    (a few minutes on a CPU) and cached under $RTNF_CACHE (default ~/.cache/rtnf)."""
    directory = default_checkpoint_dir(config)
    if (directory / "model.json").is_file():
        return directory
    recipe = default_recipe(config)
    building = directory.with_name(directory.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    sessions = simulate(recipe.simulation, recipe.rig.profile)
    pretrain(sessions, recipe, building, show_progress=show_progress)
    os.replace(building, directory)
    return directory
