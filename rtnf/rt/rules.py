"""Control rules: conditions on each window's decoded behaviour and predicted activity, mapped to
named commands for the sinks (`control.rules` in rtnf.yaml, where the schema is documented).

- `Rules.from_config(rules, layout)` validates every rule against the run's `OutputLayout` before
  the loop starts; each mistake is a `ConfigError` naming the key path, the value and what was
  expected. Value names, unit ids and entry points are resolved there, once, so evaluation only
  indexes arrays and never looks a value up by name.
- `Rules.evaluate(sequence, window_end, decoded, predicted)` runs once per window and returns the
  `Command`s fired at that window, in rule order. Durations (min_duration, refractory) are
  measured on the window ends (the stream clock), never on wall-clock time.
- A rule's condition combines `Threshold`s (above / below a level, with hysteresis) and,
  optionally, a lab's own callable from the `rtnf.rules` entry-point group. A callable that raises
  is counted in `Rules.errors`, reads as false, and the loop carries on.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np

from rtnf.errors import ConfigError
from rtnf.stream.window_output import SINKS, Command, OutputLayout

ENTRY_POINT_GROUP = "rtnf.rules"
ROOT = "control.rules"
DEFAULT_SINKS = ("lsl", "zmq")
RULE_KEYS = ("name", "when", "any", "entry_point", "min_duration", "refractory", "command",
             "release_command", "sinks", "soft_code", "release_soft_code")
CONDITION_KEYS = ("value", "units", "above", "below", "hysteresis")
REDUCTIONS: dict[str, Callable[[np.ndarray], Any]] = {"sum": np.sum, "mean": np.mean,
                                                      "max": np.max}
# Bpod sinks -> the soft codes they can carry: a byte on the App serial port; one digit k in
# pybpod's UDP `SoftCode<k>` line, which pybpod reads as soft code k - 1, so 0 is not valid
# (shared/RIGS.md; pybpodapi Bpod.handle_inline).
SOFT_CODE_RANGES = {"bpod_serial": (0, 255), "bpod_udp": (1, 9)}
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
NAME_EXPECTED = "a name of letters, digits and _ . : - (starting with a letter or digit)"
LABEL_UNITS = 6  # unit ids shown in a condition's label before the rest are counted
TIME_TOLERANCE = 1e-9  # seconds: window ends are sums of hops, so durations carry rounding

CustomRule = Callable[[dict[str, float], np.ndarray, OutputLayout], bool]


# ---------------------------------------------------------------------------------------------
# Conditions and rules (the run-time side)
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class DecodedValue:
    """One decoded target, read by its index in the window's `decoded` array."""

    index: int

    def read(self, decoded: np.ndarray, predicted: np.ndarray) -> float:
        return float(decoded[self.index])


@dataclass(eq=False)
class PredictedValue:
    """A reduction (sum, mean, max) of some units' expected spike counts; `units` holds their
    indices in the window's `predicted` array, or is slice(None) for every unit."""

    reduce: Callable[[np.ndarray], Any]
    units: np.ndarray | slice

    def read(self, decoded: np.ndarray, predicted: np.ndarray) -> float:
        return float(self.reduce(predicted[self.units]))


@dataclass(eq=False)
class Threshold:
    """`value` above (or below) `level`. Once on, it stays on until the value passes the level by
    more than `hysteresis` the other way; a NaN value turns it off."""

    label: str  # the value as the operator reads it, e.g. "predicted.sum[3, 17]"
    value: DecodedValue | PredictedValue
    above: bool
    level: float
    hysteresis: float
    unit: str  # physical unit of the value, for `describe`
    on: bool = False

    def holds(self, decoded: np.ndarray, predicted: np.ndarray) -> bool:
        x = self.value.read(decoded, predicted)
        if self.above:
            self.on = x > self.level or (self.on and x >= self.level - self.hysteresis)
        else:
            self.on = x < self.level or (self.on and x <= self.level + self.hysteresis)
        return self.on

    def describe(self) -> str:
        sign, off_level = (">", self.level - self.hysteresis) if self.above else (
            "<", self.level + self.hysteresis)
        text = f"{self.label} {sign} {self.level:g} {self.unit}"
        return text + (f" (off {'below' if self.above else 'above'} {off_level:g})"
                       if self.hysteresis else "")


@dataclass(eq=False)
class Rule:
    """One validated rule and its state. Its condition holds when every `all_of` threshold holds,
    at least one `any_of` threshold does (if there are any) and `custom` returns true (if set).

    It fires `command` once per episode of the condition holding: after it has held for
    `min_duration` seconds and at least `refractory` seconds after the previous firing (an episode
    that starts inside the refractory period fires when the period ends, if it still holds). When
    an episode that fired ends, it sends `release` (if set)."""

    name: str
    all_of: tuple[Threshold, ...]
    any_of: tuple[Threshold, ...]
    entry_point: str  # "" when the rule has no custom callable
    custom: CustomRule | None
    min_duration: float
    refractory: float
    command: Command
    release: Command | None
    holding_since: float | None = None
    fired: bool = False
    last_fired: float = -math.inf

    def thresholds_hold(self, decoded: np.ndarray, predicted: np.ndarray) -> bool:
        """Every threshold is updated each window (no short-circuit), so hysteresis state stays
        true to the signal."""
        every = True
        for threshold in self.all_of:
            every = threshold.holds(decoded, predicted) and every
        if not self.any_of:
            return every
        some = False
        for threshold in self.any_of:
            some = threshold.holds(decoded, predicted) or some
        return every and some

    def step(self, window_end: float, holds: bool) -> Command | None:
        """Advance the rule to the window ending at `window_end`; the command it sends, if any."""
        if not holds:
            released = self.release if self.fired else None
            self.holding_since, self.fired = None, False
            return released
        if self.holding_since is None:
            self.holding_since = window_end
        held_long_enough = window_end - self.holding_since >= self.min_duration - TIME_TOLERANCE
        rested = window_end - self.last_fired >= self.refractory - TIME_TOLERANCE
        if self.fired or not (held_long_enough and rested):
            return None
        self.fired, self.last_fired = True, window_end
        return self.command

    def describe(self) -> str:
        parts = [threshold.describe() for threshold in self.all_of]
        if self.any_of:
            either = " or ".join(threshold.describe() for threshold in self.any_of)
            parts.append(f"({either})" if len(self.any_of) > 1 else either)
        if self.entry_point:
            parts.append(f"entry point {self.entry_point}")
        held = f" for {self.min_duration:g} s" if self.min_duration else ""
        release = f", on release {self.release.name}" if self.release else ""
        codes = [str(c.soft_code) for c in (self.command, self.release)
                 if c is not None and c.soft_code is not None]
        soft = f" (soft code {' / '.join(codes)})" if codes else ""
        rest = f"; refractory {self.refractory:g} s" if self.refractory else ""
        return (f"{self.name}: when {' and '.join(parts)}{held} -> {self.command.name}{release} "
                f"to {', '.join(self.command.sinks)}{soft}{rest}")


class Rules:
    """The run's control rules: built by `from_config`, then `evaluate`d once per window."""

    def __init__(self, rules: Sequence[Rule], layout: OutputLayout) -> None:
        self.rules = tuple(rules)
        self.layout = layout
        self.errors: Counter[str] = Counter()  # rule name -> exceptions raised by its callable
        self.last_errors: dict[str, str] = {}  # rule name -> the latest of those, as text
        self._last_sequence = -1

    @classmethod
    def from_config(cls, rules: list[dict], layout: OutputLayout) -> Rules:
        """Validate `control.rules` against the run's layout; ConfigError on the first mistake."""
        if not isinstance(rules, list):
            raise _invalid(ROOT, rules, "a list of rules")
        unit_index = {int(unit): i for i, unit in enumerate(layout.unit_ids)}
        parsed: list[Rule] = []
        for i, data in enumerate(rules):
            rule = _parse_rule(data, f"{ROOT}[{i}]", layout, unit_index)
            for j, earlier in enumerate(parsed):
                if earlier.name == rule.name:
                    raise _invalid(f"{ROOT}[{i}].name", rule.name,
                                   f"a unique name; {ROOT}[{j}] already has it")
            parsed.append(rule)
        return cls(parsed, layout)

    def evaluate(self, sequence: int, window_end: float, decoded: np.ndarray,
                 predicted: np.ndarray) -> tuple[Command, ...]:
        """The commands fired at window `sequence`, ending at `window_end` (stream clock). Windows
        must come in increasing sequence order; gaps (skipped windows) are fine."""
        if sequence <= self._last_sequence:
            raise ValueError(f"window {sequence} evaluated after window {self._last_sequence}: "
                             "rules need windows in increasing sequence order")
        self._last_sequence = sequence
        fired = []
        for rule in self.rules:
            holds = rule.thresholds_hold(decoded, predicted)
            if rule.custom is not None:
                holds = self._custom_holds(rule, rule.custom, decoded, predicted) and holds
            command = rule.step(window_end, holds)
            if command is not None:
                fired.append(command)
        return tuple(fired)

    def describe(self) -> list[str]:
        """One line per rule, for the operator's start-up printout."""
        return [rule.describe() for rule in self.rules]

    def _custom_holds(self, rule: Rule, custom: CustomRule, decoded: np.ndarray,
                      predicted: np.ndarray) -> bool:
        values = dict(zip(self.layout.targets, decoded.tolist(), strict=True))
        read_only = predicted.view()
        read_only.flags.writeable = False
        try:
            return bool(custom(values, read_only, self.layout))
        except Exception as exc:  # noqa: BLE001 - a lab's code must not stop the loop
            self.errors[rule.name] += 1
            self.last_errors[rule.name] = f"{type(exc).__name__}: {exc}"
            return False


# ---------------------------------------------------------------------------------------------
# Validation (the start-up side)
# ---------------------------------------------------------------------------------------------


def value_names(layout: OutputLayout) -> list[str]:
    """The values a condition can test: each decoded target, and reductions of the predictions."""
    return [f"decoded.{t}" for t in layout.targets] + [f"predicted.{r}" for r in REDUCTIONS]


def _invalid(path: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{path} = {value!r}: expected {expected}")


def _missing(path: str, expected: str) -> ConfigError:
    return ConfigError(f"{path} is missing: expected {expected}")


def _check_keys(data: dict, known: Sequence[str], path: str) -> None:
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = (f"; did you mean '{path}.{close[0]}'?" if close
                    else f"; known keys here: {', '.join(known)}")
            raise ConfigError(f"unknown key '{path}.{key}'{hint}")


def _name(value: Any, path: str) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise _invalid(path, value, NAME_EXPECTED)
    return value


def _number(value: Any, path: str, expected: str = "a number") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _invalid(path, value, expected)
    return float(value)


def _non_negative(data: dict, key: str, path: str, expected: str) -> float:
    value = data.get(key, 0.0)
    number = _number(value, f"{path}.{key}", expected)
    if number < 0:
        raise _invalid(f"{path}.{key}", value, expected)
    return number


def _sinks(data: dict, path: str) -> tuple[str, ...]:
    value = data.get("sinks", list(DEFAULT_SINKS))
    expected = f"a non-empty list of sinks, each one of {', '.join(SINKS)}"
    if not isinstance(value, list) or not value:
        raise _invalid(f"{path}.sinks", value, expected)
    for i, sink in enumerate(value):
        if sink not in SINKS:
            raise _invalid(f"{path}.sinks[{i}]", sink, f"one of {', '.join(SINKS)}")
        if sink in value[:i]:
            raise _invalid(f"{path}.sinks[{i}]", sink, "each sink listed once")
    return tuple(value)


def _soft_code(data: dict, key: str, sinks: tuple[str, ...], path: str) -> int | None:
    """The Bpod soft code of a command: required when a Bpod sink is listed, refused otherwise."""
    where = f"{path}.{key}"
    bpod = [sink for sink in sinks if sink in SOFT_CODE_RANGES]
    if not bpod:
        if key in data:
            raise _invalid(where, data[key], "no soft code: it applies only when sinks include "
                           "bpod_serial or bpod_udp")
        return None
    low = max(SOFT_CODE_RANGES[sink][0] for sink in bpod)
    high = min(SOFT_CODE_RANGES[sink][1] for sink in bpod)
    why = ("one digit k: pybpod's UDP port takes SoftCode<k>, k = 1..9" if "bpod_udp" in bpod
           else "one byte on the Bpod App serial port")
    expected = f"an integer {low}..{high} ({why})"
    if key not in data:
        raise _missing(where, f"{expected}, since sinks include {', '.join(bpod)}")
    code = data[key]
    if isinstance(code, bool) or not isinstance(code, int) or not low <= code <= high:
        raise _invalid(where, code, expected)
    return code


def _unit_indices(value: Any, path: str, unit_index: dict[int, int]) -> np.ndarray:
    expected = "a non-empty list of the rig's unit ids (integers)"
    if (not isinstance(value, list) or not value
            or any(isinstance(u, bool) or not isinstance(u, int) for u in value)):
        raise _invalid(path, value, expected)
    unknown = [u for u in value if u not in unit_index]
    if unknown:
        ids = sorted(unit_index)
        known = (f"the rig has {len(ids)} units, ids {ids[0]} to {ids[-1]}" if ids
                 else "the rig has no units")
        raise _invalid(path, value, f"ids of the rig's units; {unknown} are not ({known})")
    if len(set(value)) != len(value):
        raise _invalid(path, value, "each unit id listed once")
    return np.array([unit_index[u] for u in value], dtype=np.intp)


def _parse_value(data: dict, path: str, layout: OutputLayout, unit_index: dict[int, int]
                 ) -> tuple[str, DecodedValue | PredictedValue, str]:
    """A condition's `value` (and `units`) -> (label, reader, physical unit)."""
    if "value" not in data:
        raise _missing(f"{path}.value", f"one of {', '.join(value_names(layout))}")
    name = data["value"]
    choices = value_names(layout)
    if name not in choices:
        close = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise _invalid(f"{path}.value", name, f"one of {', '.join(choices)}{hint}")
    kind, _, what = name.partition(".")
    if kind == "decoded":
        if "units" in data:
            raise _invalid(f"{path}.units", data["units"],
                           "no units: they apply only to predicted.* values")
        index = layout.targets.index(what)
        return name, DecodedValue(index), layout.target_units[index]
    if "units" not in data:
        return f"{name} (all units)", PredictedValue(REDUCTIONS[what], slice(None)), "spikes"
    units = data["units"]
    indices = _unit_indices(units, f"{path}.units", unit_index)
    shown = ", ".join(str(u) for u in units[:LABEL_UNITS])
    label = (f"{name}[{shown}]" if len(units) <= LABEL_UNITS
             else f"{name}[{shown}, ... {len(units)} units]")
    return label, PredictedValue(REDUCTIONS[what], indices), "spikes"


def _parse_condition(data: Any, path: str, layout: OutputLayout, unit_index: dict[int, int]
                     ) -> Threshold:
    if not isinstance(data, dict):
        raise _invalid(path, data, "a condition such as {value: decoded.speed, above: 10.0}")
    _check_keys(data, CONDITION_KEYS, path)
    label, value, unit = _parse_value(data, path, layout, unit_index)
    directions = [key for key in ("above", "below") if key in data]
    if len(directions) != 1:
        raise _invalid(path, data, "exactly one of `above` or `below`")
    (direction,) = directions
    level = _number(data[direction], f"{path}.{direction}", "a number (the threshold)")
    hysteresis = _non_negative(data, "hysteresis", path, "a number >= 0 (how far back past the "
                               "threshold the value must go to turn the condition off)")
    return Threshold(label, value, direction == "above", level, hysteresis, unit)


def _conditions(data: dict, key: str, path: str, layout: OutputLayout,
                unit_index: dict[int, int]) -> tuple[Threshold, ...]:
    """`when` / `any`: a list of conditions (or one condition on its own)."""
    if key not in data:
        return ()
    items = data[key]
    if isinstance(items, dict):
        return (_parse_condition(items, f"{path}.{key}", layout, unit_index),)
    if not isinstance(items, list) or not items:
        raise _invalid(f"{path}.{key}", items, "a non-empty list of conditions such as "
                       "{value: decoded.speed, above: 10.0}")
    return tuple(_parse_condition(item, f"{path}.{key}[{i}]", layout, unit_index)
                 for i, item in enumerate(items))


def _accepts_three_arguments(function: Callable) -> bool:
    try:
        inspect.signature(function).bind(None, None, None)
    except TypeError:
        return False
    except ValueError:  # no signature to read (some built-ins): let the call decide
        return True
    return True


def load_custom_rule(name: Any, path: str) -> CustomRule:
    """The callable registered as `name` in the `rtnf.rules` entry-point group, checked to be
    loadable and callable with (decoded, predicted, layout)."""
    expected = f"the name of an entry point in the '{ENTRY_POINT_GROUP}' group"
    if not isinstance(name, str) or not name:
        raise _invalid(path, name, expected)
    found = metadata.entry_points(group=ENTRY_POINT_GROUP, name=name)
    if not found:
        installed = sorted({entry.name for entry in metadata.entry_points(group=ENTRY_POINT_GROUP)})
        where = (f"installed: {', '.join(installed)}" if installed else
                 "none is installed; a lab package declares one in its pyproject.toml under "
                 f'[project.entry-points."{ENTRY_POINT_GROUP}"]')
        raise _invalid(path, name, f"{expected} ({where})")
    if len(found) > 1:
        targets = ", ".join(sorted(entry.value for entry in found))
        raise _invalid(path, name, f"one entry point of that name in '{ENTRY_POINT_GROUP}', "
                       f"found several ({targets})")
    (entry,) = found
    try:
        function = entry.load()
    except Exception as exc:  # noqa: BLE001 - whatever a lab's module raises, at start
        raise ConfigError(f"{path} = {name!r}: entry point '{entry.value}' in group "
                          f"'{ENTRY_POINT_GROUP}' cannot be loaded: {type(exc).__name__}: {exc}"
                          ) from None
    if not callable(function):
        raise _invalid(path, name, f"a callable; '{entry.value}' in group '{ENTRY_POINT_GROUP}' "
                       f"is a {type(function).__name__}")
    if not _accepts_three_arguments(function):
        raise _invalid(path, name, f"a callable taking (decoded, predicted, layout); "
                       f"'{entry.value}' has signature {inspect.signature(function)}")
    return function


def _parse_rule(data: Any, path: str, layout: OutputLayout, unit_index: dict[int, int]) -> Rule:
    if not isinstance(data, dict):
        raise _invalid(path, data, "a rule: a mapping with name, when / any / entry_point and "
                       "command")
    _check_keys(data, RULE_KEYS, path)
    for key in ("name", "command"):
        if key not in data:
            raise _missing(f"{path}.{key}", NAME_EXPECTED)
    name = _name(data["name"], f"{path}.name")
    sinks = _sinks(data, path)
    command = Command(name, _name(data["command"], f"{path}.command"), sinks,
                      _soft_code(data, "soft_code", sinks, path))
    release = _release(data, path, name, command)
    all_of = _conditions(data, "when", path, layout, unit_index)
    any_of = _conditions(data, "any", path, layout, unit_index)
    entry_point = data.get("entry_point", "")
    custom = load_custom_rule(entry_point, f"{path}.entry_point") if "entry_point" in data else None
    if not (all_of or any_of or custom):
        raise ConfigError(f"{path} (rule {name!r}) has no condition: expected `when` (conditions "
                          "that must all hold), `any` (one must hold) or `entry_point`")
    return Rule(name, all_of, any_of, entry_point, custom,
                _non_negative(data, "min_duration", path, "a duration >= 0 in seconds"),
                _non_negative(data, "refractory", path, "a duration >= 0 in seconds"),
                command, release)


def _release(data: dict, path: str, rule: str, command: Command) -> Command | None:
    """The command sent when a fired episode ends; on Bpod it needs a soft code of its own."""
    if "release_command" not in data:
        if "release_soft_code" in data:
            raise _invalid(f"{path}.release_soft_code", data["release_soft_code"],
                           "no release soft code: it applies only with release_command")
        return None
    name = _name(data["release_command"], f"{path}.release_command")
    soft_code = _soft_code(data, "release_soft_code", command.sinks, path)
    if soft_code is not None and soft_code == command.soft_code:
        raise _invalid(f"{path}.release_soft_code", soft_code,
                       f"a soft code other than soft_code ({command.soft_code}), so Bpod can tell "
                       "the release from the command")
    return Command(rule, name, command.sinks, soft_code)
