"""What the model reads (`ModelInputs`) and what it is trained against (`ModelTargets`).

One batch holds windows of one session, so one set of unit rows serves the whole batch. Token
ids are the session-local ids of `rtnf.tokens` (units 0..N-1, then SOS, EOS, PAD); the model maps
them to its table rows through `unit_rows`. Times enter as integer dt bins on a grid shared by
every window of the session (`rtnf.tokens.window_start_bins`): a token's absolute bin is its
window's start bin plus its dt, which is what the rotary time encoding of the history uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

import numpy as np
import torch

from rtnf.tokens import SampleTokens, TokenSpec, window_start_bins


@dataclass
class ModelInputs:
    unit_rows: torch.Tensor  # (N,) long: model unit-table row of each local unit
    session_row: torch.Tensor  # () long: model session-table row
    current_units: torch.Tensor  # (B, Lc) long, local ids
    current_dts: torch.Tensor  # (B, Lc) long, bins from the current window's start (+ specials)
    current_start_bin: torch.Tensor  # (B,) long, absolute bin of the current window's start
    history_units: torch.Tensor  # (B, Lh) long, local ids
    history_dts: torch.Tensor  # (B, Lh) long, bins from the history window's start (+ specials)
    history_start_bin: torch.Tensor  # (B,) long, absolute bin of the history window's start
    frames: torch.Tensor | None = None  # (B, T, H, W) uint8: the clip shown before the window end
    behavior_inputs: torch.Tensor | None = None  # (B, n_inputs) float, standardised

    @property
    def n_units(self) -> int:
        return int(self.unit_rows.shape[0])

    def trimmed(self) -> ModelInputs:
        """The same windows without the padding columns that every window has (attention
        masks make them inert, so outputs are unchanged, but they cost compute)."""
        pad = self.n_units + 2
        current = int((self.current_units != pad).sum(dim=1).max())
        history = int((self.history_units != pad).sum(dim=1).max())
        return dataclasses.replace(
            self, current_units=self.current_units[:, :current],
            current_dts=self.current_dts[:, :current],
            history_units=self.history_units[:, :history],
            history_dts=self.history_dts[:, :history])

    def to(self, device: torch.device | str) -> ModelInputs:
        return ModelInputs(**{f.name: None if getattr(self, f.name) is None
                              else getattr(self, f.name).to(device) for f in fields(self)})


@dataclass
class ModelTargets:
    behavior: torch.Tensor  # (B, n_targets): standardised values, or long class ids
    next_counts: torch.Tensor  # (B, N) float: spikes of each unit in the next window

    def to(self, device: torch.device | str) -> ModelTargets:
        return ModelTargets(self.behavior.to(device), self.next_counts.to(device))


def inputs_from_tokens(tokens: SampleTokens, ends: np.ndarray, spec: TokenSpec,
                       unit_rows: np.ndarray | torch.Tensor, session_row: int | torch.Tensor,
                       frames: np.ndarray | None = None,
                       behavior_inputs: np.ndarray | None = None) -> ModelInputs:
    """`ModelInputs` for windows ending at `ends`, tokenized as `tokens` (a batch)."""
    current_start, history_start = window_start_bins(ends, spec)

    def tensor(array: np.ndarray | torch.Tensor | None, dtype: torch.dtype = torch.long
               ) -> torch.Tensor | None:
        return None if array is None else torch.as_tensor(array, dtype=dtype)

    return ModelInputs(
        unit_rows=tensor(unit_rows), session_row=tensor(session_row),
        current_units=tensor(tokens.current.units), current_dts=tensor(tokens.current.dts),
        current_start_bin=tensor(current_start),
        history_units=tensor(tokens.history.units), history_dts=tensor(tokens.history.dts),
        history_start_bin=tensor(history_start),
        frames=tensor(frames, torch.uint8), behavior_inputs=tensor(behavior_inputs, torch.float32))
