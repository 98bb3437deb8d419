"""What every engine backend provides: run one graph on named tensors, describe itself.

A backend runs the graphs of `rtnf.engine.graphs` (history, context, decode, step) for one
calibrated session. Inputs are CPU torch tensors keyed by the graph's input names; outputs come
back as CPU torch tensors in the graph's output order. Backends keep no state between calls
beyond their own buffers: caches travel as inputs and outputs.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Backend(Protocol):
    name: str

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Outputs of `graph` for `inputs`, in the graph's output order."""
        ...

    def describe(self) -> dict[str, Any]:
        """What was built: backend, device, library versions, options."""
        ...
