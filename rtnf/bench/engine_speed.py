"""`rtnf bench engine`: the hot calls on every backend available here (BENCHMARKS.md section 2).

A model of the configured preset (random weights: speed does not depend on them) for a simulated
2p session (386 units), batch 1. The backends built here (torch, and ONNX Runtime when
installed) run the engine graphs with the history's keys/values cached per spike; the reference
is the same model in torch eager with no caching at all (every call recomputes the history's
keys/values, the clip encoding and, for generation, the whole prefix). Every configuration runs
once per repeat, interleaved, so machine noise falls on all of them alike.

- `decode_{16,64,100}`: one window decode (clip encoding + the window's tokens against the
  cached history), 150 ms of real history, the current window set to that many tokens;
- `hop_{0.15,1}s`: a whole hop as the loop makes it (add the spikes that entered the history,
  select the window's history, encode the clip, decode), real tokens; `history_ratio` =
  hop at 1 s of history / hop at 150 ms;
- `step_{16,64,100}`: one autoregressive step with that many tokens already in the caches
  (the reference recomputes the whole prefix and the context);
- `generate_98`: a whole next-window generation of 98 spikes (exactly; EOS held back).

ONNX Runtime also runs with the other thread-spinning setting than `engine.spin`
(`onnxruntime-spin-on` / `-off`), for comparison; the summary uses the configured one.

Summary figures: per backend `decode_ms` and `ar_step_ms` ({p50, p99} at 64 tokens); for the
faster compiled backend (lower decode median), `compiled_vs_eager` = its decode p50 / the eager
reference's, and `kv_speedup` = the reference's whole generation / its cached one.
"""

from __future__ import annotations

import importlib.util
import platform
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from rtnf.bench.model_speed import (HISTORIES_S, percentiles, speed_setup, timed,
                                    with_current_length)
from rtnf.config import Config
from rtnf.engine.backend import Backend
from rtnf.engine.export import export_graph
from rtnf.engine.graphs import session_graphs
from rtnf.engine.runtime import Engine
from rtnf.engine.torch_backend import TorchBackend
from rtnf.model.generation import Sampling, generate_window
from rtnf.model.history import HistoryCache
from rtnf.model.inputs import ModelInputs, inputs_from_tokens
from rtnf.model.neuroformer import Neuroformer
from rtnf.tokens import absolute_bins

TOKENS = (16, 64, 100)
GENERATED_SPIKES = 98
REFERENCE = "torch-eager-uncached"


def build_backends(model: Neuroformer, unit_rows: torch.Tensor, threads: int, spin: bool,
                   directory: Path) -> dict[str, Backend]:
    """Every CPU backend available here, for the session of `unit_rows`."""
    graphs = session_graphs(model, unit_rows, torch.tensor(0))
    backends: dict[str, Backend] = {"torch": TorchBackend(graphs, threads)}
    if importlib.util.find_spec("onnxruntime") is not None:
        from rtnf.engine.onnxruntime_backend import OnnxRuntimeBackend

        paths = {name: export_graph(graph, directory / f"{name}.onnx").path
                 for name, graph in graphs.items()}
        backends["onnxruntime"] = OnnxRuntimeBackend(paths, directory, threads, spin)
        # The other spinning setting, measured beside it (engine.spin: off is often better on
        # a small machine, where a spinning thread takes the core the loop needs).
        backends[f"onnxruntime-spin-{'off' if spin else 'on'}"] = OnnxRuntimeBackend(
            paths, directory, threads, not spin)
    return backends


@torch.inference_mode()
def run(config: Config, repeats: int = 100, minutes: float = 1.0) -> dict[str, Any]:
    """Every figure of the module docstring for `config.model`'s preset and `config.engine`."""
    setup = speed_setup(config, repeats, minutes)
    session, ends, windows, model = setup.session, setup.ends, setup.windows, setup.model
    current = config.windows.current
    short = windows[HISTORIES_S[0]]
    capacity = config.windows.current_capacity
    token_counts = tuple(min(n, capacity) for n in TOKENS)
    unit_rows = torch.as_tensor(short.unit_rows)

    def window(history_s: float, index: int, tokens: int | None = None) -> ModelInputs:
        """Window `index` (its real tokens, or `tokens` synthetic ones), trimmed."""
        source = windows[history_s]
        if tokens is None:
            return source.batch(np.array([index]))[0].trimmed()
        sample = with_current_length(source.tokens[index:index + 1], tokens, source.spec)
        return inputs_from_tokens(sample, ends[index:index + 1], source.spec, unit_rows, 0,
                                  source.frames(np.array([index]))).trimmed()

    with tempfile.TemporaryDirectory() as directory:
        backends = build_backends(model, unit_rows, config.engine.threads, config.engine.spin,
                                  Path(directory))
        engines = {name: Engine(backend, model.spec, model.dims, session.n_units)
                   for name, backend in backends.items()}
        caches = {(name, h): HistoryCache(engine.history_keys_values, session.n_units,
                                          windows[h].spec)
                  for name, engine in engines.items() for h in HISTORIES_S}
        added_until = {key: -np.inf for key in caches}
        times: dict[str, dict[str, list[float]]] = {name: {} for name in (REFERENCE, *engines)}

        def record(backend: str, call: str, run_call: Callable[[], Any]) -> None:
            times[backend].setdefault(call, []).append(timed(run_call))

        def hop(name: str, history_s: float, index: int) -> None:
            """Add the spikes that entered the history; decode the window with real tokens."""
            engine, cache, end = engines[name], caches[name, history_s], float(ends[index])
            new = (session.spike_times >= added_until[name, history_s]) & (
                session.spike_times < end - current)
            cache.add(session.spike_unit_index[new],
                      absolute_bins(session.spike_times[new], end, windows[history_s].spec))
            added_until[name, history_s] = end - current
            decode(engine, cache, window(history_s, index))

        def decode(engine: Engine, cache: HistoryCache, inputs: ModelInputs) -> None:
            context = engine.context(cache.window(int(inputs.history_start_bin[0])),
                                     inputs.frames, inputs.behavior_inputs)
            engine.decode(inputs.current_units, inputs.current_dts,
                          int(inputs.current_start_bin[0]), context)

        def step_call(engine: Engine, cache: HistoryCache, inputs: ModelInputs, tokens: int
                      ) -> Callable[[], Any]:
            """One step at position tokens - 1 (caches hold the earlier tokens)."""
            context = engine.context(cache.window(int(inputs.history_start_bin[0])),
                                     inputs.frames, inputs.behavior_inputs)
            step = engine.step_function(int(inputs.current_start_bin[0]), context)
            units, dts = inputs.current_units[:, :tokens], inputs.current_dts[:, :tokens]
            return lambda: step(tokens - 1, units, dts)

        def reference_step(inputs: ModelInputs, tokens: int) -> None:
            states = model.hidden_states(inputs.current_units[:, :tokens],
                                         inputs.current_dts[:, :tokens],
                                         inputs.current_start_bin, inputs.unit_rows,
                                         inputs.session_row, model.context(inputs))
            model.token_logits(states[:, -1], inputs.unit_rows)

        for name, engine in engines.items():  # warm-up, untimed: first spikes, first calls
            for history_s in HISTORIES_S:
                hop(name, history_s, 0)
        for index in range(1, len(ends)):
            for name, engine in engines.items():
                for history_s in HISTORIES_S:
                    record(name, f"hop_{history_s:g}s", lambda: hop(name, history_s, index))
            for tokens in token_counts:
                inputs = window(HISTORIES_S[0], index, tokens)
                record(REFERENCE, f"decode_{tokens}", lambda: model(inputs))
                record(REFERENCE, f"step_{tokens}", lambda: reference_step(inputs, tokens))
                for name, engine in engines.items():
                    cache = caches[name, HISTORIES_S[0]]
                    record(name, f"decode_{tokens}", lambda: decode(engine, cache, inputs))
                    record(name, f"step_{tokens}", step_call(engine, cache, inputs, tokens))
            if index % 10 == 1:  # whole generations: one repeat in ten, from the first
                inputs = window(HISTORIES_S[0], index)
                generator = torch.Generator().manual_seed(index)
                spikes = min(GENERATED_SPIKES, capacity - 2)
                record(REFERENCE, "generate_98", lambda: generate_window(
                    model, inputs, Sampling(), generator, use_cache=False, spikes=spikes))
                for name, engine in engines.items():
                    cache = caches[name, HISTORIES_S[0]]
                    context = engine.context(cache.window(int(inputs.history_start_bin[0])),
                                             inputs.frames, inputs.behavior_inputs)
                    record(name, "generate_98", lambda: engine.generate(
                        int(inputs.current_start_bin[0]), context, Sampling(), generator,
                        spikes=spikes))
        descriptions = {name: backend.describe() for name, backend in backends.items()}

    return _report(config, model, times, descriptions, token_counts, len(ends))


def _report(config: Config, model: Neuroformer, times: dict[str, dict[str, list[float]]],
            descriptions: dict[str, Any], token_counts: tuple[int, ...], windows: int
            ) -> dict[str, Any]:
    figures = {backend: {call: percentiles(values) for call, values in calls.items()}
               for backend, calls in times.items()}
    middle = token_counts[1]

    def p50_p99(backend: str, call: str) -> dict[str, float]:
        figure = figures[backend][call]
        return {"p50": figure["median_ms"], "p99": figure["p99_ms"]}

    backends = {name: {"decode_ms": p50_p99(name, f"decode_{middle}"),
                       "ar_step_ms": p50_p99(name, f"step_{middle}"),
                       "built": descriptions.get(name, {"backend": "torch eager, no caching"}),
                       "figures": figures[name]} for name in figures}
    compiled = [name for name in figures if name != REFERENCE and "-spin-" not in name]
    fastest = min(compiled, key=lambda name: backends[name]["decode_ms"]["p50"])

    def median(backend: str, call: str) -> float:
        return figures[backend][call]["median_ms"]

    decode_call = f"decode_{middle}"
    compiled_vs_eager = median(fastest, decode_call) / median(REFERENCE, decode_call)
    kv_speedup = median(REFERENCE, "generate_98") / median(fastest, "generate_98")
    history_ratio = median(fastest, "hop_1s") / median(fastest, "hop_0.15s")
    return {
        "benchmark": "engine_speed",
        "preset": config.model.preset,
        "parameters": model.parameter_count(),
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "torch": torch.__version__, "threads": config.engine.threads,
                    "spin": config.engine.spin},
        "setup": {"units": 386, "profile": "2p", "windows": windows, "tokens": token_counts,
                  "histories_s": list(HISTORIES_S), "generated_spikes": GENERATED_SPIKES},
        "backends": backends,
        "fastest_compiled": fastest,
        "compiled_vs_eager": compiled_vs_eager,
        "kv_speedup": kv_speedup,
        "history_ratio": history_ratio,
        "targets": {"decode p50 <= 2 ms": median(fastest, decode_call) <= 2.0,
                    "compiled_vs_eager <= 0.5": compiled_vs_eager <= 0.5,
                    "kv_speedup >= 10": kv_speedup >= 10,
                    "history_ratio <= 1.25": history_ratio <= 1.25},
    }


def format_table(report: dict[str, Any]) -> str:
    backends = report["backends"]
    calls: list[str] = []
    for backend in backends.values():
        calls += [call for call in backend["figures"] if call not in calls]
    lines = [f"engine speed: {report['preset']} ({report['parameters'] / 1e6:.2f}M parameters), "
             f"{report['machine']['threads']} thread(s); median / p99 ms",
             "| call | " + " | ".join(backends) + " |", "|---|" + "---:|" * len(backends)]
    for call in calls:
        cells = [f"{b['figures'][call]['median_ms']:.2f} / {b['figures'][call]['p99_ms']:.2f}"
                 if call in b["figures"] else "-" for b in backends.values()]
        lines.append(f"| {call} | " + " | ".join(cells) + " |")
    lines.append(f"fastest compiled: {report['fastest_compiled']}; compiled_vs_eager "
                 f"{report['compiled_vs_eager']:.2f}; kv_speedup {report['kv_speedup']:.1f}x; "
                 f"history_ratio {report['history_ratio']:.2f}")
    return "\n".join(lines)
