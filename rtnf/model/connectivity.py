"""Unit-to-unit connectivity estimates: from the model's attention, and from correlations.

Both give an (N, N) score matrix S in the simulator's convention (`GroundTruth.coupling`):
S[i, j] scores how strongly unit j drives unit i. Comparing the scores of true edges with those of
absent ones (AUROC, `rtnf.train.metrics.auroc`) tells how much connectivity each recovers.

- `attention_connectivity`: how much the spike tokens of unit i attend to those of unit j, on
  average, in a trained model. `source="self"`: the causal self-attention of the current window's
  first block (current tokens looking at earlier tokens of the same window, within 50 ms);
  `source="history"`: the first history cross-attention block (current tokens looking at the
  history window's spikes, which carries the lagged coupling). The attention probabilities are
  averaged over heads, then over every (query of unit i, key token of unit j) pair in which the
  key was visible to the query, so units that fire often are not favoured for co-occurring often.
  A query "of unit i" is, with `query_unit="own"`, a spike token of unit i (a token's attention
  to itself left out); with `query_unit="next"`, the position whose output predicts the next
  token when that token is a spike of unit i (the attention the model pays while predicting
  unit i's spike). Special tokens (SOS, EOS, PAD) are left out; pairs that never co-occur
  score 0.
- `correlation_connectivity`: the Pearson correlation of unit j's binned counts with unit i's
  one bin later, the usual model-free baseline (lagged so that it has a direction).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rtnf.model.inputs import ModelInputs
from rtnf.model.layers import causal_mask
from rtnf.model.neuroformer import Neuroformer

AttentionSource = Literal["self", "history"]
QueryUnit = Literal["own", "next"]


def _block_arguments(model: Neuroformer, inputs: ModelInputs, block: nn.Module) -> tuple:
    """The positional arguments `block` is called with when the model runs on `inputs`
    (its input states, and for a cross-attention block the keys, values, mask and rotary
    angles), captured from the model's own forward pass."""
    captured: list[tuple] = []
    handle = block.register_forward_pre_hook(lambda module, args: captured.append(args))
    try:
        model(inputs)
    finally:
        handle.remove()
    return captured[0]


def _attention(model: Neuroformer, inputs: ModelInputs, source: AttentionSource,
               query_unit: QueryUnit) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor]:
    """Head-averaged attention probabilities (B, Lq, Lk) of the current tokens in the first
    block of `source`, the local unit ids that the queries (B, Lq) and keys (B, Lk) count for,
    and which (query, key) pairs count (B, Lq, Lk): both are units and the key was visible."""
    units = inputs.current_units
    if query_unit == "own":
        query_units = units
    else:  # position q predicts token q + 1; the last position predicts nothing (PAD)
        query_units = F.pad(units[:, 1:], (0, 1), value=inputs.n_units + 2)
    if source == "self":
        block = model.current_blocks[0]
        states = _block_arguments(model, inputs, block)[0]
        normed = block.ln_attn(states)
        keys, _ = block.attn.keys_values(normed)
        length = states.shape[1]
        weights = block.attn.weights(normed, keys, causal_mask(length, length, states.device))
        key_units = units
        # "own": a token's attention to itself is left out; "next": the predicting position's
        # own token is an earlier spike like the others.
        visible = torch.ones(length, length, dtype=torch.bool, device=states.device).tril(
            -1 if query_unit == "own" else 0)
    else:
        block = model.history_blocks[0]
        states, keys, _values, mask, rotary = _block_arguments(model, inputs, block)
        weights = block.attn.weights(block.ln_attn(states), keys, mask, rotary)
        key_units = inputs.history_units
        visible = mask[:, 0] == 0  # (B, 1, Lh): what the model lets the queries see
    counted = ((query_units < inputs.n_units)[:, :, None]
               & (key_units < inputs.n_units)[:, None, :] & visible)
    return weights.mean(dim=1), query_units, key_units, counted


@torch.inference_mode()
def attention_connectivity(model: Neuroformer, batches: Iterable[ModelInputs], n_units: int,
                           source: AttentionSource = "self", query_unit: QueryUnit = "own"
                           ) -> np.ndarray:
    """Attention-derived connectivity (n_units, n_units) over the windows of `batches` (windows
    of one session with `n_units` units): A[i, j] = mean head-averaged attention probability
    from a query of unit i to a visible spike token of unit j (module docstring).

    The model runs in eval mode (no dropout) and is left in the mode it was in.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(n_units * n_units, dtype=torch.float64)
    pairs = torch.zeros(n_units * n_units, dtype=torch.float64)
    try:
        for inputs in batches:
            weights, query_units, key_units, counted = _attention(model, inputs, source,
                                                                  query_unit)
            cells = (query_units[:, :, None] * n_units + key_units[:, None, :])[counted].cpu()
            sums += torch.bincount(cells, weights=weights[counted].double().cpu(),
                                   minlength=n_units * n_units)
            pairs += torch.bincount(cells, minlength=n_units * n_units).double()
    finally:
        model.train(was_training)
    mean = torch.where(pairs > 0, sums / pairs.clamp(min=1.0), torch.zeros_like(sums))
    return mean.view(n_units, n_units).numpy()


def correlation_connectivity(counts: np.ndarray) -> np.ndarray:
    """Lagged Pearson correlation (N, N) of binned spike counts (T, N):
    C[i, j] = corr(counts[t - 1, j], counts[t, i]) over t = 1..T-1.

    Positive for excitatory drive from j to i, negative for inhibitory; a unit whose counts do
    not vary correlates 0 with everything.
    """
    counts = np.asarray(counts, dtype=np.float64)
    now, before = counts[1:], counts[:-1]

    def standardized(x: np.ndarray) -> np.ndarray:
        deviation = x - x.mean(axis=0)
        scale = deviation.std(axis=0)
        return np.divide(deviation, scale, out=np.zeros_like(deviation), where=scale > 0)

    return standardized(now).T @ standardized(before) / now.shape[0]
