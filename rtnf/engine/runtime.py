"""`Engine`: one calibrated session's hot calls on a backend, as the real-time loop makes them.

Per hop the loop (1) adds the spikes that entered the history (`history_keys_values`, through a
`rtnf.model.history.HistoryCache`), (2) encodes the stimulus clip and behaviour inputs
(`context`), (3) decodes the window that just closed (`decode`: behaviour and next-window
rates) and, optionally, (4) generates the next window token by token (`generate`, one `step`
call per token against caches preallocated once). Rotary time angles are computed here, in
float64, from absolute bins; the backend only ever sees float32 cos/sin.

The engine works on batch 1 and CPU tensors; the backend decides where the work happens.
"""

from __future__ import annotations

import torch

from rtnf.engine.backend import Backend
from rtnf.engine.graphs import cache_shape, context_stages, rotary_inputs
from rtnf.model.generation import GeneratedWindow, Sampling, StepFunction, generate_tokens
from rtnf.model.history import KeysValues
from rtnf.model.neuroformer import Neuroformer
from rtnf.model.spec import ModelDims, ModelSpec

Context = dict[str, torch.Tensor]  # history/frame/behavior keys and values, history_mask


class Engine:
    def __init__(self, backend: Backend, spec: ModelSpec, dims: ModelDims, n_units: int):
        self.backend, self.spec, self.dims, self.n_units = backend, spec, dims, n_units
        self.stages = context_stages(spec, dims)
        self._caches = (torch.zeros(cache_shape(spec, dims)), torch.zeros(cache_shape(spec, dims)))

    def history_keys_values(self, units: torch.Tensor, bins: torch.Tensor) -> KeysValues:
        """Keys/values of history tokens (1, L): local unit ids at absolute `bins`."""
        keys, values = self.backend.run("history", {"units": units,
                                                    **rotary_inputs(bins, self.spec)})
        return keys, values

    def context(self, history: KeysValues, frames: torch.Tensor | None = None,
                behavior_inputs: torch.Tensor | None = None) -> Context:
        """Everything a window's tokens attend to across: `history` (SOS first, every key
        valid, e.g. from a `HistoryCache`), the clip (1, T, H, W) uint8 and the standardised
        behaviour inputs (1, n), each when the model has that stage."""
        return {**self.history_context(history), **self.input_context(frames, behavior_inputs)}

    @staticmethod
    def history_context(history: KeysValues) -> Context:
        """The history's part of a window's context."""
        keys, values = history
        return {"history_keys": keys, "history_values": values,
                "history_mask": torch.zeros((1, 1, 1, keys.shape[3]))}

    def input_context(self, frames: torch.Tensor | None = None,
                      behavior_inputs: torch.Tensor | None = None) -> Context:
        """The clip's and behaviour inputs' part of a window's context (empty when the model
        reads neither); the loop computes it only when a new frame or sample changes it."""
        context: Context = {}
        if not self.stages:
            return context
        given = {"frame": ("frames", frames), "behavior": ("behavior_inputs", behavior_inputs)}
        missing = [given[stage][0] for stage in self.stages if given[stage][1] is None]
        if missing:
            raise ValueError(f"this model needs {' and '.join(missing)} for every window")
        outputs = iter(self.backend.run("context", dict(given[stage] for stage in self.stages)))
        for stage in self.stages:
            context[f"{stage}_keys"], context[f"{stage}_values"] = next(outputs), next(outputs)
        return context

    def decode(self, units: torch.Tensor, dts: torch.Tensor, start_bin: int, context: Context
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Behaviour (standardised, or class logits) and next-window log rates of the window
        whose tokens are `units`, `dts` (1, L, no padding) and whose current part starts at
        absolute bin `start_bin`."""
        bins = Neuroformer.token_bins(dts, torch.tensor([start_bin]), self.dims.current_bins)
        behavior, log_rates = self.backend.run("decode", {
            "units": units, "dts": dts, **rotary_inputs(bins, self.spec), **context})
        return behavior, log_rates

    def step_function(self, start_bin: int, context: Context) -> StepFunction:
        """Generation steps for the window starting at `start_bin`: each runs the newest token
        against the caches, which the step returns updated."""
        n_bins = self.dims.current_bins
        # Every dt id's time: bins of the window, and the specials at its start.
        dt_ids = torch.arange(self.dims.current_dt_vocab)[None]
        rotary = rotary_inputs(Neuroformer.token_bins(dt_ids, torch.tensor([start_bin]), n_bins),
                               self.spec)
        caches = dict(zip(("cache_keys", "cache_values"), self._caches))

        def step(position: int, units: torch.Tensor, dts: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
            dt = dts[:, -1:]
            unit_logits, dt_logits, caches["cache_keys"], caches["cache_values"] = (
                self.backend.run("step", {
                    "unit": units[:, -1:], "dt": dt, "position": torch.tensor([position]),
                    "rotary_cos": rotary["rotary_cos"][:, dt[0]],
                    "rotary_sin": rotary["rotary_sin"][:, dt[0]], **caches, **context}))
            return unit_logits, dt_logits

        return step

    def generate(self, start_bin: int, context: Context, sampling: Sampling = Sampling(),
                 generator: torch.Generator | None = None, spikes: int | None = None
                 ) -> GeneratedWindow:
        """The tokens of the window starting at `start_bin`, sampled step by step."""
        return generate_tokens(self.step_function(start_bin, context), 1, self.n_units,
                               self.dims.current_bins, self.dims.current_capacity, sampling,
                               generator, spikes)
