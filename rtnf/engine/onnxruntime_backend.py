"""The ONNX Runtime backend (CPU): one InferenceSession per exported graph.

Sessions run sequentially with `engine.threads` intra-op threads and one inter-op thread, all
graph optimisations on, and thread spinning as `engine.spin` says (off is often better on a
small machine, where spinning threads steal the core the loop needs). The optimised graph is
saved under the bundle's engines/ directory, keyed by ONNX Runtime version and processor,
since the optimiser's layout choices are specific to both, and named by the sha256 of the graph
it was optimised from (a re-exported graph is optimised afresh), with its own sha256 beside it
(`rtnf.engine.cache_integrity`); later starts load it directly once it matches that digest,
and otherwise optimise the bundle's (verified) graph again.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from rtnf.bundle import sha256_file
from rtnf.engine.cache_integrity import digest_path, read_verified, write_digest


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, models: dict[str, Path], cache_dir: Path | None, threads: int,
                 spin: bool):
        import onnxruntime

        self.threads, self.spin = threads, spin
        self.sessions: dict[str, Any] = {}
        self.inputs: dict[str, list[str]] = {}
        self.outputs: dict[str, list[str]] = {}
        if cache_dir is not None:
            cache_dir = cache_dir / f"onnxruntime-{onnxruntime.__version__}-{platform.machine()}"
            cache_dir.mkdir(parents=True, exist_ok=True)
        self.cache_dir = cache_dir
        for name, path in models.items():
            optimised = None if cache_dir is None else _optimised_path(cache_dir, name, Path(path))
            session = self._session(Path(path), optimised)
            self.sessions[name] = session
            self.inputs[name] = [item.name for item in session.get_inputs()]
            self.outputs[name] = [item.name for item in session.get_outputs()]

    def _options(self) -> Any:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning",
                                         "1" if self.spin else "0")
        options.log_severity_level = 3  # errors only
        return options

    def _session(self, source: Path, optimised: Path | None) -> Any:
        """A session on the verified optimised graph cached at `optimised`, or one that
        optimises `source` and (when `optimised` is given) caches the result with its sha256."""
        import onnxruntime

        levels = onnxruntime.GraphOptimizationLevel
        options = self._options()
        cached = None if optimised is None else read_verified(optimised)
        if cached is not None:  # the bytes checked are the bytes loaded
            options.graph_optimization_level = levels.ORT_DISABLE_ALL
            return onnxruntime.InferenceSession(cached, options,
                                                providers=["CPUExecutionProvider"])
        options.graph_optimization_level = levels.ORT_ENABLE_ALL
        if optimised is not None:
            options.optimized_model_filepath = str(optimised)
        session = onnxruntime.InferenceSession(str(source), options,
                                               providers=["CPUExecutionProvider"])
        if optimised is not None:  # ONNX Runtime wrote it while creating the session
            write_digest(optimised)
        return session

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        feeds = {name: inputs[name].numpy() for name in self.inputs[graph]}
        outputs = self.sessions[graph].run(self.outputs[graph], feeds)
        return tuple(torch.from_numpy(out) for out in outputs)

    def describe(self) -> dict[str, Any]:
        import onnxruntime

        return {"backend": self.name, "device": "cpu", "onnxruntime": onnxruntime.__version__,
                "threads": self.threads, "spin": self.spin,
                "optimized_graphs": None if self.cache_dir is None else str(self.cache_dir)}


def _optimised_path(cache_dir: Path, name: str, source: Path) -> Path:
    """Where the optimised form of graph `name` exported as `source` is cached; the optimised
    forms of earlier exports of that graph are removed."""
    path = cache_dir / f"{name}.{sha256_file(source)[:16]}.optimized.onnx"
    for stale in cache_dir.glob(f"{name}.*.optimized.onnx"):
        if stale != path:
            stale.unlink(missing_ok=True)
            digest_path(stale).unlink(missing_ok=True)
    return path
