"""The torch backend: the engine graphs run by torch itself, on the CPU (inference mode).

This is also the reference every other backend is compared with.
"""

from __future__ import annotations

from typing import Any

import torch

from rtnf.engine.graphs import Graph


class TorchBackend:
    name = "torch"

    def __init__(self, graphs: dict[str, Graph], threads: int):
        self.graphs, self.threads = graphs, threads
        torch.set_num_threads(threads)

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        module = self.graphs[graph]
        with torch.inference_mode():
            return module(*(inputs[name] for name in module.inputs))

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": "cpu", "torch": torch.__version__,
                "threads": self.threads}
