"""`rtnf compile`: export a bundle's graphs to ONNX, build the backends, choose, check parity.

1. The four graphs of `rtnf.engine.graphs` are exported to the bundle's onnx/ directory (ONNX
   checker, parity with torch), and the manifest records them (`BundleAmender`: atomic) with
   the weights' hash and the versions that exported them; graphs still current are kept.
2. Each backend asked for is built (ONNX Runtime saves its optimised graphs, TensorRT its
   plans, under engines/) and checked against the torch graphs on fresh random inputs.
3. On a CPU, `auto` is settled by measurement: the window decode and one generation step run
   on ONNX Runtime and on torch, interleaved, and the faster (by the median decode, the call
   every hop makes) is recorded in engines/ for this machine, with its sha256, so later starts
   reuse the choice.
"""

from __future__ import annotations

import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rtnf import __version__
from rtnf.bundle import Bundle, BundleAmender, load_bundle
from rtnf.config import EngineConfig
from rtnf.engine.backend import Backend
from rtnf.engine.export import OPSET, export_graph, relative_error
from rtnf.engine.graphs import Graph, example_inputs, session_graphs
from rtnf.engine.select import ENGINES_DIR, ONNX_DIR, make_backend, resolve, write_cpu_choice
from rtnf.model.checkpoint import WEIGHTS

CHOICE_ROUNDS = 30


def export_bundle(bundle: Bundle) -> dict[str, Any]:
    """Export the bundle's graphs into onnx/ and record them in the manifest, unless graphs
    exported from the same weights by the same rtnf and torch are there already."""
    stamp = {"weights_sha256": bundle.manifest["files"][WEIGHTS]["sha256"], "rtnf": __version__,
             "torch": torch.__version__, "opset": OPSET}
    recorded = bundle.manifest.get("onnx", {})
    if {key: recorded.get(key) for key in stamp} == stamp:
        return recorded["graphs"]
    graphs = session_graphs(bundle.checkpoint.model, bundle.unit_rows, bundle.session_row)
    records = {}
    amender = BundleAmender(bundle.directory, {})
    with amender as staging:
        shutil.rmtree(staging / ONNX_DIR, ignore_errors=True)
        (staging / ONNX_DIR).mkdir()
        for name, graph in graphs.items():
            exported = export_graph(graph, staging / ONNX_DIR / f"{name}.onnx")
            records[name] = {"file": f"{ONNX_DIR}/{name}.onnx", "parity": exported.parity,
                             "inputs": list(graph.inputs), "outputs": list(graph.outputs)}
        amender.extra["onnx"] = {**stamp, "graphs": records}
    return records


def backend_parity(backend: Backend, graphs: dict[str, Graph], seed: int = 11) -> dict[str, float]:
    """Relative error of each graph on `backend` against torch, on fresh random inputs."""
    generator = torch.Generator().manual_seed(seed)
    errors = {}
    for name, graph in graphs.items():
        inputs = example_inputs(graph, generator, tokens=21, history=37)
        with torch.inference_mode():
            expected = [out.numpy() for out in graph(*inputs.values())]
        actual = [out.numpy() for out in backend.run(name, inputs)]
        errors[name] = relative_error(actual, expected)
    return errors


def _median_ms(samples: list[float]) -> float:
    return float(np.median(samples) * 1e3)


def measure_cpu_choice(backends: dict[str, Backend], graphs: dict[str, Graph],
                       rounds: int = CHOICE_ROUNDS) -> dict[str, Any]:
    """Median decode (64 tokens, or the capacity) and step times of each backend, interleaved
    round by round."""
    generator = torch.Generator().manual_seed(5)
    tokens = min(64, graphs["decode"].model.dims.current_capacity)
    calls = {name: example_inputs(graphs[name], generator, tokens=tokens, history=60)
             for name in ("decode", "step")}
    times: dict[str, dict[str, list[float]]] = {b: {c: [] for c in calls} for b in backends}
    for round_ in range(rounds + 3):
        for backend_name, backend in backends.items():
            for call, inputs in calls.items():
                start = time.perf_counter()
                backend.run(call, inputs)
                if round_ >= 3:  # warm-up rounds are not counted
                    times[backend_name][call].append(time.perf_counter() - start)
    figures = {b: {f"{c}_ms": _median_ms(t) for c, t in calls_.items()}
               for b, calls_ in times.items()}
    chosen = min(figures, key=lambda b: figures[b]["decode_ms"])
    return {"chosen": chosen, "median_ms": figures, "rounds": rounds,
            "machine": platform.machine(), "processor": platform.processor()}


def compile_bundle(directory: str | Path, engine: EngineConfig, backend: str | None = None
                   ) -> dict[str, Any]:
    """Everything of the module docstring for the bundle at `directory`; returns a report."""
    bundle = load_bundle(directory)
    records = export_bundle(bundle)
    bundle = load_bundle(directory)  # re-verified, with the graphs in its manifest
    graphs = session_graphs(bundle.checkpoint.model, bundle.unit_rows, bundle.session_row)
    requested = backend or engine.backend
    report: dict[str, Any] = {"bundle": str(bundle.directory), "requested": requested,
                              "onnx": records}
    if requested == "auto" and not torch.cuda.is_available():
        candidates = {name: make_backend(name, bundle, engine) for name in ("onnxruntime",
                                                                            "torch")}
        choice = measure_cpu_choice(candidates, graphs)
        write_cpu_choice(bundle.directory, engine, choice)
        report["cpu_choice"] = choice
    name = resolve(requested, bundle, engine)
    built = make_backend(name, bundle, engine)
    report.update(backend=name, built=built.describe(), parity=backend_parity(built, graphs),
                  engines=str(bundle.directory / ENGINES_DIR))
    return report
