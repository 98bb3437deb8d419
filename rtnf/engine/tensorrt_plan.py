"""What a TensorRT plan is built from, decided without TensorRT: profiles, precision, cache key.

- Optimisation profiles: every dynamic dimension of an exported graph (tokens, history, spikes)
  gets (min, opt, max) from the model's capacities; `profile_shapes` turns them into the full
  input shapes TensorRT's `set_shape` wants, read from the ONNX graph's symbolic dimensions, so
  the profiles of every input that shares a dimension agree.
- Precision: TensorRT 11 networks are strongly typed (the FP16 builder flag is gone), so reduced
  precision is written into the ONNX graph (`fp16_graph`): weights and activations in fp16,
  while LayerNormalization, Softmax, every Add (residual sums, the additive attention masks),
  the reductions and the elementwise maths that overflow easily stay in fp32, and the graph's
  inputs and outputs stay fp32.
- Plans run only on the GPU model and TensorRT version that built them, so the cache key
  (`plan_key`) covers GPU name, compute capability, TensorRT version, the ONNX graph's hash,
  precision and profile; anything different is another key, hence a rebuild, never a crash.
- A cached plan is used only when it matches the sha256 recorded beside it
  (`rtnf.engine.cache_integrity`) and deserialises; otherwise it is rebuilt (`cached_or_built`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from rtnf.engine.buckets import SPIKE_CHUNK
from rtnf.engine.cache_integrity import read_verified, write_verified
from rtnf.errors import EngineError
from rtnf.model.spec import ModelDims

FP32_OPS = ("LayerNormalization", "Softmax", "Add", "Sub", "ReduceSum", "ReduceMean", "Pow",
            "Sqrt", "Exp", "Log", "Erf", "Cos", "Sin", "Div", "Range", "Where", "Clip")
FP16_PARITY = 1e-2  # stated bound for fp16 graphs against fp32 torch (relative, as in export)
Shapes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
Loaded = TypeVar("Loaded")  # what a plan deserialises to (a TensorRT ICudaEngine)


def dimension_ranges(dims: ModelDims) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each dynamic dimension: opt is a typical window (16 tokens, 64
    history spikes, 64 new spikes per hop)."""
    tokens, history = dims.current_capacity, dims.history_capacity
    return {"tokens": (1, min(16, tokens), tokens), "history": (1, min(64, history), history),
            "spikes": (1, 64, SPIKE_CHUNK)}


def profile_shapes(onnx_path: str | Path, ranges: dict[str, tuple[int, int, int]]
                   ) -> dict[str, Shapes]:
    """(min, opt, max) shapes of each graph input with a symbolic dimension."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    shapes = {}
    for item in model.graph.input:
        dims = item.type.tensor_type.shape.dim
        symbols = [d.dim_param for d in dims if d.dim_param]
        if not symbols:
            continue
        unknown = [symbol for symbol in symbols if symbol not in ranges]
        if unknown:
            raise ValueError(f"{onnx_path}: input {item.name} has dimension {unknown[0]!r}, "
                             f"which has no range")
        shapes[item.name] = tuple(
            tuple(ranges[d.dim_param][k] if d.dim_param else d.dim_value for d in dims)
            for k in range(3))
    return shapes


def fp16_graph(source: str | Path, target: str | Path) -> Path:
    """Write `source`'s graph with fp16 weights and activations (see the module docstring)."""
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(source))
    del model.graph.value_info[:]  # the exporter's fp32 annotations; re-inferred on load
    converted = float16.convert_float_to_float16(model, keep_io_types=True,
                                                 op_block_list=list(FP32_OPS))
    # The converter types a Cast's output fp16 (e.g. uint8 frames -> float) but leaves the
    # node casting to fp32: make the node agree with the type its consumers expect.
    fp16 = {info.name for info in converted.graph.value_info
            if info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    for node in converted.graph.node:
        if node.op_type == "Cast" and node.output[0] in fp16:
            for attribute in node.attribute:
                if attribute.name == "to" and attribute.i == onnx.TensorProto.FLOAT:
                    attribute.i = onnx.TensorProto.FLOAT16
    # Outputs stay fp32 (the converter leaves some in fp16): cast them back at the end.
    for output in converted.graph.output:
        if output.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16:
            continue
        half = f"{output.name}_fp16"
        for node in converted.graph.node:
            node.output[:] = [half if name == output.name else name for name in node.output]
        converted.graph.node.append(onnx.helper.make_node(
            "Cast", [half], [output.name], to=onnx.TensorProto.FLOAT))
        output.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    onnx.checker.check_model(converted)
    onnx.save(converted, str(target))
    return Path(target)


def plan_key(gpu_name: str, compute_capability: tuple[int, int], tensorrt_version: str,
             onnx_sha256: str, precision: str, profile: dict[str, Shapes]) -> str:
    """The plan cache key: 16 hex digits over everything a plan depends on."""
    payload = json.dumps({"gpu": gpu_name, "capability": list(compute_capability),
                          "tensorrt": tensorrt_version, "onnx": onnx_sha256,
                          "precision": precision,
                          "profile": {name: [list(s) for s in shapes]
                                      for name, shapes in sorted(profile.items())}},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cached_or_built(plan_path: Path, build: Callable[[], bytes],
                    load: Callable[[bytes], Loaded | None]) -> Loaded:
    """`load` of the plan cached at `plan_path` when it matches its recorded sha256 and loads
    (`load` gives None when it cannot: another TensorRT); otherwise of the plan `build` makes,
    cached at `plan_path` with its sha256 first."""
    cached = read_verified(plan_path)
    if cached is not None:
        loaded = load(cached)
        if loaded is not None:
            return loaded
    plan = build()
    write_verified(plan_path, plan)
    loaded = load(plan)
    if loaded is None:
        raise EngineError(f"TensorRT built {plan_path.name} but cannot load it")
    return loaded
