"""rtnf.yaml loading: defaults, merging, overrides, and one clear error per bad input."""

from pathlib import Path

import pytest
import yaml

from rtnf.config import (Config, check_config_file, default_config_text, load_config,
                         recipe_names, recipe_path)
from rtnf.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_defaults_are_the_repository_file_and_match_the_schema():
    assert default_config_text() == (ROOT / "rtnf.yaml").read_text()
    assert load_config() == Config()


@pytest.mark.parametrize("path", ["rtnf.yaml", "calibration/default.yaml",
                                  "calibration/quick.yaml", "calibration/thorough.yaml"])
def test_every_shipped_key_is_commented(path):
    """Each key with a value has an inline comment or sits in a commented block of keys
    (a comment line above it with no blank line in between)."""
    undocumented, in_commented_block = [], False
    for line in (ROOT / path).read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            in_commented_block = False
        elif stripped.startswith("#"):
            in_commented_block = True
        elif not stripped.endswith(":") and "#" not in stripped and not in_commented_block:
            undocumented.append(stripped)
    assert undocumented == []


def test_user_file_merges_over_defaults(tmp_path):
    user = tmp_path / "rig.yaml"
    user.write_text("windows:\n  hop: 0.02\n  current: 0.04\nengine:\n  threads: 3\n")
    config = load_config([user])
    assert config.windows.hop == 0.02 and config.windows.current == 0.04
    assert config.windows.history == 0.15  # untouched default
    assert config.engine.threads == 3


def test_overrides_apply_after_files_and_parse_yaml_values(tmp_path):
    user = tmp_path / "rig.yaml"
    user.write_text("engine:\n  threads: 1\n")
    config = load_config([user], ["engine.threads=4", "realtime.cpu_affinity=[0, 1]",
                                  "calibration.require_beats_baseline=false"])
    assert config.engine.threads == 4
    assert config.realtime.cpu_affinity == [0, 1]
    assert config.calibration.require_beats_baseline is False


@pytest.mark.parametrize("override, words", [
    ("windows.hopp=0.1", ["unknown key 'windows.hopp'", "did you mean 'windows.hop'"]),
    ("windows.hop=-1", ["windows.hop = -1", "positive"]),
    ("windows.hop=fast", ["windows.hop = 'fast'", "a number"]),
    ("windows.hop=0.045", ["windows.hop = 0.045", "multiple of windows.dt_resolution"]),
    ("windows.hop=0.1", ["windows.hop = 0.1", "at most windows.current"]),
    ("engine.backend=gpu", ["engine.backend = 'gpu'", "'onnxruntime'"]),
    ("simulation.neurons=1.5", ["simulation.neurons = 1.5", "an integer"]),
    ("decoding.targets=[speed, pupil]", ["decoding.targets[1] = 'pupil'", "gaze_phi"]),
    ("calibration.holdout_fraction=1.5", ["calibration.holdout_fraction = 1.5", "fraction"]),
    ("outputs.zmq.enabled=maybe", ["outputs.zmq.enabled = 'maybe'", "true or false"]),
    ("model=3", ["model = 3", "a mapping"]),
    ("windows.hop", ["expected KEY.PATH=VALUE"]),
])
def test_bad_overrides_name_key_value_and_expectation(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_check_file_names_the_file_and_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rig:\n  profil: 2p\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'rig\.profil'; did you mean "
                                          r"'rig\.profile'"):
        check_config_file(bad)


def test_invalid_yaml_reports_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("windows:\n  hop: [0.05\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML at line \d+"):
        check_config_file(bad)


def test_top_level_must_be_a_mapping_and_file_must_exist(tmp_path):
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        check_config_file(listing)
    with pytest.raises(ConfigError, match="missing.yaml: cannot read"):
        check_config_file(tmp_path / "missing.yaml")


def test_empty_file_is_the_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert check_config_file(empty) == Config()


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = load_config(overrides=["windows.history=1.0", "rig.profile=ephys"])
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(config.to_yaml())
    assert check_config_file(dumped) == config
    assert yaml.safe_load(config.to_yaml())["rig"]["profile"] == "ephys"
    assert config.digest() != Config().digest()


def test_calibration_recipes():
    assert recipe_names() == ["default", "quick", "thorough"]
    assert load_config([recipe_path("default")]) == load_config()  # default is the default
    quick, thorough = (load_config([recipe_path(name)]).calibration
                       for name in ("quick", "thorough"))
    assert quick.minutes == 2.0 and thorough.minutes == 10.0 and thorough.unfreeze_after > 0
    assert load_config([recipe_path(str(ROOT / "calibration" / "quick.yaml"))]).calibration == quick
    with pytest.raises(ConfigError, match="--recipe 'fast': expected one of default, quick, "
                                          "thorough or the path of a recipe file"):
        recipe_path("fast")
