"""Unit-to-unit connectivity estimates: from the model's attention, and from correlations.

Both give an (N, N) score matrix S in the simulator's convention (`GroundTruth.coupling`):
S[i, j] scores how strongly unit j drives unit i. Comparing the scores of true edges with those of
absent ones (AUROC, `rtnf.train.metrics.auroc`) tells how much connectivity each recovers.

- `attention_connectivity`: how much the spike tokens of unit i attend to those of unit j, on
  average, in a trained model. `source="self"`: the causal self-attention of the current window's
  first block (unit i's token looking at earlier tokens of the same window, within 50 ms);
  `source="history"`: the first history cross-attention block (the current window's tokens
  looking at the history window's spikes, which carries the lagged coupling). The attention
  probabilities are averaged over heads, then over every (query token of unit i, key token of
  unit j) pair in which the key was visible to the query, so units that fire often are not
  favoured for co-occurring often. A token's attention to itself and special tokens (SOS, EOS,
  PAD) are left out; pairs that never co-occur score 0.
- `correlation_connectivity`: the Pearson correlation of unit j's binned counts with unit i's
  one bin later, the usual model-free baseline (lagged so that it has a direction).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
import torch
from torch import nn

from rtnf.model.inputs import ModelInputs
from rtnf.model.layers import causal_mask
from rtnf.model.neuroformer import Neuroformer

AttentionSource = Literal["self", "history"]


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


def _attention(model: Neuroformer, inputs: ModelInputs, source: AttentionSource
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Head-averaged attention probabilities (B, Lq, Lk) of the current tokens in the first
    block of `source`, the key tokens' local unit ids (B, Lk), and which (query, key) pairs
    count (B, Lq, Lk): both tokens are spikes and the key was visible to the query."""
    queries_are_units = inputs.current_units < inputs.n_units
    if source == "self":
        block = model.current_blocks[0]
        states, _ = _block_arguments(model, inputs, block)
        normed = block.ln_attn(states)
        keys, _ = block.attn.keys_values(normed)
        length = states.shape[1]
        weights = block.attn.weights(normed, keys, causal_mask(length, length, states.device))
        key_units = inputs.current_units
        visible = torch.ones(length, length, dtype=torch.bool, device=states.device).tril(-1)
    else:
        block = model.history_blocks[0]
        states, keys, _values, mask, rotary = _block_arguments(model, inputs, block)
        weights = block.attn.weights(block.ln_attn(states), keys, mask, rotary)
        key_units = inputs.history_units
        visible = mask[:, 0] == 0  # (B, 1, Lh): what the model lets the queries see
    counted = queries_are_units[:, :, None] & (key_units < inputs.n_units)[:, None, :] & visible
    return weights.mean(dim=1), key_units, counted


@torch.inference_mode()
def attention_connectivity(model: Neuroformer, batches: Iterable[ModelInputs], n_units: int,
                           source: AttentionSource = "self") -> np.ndarray:
    """Attention-derived connectivity (n_units, n_units) over the windows of `batches` (windows
    of one session with `n_units` units): A[i, j] = mean head-averaged attention probability
    from a spike token of unit i to a visible spike token of unit j (module docstring).

    The model runs in eval mode (no dropout) and is left in the mode it was in.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(n_units * n_units, dtype=torch.float64)
    pairs = torch.zeros(n_units * n_units, dtype=torch.float64)
    try:
        for inputs in batches:
            weights, key_units, counted = _attention(model, inputs, source)
            cells = (inputs.current_units[:, :, None] * n_units + key_units[:, None, :])[counted]
            sums += torch.bincount(cells.cpu(), weights=weights[counted].double().cpu(),
                                   minlength=n_units * n_units)
            pairs += torch.bincount(cells.cpu(), minlength=n_units * n_units).double()
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
