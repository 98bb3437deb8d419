"""`rtnf bench model`: how fast the model's hot calls are on this machine (torch, eager).

Measured on a simulated 2p session (386 units), batch 1, `torch.inference_mode`, the
configurations interleaved repeat by repeat so machine noise falls on all of them alike:

- decode: one window (64 current tokens, 150 ms of real history, the stimulus clip), the full
  forward pass that decodes behaviour and next-window rates;
- per-window decode as the window slides, with the history's keys/values cached per spike
  (`HistoryCache`), at 150 ms and at 1 s of history: `history_ratio` = 1 s / 150 ms;
- a whole next-window generation of 10, 30 and 98 spikes with the KV cache and without it
  (every step recomputes the whole model on the prefix, as the original implementation does):
  `kv_speedup` = without / with, at 98 spikes.

The original implementation's figures (paper-size model, 1 CPU thread: 1.1 s, 3.6 s, 12.4 s to
generate windows of 10, 30, 98 spikes) are quoted from BENCHMARKS.md for comparison.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from typing import Any, Callable

import numpy as np
import torch

from rtnf.config import Config, SimulationConfig
from rtnf.data.session import Session
from rtnf.data.sim import simulate
from rtnf.model.generation import Sampling, generate_window
from rtnf.model.history import HistoryCache, as_layers, model_keys_values
from rtnf.model.inputs import ModelInputs, inputs_from_tokens
from rtnf.model.neuroformer import Neuroformer
from rtnf.model.spec import dims_from_config, spec_from_config
from rtnf.tokens import SampleTokens, TokenSpec, absolute_bins, window_ends
from rtnf.train.dataset import Normalization, SessionWindows, behavior_before

ORIGINAL_GENERATION_S = {10: 1.1, 30: 3.6, 98: 12.4}
GENERATION_SPIKES = (10, 30, 98)
DECODE_TOKENS = 64
HISTORIES_S = (0.15, 1.0)


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max()), "runs": int(ms.size)}


def timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def with_current_length(tokens: SampleTokens, count: int, spec: TokenSpec) -> SampleTokens:
    """`tokens` with the current sequence replaced by exactly `count` tokens (SOS, count - 2
    spikes of successive units spread evenly over the window's bins, EOS), so every preset and
    machine decodes the same length; the history stays the real one."""
    layout, spikes = spec.current, count - 2
    units = np.full((1, layout.capacity), spec.unit_pad, dtype=np.int64)
    dts = np.full((1, layout.capacity), layout.dt_pad, dtype=np.int64)
    units[0, 0], dts[0, 0] = spec.unit_sos, layout.dt_sos
    units[0, 1:spikes + 1] = np.arange(spikes) % spec.n_units
    dts[0, 1:spikes + 1] = np.arange(spikes) * layout.n_bins // spikes
    units[0, spikes + 1], dts[0, spikes + 1] = spec.unit_eos, layout.dt_eos
    current = dataclasses.replace(tokens.current, units=units, dts=dts,
                                  n_spikes=np.array([spikes]), truncated=np.array([0]))
    return dataclasses.replace(tokens, current=current)


def session_windows(config: Config, session: Session, ends: np.ndarray, history_s: float
             ) -> SessionWindows:
    """The session's windows ending at `ends`, with `history_s` of history, ready to batch."""
    config = dataclasses.replace(config,
                                 windows=dataclasses.replace(config.windows, history=history_s))
    spec = TokenSpec.from_config(config.windows, session.n_units)
    dims = dims_from_config(config, session.frames.images.shape[1:], config.simulation.frame_rate,
                            spec_from_config(config))
    behavior = behavior_before(session, dims.behavior_targets, ends, spec.dt_resolution)
    return SessionWindows(session, ends, spec, dims, Normalization.fit(behavior),
                          np.arange(session.n_units), 0, config.windows.current)


@dataclasses.dataclass
class SpeedSetup:
    """What the speed benchmarks time: a simulated 2p session (386 units), `repeats` + 1
    window ends with at least the longest history before them, the windows at each history
    length, and a model of the configured preset (random weights: speed does not depend on
    them)."""

    session: Session
    ends: np.ndarray
    windows: dict[float, SessionWindows]
    model: Neuroformer


def speed_setup(config: Config, repeats: int, minutes: float) -> SpeedSetup:
    torch.manual_seed(0)
    (session,) = simulate(SimulationConfig(neurons=386, minutes=minutes, seed=0), "2p")
    ends = window_ends(session.start_time, session.end_time, config.windows, full_history=True)
    ends = ends[ends >= max(HISTORIES_S) + config.windows.current][:repeats + 1]
    windows = {h: session_windows(config, session, ends, h) for h in HISTORIES_S}
    model = Neuroformer(spec_from_config(config), windows[HISTORIES_S[0]].dims,
                        n_units=session.n_units, n_sessions=1).eval()
    return SpeedSetup(session, ends, windows, model)


@torch.inference_mode()
def run(config: Config, repeats: int = 30, minutes: float = 1.0) -> dict[str, Any]:
    """Every figure of the module docstring for `config.model`'s preset."""
    setup = speed_setup(config, repeats, minutes)
    session, ends, windows, model = setup.session, setup.ends, setup.windows, setup.model
    current = config.windows.current
    short = windows[HISTORIES_S[0]]

    def inputs(history_s: float, index: int) -> ModelInputs:
        return windows[history_s].batch(np.array([index]))[0]

    decode_tokens = with_current_length(short.tokens[:1], DECODE_TOKENS, short.spec)
    decode_inputs = inputs_from_tokens(decode_tokens, ends[:1], short.spec, short.unit_rows, 0,
                                       short.frames(np.array([0]))).trimmed()

    caches = {h: HistoryCache(model_keys_values(model, w.unit_rows, w.session_row),
                              session.n_units, w.spec) for h, w in windows.items()}
    added_until = {h: -np.inf for h in HISTORIES_S}
    times: dict[str, list[float]] = {}

    def slide(history_s: float, index: int) -> None:
        """One hop of the loop: add the spikes that entered the history, decode the window."""
        cache, end = caches[history_s], float(ends[index])
        history_end = end - current
        new = (session.spike_times >= added_until[history_s]) & (
            session.spike_times < history_end)
        cache.add(session.spike_unit_index[new],
                  absolute_bins(session.spike_times[new], end, windows[history_s].spec))
        added_until[history_s] = history_end
        window = inputs(history_s, index)
        model(window, model.context(window, history=as_layers(cache.window(
            int(window.history_start_bin[0])))))

    model(decode_inputs)  # warm-up
    for index in range(len(ends)):
        times.setdefault("decode_64_tokens", []).append(timed(lambda: model(decode_inputs)))
        for history_s in HISTORIES_S:
            times.setdefault(f"slide_history_{history_s:g}s", []).append(
                timed(lambda: slide(history_s, index)))
    generation_inputs = inputs(HISTORIES_S[0], 0)
    for repeat in range(max(3, repeats // 10)):
        for spikes in GENERATION_SPIKES:
            for use_cache in (True, False):
                name = f"generate_{spikes}_{'cached' if use_cache else 'recomputed'}"
                generator = torch.Generator().manual_seed(repeat)
                times.setdefault(name, []).append(timed(lambda: generate_window(
                    model, generation_inputs, Sampling(), generator, use_cache=use_cache,
                    spikes=spikes)))

    figures = {name: percentiles(values) for name, values in times.items()}
    slide_short, slide_long = (figures[f"slide_history_{h:g}s"]["median_ms"]
                               for h in HISTORIES_S)
    kv = {spikes: figures[f"generate_{spikes}_recomputed"]["median_ms"]
          / figures[f"generate_{spikes}_cached"]["median_ms"] for spikes in GENERATION_SPIKES}
    return {
        "benchmark": "model_speed",
        "preset": config.model.preset,
        "parameters": model.parameter_count(),
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "setup": {"units": session.n_units, "profile": "2p", "decode_tokens": DECODE_TOKENS,
                  "histories_s": list(HISTORIES_S), "repeats": len(ends),
                  "mean_history_spikes": {f"{h:g}s": float(np.mean(w.tokens.history.n_spikes))
                                          for h, w in windows.items()}},
        "figures": figures,
        "kv_speedup": kv[GENERATION_SPIKES[-1]],
        "kv_speedup_by_spikes": {str(k): v for k, v in kv.items()},
        "history_ratio": slide_long / slide_short,
        "original_generation_s": {str(k): v for k, v in ORIGINAL_GENERATION_S.items()},
        "targets": {"kv_speedup >= 10": kv[GENERATION_SPIKES[-1]] >= 10,
                    "history_ratio <= 1.25": slide_long / slide_short <= 1.25},
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [f"model speed: {report['preset']} ({report['parameters'] / 1e6:.2f}M parameters), "
             f"torch {report['machine']['torch']}, {report['machine']['threads']} threads",
             "| call | median ms | p99 ms | max ms | runs |", "|---|---:|---:|---:|---:|"]
    for name, figure in report["figures"].items():
        lines.append(f"| {name} | {figure['median_ms']:.2f} | {figure['p99_ms']:.2f} "
                     f"| {figure['max_ms']:.2f} | {figure['runs']} |")
    lines.append(f"kv_speedup (98 spikes, recomputed / cached) = {report['kv_speedup']:.1f}x; "
                 f"history_ratio (1 s / 150 ms history) = {report['history_ratio']:.2f}")
    return "\n".join(lines)
