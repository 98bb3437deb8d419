"""Which backend runs a bundle here, and building it (`open_engine`).

`engine.backend`:
- `tensorrt`: an NVIDIA GPU with TensorRT importable; otherwise one clear error line.
- `onnxruntime`: CPU, from the bundle's ONNX graphs (exported by `rtnf compile`).
- `torch`: the CPU, or a CUDA GPU (static buffers and CUDA graphs).
- `auto`: TensorRT on an NVIDIA GPU when it is installed, torch with CUDA graphs on a GPU without
  it; on a CPU, whichever of ONNX Runtime and torch `rtnf compile` measured faster on this
  machine (engines/cpu-choice-*.json, used only when it matches the sha256 recorded beside it:
  `rtnf.engine.cache_integrity`), else ONNX Runtime when the graphs are exported and ONNX
  Runtime is installed, else torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import platform
from pathlib import Path
from typing import Any

import torch

from rtnf.bundle import Bundle
from rtnf.config import EngineConfig
from rtnf.engine.backend import Backend
from rtnf.engine.cache_integrity import read_verified, write_verified
from rtnf.engine.graphs import session_graphs
from rtnf.engine.runtime import Engine
from rtnf.errors import EngineError

ONNX_DIR, ENGINES_DIR = "onnx", "engines"


def onnx_paths(bundle: Bundle) -> dict[str, Path]:
    """The bundle's exported graphs (empty before `rtnf compile`)."""
    graphs = bundle.manifest.get("onnx", {}).get("graphs", {})
    return {name: bundle.directory / record["file"] for name, record in graphs.items()}


def tensorrt_unavailable() -> str | None:
    """Why TensorRT cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    try:
        importlib.import_module("tensorrt")
    except Exception as exc:  # ImportError, or a broken install failing to load its libraries
        return f"TensorRT is not installed ({type(exc).__name__}: {exc})"
    return None


def _onnxruntime_unavailable(bundle: Bundle) -> str | None:
    if importlib.util.find_spec("onnxruntime") is None:
        return "ONNX Runtime is not installed (pip install 'rtnf[onnx]')"
    if not onnx_paths(bundle):
        return f"the bundle has no ONNX graphs yet (run: rtnf compile --bundle {bundle.directory})"
    return None


def cpu_choice_path(directory: Path, engine: EngineConfig) -> Path:
    """Where `rtnf compile` records the CPU backend it measured faster on this machine."""
    onnxruntime = importlib.util.find_spec("onnxruntime") is not None
    version = __import__("onnxruntime").__version__ if onnxruntime else "none"
    key = (f"{platform.machine()}-torch{torch.__version__}-ort{version}"
           f"-threads{engine.threads}").replace("+", "_")
    return Path(directory) / ENGINES_DIR / f"cpu-choice-{key}.json"


def write_cpu_choice(directory: Path, engine: EngineConfig, choice: dict[str, Any]) -> None:
    """Record `rtnf compile`'s measured CPU choice (`chosen`: the backend) for this machine,
    with its sha256."""
    path = cpu_choice_path(directory, engine)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_verified(path, json.dumps(choice, indent=2).encode())


def recorded_cpu_choice(directory: Path, engine: EngineConfig) -> str | None:
    """The CPU backend `rtnf compile` measured faster here, or None when none is recorded or
    the record fails its sha256 check (then it is discarded, with a warning)."""
    recorded = read_verified(cpu_choice_path(directory, engine))
    return None if recorded is None else json.loads(recorded)["chosen"]


def resolve(requested: str, bundle: Bundle, engine: EngineConfig) -> str:
    """The backend `requested` (or `auto`) means here; a clear error when it cannot run."""
    if requested == "tensorrt":
        reason = tensorrt_unavailable()
        if reason:
            raise EngineError(f"engine.backend = tensorrt: {reason}; use auto, onnxruntime or "
                              f"torch")
        return requested
    if requested == "onnxruntime":
        reason = _onnxruntime_unavailable(bundle)
        if reason:
            raise EngineError(f"engine.backend = onnxruntime: {reason}")
        return requested
    if requested == "torch":
        return requested
    if torch.cuda.is_available():
        return "tensorrt" if tensorrt_unavailable() is None and onnx_paths(bundle) else "torch"
    if _onnxruntime_unavailable(bundle):
        return "torch"
    return recorded_cpu_choice(bundle.directory, engine) or "onnxruntime"


def make_backend(name: str, bundle: Bundle, engine: EngineConfig) -> Backend:
    """Build backend `name` for the bundle (caches under its engines/ directory)."""
    engines = bundle.directory / ENGINES_DIR
    if name == "onnxruntime":
        from rtnf.engine.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(onnx_paths(bundle), engines, engine.threads, engine.spin)
    graphs = session_graphs(bundle.checkpoint.model, bundle.unit_rows, bundle.session_row)
    if name == "torch":
        from rtnf.engine.torch_backend import TorchBackend

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return TorchBackend(graphs, engine.threads, device, engine.precision)
    if name == "tensorrt":
        from rtnf.engine.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(onnx_paths(bundle), graphs, engines, engine.precision)
    raise EngineError(f"engine.backend = {name!r}: expected auto, onnxruntime, torch or "
                      f"tensorrt")


def open_engine(bundle: Bundle, engine: EngineConfig, backend: str | None = None) -> Engine:
    """The bundle's engine on the backend `backend` (default `engine.backend`) means here."""
    name = resolve(backend or engine.backend, bundle, engine)
    model = bundle.checkpoint.model
    return Engine(make_backend(name, bundle, engine), model.spec, model.dims,
                  int(bundle.unit_rows.numel()))
