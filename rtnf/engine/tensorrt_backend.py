"""The TensorRT backend (NVIDIA GPUs): plans built on the rig from the bundle's ONNX graphs.

For each graph: the ONNX file (converted to fp16 first when `engine.precision` is fp16; see
`rtnf.engine.tensorrt_plan`) is parsed with TensorRT's ONNX parser and built with one
optimisation profile over its dynamic dimensions and a timing cache shared by the builds of
this GPU and TensorRT version. The plan is cached under the bundle's engines/tensorrt/ by
`plan_key`, and the fp16 graph and the timing cache beside it, each with its sha256
(`rtnf.engine.cache_integrity`); a cached file that does not match its sha256, or a plan that no
longer deserialises (another TensorRT), is rebuilt.

Calls run on torch-owned device memory: inputs are copied to the GPU, outputs allocated at the
shapes the execution context reports, every address set with `set_tensor_address`, and the
plan enqueued with `execute_async_v3` on a dedicated (non-default) CUDA stream. TensorRT's
Python package is imported here only, so its absence never affects other backends.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch

from rtnf.engine.buckets import SPIKE_CHUNK, in_chunks, lengths
from rtnf.engine.cache_integrity import read_verified, verified, write_digest, write_verified
from rtnf.engine.graphs import Graph
from rtnf.engine.tensorrt_plan import (cached_or_built, dimension_ranges, fp16_graph, plan_key,
                                       profile_shapes)
from rtnf.errors import EngineError

WORKSPACE_BYTES = 1 << 30


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, models: dict[str, Path], graphs: dict[str, Graph], engines_dir: Path,
                 precision: str = "fp32", device: str = "cuda"):
        import tensorrt as trt

        self.trt, self.precision = trt, precision
        self.dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                       trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64,
                       trt.DataType.UINT8: torch.uint8, trt.DataType.BOOL: torch.bool}
        self.device = torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.stream = torch.cuda.Stream(self.device)
        properties = torch.cuda.get_device_properties(self.device)
        self.gpu = properties.name
        self.capability = (properties.major, properties.minor)
        self.directory = Path(engines_dir) / "tensorrt"
        self.directory.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.gpu).strip("-")
        self.timing_cache = self.directory / f"timing-{slug}-trt{trt.__version__}.cache"
        model = next(iter(graphs.values())).model
        self.ranges = dimension_ranges(model.dims)
        self.outputs = {name: graph.outputs for name, graph in graphs.items()}
        self.engines: dict[str, Any] = {}
        self.contexts: dict[str, Any] = {}
        self.plans: dict[str, str] = {}
        for name, path in models.items():
            engine = self._load_or_build(name, Path(path))
            self.engines[name] = engine
            self.contexts[name] = engine.create_execution_context()

    # ----------------------------------------------------------------------------- building

    def _load_or_build(self, name: str, onnx_path: Path) -> Any:
        if self.precision == "fp16":
            onnx_path = self._fp16_copy(onnx_path)
        profile = profile_shapes(onnx_path, self.ranges)
        digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
        key = plan_key(self.gpu, self.capability, self.trt.__version__, digest,
                       self.precision, profile)
        plan_path = self.directory / f"{name}-{key}.plan"
        self.plans[name] = plan_path.name
        return cached_or_built(plan_path, lambda: self._build(onnx_path, profile),
                               self.runtime.deserialize_cuda_engine)

    def _fp16_copy(self, onnx_path: Path) -> Path:
        digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()[:16]
        target = self.directory / f"{onnx_path.stem}-fp16-{digest}.onnx"
        if not verified(target):
            write_digest(fp16_graph(onnx_path, target))
        return target

    def _build(self, onnx_path: Path, profile: dict[str, tuple]) -> bytes:
        trt = self.trt
        builder = trt.Builder(self.logger)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        optimization = builder.create_optimization_profile()
        for name, (low, typical, high) in profile.items():
            optimization.set_shape(name, low, typical, high)
        config.add_optimization_profile(optimization)
        timing = config.create_timing_cache(read_verified(self.timing_cache) or b"")
        config.set_timing_cache(timing, False)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineError(f"TensorRT could not build a plan from {onnx_path.name} "
                              f"(see the TensorRT messages above)")
        write_verified(self.timing_cache, bytes(config.get_timing_cache().serialize()))
        return bytes(plan)

    # ----------------------------------------------------------------------------- running

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        spikes = lengths(graph, inputs).get("spikes", 0)
        if spikes > SPIKE_CHUNK:
            return in_chunks(lambda part: self.run(graph, part), inputs, spikes, SPIKE_CHUNK)
        context, engine = self.contexts[graph], self.engines[graph]
        with torch.cuda.stream(self.stream):
            device_inputs = {name: value.to(self.device, non_blocking=True).contiguous()
                             for name, value in inputs.items()}
            for name, value in device_inputs.items():
                context.set_input_shape(name, tuple(value.shape))
                context.set_tensor_address(name, value.data_ptr())
            outputs = []
            for name in self.outputs[graph]:
                dtype = self.dtypes[engine.get_tensor_dtype(name)]
                output = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype,
                                     device=self.device)
                context.set_tensor_address(name, output.data_ptr())
                outputs.append(output)
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise EngineError(f"TensorRT failed to run the {graph} graph")
            results = tuple(output.to("cpu", non_blocking=True) for output in outputs)
        self.stream.synchronize()  # device_inputs and outputs live until here
        return results

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": str(self.device), "gpu": self.gpu,
                "compute_capability": ".".join(map(str, self.capability)),
                "tensorrt": self.trt.__version__, "precision": self.precision,
                "plans": self.plans}
