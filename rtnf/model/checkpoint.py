"""Checkpoints: weights in safetensors, everything else in JSON (nothing is unpickled).

A checkpoint directory holds:

    model.safetensors   the model's weights (loadable with the safetensors library alone)
    model.json          format, rtnf version, architecture (`ModelSpec`), data shapes
                        (`ModelDims`), unit/session vocabulary, behaviour normalisation, the
                        resolved configuration and a training summary
    optimizer.safetensors + train_state.json
                        only while training: the AdamW state, step and random-generator states,
                        so that an interrupted run resumes where it stopped

Files are written to a temporary name and renamed, so a crash never leaves a half-written file
under the final name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rtnf import __version__
from rtnf.errors import RtnfError
from rtnf.model.neuroformer import Neuroformer
from rtnf.model.spec import ModelDims, ModelSpec
from rtnf.model.vocabulary import Vocabulary

FORMAT = "rtnf-model"
FORMAT_VERSION = 1
WEIGHTS, META = "model.safetensors", "model.json"
OPTIMIZER, TRAIN_STATE = "optimizer.safetensors", "train_state.json"


@dataclass
class Checkpoint:
    """A model and what it needs to be used on new data."""

    model: Neuroformer
    vocabulary: Vocabulary
    normalization: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(temporary path)`, then rename the result to `path` (never half-written)."""
    temporary = path.with_name(path.name + ".partial")
    write(temporary)
    os.replace(temporary, path)


def save_checkpoint(checkpoint: Checkpoint, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = checkpoint.model
    weights = {name: tensor.detach().cpu().contiguous()
               for name, tensor in model.state_dict().items()}
    atomic_write(directory / WEIGHTS, lambda p: save_file(weights, str(p)))
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "rtnf_version": __version__,
        "spec": model.spec.to_dict(), "dims": model.dims.to_dict(),
        "vocabulary": checkpoint.vocabulary.to_dict(),
        "normalization": checkpoint.normalization, "config": checkpoint.config,
        "summary": checkpoint.summary,
    }
    atomic_write(directory / META, lambda p: p.write_text(json.dumps(meta, indent=2)))


def load_checkpoint(directory: str | Path, device: torch.device | str = "cpu") -> Checkpoint:
    """Load a checkpoint directory; a clear error names the file and what is wrong."""
    directory = Path(directory)
    meta_path, weights_path = directory / META, directory / WEIGHTS
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise RtnfError(f"{meta_path}: no such file (not an rtnf checkpoint directory)") from None
    except (OSError, ValueError) as exc:
        raise RtnfError(f"{meta_path}: cannot read ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RtnfError(f"{meta_path}: not an rtnf model description (format {FORMAT!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise RtnfError(f"{meta_path}: format version {meta['format_version']} is newer than "
                        f"this rtnf reads ({FORMAT_VERSION}); upgrade rtnf")
    try:
        vocabulary = Vocabulary.from_dict(meta["vocabulary"])
        model = Neuroformer(ModelSpec.from_dict(meta["spec"]), ModelDims.from_dict(meta["dims"]),
                            max(1, vocabulary.n_units), max(1, vocabulary.n_sessions))
    except (KeyError, TypeError, ValueError) as exc:
        raise RtnfError(f"{meta_path}: malformed model description ({exc})") from None
    try:
        weights = load_file(str(weights_path), device=str(device))
    except FileNotFoundError:
        raise RtnfError(f"{weights_path}: no such file") from None
    except (SafetensorError, OSError) as exc:
        raise RtnfError(f"{weights_path}: cannot read weights ({exc})") from None
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise RtnfError(f"{weights_path}: weights do not match {meta_path} ({first})") from None
    return Checkpoint(model.to(device).eval(), vocabulary, meta.get("normalization", {}),
                      meta.get("config", {}), meta.get("summary", {}))


def save_training_state(directory: str | Path, optimizer: torch.optim.Optimizer,
                        model: torch.nn.Module, state: dict[str, Any]) -> None:
    """The optimiser's tensors (named by parameter) and the loop's state, for resuming."""
    directory = Path(directory)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for key, value in optimizer.state.get(parameter, {}).items():
                tensors[f"{names[id(parameter)]}::{key}"] = value.detach().cpu().contiguous()
    tensors["::torch_rng"] = torch.get_rng_state()
    atomic_write(directory / OPTIMIZER, lambda p: save_file(tensors, str(p)))
    atomic_write(directory / TRAIN_STATE, lambda p: p.write_text(json.dumps(state, indent=2)))


def load_training_state(directory: str | Path, optimizer: torch.optim.Optimizer,
                        model: torch.nn.Module) -> dict[str, Any] | None:
    """Restore what `save_training_state` wrote; None when the directory has none."""
    directory = Path(directory)
    if not (directory / TRAIN_STATE).is_file():
        return None
    tensors = load_file(str(directory / OPTIMIZER))
    parameters = dict(model.named_parameters())
    for key, value in tensors.items():
        name, _, slot = key.partition("::")
        if name in parameters:
            device = parameters[name].device
            optimizer.state[parameters[name]][slot] = value.to(device)
    torch.set_rng_state(tensors["::torch_rng"])
    return json.loads((directory / TRAIN_STATE).read_text())
