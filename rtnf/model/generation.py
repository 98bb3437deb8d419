"""Autoregressive next-window generation with a KV cache, and simulation several windows ahead.

`generate_tokens` starts each sequence from SOS and, step by step, samples the next token's unit
and dt from the newest position's logits (temperature, top-k, top-p or greedy), until EOS or the
window's capacity. A step is any `StepFunction`: the torch model's (`model_step`, used by
`generate_window`) or a compiled engine's (`rtnf.engine.runtime`). With `use_cache` (the
default) the model's step runs only the new token: the causal layers' keys/values of earlier
tokens come from `KVCache`s and the history / frames / behaviour keys/values from one `Context`
per window. Without it every step recomputes the whole model on the whole prefix, context
included (the original implementation's way; kept as the reference the cache is measured and
tested against).
Generated tokens are kept well formed: units are real units or EOS, dts are real bins (never
earlier than the previous token's, since tokens are ordered by time) or EOS.

`generate_ahead` simulates several windows ahead, feeding each generated window back as
history for the next (what the original meant to do but did not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from rtnf.model.inputs import ModelInputs, inputs_from_tokens
from rtnf.model.neuroformer import Context, Neuroformer
from rtnf.tokens import TokenSpec, tokenize_window, tokens_to_spikes


@dataclass(frozen=True)
class Sampling:
    """How each token is drawn from its logits (the paper samples with top-p 0.95)."""

    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 0.95  # 1: no nucleus filter
    greedy: bool = False


def sample(logits: torch.Tensor, sampling: Sampling,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row of `logits` (B, V); -inf entries are never drawn.

    Drawn by inverting the cumulative distribution of the sorted, filtered probabilities
    (one uniform number per row), which the top-k / top-p filters need sorted anyway.
    """
    if sampling.greedy:
        return logits.argmax(dim=-1)
    ordered, order = torch.sort(logits / sampling.temperature, dim=-1, descending=True)
    if sampling.top_k:
        ordered[:, sampling.top_k:] = float("-inf")
    probabilities = torch.softmax(ordered, dim=-1)
    if sampling.top_p < 1.0:
        # Drop a token when the ones ranked above it already hold top_p of the probability.
        outside = probabilities.cumsum(dim=-1) - probabilities > sampling.top_p
        probabilities = probabilities.masked_fill(outside, 0.0)
    cumulative = probabilities.cumsum(dim=-1)
    draw = torch.rand((logits.shape[0], 1), generator=generator, device=logits.device)
    rank = torch.searchsorted(cumulative, draw * cumulative[:, -1:], right=True)
    return order.gather(-1, rank.clamp(max=logits.shape[-1] - 1)).squeeze(-1)


@dataclass
class GeneratedWindow:
    units: torch.Tensor  # (B, capacity) local ids: SOS, spikes..., EOS, PAD...
    dts: torch.Tensor  # (B, capacity)
    n_spikes: torch.Tensor  # (B,)


def _allowed_units(logits: torch.Tensor, n_units: int) -> torch.Tensor:
    """Units or EOS only (never SOS or PAD)."""
    logits = logits.clone()
    logits[:, n_units] = float("-inf")  # SOS
    logits[:, n_units + 2] = float("-inf")  # PAD
    return logits


def _allowed_dts(logits: torch.Tensor, n_bins: int, previous: torch.Tensor) -> torch.Tensor:
    """Bins not earlier than `previous` (B,), or EOS (never SOS or PAD)."""
    ids = torch.arange(logits.shape[-1], device=logits.device)
    too_early = (ids[None, :] < previous[:, None]) & (ids[None, :] < n_bins)
    special = (ids == n_bins) | (ids == n_bins + 2)  # SOS, PAD
    return logits.masked_fill(too_early | special[None, :], float("-inf"))


# A generation step: (position of the newest token, units and dts so far (B, position + 1))
# -> the next token's unit and dt logits (B, vocabulary) from the newest position.
StepFunction = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def model_step(model: Neuroformer, inputs: ModelInputs, use_cache: bool = True,
               context: Context | None = None) -> StepFunction:
    """The torch model's step for the windows of `inputs`. With `use_cache` only the newest
    token runs through the model, against `KVCache`s and one `Context` per window; without it
    every step recomputes the whole model on the whole prefix, context included."""
    if use_cache and context is None:
        context = model.context(inputs)
    caches = model.new_caches(inputs.current_start_bin.shape[0],
                              inputs.current_start_bin.device) if use_cache else None

    def step(position: int, units: torch.Tensor, dts: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        start = position if use_cache else 0
        states = model.hidden_states(units[:, start:], dts[:, start:], inputs.current_start_bin,
                                     inputs.unit_rows, inputs.session_row,
                                     context if use_cache else model.context(inputs),
                                     caches, position=start)
        return model.token_logits(states[:, -1], inputs.unit_rows)

    return step


@torch.inference_mode()
def generate_tokens(step: StepFunction, batch: int, n_units: int, n_bins: int, capacity: int,
                    sampling: Sampling = Sampling(), generator: torch.Generator | None = None,
                    spikes: int | None = None, device: torch.device | None = None
                    ) -> GeneratedWindow:
    """Generate windows of tokens from SOS, one `step` at a time, until EOS or `capacity`.

    `spikes`: generate exactly this many spikes per window (EOS is held back until then), e.g.
    to time generation at a fixed length.
    """
    sos, eos, pad = n_units, n_units + 1, n_units + 2
    units = torch.full((batch, capacity), pad, dtype=torch.long, device=device)
    dts = torch.full((batch, capacity), n_bins + 2, dtype=torch.long, device=device)
    units[:, 0], dts[:, 0] = sos, n_bins
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    n_spikes = torch.zeros(batch, dtype=torch.long, device=device)
    previous_dt = torch.zeros(batch, dtype=torch.long, device=device)
    last_step = capacity - 1 if spikes is None else min(capacity - 1, spikes + 1)
    for position in range(last_step):
        unit_logits, dt_logits = step(position, units[:, :position + 1], dts[:, :position + 1])
        unit_logits = _allowed_units(unit_logits, n_units)
        dt_logits = _allowed_dts(dt_logits, n_bins, previous_dt)
        if spikes is not None and position < spikes:  # hold EOS back
            unit_logits[:, eos] = float("-inf")
            dt_logits[:, n_bins + 1] = float("-inf")
        unit = sample(unit_logits, sampling, generator)
        dt = sample(dt_logits, sampling, generator)
        ends = (unit == eos) | (dt == n_bins + 1) | (position + 1 == last_step)
        units[:, position + 1] = torch.where(finished, pad, torch.where(ends, eos, unit))
        dts[:, position + 1] = torch.where(finished, n_bins + 2,
                                           torch.where(ends, n_bins + 1, dt))
        n_spikes += (~finished & ~ends).long()
        previous_dt = torch.where(ends, previous_dt, dt)
        finished |= ends
        if bool(finished.all()):
            break
    return GeneratedWindow(units, dts, n_spikes)


@torch.inference_mode()
def generate_window(model: Neuroformer, inputs: ModelInputs, sampling: Sampling = Sampling(),
                    generator: torch.Generator | None = None, use_cache: bool = True,
                    context: Context | None = None, spikes: int | None = None
                    ) -> GeneratedWindow:
    """Generate the current window's tokens of `inputs` (its `current_*` tokens are ignored,
    but for `current_start_bin`), conditioned on its history, frames and behaviour inputs."""
    return generate_tokens(model_step(model, inputs, use_cache, context),
                           inputs.current_start_bin.shape[0], inputs.n_units,
                           model.dims.current_bins, model.dims.current_capacity, sampling,
                           generator, spikes, inputs.current_start_bin.device)


def generate_ahead(model: Neuroformer, spike_times: np.ndarray, spike_units: np.ndarray,
                   window_end: float, n_windows: int, spec: TokenSpec, unit_rows: np.ndarray,
                   session_row: int, frames_for: Callable[[float], np.ndarray | None] | None = None,
                   sampling: Sampling = Sampling(), generator: torch.Generator | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Generate the `n_windows` windows after `window_end`, one after another, each conditioned
    on a history that holds the observed spikes before `window_end` and the generated ones
    after it. Returns the generated spikes (times at bin centres, unit indices)."""
    current = spec.current.n_bins * spec.dt_resolution
    before = spike_times < window_end
    times, units = spike_times[before], np.asarray(spike_units)[before]
    generated_times, generated_units = [], []
    for k in range(1, n_windows + 1):
        end = window_end + k * current
        tokens = tokenize_window(times, units, end, spec)
        frames = None if frames_for is None else frames_for(end)[None]
        inputs = inputs_from_tokens(tokens[None], np.array([end]), spec, unit_rows, session_row,
                                    frames)
        window = generate_window(model, inputs, sampling, generator)
        new_times, new_units = tokens_to_spikes(window.units[0].numpy(), window.dts[0].numpy(),
                                                end, spec)
        times, units = np.concatenate([times, new_times]), np.concatenate([units, new_units])
        generated_times.append(new_times)
        generated_units.append(new_units)
    return np.concatenate(generated_times), np.concatenate(generated_units)
