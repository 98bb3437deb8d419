"""AdamW with weight decay on Linear weights only, and warmup then cosine decay to 10%."""

from __future__ import annotations

import math

from torch import nn, optim

from rtnf.config import TrainingConfig

FINAL_LR_FRACTION = 0.1


def build_optimizer(model: nn.Module, training: TrainingConfig,
                    learning_rate: float | None = None) -> optim.AdamW:
    """AdamW over the parameters that require gradients; decay only on nn.Linear weights."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) in decayed],
         "weight_decay": training.weight_decay},
        {"params": [p for p in trainable if id(p) not in decayed], "weight_decay": 0.0},
    ]
    return optim.AdamW([g for g in groups if g["params"]],
                       lr=learning_rate or training.learning_rate, betas=tuple(training.betas))


def learning_rate_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 10% of `base` at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base * (FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * cosine)
