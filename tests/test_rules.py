"""Control rules (rtnf.rt.rules): thresholds, hysteresis, durations, combinations, commands, the
validation of every key, and lab callables loaded through a real `rtnf.rules` entry point."""

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from rtnf.config import load_config
from rtnf.errors import ConfigError
from rtnf.rt.rules import Rules
from rtnf.stream.window_output import Command, OutputLayout

ROOT = Path(__file__).resolve().parents[1]
HOP = 0.05
T0 = 1234.5  # window ends are stream-clock seconds, far from zero like pylsl.local_clock()
UNIT_IDS = np.array([3, 5, 17, 42, 100], dtype=np.int64)
LAYOUT = OutputLayout(targets=("speed", "gaze_phi", "gaze_theta"),
                      target_units=("cm/s", "deg", "deg"), unit_ids=UNIT_IDS, window=HOP, hop=HOP)
WIDE_LAYOUT = OutputLayout(LAYOUT.targets, LAYOUT.target_units, np.arange(100, dtype=np.int64),
                           HOP, HOP)
LAB_MODULE = "rtnf_test_lab_rules"


def speed_above(level: float, **rule) -> dict:
    return {"name": "fast", "when": [{"value": "decoded.speed", "above": level}],
            "command": "go", **rule}


def behaviour(speed=0.0, phi=0.0, theta=0.0) -> np.ndarray:
    """Rows of decoded values (speed, gaze_phi, gaze_theta), one per window."""
    speed, phi, theta = np.broadcast_arrays(*(np.atleast_1d(np.asarray(v, np.float32))
                                              for v in (speed, phi, theta)))
    return np.stack([speed, phi, theta], axis=1).astype(np.float32)


def drive(rules: Rules, decoded: np.ndarray, predicted: np.ndarray | None = None
          ) -> list[tuple[int, str]]:
    """Evaluate windows k = 0, 1, ... with row k of each array; (k, name) of each command."""
    if predicted is None:
        predicted = np.zeros((len(decoded), len(UNIT_IDS)), np.float32)
    fired = []
    for k, (row, counts) in enumerate(zip(decoded, predicted, strict=True)):
        fired += [(k, command.name) for command in rules.evaluate(k, T0 + k * HOP, row, counts)]
    return fired


def on_off(*segments: tuple[float, int]) -> np.ndarray:
    """A speed trace from (value, windows) segments."""
    return np.concatenate([np.full(n, value, np.float32) for value, n in segments])


# ---------------------------------------------------------------------------------------------
# Thresholds and timing
# ---------------------------------------------------------------------------------------------


def test_threshold_fires_once_per_rising_edge():
    rules = Rules.from_config([speed_above(10.0)], LAYOUT)
    speed = on_off((0, 2), (12, 3), (0, 2), (15, 2), (0, 1), (10, 2), (11, 1))
    # 10 is not above 10: the last rise is at window 12 (speed 11)
    assert drive(rules, behaviour(speed)) == [(2, "go"), (7, "go"), (12, "go")]


def test_hysteresis_prevents_chatter_on_a_noisy_signal():
    rng = np.random.default_rng(7)
    speed = np.concatenate([np.zeros(20), 10 + rng.normal(0, 0.5, 400), np.zeros(20)])
    chattering = Rules.from_config([speed_above(10.0, release_command="stop")], LAYOUT)
    steady = Rules.from_config([speed_above(10.0, release_command="stop",
                                            when=[{"value": "decoded.speed", "above": 10.0,
                                                   "hysteresis": 2.0}])], LAYOUT)
    noisy = drive(chattering, behaviour(speed))
    assert sum(name == "go" for _, name in noisy) > 50
    assert drive(steady, behaviour(speed)) == [(20 + int(np.argmax(speed[20:] > 10)), "go"),
                                               (420, "stop")]


def test_below_with_hysteresis_turns_off_only_past_the_margin():
    rule = {"name": "slow", "when": [{"value": "decoded.speed", "below": 2.0, "hysteresis": 1.0}],
            "command": "still", "release_command": "moving"}
    rules = Rules.from_config([rule], LAYOUT)
    speed = np.array([5, 1.5, 2.5, 2.9, 1.0, 3.5, 1.9], np.float32)
    assert drive(rules, behaviour(speed)) == [(1, "still"), (5, "moving"), (6, "still")]


def test_min_duration_delays_firing_and_a_short_blip_does_not_fire():
    rules = Rules.from_config([speed_above(10.0, min_duration=0.2)], LAYOUT)
    # a blip held 0.15 s (4 windows), then a hold from window 10: fires 0.2 s in, at window 14
    speed = on_off((0, 2), (20, 4), (0, 4), (20, 10))
    assert drive(rules, behaviour(speed)) == [(14, "go")]


def test_refractory_suppresses_refiring_within_the_period_and_allows_it_after():
    rules = Rules.from_config([speed_above(10.0, refractory=1.0)], LAYOUT)
    speed = on_off((20, 2), (0, 3), (20, 2), (0, 23), (20, 2))  # rises at 0, 5 (0.25 s), 30
    assert drive(rules, behaviour(speed)) == [(0, "go"), (30, "go")]


def test_an_episode_starting_in_the_refractory_period_fires_when_it_ends():
    rules = Rules.from_config([speed_above(10.0, refractory=1.0)], LAYOUT)
    speed = on_off((20, 1), (0, 9), (20, 30))  # fired at 0; holds from window 10 onwards
    assert drive(rules, behaviour(speed)) == [(0, "go"), (20, "go")]


def test_and_or_combinations():
    rules = Rules.from_config([
        {"name": "both", "command": "both",
         "when": [{"value": "decoded.speed", "above": 10}, {"value": "decoded.gaze_phi",
                                                            "above": 5}]},
        {"name": "either", "command": "either",
         "any": [{"value": "decoded.speed", "above": 10}, {"value": "decoded.gaze_phi",
                                                           "above": 5}]},
        {"name": "mixed", "command": "mixed",
         "when": [{"value": "decoded.speed", "above": 10}],
         "any": [{"value": "decoded.gaze_phi", "above": 5},
                 {"value": "decoded.gaze_theta", "above": 5}]},
    ], LAYOUT)
    speed = [12, 0, 0, 0, 12, 0, 12, 0]
    phi = [0, 0, 6, 0, 6, 0, 0, 0]
    theta = [0, 0, 0, 0, 0, 0, 6, 0]
    assert drive(rules, behaviour(speed, phi, theta)) == [
        (0, "either"), (2, "either"), (4, "both"), (4, "either"), (4, "mixed"), (6, "either"),
        (6, "mixed")]


def test_every_condition_is_updated_each_window_so_hysteresis_state_is_kept():
    """The speed condition turns on at window 0 while gaze is low; at window 1 speed 7 is within
    its hysteresis, so it is still on when gaze rises: the AND holds."""
    rules = Rules.from_config([{"name": "r", "command": "go", "when": [
        {"value": "decoded.gaze_phi", "above": 5},
        {"value": "decoded.speed", "above": 10, "hysteresis": 5}]}], LAYOUT)
    assert drive(rules, behaviour([12, 7], [0, 6])) == [(1, "go")]


def test_predicted_sum_over_named_units_and_reductions_over_all_units():
    rules = Rules.from_config([
        {"name": "pair", "command": "pair",
         "when": [{"value": "predicted.sum", "units": [42, 3], "above": 1.5}]},
        {"name": "mean", "command": "mean", "when": [{"value": "predicted.mean", "above": 1.0}]},
        {"name": "max", "command": "max", "when": [{"value": "predicted.max", "above": 2.5}]},
    ], LAYOUT)
    predicted = np.array([
        [1.0, 0, 0, 1.0, 0],  # units 3 + 42 = 2.0: pair
        [0, 0, 0, 0, 0],
        [0, 2.0, 2.0, 0, 2.0],  # mean 1.2 but units 3 + 42 = 0
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 3.0],  # max 3.0
    ], np.float32)
    decoded = behaviour(np.zeros(len(predicted)))
    assert drive(rules, decoded, predicted) == [(0, "pair"), (2, "mean"), (4, "max")]


def test_release_command_follows_a_fired_episode_only():
    rules = Rules.from_config([speed_above(10.0, min_duration=0.1, release_command="stop")],
                              LAYOUT)
    speed = on_off((20, 2), (0, 2), (20, 4), (0, 2))  # first hold too short: fires, then releases
    assert drive(rules, behaviour(speed)) == [(6, "go"), (8, "stop")]


def test_nan_reads_as_not_holding():
    rules = Rules.from_config([speed_above(10.0, release_command="stop")], LAYOUT)
    assert drive(rules, behaviour([20, np.nan, 20])) == [(0, "go"), (1, "stop"), (2, "go")]


def test_commands_carry_rule_sinks_and_soft_codes():
    rules = Rules.from_config([speed_above(10.0, sinks=["bpod_serial", "zmq"], soft_code=200,
                                           release_command="stop", release_soft_code=201)],
                              LAYOUT)
    fired = [rules.evaluate(k, T0 + k * HOP, row, np.zeros(5, np.float32))
             for k, row in enumerate(behaviour([20, 0]))]
    assert fired == [(Command("fast", "go", ("bpod_serial", "zmq"), 200),),
                     (Command("fast", "stop", ("bpod_serial", "zmq"), 201),)]
    default = Rules.from_config([speed_above(10.0)], LAYOUT)
    (command,) = default.evaluate(0, T0, behaviour(20)[0], np.zeros(5, np.float32))
    assert command.sinks == ("lsl", "zmq") and command.soft_code is None


def test_windows_must_come_in_increasing_sequence_but_gaps_are_fine():
    rules = Rules.from_config([speed_above(10.0, min_duration=0.2)], LAYOUT)
    row, counts = behaviour(20)[0], np.zeros(5, np.float32)
    assert rules.evaluate(0, T0, row, counts) == ()
    assert rules.evaluate(4, T0 + 4 * HOP, row, counts) == (Command("fast", "go", ("lsl", "zmq")),)
    with pytest.raises(ValueError, match="window 4 evaluated after window 4"):
        rules.evaluate(4, T0 + 4 * HOP, row, counts)


def test_describe_gives_one_line_per_rule():
    rules = Rules.from_config([
        {"name": "burst", "min_duration": 0.1, "refractory": 2.0, "command": "stim-on",
         "release_command": "stim-off", "sinks": ["zmq", "bpod_serial"], "soft_code": 3,
         "release_soft_code": 4,
         "when": [{"value": "decoded.speed", "above": 10.0, "hysteresis": 2.0},
                  {"value": "predicted.sum", "units": [3, 17, 42], "above": 1.5}]},
        {"name": "many", "command": "many",
         "when": [{"value": "predicted.mean", "units": [99, 42, 17, 5, 3, 1, 2], "above": 1}]},
        {"name": "gaze", "command": "look",
         "any": [{"value": "decoded.gaze_phi", "below": -20}, {"value": "predicted.max",
                                                               "above": 0.8}]},
    ], WIDE_LAYOUT)
    assert rules.describe() == [
        ("burst: when decoded.speed > 10 cm/s (off below 8) and predicted.sum[3, 17, 42] > 1.5 "
         "spikes for 0.1 s -> stim-on, on release stim-off to zmq, bpod_serial (soft code 3 / 4); "
         "refractory 2 s"),
        ("many: when predicted.mean[99, 42, 17, 5, 3, 1, ... 7 units] > 1 spikes -> many "
         "to lsl, zmq"),
        ("gaze: when (decoded.gaze_phi < -20 deg or predicted.max (all units) > 0.8 spikes) -> "
         "look to lsl, zmq"),
    ]


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

GOOD = speed_above(10.0)


def with_condition(**condition) -> list[dict]:
    return [{**GOOD, "when": [condition]}]


@pytest.mark.parametrize("rules, words", [
    ({"name": "x"}, ["control.rules = {'name': 'x'}", "a list of rules"]),
    (["fast"], ["control.rules[0] = 'fast'", "a mapping"]),
    ([{**GOOD, "refractroy": 1}],
     ["unknown key 'control.rules[0].refractroy'", "did you mean 'control.rules[0].refractory'"]),
    (with_condition(value="decoded.speed", abve=3),
     ["unknown key 'control.rules[0].when[0].abve'",
      "did you mean 'control.rules[0].when[0].above'"]),
    (with_condition(value="decoded.sped", above=3),
     ["control.rules[0].when[0].value = 'decoded.sped'", "decoded.speed, decoded.gaze_phi",
      "predicted.sum", "did you mean 'decoded.speed'"]),
    (with_condition(above=3), ["control.rules[0].when[0].value is missing", "decoded.speed"]),
    ([GOOD, {**GOOD, "command": "other"}],
     ["control.rules[1].name = 'fast'", "unique", "control.rules[0]"]),
    ([{k: v for k, v in GOOD.items() if k != "name"}], ["control.rules[0].name is missing"]),
    ([{k: v for k, v in GOOD.items() if k != "command"}], ["control.rules[0].command is missing"]),
    ([{**GOOD, "command": "stim on"}], ["control.rules[0].command = 'stim on'", "letters, digits"]),
    ([{**GOOD, "name": 7}], ["control.rules[0].name = 7", "a name"]),
    (with_condition(value="predicted.sum", units=[3, 999, 17], above=1),
     ["control.rules[0].when[0].units = [3, 999, 17]", "[999]", "5 units, ids 3 to 100"]),
    (with_condition(value="predicted.sum", units=[3, 3], above=1),
     ["control.rules[0].when[0].units = [3, 3]", "listed once"]),
    (with_condition(value="predicted.sum", units=[], above=1),
     ["control.rules[0].when[0].units = []", "non-empty list"]),
    (with_condition(value="predicted.max", units=["a"], above=1),
     ["control.rules[0].when[0].units = ['a']", "unit ids"]),
    (with_condition(value="decoded.speed", units=[3], above=1),
     ["control.rules[0].when[0].units = [3]", "only to predicted"]),
    (with_condition(value="decoded.speed", above=1, below=0),
     ["control.rules[0].when[0] = {", "exactly one of `above` or `below`"]),
    (with_condition(value="decoded.speed"), ["control.rules[0].when[0] = {", "exactly one"]),
    (with_condition(value="decoded.speed", above="fast"),
     ["control.rules[0].when[0].above = 'fast'", "a number"]),
    (with_condition(value="decoded.speed", above=1, hysteresis=-1),
     ["control.rules[0].when[0].hysteresis = -1", ">= 0"]),
    ([{**GOOD, "when": []}], ["control.rules[0].when = []", "non-empty list of conditions"]),
    ([{**GOOD, "when": ["speed > 10"]}], ["control.rules[0].when[0] = 'speed > 10'"]),
    ([{**GOOD, "any": [{"value": "decoded.speed", "below": float("nan")}]}],
     ["control.rules[0].any[0].below = nan", "a number"]),
    ([{**GOOD, "min_duration": -0.5}], ["control.rules[0].min_duration = -0.5", ">= 0"]),
    ([{**GOOD, "refractory": "2s"}], ["control.rules[0].refractory = '2s'", ">= 0"]),
    ([{**GOOD, "sinks": ["zmq", "bonsai"]}], ["control.rules[0].sinks[1] = 'bonsai'", "bpod_udp"]),
    ([{**GOOD, "sinks": ["zmq", "zmq"]}], ["control.rules[0].sinks[1] = 'zmq'", "once"]),
    ([{**GOOD, "sinks": []}], ["control.rules[0].sinks = []", "non-empty"]),
    ([{**GOOD, "sinks": ["bpod_serial"]}],
     ["control.rules[0].soft_code is missing", "0..255", "bpod_serial"]),
    ([{**GOOD, "sinks": ["bpod_serial"], "soft_code": 256}],
     ["control.rules[0].soft_code = 256", "0..255", "App serial port"]),
    ([{**GOOD, "sinks": ["bpod_serial"], "soft_code": -1}], ["control.rules[0].soft_code = -1"]),
    ([{**GOOD, "sinks": ["bpod_udp"], "soft_code": 12}],
     ["control.rules[0].soft_code = 12", "1..9", "SoftCode<k>"]),
    ([{**GOOD, "sinks": ["bpod_udp"], "soft_code": 0}], ["control.rules[0].soft_code = 0", "1..9"]),
    ([{**GOOD, "sinks": ["bpod_udp", "bpod_serial"], "soft_code": 10}],
     ["control.rules[0].soft_code = 10", "1..9"]),
    ([{**GOOD, "sinks": ["bpod_udp"], "soft_code": True}], ["control.rules[0].soft_code = True"]),
    ([{**GOOD, "soft_code": 3}], ["control.rules[0].soft_code = 3", "only when sinks include"]),
    ([{**GOOD, "sinks": ["bpod_udp"], "soft_code": 3, "release_command": "stop"}],
     ["control.rules[0].release_soft_code is missing", "1..9"]),
    ([{**GOOD, "sinks": ["bpod_udp"], "soft_code": 3, "release_command": "stop",
       "release_soft_code": 3}], ["control.rules[0].release_soft_code = 3", "other than"]),
    ([{**GOOD, "release_soft_code": 3}],
     ["control.rules[0].release_soft_code = 3", "only with release_command"]),
    ([{**GOOD, "release_command": ""}], ["control.rules[0].release_command = ''", "a name"]),
    ([{"name": "r", "command": "go"}], ["control.rules[0]", "'r'", "has no condition"]),
    ([{"name": "r", "command": "go", "entry_point": "no_such_rule_anywhere"}],
     ["control.rules[0].entry_point = 'no_such_rule_anywhere'", "'rtnf.rules' group"]),
])
def test_every_mistake_names_its_key_path_and_value(rules, words):
    with pytest.raises(ConfigError) as error:
        Rules.from_config(rules, LAYOUT)
    for word in words:
        assert word in str(error.value)


def test_a_single_condition_may_be_written_without_a_list():
    rules = Rules.from_config([{**GOOD, "when": {"value": "decoded.speed", "above": 10}}], LAYOUT)
    assert drive(rules, behaviour([0, 20])) == [(1, "go")]


# ---------------------------------------------------------------------------------------------
# Lab callables through the `rtnf.rules` entry-point group
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def lab_package(tmp_path, monkeypatch):
    """An installed-looking lab package on sys.path: a module and its *.dist-info."""
    (tmp_path / f"{LAB_MODULE}.py").write_text(textwrap.dedent("""
        import numpy as np

        def running_fast(decoded, predicted, layout):
            return decoded["speed"] > 10 and float(np.sum(predicted)) > 0

        def broken(decoded, predicted, layout):
            raise RuntimeError("lab bug")

        def writes_predicted(decoded, predicted, layout):
            predicted[0] = 99.0
            return True

        def two_arguments(decoded, predicted):
            return True

        NOT_CALLABLE = 3
    """))
    dist_info = tmp_path / "rtnf_test_lab_rules-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: rtnf-test-lab-rules\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(textwrap.dedent(f"""
        [rtnf.rules]
        running_fast = {LAB_MODULE}:running_fast
        mylab_rule = {LAB_MODULE}:running_fast
        broken = {LAB_MODULE}:broken
        writes_predicted = {LAB_MODULE}:writes_predicted
        two_arguments = {LAB_MODULE}:two_arguments
        not_callable = {LAB_MODULE}:NOT_CALLABLE
        missing_attribute = {LAB_MODULE}:nowhere
        missing_module = rtnf_test_no_such_module:rule
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop(LAB_MODULE, None)


def lab_rule(entry_point: str, **rule) -> dict:
    return {"name": "lab", "entry_point": entry_point, "command": "reward", **rule}


def test_entry_point_rule_loads_and_drives_commands(lab_package):
    rules = Rules.from_config([lab_rule("running_fast", min_duration=0.1,
                                        release_command="done")], LAYOUT)
    speed = on_off((0, 2), (20, 5), (0, 2))
    predicted = np.full((len(speed), 5), 0.1, np.float32)
    predicted[4] = 0.0  # the callable reads the predictions too: false at window 4
    assert drive(rules, behaviour(speed), predicted) == []  # holds 2-3, 5-6: each too short
    predicted[4] = 0.1
    rules = Rules.from_config([lab_rule("running_fast", min_duration=0.1,
                                        release_command="done")], LAYOUT)
    assert drive(rules, behaviour(speed), predicted) == [(4, "reward"), (7, "done")]
    assert rules.errors == {}
    assert rules.describe() == [("lab: when entry point running_fast for 0.1 s -> reward, on "
                                 "release done to lsl, zmq")]


def test_entry_point_is_anded_with_thresholds(lab_package):
    rules = Rules.from_config([lab_rule("running_fast", when=[{"value": "decoded.gaze_phi",
                                                                "above": 5}])], LAYOUT)
    predicted = np.ones((4, 5), np.float32)
    assert drive(rules, behaviour([20, 20, 0, 20], [0, 6, 6, 6]), predicted) == [
        (1, "reward"), (3, "reward")]


def test_a_raising_callable_is_counted_and_the_other_rules_carry_on(lab_package):
    rules = Rules.from_config([lab_rule("broken"), speed_above(10.0)], LAYOUT)
    assert drive(rules, behaviour([0, 20, 20, 0, 20])) == [(1, "go"), (4, "go")]
    assert rules.errors == {"lab": 5}
    assert rules.last_errors == {"lab": "RuntimeError: lab bug"}


def test_a_callable_cannot_modify_the_predictions(lab_package):
    rules = Rules.from_config([lab_rule("writes_predicted")], LAYOUT)
    predicted = np.zeros((1, 5), np.float32)
    assert drive(rules, behaviour([0]), predicted) == []
    assert predicted[0, 0] == 0.0
    assert rules.errors == {"lab": 1} and "read-only" in rules.last_errors["lab"]


@pytest.mark.parametrize("entry_point, words", [
    ("not_callable", ["a callable", f"'{LAB_MODULE}:NOT_CALLABLE'", "is a int"]),
    ("two_arguments", ["(decoded, predicted, layout)", "(decoded, predicted)"]),
    ("missing_attribute", ["cannot be loaded", "AttributeError", "'rtnf.rules'"]),
    ("missing_module", ["cannot be loaded", "ModuleNotFoundError", "rtnf_test_no_such_module"]),
    ("no_such_rule", ["'rtnf.rules' group", "installed: ", "running_fast"]),
])
def test_entry_points_are_checked_at_start(lab_package, entry_point, words):
    with pytest.raises(ConfigError) as error:
        Rules.from_config([speed_above(1.0), lab_rule(entry_point)], LAYOUT)
    message = str(error.value)
    assert f"control.rules[1].entry_point = '{entry_point}'" in message
    for word in words:
        assert word in message


# ---------------------------------------------------------------------------------------------
# The schema documented in rtnf.yaml
# ---------------------------------------------------------------------------------------------


def documented_example() -> list[dict]:
    """The commented example under `control:` in rtnf.yaml, parsed."""
    text = (ROOT / "rtnf.yaml").read_text()
    control = text[text.index("\ncontrol:\n"):text.index("\n  rules: []")]
    example = control[control.index("  # Example:\n") + len("  # Example:\n"):]
    return yaml.safe_load("\n".join(line[len("  # "):] for line in example.splitlines()))["rules"]


def test_the_documented_example_is_valid_and_the_default_has_no_rules(lab_package):
    rules = Rules.from_config(documented_example(), WIDE_LAYOUT)
    assert [line.split(":")[0] for line in rules.describe()] == [
        "fast-running-burst", "looking-away", "lab-logic"]
    assert load_config().control.rules == []
