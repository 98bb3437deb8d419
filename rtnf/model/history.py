"""Incremental window decoding: the history's keys/values computed once per spike.

Under the rotary time encoding a history spike's keys and values depend only on its unit and
its absolute time bin, not on the window, so when the window slides by one hop only the spikes
that just entered the history need computing. `HistoryCache` keeps the keys/values of the spikes
added so far, stacked over history layers (layers, 1, heads, spikes, head_dim), in arrival
order (time-then-unit order); for a window it selects those inside the window's history span,
keeps the latest `max_spikes` of them (as `rtnf.tokens` does) and puts the window's SOS token
first. Spikes that fell out of every later window are dropped as windows move forward.

The keys/values come from a `KeysValuesFunction`: the torch model's (`model_keys_values`) or a
compiled engine's history graph.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from rtnf.model.neuroformer import Neuroformer
from rtnf.tokens import TokenSpec

KeysValues = tuple[torch.Tensor, torch.Tensor]  # each (history layers, 1, heads, L, head_dim)
# (local unit ids (1, L), absolute bins (1, L)) -> their stacked keys and values.
KeysValuesFunction = Callable[[torch.Tensor, torch.Tensor], KeysValues]


def model_keys_values(model: Neuroformer, unit_rows: torch.Tensor, session_row: torch.Tensor
                      ) -> KeysValuesFunction:
    """The torch model's history keys/values for one session's units."""
    def keys_values(units: torch.Tensor, bins: torch.Tensor) -> KeysValues:
        return stacked(model.history_keys_values(units, model.rotary(bins), unit_rows,
                                                 session_row))

    return keys_values


def stacked(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> KeysValues:
    """One (keys, values) pair per layer -> keys and values stacked over layers."""
    return torch.stack([k for k, _ in layers]), torch.stack([v for _, v in layers])


def as_layers(keys_values: KeysValues) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stacked keys/values -> one (keys, values) pair per layer, as `Context.history` holds."""
    keys, values = keys_values
    return list(zip(keys.unbind(0), values.unbind(0)))


class HistoryCache:
    """History keys/values of one stream of windows (batch 1)."""

    def __init__(self, keys_values: KeysValuesFunction, n_units: int, spec: TokenSpec):
        self.keys_values, self.sos = keys_values, n_units
        self.n_bins, self.max_spikes = spec.history.n_bins, spec.history.max_spikes
        self.bins = torch.zeros(0, dtype=torch.long)
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.bins.shape[0])

    @torch.inference_mode()
    def add(self, units: np.ndarray | torch.Tensor, bins: np.ndarray | torch.Tensor) -> None:
        """Compute and keep the keys/values of new spikes (local unit ids, absolute bins),
        which must come after every spike already added, in time-then-unit order."""
        units = torch.as_tensor(units, dtype=torch.long)
        bins = torch.as_tensor(bins, dtype=torch.long)
        if units.numel() == 0:
            return
        keys, values = self.keys_values(units[None], bins[None])
        if self.keys is not None:
            keys = torch.cat((self.keys, keys), dim=3)
            values = torch.cat((self.values, values), dim=3)
        self.keys, self.values = keys, values
        self.bins = torch.cat((self.bins, bins))

    @torch.inference_mode()
    def window(self, history_start_bin: int) -> KeysValues:
        """The history keys/values (SOS first) of the window whose history starts at
        `history_start_bin`; spikes before it are dropped for good."""
        expired = int(torch.searchsorted(self.bins, history_start_bin))
        if expired:
            self.bins = self.bins[expired:]
            self.keys, self.values = self.keys[:, :, :, expired:], self.values[:, :, :, expired:]
        inside = int(torch.searchsorted(self.bins, history_start_bin + self.n_bins))
        first = max(0, inside - self.max_spikes)
        sos_keys, sos_values = self.keys_values(torch.tensor([[self.sos]]),
                                                torch.tensor([[history_start_bin]]))
        if self.keys is None:
            return sos_keys, sos_values
        return (torch.cat((sos_keys, self.keys[:, :, :, first:inside]), dim=3),
                torch.cat((sos_values, self.values[:, :, :, first:inside]), dim=3))
