"""Calibration end to end: contiguous blocks, unit mapping, baselines, verdict, bundle."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rtnf.bundle import load_bundle, verify_bundle
from rtnf.config import load_config
from rtnf.data.io import read_session, write_session
from rtnf.data.sim import simulate
from rtnf.errors import RtnfError
from rtnf.model.checkpoint import load_checkpoint
from rtnf.model.losses import losses
from rtnf.stream.lslconfig import import_pylsl
from rtnf.train import calibrate as calibrate_module
from rtnf.train.baselines import decoder_from_state
from rtnf.train.calibrate import calibrate, prepare_model, session_windows, split_session
from rtnf.train.dataset import Normalization, behavior_before
from rtnf.train.evaluate import evaluate_bundle
from rtnf.train.finetune import validation_loss
from rtnf.train.pretrain import pretrain
from rtnf.train.smoothing import TAUS_S

TINY = ["simulation.sessions=3", "simulation.neurons=30", "simulation.minutes=1.2",
        "simulation.seed=7", "model.n_embd=32", "model.n_head=2", "model.n_current_layers=1",
        "model.n_history_layers=1", "model.n_frame_encoder_layers=1", "model.n_frame_layers=1",
        "model.n_decoder_layers=1", "training.batch_size=16", "training.max_steps=20",
        "training.eval_every=20", "calibration.max_epochs=2", "calibration.patience=1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def animal():
    config = load_config(overrides=TINY)
    return config, simulate(config.simulation, config.rig.profile)


@pytest.fixture(scope="module")
def pretrained(animal, tmp_path_factory):
    config, sessions = animal
    out = tmp_path_factory.mktemp("pretrained")
    pretrain(sessions[:2], config, out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def bundle(animal, pretrained, tmp_path_factory):
    config, sessions = animal
    out = tmp_path_factory.mktemp("bundles") / "today"
    metrics = calibrate(sessions[2], config, out, pretrained=pretrained,
                        source={"kind": "test"}, log=lambda _: None)
    return out, metrics


def test_blocks_are_contiguous_ordered_and_separated(animal):
    config, sessions = animal
    blocks = split_session(sessions[2], config)
    gap = config.windows.current + config.windows.history - 1e-9
    assert blocks.train[-1] <= blocks.validation[0] - gap
    assert blocks.validation[-1] <= blocks.holdout[0] - gap
    total = blocks.train.size + blocks.validation.size + blocks.holdout.size
    assert blocks.holdout.size / total == pytest.approx(0.2, abs=0.02)
    assert blocks.validation.size / total == pytest.approx(0.1, abs=0.02)
    with pytest.raises(RtnfError, match="too short to calibrate"):
        split_session(sessions[2].first(0.5), config)


def test_bundle_verifies_and_holds_everything(bundle, animal):
    out, metrics = bundle
    _, sessions = animal
    manifest = verify_bundle(out)
    assert manifest["source"] == {"kind": "test"}
    assert manifest["verdict"] == metrics["verdict"]
    for name in ("model.safetensors", "model.json", "units.json", "normalization.json",
                 "config.yaml", "baselines/ridge.safetensors", "baselines/ridge.json",
                 "baselines/mlp.safetensors", "baselines/gru.json", "smoothing.json",
                 "report/metrics.json", "report/report.md", "report/decoded_speed.png",
                 "report/training_curve.png"):
        assert name in manifest["files"], name
    units = json.loads((out / "units.json").read_text())
    assert units["unit_ids"] == sessions[2].unit_ids.tolist()
    # Turnover: most units of day 3 were known from days 1-2, some are new.
    assert 0.5 * len(units["unit_ids"]) <= units["known_units"] < len(units["unit_ids"])
    report = (out / "report" / "report.md").read_text()
    assert ("GO:" in report) and metrics["verdict"]["reason"] in report


def test_model_and_baselines_are_scored_on_the_same_held_out_time(bundle):
    _, metrics = bundle
    assert set(metrics["holdout"]) == {"neuroformer", "ridge", "mlp", "gru"}
    # The shape `rtnf evaluate --json` shares: models -> target -> r, r2; held-out seconds.
    assert set(metrics["models"]) == {"neuroformer", "ridge", "mlp", "gru"}
    assert metrics["models"]["ridge"]["speed"]["r"] == metrics["holdout"]["ridge"]["r"]["speed"]
    assert np.isfinite(metrics["models"]["neuroformer"]["bits_per_spike"])
    assert 0.15 * 72 < metrics["heldout_s"] < 0.25 * 72
    assert set(metrics["validation"]) == {"neuroformer", "ridge", "mlp", "gru"}
    assert set(metrics["holdout_unsmoothed"]) == set(metrics["holdout"])
    for taus in metrics["smoothing_tau_s"].values():  # one output filter per decoder, target
        assert set(taus) == {"speed", "gaze_phi", "gaze_theta"}
        assert all(tau in TAUS_S for tau in taus.values())
    for scores in metrics["holdout"].values():
        assert set(scores["r"]) == {"speed", "gaze_phi", "gaze_theta"}
        assert all(np.isfinite(v) for v in scores["r"].values())
    bits = metrics["next_window_bits_per_spike"]
    assert np.isfinite(bits["model"]) and np.isfinite(bits["oracle"]) and bits["spikes"] > 0
    verdict = metrics["verdict"]
    best = metrics["validation"][verdict["best_baseline"]]["r2_weighted"]
    assert verdict["go"] == (metrics["validation"]["neuroformer"]["r2_weighted"] > best)
    assert verdict["use"] == ("neuroformer" if verdict["go"] else "ridge")


def test_embeddings_method_freezes_the_transformer(bundle, pretrained):
    out, _ = bundle
    before, after = load_checkpoint(pretrained).model, load_checkpoint(out).model
    for name, value in before.state_dict().items():
        changed = not torch.equal(value, after.state_dict()[name][:value.shape[0]])
        trainable = name.split(".")[0] in ("unit_embedding", "unit_output", "unit_rate",
                                           "session_embedding", "behavior_head",
                                           "rate_projection")
        if not trainable:
            assert not changed, name
    assert after.unit_embedding.num_embeddings > before.unit_embedding.num_embeddings


def test_ridge_fallback_runs_from_the_bundle(bundle, animal):
    out, _ = bundle
    _, sessions = animal
    ridge = decoder_from_state(load_file(str(out / "baselines" / "ridge.safetensors")),
                               json.loads((out / "baselines" / "ridge.json").read_text()))
    ends = np.array([30.0, 30.05, 30.1])
    assert ridge.predict(ridge.features(sessions[2], ends)).shape == (3, 3)


def test_evaluate_on_the_held_out_block_reproduces_the_report(bundle, animal):
    out, metrics = bundle
    config, sessions = animal
    holdout = split_session(sessions[2], config).holdout
    current = config.windows.current
    result = evaluate_bundle(load_bundle(out), sessions[2], holdout[0] - current,
                             holdout[-1] + current)
    assert result["evaluated"]["windows"] == holdout.size
    assert result["heldout_s"] == pytest.approx(metrics["heldout_s"])
    assert result["units"] == {"bundle": sessions[2].n_units, "present": sessions[2].n_units,
                               "silent": 0, "unknown_left_out": 0}
    assert set(result["models"]) == set(metrics["models"])
    for name, scores in metrics["models"].items():
        for target, value in scores.items():
            if isinstance(value, dict):
                assert result["models"][name][target]["r"] == pytest.approx(value["r"],
                                                                            abs=1e-6)
                assert result["models"][name][target]["r2"] == pytest.approx(value["r2"],
                                                                             abs=1e-6)
    assert result["models"]["neuroformer"]["bits_per_spike"] == pytest.approx(
        metrics["models"]["neuroformer"]["bits_per_spike"], abs=1e-6)
    assert result["verdict"] == metrics["verdict"]


def test_evaluate_another_day_of_the_same_animal(bundle, animal, tmp_path):
    """Day 2 through day 3's bundle: turnover leaves some of the bundle's units silent and some
    of day 2's units unknown; the command line prints the same shape as metrics.json."""
    out, metrics = bundle
    _, sessions = animal
    day2, day3 = sessions[1], sessions[2]
    common = np.intersect1d(day2.unit_ids, day3.unit_ids).size
    path = tmp_path / "day2.npz"
    write_session(day2, path)
    result = subprocess.run([sys.executable, "-m", "rtnf.cli", "evaluate", "--bundle", str(out),
                             "--data", str(path), "--json"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    evaluation = json.loads(result.stdout)
    assert evaluation["units"] == {"bundle": day3.n_units, "present": common,
                                   "silent": day3.n_units - common,
                                   "unknown_left_out": day2.n_units - common}
    assert 0 < common < day3.n_units
    assert set(evaluation["models"]) == {"neuroformer", "ridge", "mlp", "gru"}
    assert evaluation["heldout_s"] > 0.9 * day2.duration
    for scores in evaluation["models"].values():
        assert all(np.isfinite(scores[t]["r"]) for t in ("speed", "gaze_phi", "gaze_theta"))
    assert np.isfinite(evaluation["next_window_bits_per_spike"]["oracle"])
    table = subprocess.run([sys.executable, "-m", "rtnf.cli", "evaluate", "--bundle", str(out),
                            "--data", str(path)], capture_output=True, text=True, timeout=300)
    assert f"units: {common} of the bundle's {day3.n_units} present" in table.stdout


def test_failed_calibration_leaves_the_previous_bundle(bundle, animal, pretrained, monkeypatch):
    out, _ = bundle
    config, sessions = animal
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken_report(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(calibrate_module, "write_report", broken_report)
    with pytest.raises(OSError, match="disk full"):
        calibrate(sessions[2], config, out, pretrained=pretrained, log=lambda _: None)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    verify_bundle(out)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_incompatible_pretrained_model_is_refused(animal, pretrained, tmp_path):
    config, sessions = animal
    other = load_config(overrides=[*TINY, "windows.history=0.3"])
    with pytest.raises(RtnfError, match="history_bins = 15.*give 30"):
        calibrate(sessions[2], other, tmp_path / "b", pretrained=pretrained, log=lambda _: None)


def test_cli_calibrate_refuses_more_minutes_than_recorded(tmp_path, animal):
    path = tmp_path / "day.npz"
    result = subprocess.run([sys.executable, "-m", "rtnf.cli", "simulate", "--out", str(path),
                             "--minutes", "0.5", "--neurons", "10"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    result = subprocess.run([sys.executable, "-m", "rtnf.cli", "calibrate", "--data", str(path),
                             "--out", str(tmp_path / "b"), "--minutes", "5"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--minutes 5: " in result.stderr and "holds only 0.50 minutes" in result.stderr


def test_cli_calibrate_writes_a_compiled_bundle(animal, pretrained, tmp_path):
    """`rtnf calibrate` end to end: a session file in, a bundle compiled for this machine out."""
    _, sessions = animal
    path = tmp_path / "day.npz"
    write_session(sessions[2], path)
    overrides = [arg for item in TINY for arg in ("--set", item)]
    result = subprocess.run([sys.executable, "-m", "rtnf.cli", "calibrate", "--data", str(path),
                             "--out", str(tmp_path / "b"), "--pretrained", str(pretrained),
                             *overrides, "--set", "engine.threads=1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "compiled: backend " in result.stdout and "GO" in result.stdout
    manifest = verify_bundle(tmp_path / "b")
    assert set(manifest["onnx"]["graphs"]) >= {"history", "decode", "step"}
    assert manifest["source"]["path"] == str(path.resolve())


def test_cli_calibrate_from_a_live_lsl_rig(pretrained, tmp_path):
    """`rtnf calibrate --from lsl`: the simulated rig streams day 3 of the animal over LSL
    (loopback), rtnf captures a few seconds, calibrates and keeps the capture in the bundle."""
    overrides = [arg for item in TINY for arg in ("--set", item)]
    streamer = subprocess.Popen([sys.executable, "-m", "rtnf.cli", "simulate", "--stream", "lsl",
                                 "--loop", *overrides], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    try:
        pylsl = import_pylsl("loopback")
        found = pylsl.resolve_bypred("name='rtnf-sim-frames'", 1, 60)
        assert found, "the simulated rig did not start streaming"
        out = tmp_path / "live"
        result = subprocess.run(
            [sys.executable, "-m", "rtnf.cli", "calibrate", "--from", "lsl", "--minutes", "0.1",
             "--out", str(out), "--pretrained", str(pretrained), *overrides,
             "--set", "rig.sources.frames.kind=lsl", "--set", "engine.threads=1",
             "--no-compile"], capture_output=True, text=True, timeout=600)
    finally:
        streamer.terminate()
        streamer.wait(30)
    assert result.returncode == 0, result.stderr
    assert "capturing [" in result.stdout and "captured " in result.stdout
    manifest = verify_bundle(out)
    assert manifest["source"]["kind"] == "live" and manifest["source"]["transport"] == "lsl"
    assert manifest["source"]["file"] == "capture/session.npz"
    assert "capture/session.npz" in manifest["files"]
    captured = read_session(out / "capture" / "session.npz")
    assert 5.0 < captured.duration < 7.5 and captured.n_spikes > 0
    assert set(captured.behavior) == {"speed", "gaze_phi", "gaze_theta"}
    assert not list(tmp_path.glob("live-capture-*.npz"))  # moved into the bundle


def test_finetuning_keeps_to_its_time_budget(animal, pretrained, tmp_path):
    config, sessions = animal
    budgeted = load_config(overrides=[*TINY, "calibration.max_epochs=50",
                                      "calibration.max_minutes=0.0001",
                                      "calibration.steps_per_epoch=1"])
    lines = []
    metrics = calibrate(sessions[2], budgeted, tmp_path / "b", pretrained=pretrained,
                        log=lines.append)
    assert metrics["finetune"]["epochs"] == 1
    assert any(line.startswith("epoch 1/50: training loss ") for line in lines)
    assert any("time budget of 0.0001 min reached; keeping epoch" in line for line in lines)


def test_epoch_selection_on_the_decoding_loss(animal, pretrained):
    """select_on decoding scores what the loop reads (behaviour and rates), nothing else."""
    config, sessions = animal
    checkpoint = load_checkpoint(pretrained)
    prepared = prepare_model(sessions[2], config, checkpoint.model, checkpoint.vocabulary)
    ends = split_session(sessions[2], config).validation
    normalization = Normalization.fit(behavior_before(
        sessions[2], prepared.model.dims.behavior_targets, ends, config.windows.dt_resolution))
    windows = session_windows(sessions[2], ends, prepared, normalization, config)
    model, spec = prepared.model.eval(), prepared.model.spec
    with torch.no_grad():
        inputs, targets = windows.batch(np.arange(len(windows)))
        parts = losses(model(inputs), inputs, targets, spec, model.dims,
                       model.contrastive_projection)
    decoding = validation_loss(model, windows, len(windows), "decoding")
    assert decoding == pytest.approx(float(spec.loss_behavior * parts["behavior"]
                                           + spec.loss_rate * parts["rate"]), rel=1e-5)
    assert validation_loss(model, windows, len(windows)) == pytest.approx(
        float(parts["total"]), rel=1e-5)
