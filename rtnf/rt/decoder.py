"""Per-window inference for the loop: one calibrated bundle on an `Engine`, fed from the buffers.

For window k ending at t_k (seconds on the loop's time axis, rebased so the run starts near 0):

1. `advance_history(t)`: the spikes that entered the history since the last call get their
   keys/values computed once (`HistoryCache.add`), and the history of the window ending at t is
   selected. The loop calls it right after window k-1 is sent, for t = t_k: with hop <= current,
   every spike of window k's history is older than t_(k-1), so it is all there already and
   the work is done while the loop waits for t_k.
2. `refresh_inputs(t)`: the stimulus clip (and behaviour inputs) of the window ending at t,
   encoded only when a new frame or sample changed them (also done ahead, as frames arrive).
3. `tokenize(t)`: the current window's tokens [t - current, t).
4. `infer(t, tokens)`: the engine's decode: behaviour (standardised) and next-window log rates;
   or, with `prediction = generate`, the next window sampled token by token.
5. `outputs(...)`: behaviour back to physical units, smoothed causally as calibration chose
   (smoothing.json), and the expected count of every unit in [t, t + current).

When the bundle's verdict is that a baseline decodes better (`verdict.use`), behaviour comes
from that baseline decoder on the same spikes (its binned-history features), and the
Neuroformer still predicts the next window.

The engine failing mid-run: every call into it that raises is re-raised as `InferenceError`
(the loop counts it and decides). `fall_back(reason)` gives the engine up for the rest of the
run when the bundle has a decoder to fall back to (the baseline in use, else its ridge
decoder): behaviour then comes from that decoder alone, with its own smoothing, and the
predicted next-window counts are the bundle's training means (`mean_next_counts`, NaN when the
bundle keeps none); the engine is never called again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from rtnf.bundle import SMOOTHING, Bundle
from rtnf.engine.runtime import Context, Engine
from rtnf.errors import RtnfError
from rtnf.model.generation import Sampling
from rtnf.model.history import HistoryCache
from rtnf.rt.buffers import BehaviorBuffer, FrameBuffer, SpikeBuffer
from rtnf.stream.zmq_messages import BEHAVIOR_CHANNELS
from rtnf.tokens import (TICKS_PER_BIN, TokenSpec, WindowTokens, absolute_bins,
                         tokenize_current, tokens_to_counts, window_start_bins)
from rtnf.train.baselines import BASELINES, BaselineDecoder, binned_counts, load_baselines
from rtnf.train.dataset import Normalization

Prediction = Literal["rates", "generate"]
FALLBACK_DECODER = "ridge"  # what behaviour falls back to when the engine fails (if present)
ERROR_CHARS = 200  # an engine error's text is cut to its first line and this many characters


class InferenceError(RtnfError):
    """The engine raised during the run; the message names the original error."""


@dataclass
class Decoded:
    behavior: np.ndarray  # (targets,) float32, physical units, smoothed
    predicted: np.ndarray  # (N,) float32 expected (or generated) spikes in the next window
    tokens: int  # spike tokens in the window
    truncated: int  # spikes left out for lack of token capacity


class WindowDecoder:
    def __init__(self, bundle: Bundle, engine: Engine, decoder: str = "auto",
                 prediction: Prediction = "rates", sampling: Sampling = Sampling(),
                 seed: int = 0):
        model = bundle.checkpoint.model
        self.engine, self.dims, self.prediction, self.sampling = engine, model.dims, prediction, \
            sampling
        self.windows = bundle.config.windows
        self.n_units = int(bundle.unit_ids.size)
        self.spec = TokenSpec.from_config(self.windows, self.n_units)
        self.targets = tuple(self.dims.behavior_targets)
        if self.dims.objective != "regression":
            raise RtnfError(f"bundle {bundle.directory}: the loop decodes regression models; this "
                            f"one classifies ({self.dims.objective})")
        self.normalization = Normalization.from_dict(bundle.checkpoint.normalization)
        self.history = HistoryCache(engine.history_keys_values, self.n_units, self.spec)
        self.history_added_until = -np.inf
        self.history_context: Context = {}
        self.input_context: Context = {}
        self.inputs_key: tuple | None = None
        self.generator = torch.Generator().manual_seed(seed)
        self.decoder_name = _chosen_decoder(bundle, decoder)
        baselines = load_baselines(bundle.directory / BASELINES)
        self.baseline: BaselineDecoder | None = baselines.get(self.decoder_name)
        self.fallback_name = self.decoder_name if self.baseline is not None else (
            FALLBACK_DECODER if FALLBACK_DECODER in baselines else None)
        self.fallback = None if self.fallback_name is None else baselines[self.fallback_name]
        self.failure: str | None = None  # why the engine was given up (None: still in use)
        self.mean_next_counts = (np.full(self.n_units, np.nan, np.float32)
                                 if bundle.mean_next_counts is None
                                 else bundle.mean_next_counts.astype(np.float32))
        self.gains = self._gains(bundle, self.decoder_name)
        self.fallback_gains = self._gains(bundle, self.fallback_name) if self.fallback else None
        self.smoothed: np.ndarray | None = None
        self.input_columns = [BEHAVIOR_CHANNELS.index(name) for name in self.dims.behavior_inputs]
        self.span_s = self._span_s()

    def _gains(self, bundle: Bundle, decoder: str) -> np.ndarray:
        """Per target, the causal smoothing gain per hop calibration chose for `decoder`."""
        return self.windows.hop / (_smoothing_taus(bundle, decoder, self.targets)
                                   + self.windows.hop)

    def _span_s(self) -> float:
        """How far back from a window end any input is read, by the model or by the decoder
        behaviour may fall back to (spikes older can be discarded)."""
        history_s = self.windows.current + self.windows.history
        baseline_s = max((decoder.bin_s * decoder.n_bins for decoder in (self.baseline,
                          self.fallback) if decoder is not None), default=0.0)
        return max(history_s, baseline_s) + self.windows.dt_resolution

    def fall_back(self, reason: str) -> bool:
        """Give the engine up for the rest of the run because of `reason`, if the bundle has
        a decoder to fall back to; False (nothing changes) if it has none."""
        if self.fallback is None:
            return False
        self.baseline, self.gains, self.failure = self.fallback, self.fallback_gains, reason
        return True

    def advance_history(self, end: float, spikes: SpikeBuffer) -> None:
        """Add the spikes before the current window of the window ending at `end` to the
        history cache and select that window's history."""
        if self.failure is not None:
            return
        until = end - self.windows.current
        times, units = spikes.between(self.history_added_until, until)
        _, history_start = window_start_bins(np.array([end]), self.spec)
        with _engine_call():
            self.history.add(units, absolute_bins(times, end, self.spec))
            self.history_added_until = until
            history = self.history.window(int(history_start[0]))
        self.history_context = self.engine.history_context(history)

    def refresh_inputs(self, end: float, frames: FrameBuffer | None,
                       behavior: BehaviorBuffer | None) -> None:
        """Encode the clip and behaviour inputs of the window ending at `end`, if they changed."""
        if not self.engine.stages or self.failure is not None:
            return
        tolerance = 0.5 * self.windows.dt_resolution / TICKS_PER_BIN  # half a tokenizer tick
        clip = inputs = None
        key: tuple = ()
        if self.dims.frame_shape is not None:
            if frames is None:
                raise RtnfError("the bundle's model reads stimulus frames: set "
                                "rig.sources.frames.kind to the rig's frame stream")
            shown = int(np.searchsorted(frames.times, end - tolerance))
            key += (frames.version, shown)
            if key != self.inputs_key:
                clip = torch.from_numpy(frames.clip_before(end - tolerance,
                                                           self.dims.frame_shape[0]))
        if self.input_columns:
            latest = None if behavior is None else behavior.last_before(end - tolerance)
            if latest is None:
                raise RtnfError(f"the bundle's model reads behaviour inputs "
                                f"{self.dims.behavior_inputs}, and none has arrived yet")
            values = latest[self.input_columns].astype(np.float64)
            key += tuple(values.tolist())
            # A channel the latest sample lacks (NaN) reads as its training mean (0 once
            # standardised), never as NaN.
            inputs = torch.tensor([[self.normalization.standardize(name, value)
                                    if np.isfinite(value) else 0.0 for name, value
                                    in zip(self.dims.behavior_inputs, values)]],
                                  dtype=torch.float32)
        if key != self.inputs_key:
            with _engine_call():
                self.input_context = self.engine.input_context(clip, inputs)
            self.inputs_key = key

    def tokenize(self, end: float, spikes: SpikeBuffer) -> WindowTokens:
        times, units = spikes.between(end - self.windows.current - self.windows.dt_resolution,
                                      end + self.windows.dt_resolution)
        return tokenize_current(times, units, end, self.spec)

    @torch.inference_mode()
    def infer(self, end: float, tokens: WindowTokens, spikes: SpikeBuffer
              ) -> tuple[np.ndarray, np.ndarray]:
        """Standardised behaviour (targets,) and next-window spikes per unit (N,); once the
        engine is given up, the fallback decoder's behaviour and the training mean counts."""
        if self.failure is not None:
            behavior, predicted = self._baseline_behavior(end, spikes), self.mean_next_counts
        else:
            with _engine_call():
                behavior, predicted = self._engine_infer(end, tokens)
            if self.baseline is not None:
                behavior = self._baseline_behavior(end, spikes)
        return behavior.astype(np.float64), predicted.astype(np.float32)

    def _baseline_behavior(self, end: float, spikes: SpikeBuffer) -> np.ndarray:
        """The baseline decoder's standardised behaviour from the spikes before `end`."""
        times, units = spikes.between(end - self.span_s, end)
        features = binned_counts(times, units, self.n_units, np.array([end]),
                                 self.baseline.bin_s, self.baseline.n_bins)
        return self.baseline.predict(features)[0]

    def _engine_infer(self, end: float, tokens: WindowTokens) -> tuple[np.ndarray, np.ndarray]:
        """The engine's standardised behaviour and next-window spikes per unit."""
        length = int(tokens.n_spikes) + 2
        units = torch.from_numpy(tokens.units[None, :length])
        dts = torch.from_numpy(tokens.dts[None, :length])
        current_start, _ = window_start_bins(np.array([end]), self.spec)
        context = {**self.history_context, **self.input_context}
        behavior, log_rates = self.engine.decode(units, dts, int(current_start[0]), context)
        if self.prediction == "generate":
            window = self.engine.generate(int(current_start[0]) + self.spec.current.n_bins,
                                          context, self.sampling, self.generator)
            predicted = tokens_to_counts(window.units.numpy()[0], window.dts.numpy()[0],
                                         self.spec).sum(axis=-1)
        else:
            predicted = log_rates[0].exp().numpy()
        return behavior[0].numpy(), predicted

    def outputs(self, standardised: np.ndarray) -> np.ndarray:
        """Behaviour in physical units, smoothed window by window."""
        if self.smoothed is None:
            self.smoothed = standardised.copy()
        self.smoothed += self.gains * (standardised - self.smoothed)
        return np.array([self.normalization.unstandardize(name, value) for name, value
                         in zip(self.targets, self.smoothed)], dtype=np.float32)

    def decode(self, end: float, spikes: SpikeBuffer) -> Decoded:
        """Steps 3-5 for the window ending at `end` (steps 1-2 done before)."""
        tokens = self.tokenize(end, spikes)
        behavior, predicted = self.infer(end, tokens, spikes)
        return Decoded(self.outputs(behavior), predicted, int(tokens.n_spikes),
                       int(tokens.truncated))


@contextmanager
def _engine_call() -> Iterator[None]:
    """Whatever the engine raises (onnxruntime, TensorRT, torch, CUDA errors have no common
    type) as an InferenceError naming it in one line."""
    try:
        yield
    except Exception as error:
        text = (str(error).strip().splitlines() or [""])[0][:ERROR_CHARS]
        raise InferenceError(f"{type(error).__name__}: {text}" if text
                             else type(error).__name__) from error


def _chosen_decoder(bundle: Bundle, requested: str) -> str:
    """The behaviour decoder: the calibration verdict's choice for `auto`."""
    available = ["neuroformer", *sorted(p.stem for p in (bundle.directory / BASELINES).glob(
        "*.json"))]
    name = (bundle.manifest.get("verdict") or {}).get("use", "neuroformer") \
        if requested == "auto" else requested
    if name not in available:
        raise RtnfError(f"decoder {name!r} is not in bundle {bundle.directory} (it has: "
                        f"{', '.join(available)})")
    return name


def _smoothing_taus(bundle: Bundle, decoder: str, targets: tuple[str, ...]) -> np.ndarray:
    """The output time constants calibration chose for `decoder` (0: none recorded)."""
    path = bundle.directory / SMOOTHING
    recorded = json.loads(path.read_text()).get(decoder, {}) if path.is_file() else {}
    return np.array([float(recorded.get(name, 0.0)) for name in targets])

