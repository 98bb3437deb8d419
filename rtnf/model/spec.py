"""The model's architecture (`ModelSpec`, presets `rt-small` and `paper`) and data shapes (`ModelDims`).

`ModelSpec` is what a preset fixes: widths, heads and the number of blocks per stage (the
paper's configuration keys where they still mean something). `ModelDims` is what the data fixes:
window bins and capacities, the stimulus clip, and which behaviour channels are predicted
(targets) or given as inputs. Both are plain frozen dataclasses, saved as JSON next to weights.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from rtnf.config import Config
from rtnf.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """Architecture: sizes and blocks per stage (see rtnf/model/neuroformer.py for the flow)."""

    n_embd: int
    n_head: int
    n_current_layers: int  # causal self-attention over the current window ("feature encoder")
    n_history_layers: int  # cross-attention from current tokens to the neural history
    n_frame_encoder_layers: int  # self-attention over stimulus-frame tokens
    n_frame_layers: int  # cross-attention from current tokens to frame tokens
    n_behavior_layers: int  # cross-attention to behaviour inputs (only when there are inputs)
    n_decoder_layers: int  # causal self-attention after fusion
    mlp_ratio: int = 4
    dropout: float = 0.1
    frame_window: float = 0.15  # seconds of stimulus before the window end (frames shown < t)
    frame_kernel: tuple[int, int, int] = (3, 4, 4)  # Conv3d kernel = stride (time, y, x)
    temporal_hidden: int = 128  # the dt embedding's MLP hidden width (1 -> hidden -> n_embd)
    rotary_base: float = 10000.0  # rotary frequencies over absolute time, in dt bins
    temperature: float = 0.5  # contrastive InfoNCE temperature
    loss_unit: float = 0.45
    loss_dt: float = 0.30
    loss_contrastive: float = 0.25
    loss_behavior: float = 1.0
    loss_rate: float = 1.0

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ConfigError(f"model.n_embd = {self.n_embd}: expected a multiple of "
                              f"2 * model.n_head ({2 * self.n_head})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        data = dict(data)
        data["frame_kernel"] = tuple(data["frame_kernel"])
        return cls(**data)


PRESETS: dict[str, ModelSpec] = {
    # Fits a 2-core CPU inside a 50 ms hop with room to spare.
    "rt-small": ModelSpec(n_embd=128, n_head=4, n_current_layers=2, n_history_layers=2,
                          n_frame_encoder_layers=1, n_frame_layers=1, n_behavior_layers=1,
                          n_decoder_layers=2, dropout=0.1),
    # The published sizes: n_embd 256, 8 heads, 6 blocks per stage (4 per input modality).
    "paper": ModelSpec(n_embd=256, n_head=8, n_current_layers=6, n_history_layers=6,
                       n_frame_encoder_layers=6, n_frame_layers=6, n_behavior_layers=4,
                       n_decoder_layers=6, dropout=0.2, frame_kernel=(3, 5, 5)),
}


def preset(name: str) -> ModelSpec:
    """The architecture called `name`; a clear error for an unknown one."""
    if name not in PRESETS:
        raise ConfigError(f"model.preset = {name!r}: expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


def spec_from_config(config: Config) -> ModelSpec:
    """The preset of `config.model`, with the sizes the configuration overrides."""
    overrides = {key: value for key, value in dataclasses.asdict(config.model).items()
                 if key not in ("preset", "checkpoint") and value is not None}
    if "frame_kernel" in overrides:
        overrides["frame_kernel"] = tuple(overrides["frame_kernel"])
    return dataclasses.replace(preset(config.model.preset), **overrides)


@dataclass(frozen=True)
class ModelDims:
    """Shapes the data fixes: windows, stimulus clip, behaviour targets and inputs."""

    current_bins: int
    history_bins: int
    current_capacity: int
    history_capacity: int
    frame_shape: tuple[int, int, int] | None  # (frames per clip, height, width); None: no stimulus
    behavior_targets: tuple[str, ...] = ("speed", "gaze_phi", "gaze_theta")
    behavior_inputs: tuple[str, ...] = ()
    objective: Literal["regression", "classification"] = "regression"
    n_classes: int = 0  # classification: classes per target

    @property
    def current_dt_vocab(self) -> int:
        """dt ids of the current window: its bins, then SOS, EOS, PAD (as in rtnf.tokens)."""
        return self.current_bins + 3

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelDims:
        data = dict(data)
        for key in ("behavior_targets", "behavior_inputs"):
            data[key] = tuple(data[key])
        if data["frame_shape"] is not None:
            data["frame_shape"] = tuple(data["frame_shape"])
        return cls(**data)


def frames_per_clip(frame_window: float, frame_rate: float, kernel_time: int) -> int:
    """Frames in a stimulus clip: ceil(rate * window), at least and a multiple of the kernel."""
    frames = max(kernel_time, math.ceil(frame_rate * frame_window - 1e-9))
    return kernel_time * math.ceil(frames / kernel_time)


def dims_from_config(config: Config, frame_size: tuple[int, int] | None,
                     frame_rate: float | None, spec: ModelSpec) -> ModelDims:
    """`ModelDims` for `config`'s windows and decoding, for frames of `frame_size` at `frame_rate`
    (None when the sessions have no stimulus)."""
    windows, decoding = config.windows, config.decoding
    frame_shape = None
    if frame_size is not None and frame_rate:
        clip = frames_per_clip(spec.frame_window, frame_rate, spec.frame_kernel[0])
        frame_shape = (clip, *frame_size)
    return ModelDims(
        current_bins=windows.bins("current"),
        history_bins=windows.bins("history"),
        current_capacity=windows.current_capacity,
        history_capacity=windows.history_capacity,
        frame_shape=frame_shape,
        behavior_targets=tuple(decoding.targets),
        behavior_inputs=tuple(decoding.inputs),
        objective=decoding.objective,
        n_classes=decoding.classes if decoding.objective == "classification" else 0,
    )
