"""Finetuning a model on one calibration session, with early stopping on a validation block.

Methods (`calibration.method`):
- `embeddings`: only the unit-keyed tables (input embedding, unit-head rows, rate readout), the
  session token, the behaviour head and the rate projection learn; the transformer is frozen.
  With `unfreeze_after` > 0 the whole model is unfrozen after that many epochs and trains on at
  `unfreeze_learning_rate`.
- `full`: every parameter learns from the start.
- `scratch`: a freshly initialised model, every parameter learns.

An epoch is `steps_per_epoch` batches of training windows drawn afresh (shuffled, seeded) from
the whole training block, or one pass over it when that is 0; neighbouring windows overlap by
most of their span, so a few hundred windows per epoch see most of what the block holds. After
each epoch the validation loss (`select_on`: the total, or the decoding part alone) decides:
the best state so far is kept, and `patience` epochs
without improvement stop the run, as does the `max_minutes` time budget.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from rtnf.config import CalibrationConfig, TrainingConfig
from rtnf.model.losses import losses
from rtnf.model.neuroformer import Neuroformer
from rtnf.train.dataset import SessionWindows
from rtnf.train.optim import build_optimizer

EMBEDDING_PARAMETERS = ("unit_embedding", "unit_output", "unit_rate", "session_embedding",
                        "behavior_head", "rate_projection")


@dataclass
class FinetuneResult:
    epochs: int
    best_epoch: int
    best_validation_loss: float
    curve: list[dict[str, float]] = field(default_factory=list)  # per epoch: train, validation


def set_trainable(model: nn.Module, method: str) -> None:
    """Freeze what `method` keeps fixed (see the module docstring)."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad = (method != "embeddings"
                                   or name.split(".")[0] in EMBEDDING_PARAMETERS)


def _batches(windows: SessionWindows, batch_size: int, rng: np.random.Generator | None):
    order = np.arange(len(windows)) if rng is None else rng.permutation(len(windows))
    for start in range(0, len(order), batch_size):
        indices = np.sort(order[start:start + batch_size])
        if indices.size >= 2:
            yield windows.batch(indices)


@torch.no_grad()
def validation_loss(model: Neuroformer, windows: SessionWindows, batch_size: int,
                    select_on: str = "total") -> float:
    """Mean loss over the windows (eval mode): the total, or with `select_on` "decoding" only
    what the loop reads from every window (behaviour and next-window rates, weighted as in
    the total)."""
    model.eval()
    total, count = 0.0, 0
    spec = model.spec
    for inputs, targets in _batches(windows, batch_size, None):
        parts = losses(model(inputs), inputs, targets, spec, model.dims,
                       model.contrastive_projection)
        loss = parts["total"] if select_on == "total" else (
            spec.loss_behavior * parts["behavior"] + spec.loss_rate * parts["rate"])
        total += float(loss) * inputs.current_units.shape[0]
        count += inputs.current_units.shape[0]
    return total / max(count, 1)


def finetune(model: Neuroformer, train: SessionWindows, validation: SessionWindows,
             calibration: CalibrationConfig, training: TrainingConfig,
             log: Callable[[str], None] = lambda _: None) -> FinetuneResult:
    """Finetune `model` in place by `calibration.method`; it ends holding its best state."""
    started = time.monotonic()
    budget_s = calibration.max_minutes * 60 if calibration.max_minutes else float("inf")
    torch.manual_seed(training.seed)
    rng = np.random.default_rng(training.seed)
    method = calibration.method
    set_trainable(model, method)
    optimizer = build_optimizer(model, training, calibration.learning_rate)
    best = (validation_loss(model, validation, calibration.batch_size, calibration.select_on),
            copy.deepcopy(model.state_dict()), 0)
    curve: list[dict[str, float]] = [{"epoch": 0, "validation": best[0]}]
    stale, epoch = 0, 0
    for epoch in range(1, calibration.max_epochs + 1):
        unfreeze_now = calibration.unfreeze_after and epoch == calibration.unfreeze_after + 1
        if method == "embeddings" and unfreeze_now:
            set_trainable(model, "full")
            optimizer = build_optimizer(model, training, calibration.unfreeze_learning_rate)
        model.train()
        train_losses = []
        for step, (inputs, targets) in enumerate(_batches(train, calibration.batch_size, rng)):
            if calibration.steps_per_epoch and step >= calibration.steps_per_epoch:
                break
            parts = losses(model(inputs), inputs, targets, model.spec, model.dims,
                           model.contrastive_projection)
            optimizer.zero_grad(set_to_none=True)
            parts["total"].backward()
            nn.utils.clip_grad_norm_(model.parameters(), training.grad_clip)
            optimizer.step()
            train_losses.append(float(parts["total"].detach()))
        loss = validation_loss(model, validation, calibration.batch_size, calibration.select_on)
        curve.append({"epoch": epoch, "train": float(np.mean(train_losses)), "validation": loss})
        improved = loss < best[0]
        elapsed = time.monotonic() - started
        log(f"epoch {epoch}/{calibration.max_epochs}: training loss {curve[-1]['train']:.3f}, "
            f"validation {loss:.3f}{' (best so far)' if improved else ''}, {elapsed:.0f} s")
        if improved:
            best, stale = (loss, copy.deepcopy(model.state_dict()), epoch), 0
        else:
            stale += 1
            if stale >= calibration.patience:
                break
        if elapsed >= budget_s:
            log(f"time budget of {calibration.max_minutes:g} min reached; keeping epoch "
                f"{best[2]}")
            break
    model.load_state_dict(best[1])
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad = True
    return FinetuneResult(epoch, best[2], best[0], curve)
