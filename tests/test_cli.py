"""The `rtnf` command as an operator runs it: real processes, real files, one-line errors."""

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from rtnf.data.io import read_session

pynwb = pytest.importorskip("pynwb")


def rtnf(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rtnf.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def test_console_script_is_installed():
    (script,) = metadata.entry_points(group="console_scripts", name="rtnf")
    assert script.value == "rtnf.cli:main"


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
    """The issue's acceptance command: 1 minute, 386 units, 2p, seed 1, as NWB."""
    out = tmp_path_factory.mktemp("sim") / "s.nwb"
    result = rtnf("simulate", "--out", str(out), "--minutes", "1", "--neurons", "386",
                  "--profile", "2p", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    return out


def test_simulated_nwb_is_plain_pynwb_readable(simulated):
    with pynwb.NWBHDF5IO(str(simulated), "r") as io:
        nwb = io.read()
        assert len(nwb.units) == 386
        behavior = nwb.processing["behavior"]
        for name in ("speed", "gaze_phi", "gaze_theta"):
            series = behavior[name]
            assert len(series.data) == len(series.timestamps) > 1000
        assert nwb.processing["behavior"]["speed"].unit == "cm/s"


def test_same_seed_same_content(simulated, tmp_path):
    again = tmp_path / "again.nwb"
    assert rtnf("simulate", "--out", str(again), "--minutes", "1", "--neurons", "386",
                "--profile", "2p", "--seed", "1").returncode == 0
    first, second = read_session(simulated), read_session(again)
    np.testing.assert_array_equal(first.unit_ids, second.unit_ids)
    np.testing.assert_array_equal(first.spike_times, second.spike_times)
    np.testing.assert_array_equal(first.spike_unit_index, second.spike_unit_index)
    for name in first.behavior:
        np.testing.assert_array_equal(first.behavior[name].values, second.behavior[name].values)
    np.testing.assert_array_equal(first.frames.images, second.frames.images)
    np.testing.assert_array_equal(first.ground_truth.rates, second.ground_truth.rates)


def test_info_describes_the_session(simulated):
    text = rtnf("info", str(simulated))
    assert text.returncode == 0, text.stderr
    assert "386" in text.stdout
    result = rtnf("info", str(simulated), "--json")
    summary = json.loads(result.stdout)
    assert summary["units"] == 386
    assert 59.0 <= summary["duration_s"] <= 61.0
    assert summary["spikes"] == read_session(simulated).n_spikes > 0
    assert sorted(summary["behavior"]) == ["gaze_phi", "gaze_theta", "speed"]
    assert summary["frames"] == pytest.approx(60 * 20, abs=2)


def test_several_sessions_of_one_animal(tmp_path):
    out = tmp_path / "animal.npz"
    result = rtnf("simulate", "--out", str(out), "--minutes", "0.2", "--neurons", "50",
                  "--profile", "ephys", "--seed", "3", "--sessions", "2")
    assert result.returncode == 0, result.stderr
    days = [read_session(tmp_path / f"animal-session{k}.npz") for k in (1, 2)]
    shared = np.intersect1d(days[0].unit_ids, days[1].unit_ids)
    assert 0.5 * 50 <= shared.size < 50


def test_config_show_resolves_overrides():
    result = rtnf("config", "show", "--json", "--set", "windows.hop=0.02")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["windows"]["hop"] == 0.02


@pytest.mark.parametrize("args, needle", [
    (["config", "check", "{bad_yaml}"], "bad.yaml: unknown key 'windows.hopp'; did you mean"),
    (["info", "{garbage_nwb}"], "garbage.nwb"),
    (["info", "{missing}"], "missing.npz"),
    (["simulate", "--out", "{tmp}/x.csv"], "x.csv: expected a .nwb, .npz or .xdf"),
    (["simulate", "--out", "{tmp}/x.npz", "--neurons", "0"], "simulation.neurons = 0"),
    (["config", "show", "--set", "engine.backend=gpu"], "engine.backend = 'gpu'"),
])
def test_operator_errors_are_one_line(tmp_path, args, needle):
    (tmp_path / "bad.yaml").write_text("windows:\n  hopp: 0.1\n")
    (tmp_path / "garbage.nwb").write_bytes(b"this is not HDF5" * 10)
    values = {"bad_yaml": tmp_path / "bad.yaml", "garbage_nwb": tmp_path / "garbage.nwb",
              "missing": tmp_path / "missing.npz", "tmp": tmp_path}
    result = rtnf(*(a.format(**values) for a in args))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rtnf: error: "), result.stderr
    assert needle in lines[0]


def test_info_preset_reports_architecture_and_parameters():
    paper = json.loads(rtnf("info", "--preset", "paper", "--json").stdout)
    assert paper["preset"] == "paper" and 20e6 <= paper["parameters"] <= 30e6
    assert paper["spec"]["n_embd"] == 256 and paper["spec"]["n_head"] == 8
    small = rtnf("info", "--preset", "rt-small")
    assert small.returncode == 0 and "rt-small" in small.stdout and "parameters" in small.stdout
    unknown = rtnf("info", "--preset", "huge")
    assert unknown.returncode == 2 and "model.preset = 'huge'" in unknown.stderr


def test_bench_model_reports_cache_and_history_figures(tmp_path):
    out = tmp_path / "speed.json"
    result = rtnf("bench", "model", "--repeats", "3", "--json", "--out", str(out),
                  "--set", "model.n_embd=32", "--set", "model.n_head=2")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == json.loads(out.read_text())
    assert report["kv_speedup"] > 0 and report["history_ratio"] > 0  # figures, not targets
    for name in ("decode_64_tokens", "slide_history_0.15s", "slide_history_1s",
                 "generate_98_cached", "generate_98_recomputed"):
        assert report["figures"][name]["runs"] >= 3
