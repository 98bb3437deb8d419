"""ONNX export of the hot-call graphs (`rtnf.engine.graphs`), checked and compared with torch.

Each graph is exported with torch's exporter (torch.export + onnxscript, opset 18) with
dynamic token, spike and history lengths, validated with the ONNX checker, and run once through
ONNX Runtime against the torch graph on fresh random inputs: the largest error relative to the
output's scale is recorded, and an export beyond `tolerance` is refused. Masks are finite
(`torch.finfo.min`), never -inf, so no row of attention can turn into NaN.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rtnf.engine.graphs import Graph, dynamic_axes, example_inputs

OPSET = 18
PARITY_TOLERANCE = 1e-4
MAX_LENGTH = 65536  # upper bound of every dynamic axis (tokens, history, spikes)


@dataclass(frozen=True)
class ExportedGraph:
    name: str
    path: Path
    sha256: str
    parity: float  # max |onnx - torch| / max(1, max |torch|) over outputs, fresh random inputs


def relative_error(actual: list[np.ndarray], expected: list[np.ndarray]) -> float:
    """Largest absolute difference over all outputs, relative to each output's scale (>= 1)."""
    return max(float(np.abs(a - e).max() / max(1.0, float(np.abs(e).max())))
               for a, e in zip(actual, expected))


def _dynamic_shapes(graph: Graph) -> tuple[dict[int, torch.export.Dim] | None, ...]:
    axes = dynamic_axes(graph.name, graph.inputs)
    dims: dict[str, torch.export.Dim] = {}
    return tuple({axis: dims.setdefault(label, torch.export.Dim(label, min=1, max=MAX_LENGTH))
                  for axis, label in axes[name].items()} if name in axes else None
                 for name in graph.inputs)


def export_graph(graph: Graph, path: str | Path, seed: int = 0,
                 tolerance: float = PARITY_TOLERANCE) -> ExportedGraph:
    """Export `graph` to `path` (ONNX), check it and measure its parity with torch."""
    import onnx
    import onnxruntime

    path = Path(path)
    generator = torch.Generator().manual_seed(seed)
    inputs = example_inputs(graph, generator)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # notes about absent torchvision
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, tuple(inputs.values()), dynamo=True,
                                    input_names=list(graph.inputs),
                                    output_names=list(graph.outputs), opset_version=OPSET,
                                    dynamic_shapes={"tensors": _dynamic_shapes(graph)},
                                    optimize=True, verbose=False)
    program.save(str(path))
    onnx.checker.check_model(str(path), full_check=True)

    fresh = example_inputs(graph, torch.Generator().manual_seed(seed + 1), tokens=7, history=19)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run(None, {name: value.numpy() for name, value in fresh.items()})
    with torch.inference_mode():
        expected = [out.numpy() for out in graph(*fresh.values())]
    parity = relative_error(actual, expected)
    if not parity <= tolerance:
        raise RuntimeError(f"ONNX export of the {graph.name} graph differs from torch by "
                           f"{parity:.2e} (relative), above {tolerance:.0e}")
    return ExportedGraph(graph.name, path, hashlib.sha256(path.read_bytes()).hexdigest(), parity)
