"""The training objective: next unit / dt cross-entropy, contrastive alignment, behaviour, rates.

    total = loss_unit * CE(next unit) + loss_dt * CE(next dt) + loss_contrastive * InfoNCE
            + loss_behavior * (MSE or CE per target) + loss_rate * Poisson NLL(next-window counts)

with the weights of `ModelSpec` (Neuroformer's 0.45 / 0.30 / 0.25, plus 1 for behaviour and 1
for rates). Next-token targets are the sequence shifted by one; padding is ignored and EOS is a
target. Components are returned separately so that training can log each of them.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from rtnf.model.inputs import ModelInputs, ModelTargets
from rtnf.model.neuroformer import ModelOutput
from rtnf.model.spec import ModelDims, ModelSpec


def info_nce(first: torch.Tensor, second: torch.Tensor, projection: torch.nn.Module,
             temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between paired features (B, C) through a shared projection."""
    a = F.normalize(projection(first), dim=-1)
    b = F.normalize(projection(second), dim=-1)
    logits = a @ b.T / temperature
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def contrastive_loss(output: ModelOutput, projection: torch.nn.Module,
                     temperature: float) -> torch.Tensor | None:
    """InfoNCE averaged over every pair of available features (neural, frames, behaviour)."""
    features = [f for f in (output.neural_feature, output.frame_feature, output.behavior_feature)
                if f is not None]
    if len(features) < 2 or features[0].shape[0] < 2:
        return None
    pairs = [info_nce(a, b, projection, temperature)
             for a, b in itertools.combinations(features, 2)]
    return torch.stack(pairs).mean()


def behavior_loss(output: ModelOutput, targets: ModelTargets, dims: ModelDims) -> torch.Tensor:
    if dims.objective == "classification":
        return F.cross_entropy(output.behavior.reshape(-1, dims.n_classes),
                               targets.behavior.reshape(-1))
    return F.mse_loss(output.behavior, targets.behavior)


def losses(output: ModelOutput, inputs: ModelInputs, targets: ModelTargets, spec: ModelSpec,
           dims: ModelDims, projection: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each component and their weighted sum (`total`)."""
    n_units = inputs.n_units
    unit_targets = inputs.current_units[:, 1:]
    dt_targets = inputs.current_dts[:, 1:]
    components = {
        "unit": F.cross_entropy(output.unit_logits[:, :-1].transpose(1, 2), unit_targets,
                                ignore_index=n_units + 2),
        "dt": F.cross_entropy(output.dt_logits[:, :-1].transpose(1, 2), dt_targets,
                              ignore_index=dims.current_bins + 2),
        "behavior": behavior_loss(output, targets, dims),
        "rate": F.poisson_nll_loss(output.log_rates, targets.next_counts, log_input=True),
    }
    weights = {"unit": spec.loss_unit, "dt": spec.loss_dt, "behavior": spec.loss_behavior,
               "rate": spec.loss_rate}
    contrastive = contrastive_loss(output, projection, spec.temperature)
    if contrastive is not None:
        components["contrastive"] = contrastive
        weights["contrastive"] = spec.loss_contrastive
    components["total"] = sum(weights[name] * components[name] for name in weights)
    return components
