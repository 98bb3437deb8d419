"""The torch backend: the engine graphs run by torch itself.

On the CPU the graphs run eagerly in inference mode (this is also the reference every other
backend is compared with). On a CUDA GPU they run from static buffers through captured CUDA
graphs, one per shape bucket (`rtnf.engine.cuda_graphs`).
"""

from __future__ import annotations

from typing import Any

import torch

from rtnf.engine.graphs import Graph


class TorchBackend:
    name = "torch"

    def __init__(self, graphs: dict[str, Graph], threads: int, device: str = "cpu",
                 precision: str = "fp32"):
        self.graphs, self.threads = graphs, threads
        self.device, self.precision = torch.device(device), precision
        torch.set_num_threads(threads)
        self.cuda = None
        if self.device.type == "cuda":
            from rtnf.engine.cuda_graphs import CudaGraphRunner

            self.cuda = CudaGraphRunner(graphs, self.device, precision)

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if self.cuda is not None:
            return self.cuda.run(graph, inputs)
        module = self.graphs[graph]
        with torch.inference_mode():
            return module(*(inputs[name] for name in module.inputs))

    def describe(self) -> dict[str, Any]:
        described = {"backend": self.name, "device": str(self.device), "torch": torch.__version__,
                     "threads": self.threads}
        if self.cuda is not None:
            described.update(gpu=torch.cuda.get_device_name(self.device),
                             precision=self.precision, cuda_graphs=True)
        return described
