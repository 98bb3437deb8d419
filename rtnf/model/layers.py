"""Transformer building blocks: attention with rotary time and a key/value cache, MLP, blocks.

- `Attention` projects queries from its input and keys/values from a context (itself for
  self-attention). Keys/values are computed by `keys_values`, separately from the attention,
  so that a caller can compute them once and keep them: the history's per spike, the frames'
  per clip, the current window's per generated token (`KVCache`).
- Rotary time encoding: queries and keys are rotated by angles proportional to their absolute
  time (in dt bins), so a score depends only on the time between query and key; a history
  spike's key is therefore the same in every window that holds it.
- Masks are additive floats: 0 where attention is allowed and the dtype's most negative finite
  value where it is not (never -inf, which turns a fully masked row into NaN).
- Blocks are pre-LayerNorm: `SelfBlock` (causal or not) and `CrossBlock` (queries normalised,
  keys/values from the raw context, as in Neuroformer), each followed by a GELU MLP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

Rotary = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (B, L, head_dim / 2)


def rotary_angles(bins: torch.Tensor, head_dim: int, base: float) -> Rotary:
    """cos / sin of the rotary angles for integer time `bins` (B, L).

    Angles are computed in float64 and reduced modulo 2*pi before the cast, so hours of session
    time (millions of bins) keep their precision.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=bins.device)
                        / head_dim)
    angles = torch.remainder(bins.to(torch.float64)[..., None] * inv_freq, 2 * math.pi)
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rotary(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Rotate the two halves of each head's features (x: B, heads, L, head_dim)."""
    cos, sin = (r[:, None].to(x.dtype) for r in rotary)
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


def blocked(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive mask from a boolean `allowed` (True = may attend)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


def causal_mask(n_queries: int, n_keys: int, device: torch.device | None = None) -> torch.Tensor:
    """(n_queries, n_keys) additive mask: query i (the last n_queries of n_keys) sees keys <= it."""
    offset = n_keys - n_queries
    keys = torch.arange(n_keys, device=device)
    queries = torch.arange(n_queries, device=device)[:, None] + offset
    return blocked(keys[None, :] <= queries)


class Attention(nn.Module):
    """Multi-head attention whose keys/values come from `keys_values` (possibly cached)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_embd, n_embd)
        self.key = nn.Linear(n_embd, n_embd)
        self.value = nn.Linear(n_embd, n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2)

    def keys_values(self, context: torch.Tensor, rotary: Rotary | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated when `rotary` is given) and values, each (B, heads, L, head_dim)."""
        keys = self._heads(self.key(context))
        if rotary is not None:
            keys = apply_rotary(keys, rotary)
        return keys, self._heads(self.value(context))

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor | None = None, rotary: Rotary | None = None) -> torch.Tensor:
        queries = self._heads(self.query(x))
        if rotary is not None:
            queries = apply_rotary(queries, rotary)
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0)
        batch, _, length, _ = out.shape
        return self.resid_dropout(self.proj(out.transpose(1, 2).reshape(batch, length, -1)))

    def weights(self, x: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None = None,
                rotary: Rotary | None = None) -> torch.Tensor:
        """Attention probabilities (B, heads, Lq, Lk), for analysis (e.g. connectivity)."""
        queries = self._heads(self.query(x))
        if rotary is not None:
            queries = apply_rotary(queries, rotary)
        scores = queries @ keys.transpose(-1, -2) / math.sqrt(queries.shape[-1])
        return torch.softmax(scores if mask is None else scores + mask, dim=-1)


class MLP(nn.Module):
    def __init__(self, n_embd: int, ratio: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(n_embd, ratio * n_embd)
        self.proj = nn.Linear(ratio * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class KVCache:
    """Keys/values of one self-attention layer for tokens 0..length-1, preallocated to capacity."""

    def __init__(self, batch: int, n_head: int, capacity: int, head_dim: int,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32):
        shape = (batch, n_head, capacity, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def append(self, keys: torch.Tensor, values: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' keys/values; return those of every token so far."""
        end = self.length + keys.shape[2]
        self.keys[:, :, self.length:end] = keys
        self.values[:, :, self.length:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class SelfBlock(nn.Module):
    """Pre-LN self-attention (causal for token sequences) + MLP, with an optional KV cache."""

    def __init__(self, n_embd: int, n_head: int, mlp_ratio: int, dropout: float, causal: bool):
        super().__init__()
        self.causal = causal
        self.ln_attn = nn.LayerNorm(n_embd)
        self.attn = Attention(n_embd, n_head, dropout)
        self.ln_mlp = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, mlp_ratio, dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` (additive, over the keys so far) replaces the causal mask derived here."""
        normed = self.ln_attn(x)
        keys, values = self.attn.keys_values(normed)
        if cache is not None:
            keys, values = cache.append(keys, values)
        # One new token may see every key so far: no mask needed (the cached generation step).
        if mask is None and self.causal and x.shape[1] > 1:
            mask = causal_mask(x.shape[1], keys.shape[2], x.device)
        x = x + self.attn(normed, keys, values, mask)
        return x + self.mlp(self.ln_mlp(x))


class CrossBlock(nn.Module):
    """Pre-LN cross-attention (queries normalised, keys/values from the raw context) + MLP."""

    def __init__(self, n_embd: int, n_head: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.ln_attn = nn.LayerNorm(n_embd)
        self.attn = Attention(n_embd, n_head, dropout)
        self.ln_mlp = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, mlp_ratio, dropout)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor | None = None, rotary: Rotary | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x), keys, values, mask, rotary)
        return x + self.mlp(self.ln_mlp(x))
