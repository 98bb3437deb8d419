"""The torch backend on a CUDA GPU: static buffers, one captured CUDA graph per shape bucket.

Each call pads its dynamic lengths up to a bucket (`rtnf.engine.buckets`), copies the inputs
through pinned host buffers into the bucket's static device buffers on a dedicated stream,
replays the graph captured for that bucket (captured on first use, after warm-up runs on the
same stream) and copies the outputs back through pinned buffers. With `precision` fp16 the
graphs run under autocast (matmuls in half precision; LayerNorm, softmax and the outputs in
fp32). History spikes beyond the largest bucket are processed in chunks.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from rtnf.engine.buckets import (SPIKE_CHUNK, bucket, in_chunks, lengths, pad_inputs,
                                 trim_outputs)
from rtnf.engine.graphs import Graph


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # static device buffers
    staging: dict[str, torch.Tensor]  # pinned host buffers for the inputs
    outputs: tuple[torch.Tensor, ...]  # static device outputs
    results: tuple[torch.Tensor, ...]  # pinned host buffers for the outputs


class CudaGraphRunner:
    def __init__(self, graphs: dict[str, Graph], device: torch.device, precision: str):
        self.device, self.precision = device, precision
        self.graphs = {name: graph.to(device) for name, graph in graphs.items()}
        model = next(iter(self.graphs.values())).model
        n_units = int(next(iter(self.graphs.values())).unit_rows.numel())
        self.unit_pad, self.dt_pad = n_units + 2, model.dims.current_bins + 2
        self.largest = {"tokens": model.dims.current_capacity,
                        "history": model.dims.history_capacity, "spikes": SPIKE_CHUNK}
        self.stream = torch.cuda.Stream(device)
        self.captured: dict[tuple, _Captured] = {}

    def _autocast(self):
        if self.precision == "fp16":
            return torch.autocast("cuda", dtype=torch.float16)
        return nullcontext()

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        module = self.graphs[graph]
        found = lengths(graph, inputs)
        if found.get("spikes", 0) > SPIKE_CHUNK:
            return in_chunks(lambda part: self.run(graph, part), inputs, found["spikes"],
                             SPIKE_CHUNK)
        sizes = {label: bucket(length, self.largest[label]) for label, length in found.items()}
        padded = pad_inputs(graph, inputs, sizes, self.unit_pad, self.dt_pad)
        key = (graph, tuple(sorted(sizes.items())))
        entry = self.captured.get(key)
        if entry is None:
            entry = self.captured[key] = self._capture(module, padded)
        with torch.cuda.stream(self.stream):
            for name, value in padded.items():
                entry.staging[name].copy_(value)
                entry.inputs[name].copy_(entry.staging[name], non_blocking=True)
            entry.graph.replay()
            for result, output in zip(entry.results, entry.outputs):
                result.copy_(output, non_blocking=True)
        self.stream.synchronize()
        results = tuple(result.clone() for result in entry.results)
        return trim_outputs(graph, module.outputs, results, found)

    def _capture(self, module: Graph, padded: dict[str, torch.Tensor]) -> _Captured:
        inputs = {name: value.to(self.device) for name, value in padded.items()}
        staging = {name: torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                   for name, value in padded.items()}
        arguments = [inputs[name] for name in module.inputs]

        def call() -> tuple[torch.Tensor, ...]:
            with self._autocast():
                return tuple(output.float() for output in module(*arguments))

        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.no_grad(), torch.cuda.stream(self.stream):
            for _ in range(3):  # warm-up on the capture stream (allocator, kernels, autotuning)
                call()
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, stream=self.stream):
            outputs = call()
        results = tuple(torch.empty(output.shape, dtype=output.dtype, pin_memory=True)
                        for output in outputs)
        return _Captured(graph, inputs, staging, outputs, results)
