"""Static shapes for captured GPU graphs: dynamic lengths padded up to a few bucket sizes.

A CUDA graph (and a TensorRT context captured in one) replays fixed shapes and addresses, so
the torch CUDA backend keeps one captured graph per bucket: each dynamic length (tokens,
history, spikes; `rtnf.engine.graphs.dynamic_axes`) is padded up to the next power of two (at
least `MIN_BUCKET`, at most the axis's largest length). Padding never changes a result:

- current tokens are padded with PAD tokens, which no real token sees (causal attention:
  they come last) and which the window's pooled state leaves out;
- history keys/values are padded with zeros behind a blocked mask (`torch.finfo.min`);
- padded history spikes (units PAD) give keys/values that are cut off again (`trim_outputs`).
"""

from __future__ import annotations

from typing import Callable

import torch

from rtnf.engine.graphs import dynamic_axes

MIN_BUCKET = 8
SPIKE_CHUNK = 1024  # most new history spikes per call on GPUs; longer inputs go in chunks


def bucket(length: int, largest: int) -> int:
    """The padded size for `length`: the next power of two >= length, within [8, largest]."""
    if length > largest:
        raise ValueError(f"length {length} is above the largest bucket {largest}")
    size = MIN_BUCKET
    while size < length:
        size *= 2
    return min(size, largest)


def lengths(graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, int]:
    """The current length of each dynamic dimension of `graph`'s `inputs`."""
    found: dict[str, int] = {}
    for name, axes in dynamic_axes(graph, tuple(inputs)).items():
        for axis, label in axes.items():
            found[label] = int(inputs[name].shape[axis])
    return found


def pad_inputs(graph: str, inputs: dict[str, torch.Tensor], sizes: dict[str, int],
               unit_pad: int, dt_pad: int) -> dict[str, torch.Tensor]:
    """`inputs` with every dynamic axis padded to `sizes[dimension]` (see the module doc)."""
    fill = {"units": unit_pad, "dts": dt_pad, "history_mask": torch.finfo(torch.float32).min}
    padded = dict(inputs)
    for name, axes in dynamic_axes(graph, tuple(inputs)).items():
        tensor = inputs[name]
        for axis, label in axes.items():
            missing = sizes[label] - tensor.shape[axis]
            if missing > 0:
                shape = list(tensor.shape)
                shape[axis] = missing
                extra = torch.full(shape, fill.get(name, 0), dtype=tensor.dtype,
                                   device=tensor.device)
                tensor = torch.cat((tensor, extra), dim=axis)
        padded[name] = tensor
    return padded


def trim_outputs(graph: str, names: tuple[str, ...], outputs: tuple[torch.Tensor, ...],
                 found: dict[str, int]) -> tuple[torch.Tensor, ...]:
    """Outputs with their dynamic axes cut back to the unpadded lengths `found`."""
    axes = dynamic_axes(graph, names)
    trimmed = []
    for name, output in zip(names, outputs):
        for axis, label in axes.get(name, {}).items():
            output = output.narrow(axis, 0, found[label])
        trimmed.append(output)
    return tuple(trimmed)


def in_chunks(run: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, ...]],
              inputs: dict[str, torch.Tensor], spikes: int, chunk: int
              ) -> tuple[torch.Tensor, ...]:
    """The history graph's outputs for more spikes than its largest shape, `chunk` at a time
    (each spike's keys/values depend on that spike alone)."""
    parts = [run({name: value.narrow(1, start, min(chunk, spikes - start))
                  for name, value in inputs.items()})
             for start in range(0, spikes, chunk)]
    return tuple(torch.cat(outputs, dim=3) for outputs in zip(*parts))
