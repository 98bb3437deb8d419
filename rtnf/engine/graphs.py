"""The model's hot calls as graphs over plain tensors: what every backend runs and ONNX exports.

A calibrated session fixes the unit map, so each graph holds that session's unit rows and
session row as constants; everything that changes from call to call is an explicit input,
caches included (no hidden state). Shapes (B windows, batch 1 in the loop; H heads, D head
width, C current-window capacity; names in brackets are dynamic axes):

    history  units (B, [spikes]), rotary_cos/sin (B, [spikes], D/2)
             -> history_keys/values (history layers, B, H, [spikes], D)
    context  frames (B, T, Hf, Wf) uint8 and/or behavior_inputs (B, n)
             -> frame_keys/values (frame layers, B, H, frame tokens, D), behavior_keys/values
    decode   units, dts (B, [tokens]), rotary_cos/sin, + the cross-attention context
             -> behavior (B, targets[, classes]), log_rates (B, N)
    step     unit, dt (B, 1), position (1,), rotary_cos/sin (B, 1, D/2),
             cache_keys/values (self-attention layers, B, H, C, D), + the context
             -> unit_logits (B, N + 3), dt_logits (B, dt vocabulary), cache_keys/values

The cross-attention context is history_keys/values (.., [history], D) with history_mask
(B, 1, 1, [history]) additive, then frame_keys/values and behavior_keys/values when the model
has those stages. The step's caches have a fixed size with the new token written at `position`
(static shapes and addresses, as CUDA graphs and TensorRT want); a mask hides slots after it.
Rotary angles are computed by the caller in float64 (`rotary_inputs`): hours of session time
are millions of bins, and TensorRT has no float64.

Every graph runs the `Neuroformer`'s own modules and methods; nothing here re-implements them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from rtnf.model.history import stacked
from rtnf.model.layers import blocked, rotary_angles
from rtnf.model.neuroformer import Context, Neuroformer
from rtnf.model.spec import ModelDims, ModelSpec

GRAPHS = ("history", "context", "decode", "step")


def rotary_inputs(bins: torch.Tensor, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """`rotary_cos`, `rotary_sin` (B, L, D/2) for absolute time `bins` (B, L)."""
    cos, sin = rotary_angles(bins, spec.head_dim, spec.rotary_base)
    return {"rotary_cos": cos, "rotary_sin": sin}


def context_stages(spec: ModelSpec, dims: ModelDims) -> tuple[str, ...]:
    """The optional cross-attention stages a model has: "frame", "behavior"."""
    stages = []
    if dims.frame_shape is not None and spec.n_frame_layers:
        stages.append("frame")
    if dims.behavior_inputs and spec.n_behavior_layers:
        stages.append("behavior")
    return tuple(stages)


def context_names(spec: ModelSpec, dims: ModelDims) -> tuple[str, ...]:
    """The cross-attention context inputs of `decode` and `step`, in order."""
    names = ["history_keys", "history_values", "history_mask"]
    for stage in context_stages(spec, dims):
        names += [f"{stage}_keys", f"{stage}_values"]
    return tuple(names)


def dynamic_axes(graph: str, names: tuple[str, ...]) -> dict[str, dict[int, str]]:
    """The dynamic axes of `graph`'s inputs or outputs `names`: {name: {axis: dimension}}."""
    if graph == "history":
        table = {"units": {1: "spikes"}, "rotary_cos": {1: "spikes"},
                 "rotary_sin": {1: "spikes"}, "history_keys": {3: "spikes"},
                 "history_values": {3: "spikes"}}
    else:
        table = {"history_keys": {3: "history"}, "history_values": {3: "history"},
                 "history_mask": {3: "history"}}
        if graph == "decode":
            table.update({name: {1: "tokens"}
                          for name in ("units", "dts", "rotary_cos", "rotary_sin")})
    return {name: table[name] for name in names if name in table}


class SlotCache:
    """One self-attention layer's keys/values in fixed slots; `append` writes the new tokens at
    `position` and returns every slot (the caller masks the slots not yet written)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor):
        self.keys, self.values, self.position = keys, values, position

    def append(self, keys: torch.Tensor, values: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self.position + torch.arange(keys.shape[2], device=keys.device)
        self.keys = self.keys.index_copy(2, slots, keys)
        self.values = self.values.index_copy(2, slots, values)
        return self.keys, self.values


class Graph(nn.Module, ABC):
    """A hot call of `model` for one session's units; `forward(*inputs)` in `inputs` order."""

    name: ClassVar[str]

    def __init__(self, model: Neuroformer, unit_rows: torch.Tensor, session_row: torch.Tensor):
        super().__init__()
        if not len(model.history_blocks):
            raise ValueError("rtnf engines need a model with at least one history layer")
        self.model = model.eval()
        self.register_buffer("unit_rows", torch.as_tensor(unit_rows, dtype=torch.long),
                             persistent=False)
        self.register_buffer("session_row", torch.as_tensor(session_row, dtype=torch.long),
                             persistent=False)
        self.context_inputs = context_names(model.spec, model.dims)
        self.inputs, self.outputs = self.io()

    @abstractmethod
    def io(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The graph's input names and output names, in order."""

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.compute(**dict(zip(self.inputs, tensors)))

    @abstractmethod
    def compute(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The outputs, in `outputs` order, for the named inputs."""

    def context(self, inputs: dict[str, torch.Tensor]) -> Context:
        def layers(prefix: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
            if f"{prefix}_keys" not in inputs:
                return []
            return list(zip(inputs[f"{prefix}_keys"].unbind(0),
                            inputs[f"{prefix}_values"].unbind(0)))

        return Context(layers("history"), inputs["history_mask"], layers("frame"),
                       layers("behavior"), None, None)


class HistoryGraph(Graph):
    """Keys/values of history spikes, computed once per spike as it enters the history."""

    name = "history"

    def io(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return ("units", "rotary_cos", "rotary_sin"), ("history_keys", "history_values")

    def compute(self, units: torch.Tensor, rotary_cos: torch.Tensor, rotary_sin: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        return stacked(self.model.history_keys_values(units, (rotary_cos, rotary_sin),
                                                      self.unit_rows, self.session_row))


class ContextGraph(Graph):
    """Keys/values of the stimulus clip and the behaviour inputs, once per window."""

    name = "context"

    def io(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        stages = context_stages(self.model.spec, self.model.dims)
        inputs = [{"frame": "frames", "behavior": "behavior_inputs"}[stage] for stage in stages]
        return tuple(inputs), tuple(f"{stage}_{kind}" for stage in stages
                                    for kind in ("keys", "values"))

    def compute(self, frames: torch.Tensor | None = None,
                behavior_inputs: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        outputs: list[torch.Tensor] = []
        for values, encode in ((frames, self.model.frame_context),
                               (behavior_inputs, self.model.behavior_context)):
            if values is not None:
                layers, _ = encode(values)
                outputs += stacked(layers)
        return tuple(outputs)


class DecodeGraph(Graph):
    """The window that just closed: behaviour and next-window rates."""

    name = "decode"

    def io(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return ("units", "dts", "rotary_cos", "rotary_sin", *self.context_inputs), (
            "behavior", "log_rates")

    def compute(self, units: torch.Tensor, dts: torch.Tensor, rotary_cos: torch.Tensor,
                rotary_sin: torch.Tensor, **context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        states = self.model.hidden_states(units, dts, None, self.unit_rows, self.session_row,
                                          self.context(context), rotary=(rotary_cos, rotary_sin))
        behavior, log_rates, _ = self.model.window_heads(states, units, self.unit_rows)
        return behavior, log_rates


class StepGraph(Graph):
    """One autoregressive step of next-window generation, with the self-attention caches."""

    name = "step"

    def io(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return (("unit", "dt", "position", "rotary_cos", "rotary_sin", "cache_keys",
                 "cache_values", *self.context_inputs),
                ("unit_logits", "dt_logits", "cache_keys_out", "cache_values_out"))

    def compute(self, unit: torch.Tensor, dt: torch.Tensor, position: torch.Tensor,
                rotary_cos: torch.Tensor, rotary_sin: torch.Tensor, cache_keys: torch.Tensor,
                cache_values: torch.Tensor, **context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        caches = [SlotCache(k, v, position)
                  for k, v in zip(cache_keys.unbind(0), cache_values.unbind(0))]
        slots = torch.arange(cache_keys.shape[3], device=cache_keys.device)
        seen = blocked((slots <= position)[None, None, None, :])
        states = self.model.hidden_states(unit, dt, None, self.unit_rows, self.session_row,
                                          self.context(context), caches, position,
                                          (rotary_cos, rotary_sin), seen)
        unit_logits, dt_logits = self.model.token_logits(states[:, -1], self.unit_rows)
        return (unit_logits, dt_logits, torch.stack([c.keys for c in caches]),
                torch.stack([c.values for c in caches]))


GRAPH_TYPES: dict[str, type[Graph]] = {
    graph.name: graph for graph in (HistoryGraph, ContextGraph, DecodeGraph, StepGraph)}


def session_graphs(model: Neuroformer, unit_rows: torch.Tensor, session_row: torch.Tensor
                   ) -> dict[str, Graph]:
    """Every hot call of `model` for one session (no context graph when it has no inputs)."""
    graphs = {name: kind(model, unit_rows, session_row) for name, kind in GRAPH_TYPES.items()}
    return {name: graph for name, graph in graphs.items() if graph.inputs}


def cache_shape(spec: ModelSpec, dims: ModelDims, batch: int = 1) -> tuple[int, ...]:
    """Shape of the step's `cache_keys` / `cache_values`."""
    layers = spec.n_current_layers + spec.n_decoder_layers
    return (layers, batch, spec.n_head, dims.current_capacity, spec.head_dim)


def example_inputs(graph: Graph, generator: torch.Generator, tokens: int = 12,
                   history: int = 30) -> dict[str, torch.Tensor]:
    """Random, well-formed inputs for `graph` (export tracing and parity tests): valid ids and
    bins, random caches and contexts, a history mask with a few blocked (never all) keys."""
    model, n_units = graph.model, graph.unit_rows.shape[0]
    dims, spec = model.dims, model.spec

    def ints(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=generator)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    def keys_values(prefix: str, layers: int, length: int) -> dict[str, torch.Tensor]:
        shape = (layers, 1, spec.n_head, length, spec.head_dim)
        return {f"{prefix}_keys": normal(*shape), f"{prefix}_values": normal(*shape)}

    length = 1 if graph.name == "step" else (history if graph.name == "history" else tokens)
    values: dict[str, torch.Tensor] = {
        "units": ints(n_units, 1, length), "dts": ints(dims.current_bins, 1, length).sort().values,
        "unit": ints(n_units, 1, 1), "dt": ints(dims.current_bins, 1, 1),
        "position": ints(dims.current_capacity, 1),
        **rotary_inputs(ints(10_000_000, 1, length), spec),
        "cache_keys": normal(*cache_shape(spec, dims)),
        "cache_values": normal(*cache_shape(spec, dims)),
        **keys_values("history", len(model.history_blocks), history),
        "history_mask": blocked(torch.rand((1, 1, 1, history), generator=generator) > 0.2),
    }
    values["history_mask"][..., 0] = 0.0  # the SOS key: never a fully masked row
    stages = context_stages(spec, dims)
    if "frame" in stages:
        values["frames"] = ints(256, 1, *dims.frame_shape).to(torch.uint8)
        values.update(keys_values("frame", len(model.frame_blocks),
                                  model.frame_tokenizer.n_tokens))
    if "behavior" in stages:
        values["behavior_inputs"] = normal(1, len(dims.behavior_inputs))
        values.update(keys_values("behavior", len(model.behavior_blocks),
                                  len(dims.behavior_inputs)))
    return {name: values[name] for name in graph.inputs}
