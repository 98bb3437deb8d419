"""Neuroformer: a GPT-style transformer over spike tokens, with rtnf's additions for rigs.

Data flow for one window (B windows of one session at a time; shapes in brackets):

    current tokens (unit, dt) --embed--> [B, Lc, C]
        unit embedding (extendable table, keyed by animal/unit) + session token
        + temporal embedding of dt (MLP on the dt index) + learned position
      -> n_current_layers causal self-attention blocks              ("feature encoder")
      -> n_history_layers cross-attention blocks to the history     (rotary time: a history
             spike's keys/values depend only on the spike, so they are computed once per spike)
      -> n_frame_layers cross-attention blocks to stimulus-frame tokens
             (Conv3d tokenizer + learned 3D positions + n_frame_encoder_layers self-attention)
      -> n_behavior_layers cross-attention blocks to behaviour inputs (standardised scalars,
             each projected to a token), only when the configuration has inputs
      -> n_decoder_layers causal self-attention blocks -> LayerNorm
      -> heads: next unit and next dt at every position; behaviour (regression or
             classification) and next-window rates (expected count per unit) on the masked
             mean of the final states; features for the contrastive alignment.

Causality holds throughout because cross-attention is per query position. Everything the
current tokens attend to across (history, frames, behaviour inputs) is a `Context`, computed
once per window; the causal self-attention layers take a `KVCache` each during generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rtnf.model.inputs import ModelInputs
from rtnf.model.layers import (CrossBlock, KVCache, Rotary, SelfBlock, blocked,
                               rotary_angles)
from rtnf.model.spec import ModelDims, ModelSpec

SPECIALS = 3  # SOS, EOS, PAD follow the N units in a session's local ids


@dataclass
class Context:
    """Keys/values the current tokens attend to across, one (keys, values) pair per layer."""

    history: list[tuple[torch.Tensor, torch.Tensor]]
    history_mask: torch.Tensor | None  # (B, 1, 1, Lh) additive, or None when nothing is masked
    frames: list[tuple[torch.Tensor, torch.Tensor]]
    behavior: list[tuple[torch.Tensor, torch.Tensor]]
    frame_feature: torch.Tensor | None  # (B, C) mean of the encoded frame tokens
    behavior_feature: torch.Tensor | None  # (B, C) mean of the behaviour input tokens


@dataclass
class ModelOutput:
    unit_logits: torch.Tensor  # (B, L, N + 3): next token's unit (local ids)
    dt_logits: torch.Tensor  # (B, L, current dt vocabulary)
    behavior: torch.Tensor  # (B, targets) standardised, or (B, targets, classes) logits
    log_rates: torch.Tensor  # (B, N) log expected spikes of each unit in the next window
    neural_feature: torch.Tensor  # (B, C) masked mean of the final states
    frame_feature: torch.Tensor | None
    behavior_feature: torch.Tensor | None


class TemporalEmbedding(nn.Module):
    """The dt index through a small MLP (1 -> hidden -> C, GELU), as in Neuroformer."""

    def __init__(self, hidden: int, n_embd: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.GELU(), nn.Linear(hidden, n_embd))

    def forward(self, dts: torch.Tensor) -> torch.Tensor:
        return self.net(dts.to(torch.float32)[..., None])


class FrameTokenizer(nn.Module):
    """Stimulus clip (B, T, H, W) uint8 -> frame tokens (B, T'*H'*W', C) with 3D positions.

    Conv3d with kernel = stride, then LayerNorm + ReLU, then a learned embedding per (t, y, x)
    token position (the positional information the original computed but never applied).
    """

    def __init__(self, spec: ModelSpec, frame_shape: tuple[int, int, int]):
        super().__init__()
        kernel = spec.frame_kernel
        self.conv = nn.Conv3d(1, spec.n_embd, kernel_size=kernel, stride=kernel)
        self.norm = nn.LayerNorm(spec.n_embd)
        grid = [size // k for size, k in zip(frame_shape, kernel)]
        if min(grid) < 1:
            raise ValueError(f"frames {frame_shape} are smaller than the kernel {kernel}")
        self.n_tokens = grid[0] * grid[1] * grid[2]
        self.position = nn.Parameter(torch.zeros(1, self.n_tokens, spec.n_embd))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        pixels = (frames.to(torch.float32) / 127.5 - 1.0)[:, None]  # (B, 1, T, H, W) in [-1, 1]
        tokens = self.conv(pixels).flatten(2).transpose(1, 2)  # (B, tokens, C)
        return F.relu(self.norm(tokens)) + self.position


class BehaviorTokenizer(nn.Module):
    """Standardised behaviour scalars (B, n) -> one token each (B, n, C): value * w_i + b_i."""

    def __init__(self, n_inputs: int, n_embd: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_inputs, n_embd) * 0.02)
        self.bias = nn.Parameter(torch.zeros(n_inputs, n_embd))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return values[..., None] * self.weight + self.bias


class Neuroformer(nn.Module):
    def __init__(self, spec: ModelSpec, dims: ModelDims, n_units: int, n_sessions: int):
        super().__init__()
        self.spec, self.dims = spec, dims
        width, dropout = spec.n_embd, spec.dropout

        def self_blocks(count: int, causal: bool) -> nn.ModuleList:
            return nn.ModuleList(SelfBlock(width, spec.n_head, spec.mlp_ratio, dropout, causal)
                                 for _ in range(count))

        def cross_blocks(count: int) -> nn.ModuleList:
            return nn.ModuleList(CrossBlock(width, spec.n_head, spec.mlp_ratio, dropout)
                                 for _ in range(count))

        # Token embeddings. Unit-keyed tables grow with `extend` (see vocabulary.py).
        self.unit_embedding = nn.Embedding(n_units, width)
        self.special_embedding = nn.Embedding(SPECIALS, width)
        self.session_embedding = nn.Embedding(n_sessions, width)
        self.current_dt = TemporalEmbedding(spec.temporal_hidden, width)
        self.current_position = nn.Embedding(dims.current_capacity, width)
        self.embedding_dropout = nn.Dropout(dropout)

        self.current_blocks = self_blocks(spec.n_current_layers, causal=True)
        self.history_blocks = cross_blocks(spec.n_history_layers)
        self.frame_tokenizer = None
        if dims.frame_shape is not None:
            self.frame_tokenizer = FrameTokenizer(spec, dims.frame_shape)
        self.frame_encoder = self_blocks(spec.n_frame_encoder_layers if dims.frame_shape else 0,
                                         causal=False)
        self.frame_blocks = cross_blocks(spec.n_frame_layers if dims.frame_shape else 0)
        self.behavior_tokenizer = None
        if dims.behavior_inputs:
            self.behavior_tokenizer = BehaviorTokenizer(len(dims.behavior_inputs), width)
        self.behavior_blocks = cross_blocks(spec.n_behavior_layers if dims.behavior_inputs else 0)
        self.decoder_blocks = self_blocks(spec.n_decoder_layers, causal=True)
        self.final_norm = nn.LayerNorm(width)

        # Heads. The unit head's rows and the rate readout are unit-keyed (extendable) too.
        self.unit_output = nn.Embedding(n_units, width)
        self.special_output = nn.Linear(width, SPECIALS, bias=False)
        self.dt_head = nn.Linear(width, dims.current_dt_vocab, bias=False)
        per_target = dims.n_classes if dims.objective == "classification" else 1
        self.behavior_head = nn.Linear(width, len(dims.behavior_targets) * per_target)
        self.rate_projection = nn.Linear(width, width)
        self.unit_rate = nn.Embedding(n_units, width + 1)  # readout weights and bias per unit
        self.contrastive_projection = nn.Linear(width, width, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # ----------------------------------------------------------------------------- embeddings

    def embed_units(self, local_ids: torch.Tensor, unit_rows: torch.Tensor,
                    session_row: torch.Tensor) -> torch.Tensor:
        """Local token ids (units 0..N-1, then SOS, EOS, PAD) -> embeddings + session token."""
        n_units = unit_rows.shape[0]
        is_unit = local_ids < n_units
        units = self.unit_embedding(unit_rows[local_ids.clamp(max=n_units - 1)])
        specials = self.special_embedding((local_ids - n_units).clamp(min=0, max=SPECIALS - 1))
        return torch.where(is_unit[..., None], units, specials) + self.session_embedding(
            session_row)

    @staticmethod
    def token_bins(dts: torch.Tensor, start_bin: torch.Tensor, n_bins: int) -> torch.Tensor:
        """Absolute time bins of tokens: window start + dt; special tokens sit at the start."""
        return start_bin[:, None] + torch.where(dts < n_bins, dts, torch.zeros_like(dts))

    def rotary(self, bins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_angles(bins, self.spec.head_dim, self.spec.rotary_base)

    # ----------------------------------------------------------------------------- context

    def history_keys_values(self, units: torch.Tensor, rotary: Rotary, unit_rows: torch.Tensor,
                            session_row: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per history layer, keys/values of history tokens (B, Lh) whose times give `rotary`
        (`self.rotary(absolute bins)`).

        Each token's keys/values depend on nothing but the token and its time, so they can be
        computed once per spike and cached (`rtnf.model.history.HistoryCache`).
        """
        embedded = self.embed_units(units, unit_rows, session_row)
        return [block.attn.keys_values(embedded, rotary) for block in self.history_blocks]

    def frame_context(self, frames: torch.Tensor
                      ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Per frame layer, keys/values of the encoded clip (B, T, H, W), and its mean feature."""
        tokens = self.frame_tokenizer(frames)
        for block in self.frame_encoder:
            tokens = block(tokens)
        return [block.attn.keys_values(tokens) for block in self.frame_blocks], tokens.mean(dim=1)

    def behavior_context(self, values: torch.Tensor
                         ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Per behaviour layer, keys/values of the behaviour input tokens, and their mean."""
        tokens = self.behavior_tokenizer(values)
        keys_values = [block.attn.keys_values(tokens) for block in self.behavior_blocks]
        return keys_values, tokens.mean(dim=1)

    def context(self, inputs: ModelInputs,
                history: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                history_mask: torch.Tensor | None = None) -> Context:
        """Everything the current tokens attend to across, for the windows of `inputs`.

        `history` (with its `history_mask`) replaces the history's keys/values computed from
        `inputs.history_*`, e.g. by those kept in a `HistoryCache`.
        """
        if history is None:
            pad, eos = inputs.n_units + 2, inputs.n_units + 1
            kept = (inputs.history_units != pad) & (inputs.history_units != eos)
            bins = self.token_bins(inputs.history_dts, inputs.history_start_bin,
                                   self.dims.history_bins)
            history = self.history_keys_values(inputs.history_units, self.rotary(bins),
                                               inputs.unit_rows, inputs.session_row)
            history_mask = blocked(kept[:, None, None, :])
        frames, frame_feature = [], None
        if self.frame_tokenizer is not None:
            frames, frame_feature = self.frame_context(inputs.frames)
        behavior, behavior_feature = [], None
        if self.behavior_tokenizer is not None:
            behavior, behavior_feature = self.behavior_context(inputs.behavior_inputs)
        return Context(history, history_mask, frames, behavior, frame_feature, behavior_feature)

    # ----------------------------------------------------------------------------- tokens

    def new_caches(self, batch: int, device: torch.device | None = None) -> list[KVCache]:
        """One KV cache per causal self-attention layer, for generation."""
        return [KVCache(batch, self.spec.n_head, self.dims.current_capacity, self.spec.head_dim,
                        device) for _ in (*self.current_blocks, *self.decoder_blocks)]

    def hidden_states(self, units: torch.Tensor, dts: torch.Tensor, start_bin: torch.Tensor,
                      unit_rows: torch.Tensor, session_row: torch.Tensor, context: Context,
                      caches: list[KVCache] | None = None, position: int | torch.Tensor = 0,
                      rotary: Rotary | None = None, self_mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Final states (B, L, C) of current tokens at sequence positions position..position+L-1.

        Without `caches` the tokens are the whole sequence so far (position 0); with them, the
        earlier tokens' keys/values come from the caches and only the new tokens are computed.
        `rotary` (the tokens' time encoding) and `self_mask` (which cached positions each new
        token may see) are derived here unless given, as compiled engines give them.
        """
        positions = position + torch.arange(units.shape[1], device=units.device)
        x = (self.embed_units(units, unit_rows, session_row) + self.current_dt(dts)
             + self.current_position(positions))
        x = self.embedding_dropout(x)
        caches = caches or [None] * (len(self.current_blocks) + len(self.decoder_blocks))
        for block, cache in zip(self.current_blocks, caches):
            x = block(x, cache, self_mask)
        if rotary is None:
            rotary = self.rotary(self.token_bins(dts, start_bin, self.dims.current_bins))
        for block, (keys, values) in zip(self.history_blocks, context.history):
            x = block(x, keys, values, context.history_mask, rotary)
        for block, (keys, values) in zip(self.frame_blocks, context.frames):
            x = block(x, keys, values)
        for block, (keys, values) in zip(self.behavior_blocks, context.behavior):
            x = block(x, keys, values)
        for block, cache in zip(self.decoder_blocks, caches[len(self.current_blocks):]):
            x = block(x, cache, self_mask)
        return self.final_norm(x)

    # ----------------------------------------------------------------------------- heads

    def token_logits(self, states: torch.Tensor, unit_rows: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next unit (B, L, N + 3) and next dt (B, L, dt vocabulary) logits."""
        unit_logits = torch.cat((states @ self.unit_output(unit_rows).T,
                                 self.special_output(states)), dim=-1)
        return unit_logits, self.dt_head(states)

    def window_heads(self, states: torch.Tensor, units: torch.Tensor, unit_rows: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Behaviour, next-window log rates (B, N) and the pooled neural feature (B, C),
        from the masked mean of the final states over the non-padding tokens."""
        kept = (units != unit_rows.shape[0] + 2).to(states.dtype)[..., None]
        pooled = (states * kept).sum(dim=1) / kept.sum(dim=1).clamp(min=1.0)
        behavior = self.behavior_head(pooled)
        if self.dims.objective == "classification":
            behavior = behavior.view(-1, len(self.dims.behavior_targets), self.dims.n_classes)
        readout = self.unit_rate(unit_rows)  # (N, C + 1)
        log_rates = self.rate_projection(pooled) @ readout[:, :-1].T + readout[:, -1]
        return behavior, log_rates, pooled

    def forward(self, inputs: ModelInputs, context: Context | None = None) -> ModelOutput:
        """Every head for the windows of `inputs` (training, evaluation, decoding)."""
        context = self.context(inputs) if context is None else context
        states = self.hidden_states(inputs.current_units, inputs.current_dts,
                                    inputs.current_start_bin, inputs.unit_rows,
                                    inputs.session_row, context)
        unit_logits, dt_logits = self.token_logits(states, inputs.unit_rows)
        behavior, log_rates, pooled = self.window_heads(states, inputs.current_units,
                                                        inputs.unit_rows)
        return ModelOutput(unit_logits, dt_logits, behavior, log_rates, pooled,
                           context.frame_feature, context.behavior_feature)

    # ----------------------------------------------------------------------------- units

    def extend(self, n_units: int, n_sessions: int) -> None:
        """Grow the unit-keyed and session tables to `n_units` / `n_sessions` rows (new rows
        initialised like the others; existing rows unchanged)."""
        for name in ("unit_embedding", "unit_output", "unit_rate"):
            setattr(self, name, _grown(getattr(self, name), n_units))
        self.session_embedding = _grown(self.session_embedding, n_sessions)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _grown(table: nn.Embedding, rows: int) -> nn.Embedding:
    if rows <= table.num_embeddings:
        return table
    grown = nn.Embedding(rows, table.embedding_dim, device=table.weight.device,
                         dtype=table.weight.dtype)
    nn.init.normal_(grown.weight, mean=0.0, std=0.02)
    with torch.no_grad():
        grown.weight[:table.num_embeddings] = table.weight
    return grown
