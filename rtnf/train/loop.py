"""The training loop: one process, or many through torchrun (DistributedDataParallel).

Stages of each step: next batch (windows of one session, in an order fixed by the seed and the
epoch) -> forward + losses (bfloat16 autocast on a GPU when `training.amp`) -> backward ->
gradient clipping -> AdamW step at the scheduled learning rate. Every `eval_every` steps and at
the end: validation losses and next-window bits/spike on the held-out blocks, then a checkpoint
with the optimiser state, so an interrupted run resumes (`resume=True`) where it stopped.

Under torchrun (WORLD_SIZE > 1) every rank builds the same sequence of batches and takes every
WORLD_SIZE-th one; DDP averages the gradients, so all ranks hold identical weights. Only rank 0
writes files and prints.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rtnf.config import TrainingConfig
from rtnf.model.checkpoint import (Checkpoint, load_training_state, save_checkpoint,
                                   save_training_state)
from rtnf.model.inputs import ModelInputs, ModelTargets
from rtnf.model.losses import losses
from rtnf.model.neuroformer import Neuroformer
from rtnf.train.dataset import TrainingData
from rtnf.train.metrics import bits_per_spike
from rtnf.train.optim import build_optimizer, learning_rate_at


class Objective(nn.Module):
    """The model and its losses as one module, so DDP sees a single forward."""

    def __init__(self, model: Neuroformer):
        super().__init__()
        self.model = model

    def forward(self, inputs: ModelInputs, targets: ModelTargets) -> dict[str, torch.Tensor]:
        output = self.model(inputs)
        return losses(output, inputs, targets, self.model.spec, self.model.dims,
                      self.model.contrastive_projection)


@dataclass
class Distributed:
    """This process's place among torchrun's processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_environment(cls) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        use_cuda = torch.cuda.is_available()
        if world == 1:
            return cls(device=torch.device("cuda" if use_cuda else "cpu"))
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        rank = dist.get_rank()
        device = torch.device("cpu")
        if use_cuda:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        return cls(rank=rank, world=world, device=device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group (torchrun's processes then exit cleanly)."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()  # no rank tears down while another still talks to it
            dist.destroy_process_group()

    def replicas_agree(self, model: nn.Module) -> bool:
        """Whether every rank holds the same weights (a float64 checksum of all parameters)."""
        if self.world == 1:
            return True
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).cpu()
        gathered = [torch.zeros_like(checksum) for _ in range(self.world)]
        dist.all_gather(gathered, checksum)
        return all(torch.equal(g, checksum) for g in gathered)

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank."""
        if self.world == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    seconds: float
    stopped_by: str  # "max_steps", "time" or "interrupted"
    train_loss: float
    validation: dict[str, float]
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    world_size: int = 1
    replicas_agree: bool = True  # every rank ended with identical weights


def _batches(data: TrainingData, batch_size: int, seed: int, start_step: int,
             distributed: Distributed) -> Iterator[tuple[ModelInputs, ModelTargets]]:
    """This rank's batches from `start_step` on, epoch after epoch (epoch e drawn from
    (seed, e)), the same on every restart."""
    index, epoch = 0, 0
    while True:
        rng = np.random.default_rng([seed, epoch])
        for batch in data.batches("train", batch_size, rng, shuffle=True):
            step, slot = divmod(index, distributed.world)
            index += 1
            if slot == distributed.rank and step >= start_step:
                yield batch
        epoch += 1


@torch.no_grad()
def evaluate(model: Neuroformer, data: TrainingData, batch_size: int,
             device: torch.device) -> dict[str, float]:
    """Mean validation losses and next-window bits/spike (vs each unit's training mean)."""
    model.eval()
    totals: dict[str, float] = {}
    weight = 0
    counts, expected, baseline = [], [], []
    for train_block, block in zip(data.train, data.validation):
        if len(block) < 2:
            continue
        mean_counts = train_block.mean_next_counts()
        for start in range(0, len(block) - 1, batch_size):
            indices = np.arange(start, min(start + batch_size, len(block)))
            if indices.size < 2:
                continue
            inputs, targets = (part.to(device) for part in block.batch(indices))
            output = model(inputs)
            parts = losses(output, inputs, targets, model.spec, model.dims,
                           model.contrastive_projection)
            for name, value in parts.items():
                totals[name] = totals.get(name, 0.0) + float(value) * indices.size
            weight += indices.size
            expected.append(output.log_rates.exp().cpu().numpy())
            counts.append(targets.next_counts.cpu().numpy())
            baseline.append(np.broadcast_to(mean_counts, counts[-1].shape))
    model.train()
    if weight == 0:
        return {}
    result = {name: value / weight for name, value in totals.items()}
    result["bits_per_spike"] = bits_per_spike(np.concatenate(counts), np.concatenate(expected),
                                              np.concatenate(baseline))
    return result


class Progress:
    """One status line on stderr: rewritten in place on a terminal, printed at evaluations
    otherwise (logs stay readable)."""

    def __init__(self, total_steps: int, enabled: bool):
        self.total, self.enabled = total_steps, enabled
        self.terminal = sys.stderr.isatty()

    def update(self, step: int, parts: dict[str, float], rate: float, final: bool = False
               ) -> None:
        if not self.enabled or not (self.terminal or final):
            return
        width = 24
        done = int(width * step / self.total)
        losses_text = " ".join(f"{k} {v:.3f}" for k, v in parts.items())
        line = (f"[{'#' * done}{'.' * (width - done)}] step {step}/{self.total} "
                f"{losses_text} ({rate:.1f} steps/s)")
        print(("\r" if self.terminal else "") + line, end="\n" if final else "",
              file=sys.stderr, flush=True)


def train(model: Neuroformer, data: TrainingData, training: TrainingConfig, out: str | Path,
          describe: Callable[[dict[str, Any]], Checkpoint], resume: bool = False,
          distributed: Distributed | None = None, show_progress: bool = True,
          should_stop: Callable[[int], bool] | None = None) -> TrainResult:
    """Train `model` on `data`; checkpoints (from `describe(summary)`) go to `out`.

    `should_stop(step)` is asked before every step (e.g. set by Ctrl-C): the run then stops
    between steps and saves a checkpoint that `resume=True` continues from exactly.
    """
    distributed = distributed or Distributed()
    device = distributed.device
    torch.manual_seed(training.seed)
    model.to(device).train()
    objective: nn.Module = Objective(model)
    if distributed.world > 1:
        objective = DistributedDataParallel(objective)
    optimizer = build_optimizer(model, training)
    state = load_training_state(out, optimizer, model) if resume else None
    start_step = state["step"] if state else 0
    tokens_seen = state["tokens_seen"] if state else 0
    evaluations: list[dict[str, Any]] = state["evaluations"] if state else []
    use_amp = training.amp and device.type == "cuda"
    progress = Progress(training.max_steps, show_progress and distributed.main)

    started = time.monotonic()
    batches = _batches(data, training.batch_size, training.seed, start_step, distributed)
    step, stopped_by, last = start_step, "max_steps", {}
    while step < training.max_steps:
        out_of_time = training.minutes > 0 and time.monotonic() - started > 60 * training.minutes
        asked = should_stop is not None and should_stop(step)
        if distributed.any(out_of_time or asked):
            stopped_by = "time" if out_of_time else "interrupted"
            break
        inputs, targets = (part.to(device) for part in next(batches))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, training.learning_rate, training.warmup_steps,
                                           training.max_steps)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            parts = objective(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        parts["total"].backward()
        nn.utils.clip_grad_norm_(model.parameters(), training.grad_clip)
        optimizer.step()
        step += 1
        tokens_seen += int((inputs.current_units != inputs.n_units + 2).sum()) * distributed.world
        last = {name: float(value.detach()) for name, value in parts.items()}
        if not all(math.isfinite(v) for v in last.values()):
            raise FloatingPointError(f"training diverged at step {step}: losses {last}")
        rate = (step - start_step) / max(1e-9, time.monotonic() - started)
        progress.update(step, {"loss": last["total"]}, rate)
        if step % training.eval_every == 0 or step == training.max_steps:
            evaluations.append(_checkpoint(model, data, training, out, describe, optimizer, step,
                                           tokens_seen, evaluations, last, distributed))
            progress.update(step, {"loss": last["total"],
                                   "val": evaluations[-1]["validation"].get("total", float("nan"))}, rate,
                            final=not progress.terminal)
    if not evaluations or evaluations[-1]["step"] != step:
        evaluations.append(_checkpoint(model, data, training, out, describe, optimizer, step,
                                       tokens_seen, evaluations, last, distributed))
    if progress.terminal and distributed.main:
        print(file=sys.stderr)
    return TrainResult(step, tokens_seen, time.monotonic() - started, stopped_by,
                       last.get("total", float("nan")), evaluations[-1]["validation"],
                       evaluations, distributed.world, distributed.replicas_agree(model))


def _checkpoint(model: Neuroformer, data: TrainingData, training: TrainingConfig,
                out: str | Path, describe: Callable[[dict[str, Any]], Checkpoint],
                optimizer: torch.optim.Optimizer, step: int, tokens_seen: int,
                evaluations: list[dict[str, Any]], last: dict[str, float],
                distributed: Distributed) -> dict[str, Any]:
    """Validate, then (rank 0) write the checkpoint and the state to resume from."""
    validation = evaluate(model, data, training.batch_size, distributed.device)
    record = {"step": step, "tokens_seen": tokens_seen, "train": last, "validation": validation}
    if distributed.main:
        save_checkpoint(describe(record), out)
        save_training_state(out, optimizer, model, {"step": step, "tokens_seen": tokens_seen,
                                                    "evaluations": [*evaluations, record]})
    if distributed.world > 1:
        dist.barrier()
    return record
