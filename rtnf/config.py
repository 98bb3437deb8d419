"""rtnf.yaml -> typed, validated configuration.

The sections below are the schema: one dataclass per section, each field typed, with an optional
`check` in its metadata (a predicate plus the words for what is expected). `load_config` starts
from the documented defaults in the repository's rtnf.yaml (shipped inside the package as
`rtnf/resources/rtnf.yaml`), merges user files in order, then `--set key.path=value` overrides,
and validates the result. Every error names the key path, the value and what was expected, and
suggests the closest key for a typo.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from rtnf.errors import ConfigError

MAX_YAML_VALUES = 100_000  # values in one document, an alias counted each time it is used
MAX_YAML_DEPTH = 64
SHOWN = reprlib.Repr()  # values in error messages: bounded, whatever the file holds
SHOWN.maxstring = SHOWN.maxother = 80


def _check(predicate: typing.Callable[[Any], bool], expected: str) -> dict:
    return {"check": (predicate, expected)}


def positive(expected: str = "a positive number") -> dict:
    return _check(lambda v: v > 0, expected)


def non_negative(expected: str = "a number >= 0") -> dict:
    return _check(lambda v: v >= 0, expected)


def fraction(expected: str = "a fraction between 0 and 1") -> dict:
    return _check(lambda v: 0 <= v < 1, expected)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class LslSourceConfig:
    """Which LSL stream to take: matched by name, and by type / source id when given."""

    name: str = "rtnf-sim-spikes"
    type: str = "Spikes"
    source_id: str = ""


@dataclass
class SourceConfig:
    """One input stream of the rig: its kind, and what that kind needs (`lsl` the stream;
    `zmq` / `openephys` the address; `replay` the file; `replay` / `sim` the speed;
    `openephys` the sample rate until the plugin's data messages give it)."""

    kind: Literal["lsl", "zmq", "openephys", "replay", "sim", "none"] = "lsl"
    lsl: LslSourceConfig = field(default_factory=LslSourceConfig)
    address: str = "tcp://127.0.0.1:5556"
    file: str = ""
    speed: float = field(default=1.0, metadata=positive("a positive factor (1 = real time)"))
    sample_rate: float = field(default=30000.0, metadata=positive("a positive rate in Hz"))


@dataclass
class SourcesConfig:
    spikes: SourceConfig = field(default_factory=SourceConfig)
    behavior: SourceConfig = field(
        default_factory=lambda: SourceConfig(
            lsl=LslSourceConfig(name="rtnf-sim-behavior", type="Behavior")))
    frames: SourceConfig = field(
        default_factory=lambda: SourceConfig(
            lsl=LslSourceConfig(name="rtnf-sim-frames", type="Frames")))


@dataclass
class LslConfig:
    """How liblsl discovers streams. `loopback`: this machine only (rtnf writes a loopback-only
    liblsl config with `session_id`); `system`: liblsl's own configuration (LSLAPICFG,
    lsl_api.cfg); anything else: the path of a liblsl config file to use."""

    config: str = "loopback"
    session_id: str = "rtnf"


@dataclass
class NwbNames:
    """Where rtnf's quantities live in an NWB file (rtnf's name -> the file's name)."""

    behavior_module: str = "behavior"
    speed: str = "speed"
    gaze_phi: str = "gaze_phi"
    gaze_theta: str = "gaze_theta"
    stimulus: str = "stimulus"


@dataclass
class XdfNames:
    """Which streams of an XDF (LSL) recording hold spikes, behaviour and frames (by name)."""

    spikes: str = "rtnf-sim-spikes"
    behavior: str = "rtnf-sim-behavior"
    frames: str = "rtnf-sim-frames"


@dataclass
class RigConfig:
    profile: Literal["2p", "ephys"] = "2p"
    name: str = "simulated-rig"
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    lsl: LslConfig = field(default_factory=LslConfig)
    nwb: NwbNames = field(default_factory=NwbNames)
    xdf: XdfNames = field(default_factory=XdfNames)


@dataclass
class SimulationConfig:
    """The simulated rig (`rtnf simulate`); command-line flags override these."""

    neurons: int = field(default=386, metadata=positive("a positive number of units"))
    minutes: float = field(default=5.0, metadata=positive("a positive duration in minutes"))
    seed: int = 0
    sessions: int = field(default=1, metadata=positive("a positive number of sessions"))
    frame_rate: float = field(default=20.0, metadata=positive("a positive rate in Hz"))
    frame_height: int = field(default=24, metadata=positive("a positive number of pixels"))
    frame_width: int = field(default=32, metadata=positive("a positive number of pixels"))
    behavior_rate: float = field(default=20.0, metadata=positive("a positive rate in Hz"))
    imaging_rate: float = field(default=30.0, metadata=positive("a positive rate in Hz"))
    rate_dt: float = field(default=0.01, metadata=positive("a positive bin width in seconds"))
    unit_turnover: float = field(default=0.1, metadata=fraction())
    gain_drift: float = field(default=0.1, metadata=non_negative())


@dataclass
class WindowsConfig:
    """Neuroformer's windows, in seconds (NEUROFORMER.md: current 50 ms, history 150 ms)."""

    hop: float = field(default=0.05, metadata=positive("a positive duration in seconds"))
    current: float = field(default=0.05, metadata=positive("a positive duration in seconds"))
    history: float = field(default=0.15, metadata=non_negative("a duration >= 0 in seconds"))
    dt_resolution: float = field(default=0.01, metadata=positive("a positive bin in seconds"))
    current_capacity: int = field(default=100, metadata=_check(lambda v: v >= 3, "an integer >= 3"))
    history_capacity: int = field(default=700, metadata=_check(lambda v: v >= 3, "an integer >= 3"))

    def bins(self, key: Literal["current", "history", "hop"]) -> int:
        """`windows.<key>` in whole `dt_resolution` bins; ConfigError if it is not whole."""
        seconds = getattr(self, key)
        bins = seconds / self.dt_resolution
        if not math.isfinite(bins) or abs(bins - round(bins)) > 1e-6:
            raise ConfigError(f"windows.{key} = {seconds}: expected a whole multiple of "
                              f"windows.dt_resolution ({self.dt_resolution} s)")
        return round(bins)


@dataclass
class ModelConfig:
    """The architecture preset, a pretrained checkpoint, and optional overrides of the preset
    (None: the preset's value; `rtnf info --preset NAME` shows them)."""

    preset: Literal["rt-small", "paper"] = "rt-small"
    checkpoint: str = ""
    n_embd: int | None = field(default=None, metadata=positive("a positive width"))
    n_head: int | None = field(default=None, metadata=positive("a positive number of heads"))
    n_current_layers: int | None = field(default=None, metadata=non_negative("a count >= 0"))
    n_history_layers: int | None = field(default=None, metadata=non_negative("a count >= 0"))
    n_frame_encoder_layers: int | None = field(default=None, metadata=non_negative("a count >= 0"))
    n_frame_layers: int | None = field(default=None, metadata=non_negative("a count >= 0"))
    n_behavior_layers: int | None = field(default=None, metadata=non_negative("a count >= 0"))
    n_decoder_layers: int | None = field(default=None, metadata=non_negative("a count >= 0"))
    dropout: float | None = field(default=None, metadata=fraction())
    frame_window: float | None = field(default=None, metadata=positive("a positive duration"))
    temperature: float | None = field(default=None, metadata=positive("a positive temperature"))


@dataclass
class DecodingConfig:
    targets: list[str] = field(default_factory=lambda: ["speed", "gaze_phi", "gaze_theta"])
    inputs: list[str] = field(default_factory=list)
    objective: Literal["regression", "classification"] = "regression"
    classes: int = field(default=8, metadata=_check(lambda v: v >= 2, "an integer >= 2"))


@dataclass
class TrainingConfig:
    """Optimisation for `rtnf pretrain` (AdamW, warmup then cosine decay to 10%)."""

    batch_size: int = field(default=32, metadata=_check(lambda v: v >= 2, "an integer >= 2"))
    learning_rate: float = field(default=3e-4, metadata=positive("a positive learning rate"))
    weight_decay: float = field(default=0.1, metadata=non_negative())
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = field(default=100, metadata=non_negative("a step count >= 0"))
    max_steps: int = field(default=2000, metadata=positive("a positive step count"))
    minutes: float = field(default=0.0, metadata=non_negative("minutes >= 0 (0: no limit)"))
    grad_clip: float = field(default=1.0, metadata=positive("a positive gradient norm"))
    validation_fraction: float = field(default=0.1, metadata=fraction())
    eval_every: int = field(default=100, metadata=positive("a positive step count"))
    seed: int = 0
    amp: bool = True


@dataclass
class CalibrationConfig:
    minutes: float = field(default=5.0, metadata=positive("a positive duration in minutes"))
    method: Literal["embeddings", "full", "scratch"] = "embeddings"
    holdout_fraction: float = field(default=0.2, metadata=fraction())
    validation_fraction: float = field(default=0.1, metadata=fraction())
    require_beats_baseline: bool = True
    max_epochs: int = field(default=30, metadata=positive("a positive number of epochs"))
    patience: int = field(default=4, metadata=positive("a positive number of epochs"))
    batch_size: int = field(default=32, metadata=_check(lambda v: v >= 2, "an integer >= 2"))
    steps_per_epoch: int = field(default=40, metadata=non_negative("batches >= 0 (0: all)"))
    max_minutes: float = field(default=2.0,
                               metadata=non_negative("minutes >= 0 (0: no time limit)"))
    select_on: Literal["total", "decoding"] = "total"
    learning_rate: float = field(default=3e-3, metadata=positive("a positive learning rate"))
    unfreeze_after: int = field(default=0, metadata=non_negative("epochs >= 0 (0: never)"))
    unfreeze_learning_rate: float = field(default=3e-4,
                                          metadata=positive("a positive learning rate"))


@dataclass
class EngineConfig:
    backend: Literal["auto", "onnxruntime", "torch", "tensorrt"] = "auto"
    threads: int = field(default=1, metadata=positive("a positive number of threads"))
    spin: bool = False
    precision: Literal["fp32", "fp16"] = "fp32"


@dataclass
class LslOutputConfig:
    enabled: bool = True
    prefix: str = "rtnf"


@dataclass
class ZmqOutputConfig:
    enabled: bool = True
    address: str = "tcp://127.0.0.1:5557"
    format: Literal["csv", "msgpack"] = "csv"
    high_water_mark: int = field(default=1000, metadata=positive("a positive message count"))


@dataclass
class BpodOutputConfig:
    serial_port: str = ""
    net_port: int = field(default=0, metadata=non_negative("a UDP port number, 0 for off"))
    net_host: str = "127.0.0.1"


@dataclass
class OutputsConfig:
    lsl: LslOutputConfig = field(default_factory=LslOutputConfig)
    zmq: ZmqOutputConfig = field(default_factory=ZmqOutputConfig)
    bpod: BpodOutputConfig = field(default_factory=BpodOutputConfig)


@dataclass
class ControlConfig:
    rules: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RecordingConfig:
    enabled: bool = True
    directory: str = "runs"
    flush_interval: float = field(default=1.0, metadata=positive("a positive interval in seconds"))


@dataclass
class RealtimeConfig:
    grace: float = field(default=0.001, metadata=non_negative("a duration >= 0 in seconds"))
    cpu_affinity: list[int] = field(default_factory=list)
    priority: Literal["normal", "high", "realtime"] = "normal"
    max_message_bytes: int = field(default=1 << 20, metadata=positive("a positive byte count"))


@dataclass
class Config:
    """The whole of rtnf.yaml."""

    rig: RigConfig = field(default_factory=RigConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    windows: WindowsConfig = field(default_factory=WindowsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    recording: RecordingConfig = field(default_factory=RecordingConfig)
    realtime: RealtimeConfig = field(default_factory=RealtimeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        """sha256 of the resolved configuration (stable across key order)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Cross-field rules (what one field alone cannot say)
# ---------------------------------------------------------------------------------------------


def _cross_checks(config: Config) -> None:
    w = config.windows
    for key in ("current", "history", "hop"):
        w.bins(key)
    if w.hop > w.current:
        raise ConfigError(f"windows.hop = {w.hop}: expected at most windows.current "
                          f"({w.current} s), or spikes between windows would be skipped")
    known = {"speed", "gaze_phi", "gaze_theta"}
    for key in ("targets", "inputs"):
        for i, name in enumerate(getattr(config.decoding, key)):
            if name not in known:
                raise ConfigError(f"decoding.{key}[{i}] = {name!r}: expected one of "
                                  f"{sorted(known)}")
    both = sorted(set(config.decoding.targets) & set(config.decoding.inputs))
    if both:
        raise ConfigError(f"decoding.inputs = {config.decoding.inputs}: {both} cannot be both "
                          "a decoding target and a model input")
    if len(config.training.betas) != 2 or not all(0 <= b < 1 for b in config.training.betas):
        raise ConfigError(f"training.betas = {config.training.betas}: expected two numbers in "
                          "[0, 1)")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def default_config_text() -> str:
    """The documented default configuration (rtnf.yaml, with its comments)."""
    return resources.files("rtnf").joinpath("resources/rtnf.yaml").read_text()


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = _safe_load(text, str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, "
                          f"got {type(data).__name__}")
    return data


def _safe_load(text: str, source: str) -> Any:
    """yaml.safe_load (plain data, never Python objects), refusing documents nested deeper
    than MAX_YAML_DEPTH or expanding to more than MAX_YAML_VALUES values (a few lines of
    anchors and aliases can stand for billions, which checking or saving would then walk)."""
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of over 4300 digits
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    pending, count = [(data, 1)], 0
    while pending:
        value, depth = pending.pop()
        count += 1
        if count > MAX_YAML_VALUES:
            raise ConfigError(f"{source}: holds more than {MAX_YAML_VALUES} values once its "
                              "YAML aliases are expanded")
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{source}: nested too deeply (over {MAX_YAML_DEPTH} levels)")
        children = value.values() if isinstance(value, dict) else (
            value if isinstance(value, list) else ())
        pending.extend((child, depth + 1) for child in children)
    return data


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; the value is read as YAML (1, true, [1, 2])."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY.PATH=VALUE, e.g. windows.hop=0.02")
    try:
        value = _safe_load(raw, f"--set {text[:80]!r}") if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    nested: Any = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping of settings"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against type `tp`; return it converted (dataclass for a mapping)."""

    def bad(expected: str | None = None) -> ConfigError:
        return ConfigError(f"{path} = {SHOWN.repr(value)}: expected "
                           f"{expected or _describe(tp)}")

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return _build(tp, value, path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad()
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad()
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(option, value, path)
            except ConfigError:
                continue
        raise bad()
    if tp is type(None):
        if value is not None:
            raise bad()
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float range
            number = math.inf
        if not math.isfinite(number):
            raise bad("a finite number")
        return number
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad()
        return str(value)
    raise bad()


def _build(cls: type, data: dict, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean '{(path + '.') if path else ''}{close[0]}'?" if close else (
                f"; known keys here: {', '.join(fields)}")
            raise ConfigError(f"unknown key '{where}'{hint}")
        converted = _convert(hints[key], value, where)
        check = fields[key].metadata.get("check")
        if check is not None and converted is not None and not check[0](converted):
            raise ConfigError(f"{where} = {SHOWN.repr(value)}: expected {check[1]}")
        kwargs[key] = converted
    return cls(**kwargs)


def config_from_dict(data: dict, source: str = "configuration") -> Config:
    """Validate a plain mapping (already merged) into a `Config`."""
    try:
        config = _build(Config, data, "")
        _cross_checks(config)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config


def load_config(files: typing.Sequence[str | Path] = (), overrides: typing.Sequence[str] = ()
                ) -> Config:
    """Defaults, then each file in order, then `--set` overrides; validated as a whole.

    Each file is also validated on its own first, so an error names the file it came from.
    """
    merged = yaml.safe_load(default_config_text()) or {}
    for file in files:
        path = Path(file)
        data = _read_yaml(path)
        config_from_dict(_merge(merged, data), source=str(path))
        merged = _merge(merged, data)
    for text in overrides:
        merged = _merge(merged, parse_override(text))
        config_from_dict(merged, source=f"--set {text}")
    return config_from_dict(merged)


def recipe_names() -> list[str]:
    """rtnf's calibration recipes (calibration/NAME.yaml in the repository)."""
    recipes = resources.files("rtnf").joinpath("resources/recipes")
    return sorted(item.name[:-5] for item in recipes.iterdir() if item.name.endswith(".yaml"))


def recipe_path(name: str) -> Path:
    """The calibration recipe `name` (one of `recipe_names()`), or a recipe file's path."""
    if name in recipe_names():
        return Path(str(resources.files("rtnf").joinpath(f"resources/recipes/{name}.yaml")))
    path = Path(name).expanduser()
    if path.is_file():
        return path
    raise ConfigError(f"--recipe {name!r}: expected one of {', '.join(recipe_names())} or the "
                      f"path of a recipe file")


def check_config_file(path: str | Path) -> Config:
    """Validate one file (merged over the defaults, so partial files are fine)."""
    return load_config([path])
