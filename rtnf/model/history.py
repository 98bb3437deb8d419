"""Incremental window decoding: the history's keys/values computed once per spike.

Under the rotary time encoding a history spike's keys and values depend only on its unit and
its absolute time bin, not on the window, so when the window slides by one hop only the spikes
that just entered the history need computing. `HistoryCache` keeps, per history layer, the
keys/values of the spikes added so far (in arrival order, which is time-then-unit order); for a
window it selects those inside the window's history span, keeps the latest `max_spikes` of
them (as `rtnf.tokens` does), adds the window's SOS token and returns them as the `Context`'s
history. Spikes that fell out of every later window are dropped as windows move forward.
"""

from __future__ import annotations

import numpy as np
import torch

from rtnf.model.neuroformer import Neuroformer
from rtnf.tokens import TokenSpec


class HistoryCache:
    """Per-layer history keys/values of one stream of windows (batch 1)."""

    def __init__(self, model: Neuroformer, unit_rows: torch.Tensor, session_row: torch.Tensor,
                 spec: TokenSpec):
        self.model, self.unit_rows, self.session_row = model, unit_rows, session_row
        self.n_bins, self.max_spikes = spec.history.n_bins, spec.history.max_spikes
        self.bins = torch.zeros(0, dtype=torch.long)
        empty = torch.zeros(1, model.spec.n_head, 0, model.spec.head_dim)
        self.keys = [empty] * len(model.history_blocks)
        self.values = [empty] * len(model.history_blocks)

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
        new = self.model.history_keys_values(units[None], bins[None], self.unit_rows,
                                             self.session_row)
        self.keys = [torch.cat((old, k), dim=2) for old, (k, _) in zip(self.keys, new)]
        self.values = [torch.cat((old, v), dim=2) for old, (_, v) in zip(self.values, new)]
        self.bins = torch.cat((self.bins, bins))

    @torch.inference_mode()
    def window(self, history_start_bin: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The history keys/values (SOS first) of the window whose history starts at
        `history_start_bin`; spikes before it are dropped for good."""
        expired = int(torch.searchsorted(self.bins, history_start_bin))
        if expired:
            self.bins = self.bins[expired:]
            self.keys = [k[:, :, expired:] for k in self.keys]
            self.values = [v[:, :, expired:] for v in self.values]
        inside = int(torch.searchsorted(self.bins, history_start_bin + self.n_bins))
        first = max(0, inside - self.max_spikes)
        sos = self.model.history_keys_values(
            torch.tensor([[self.unit_rows.shape[0]]]), torch.tensor([[history_start_bin]]),
            self.unit_rows, self.session_row)
        return [(torch.cat((sos_k, k[:, :, first:inside]), dim=2),
                 torch.cat((sos_v, v[:, :, first:inside]), dim=2))
                for (sos_k, sos_v), k, v in zip(sos, self.keys, self.values)]
