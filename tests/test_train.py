"""Pretraining end to end: the CLI, checkpoints, resuming, and torchrun with two CPU ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from rtnf.config import load_config
from rtnf.data.sim import simulate
from rtnf.errors import RtnfError
from rtnf.model.checkpoint import load_checkpoint
from rtnf.train.optim import learning_rate_at
from rtnf.train.pretrain import pretrain

TINY = ["simulation.sessions=2", "simulation.neurons=24", "simulation.minutes=0.4",
        "simulation.seed=5", "model.n_embd=32", "model.n_head=2", "model.n_current_layers=1",
        "model.n_history_layers=1", "model.n_frame_encoder_layers=1", "model.n_frame_layers=1",
        "model.n_decoder_layers=1", "training.batch_size=8", "training.eval_every=10",
        "training.warmup_steps=5", "training.learning_rate=0.003"]


def pretrain_command(out: Path, *extra: str) -> list[str]:
    command = ["pretrain", "--simulated", "--out", str(out), "--json"]
    for item in TINY:
        command += ["--set", item]
    return command + list(extra)


def run_rtnf(args: list[str], launcher: list[str] | None = None) -> dict:
    command = (launcher or [sys.executable, "-m"]) + ["rtnf.cli", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout[result.stdout.index("{"):])


def test_schedule_warms_up_then_decays_to_a_tenth():
    rates = [learning_rate_at(step, 1.0, 10, 100) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    assert learning_rate_at(100, 1.0, 10, 100) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pretrained")
    return out, run_rtnf(pretrain_command(out, "--max-steps", "40"))


def test_pretrain_writes_a_checkpoint_safetensors_can_read(pretrained):
    out, summary = pretrained
    assert summary["steps"] == 40 and summary["stopped_by"] == "max_steps"
    assert summary["sessions"] == 2 and summary["tokens_seen"] > 0
    assert np.isfinite(summary["validation_loss"])
    weights = load_file(str(out / "model.safetensors"))  # the safetensors library alone
    assert "unit_embedding.weight" in weights
    meta = json.loads((out / "model.json").read_text())
    assert meta["format"] == "rtnf-model" and meta["summary"]["step"] == 40
    assert len(meta["vocabulary"]["sessions"]) == 2
    assert set(meta["normalization"]["mean"]) == {"speed", "gaze_phi", "gaze_theta"}
    checkpoint = load_checkpoint(out)
    assert checkpoint.model.parameter_count() == summary["parameters"]
    assert weights["unit_embedding.weight"].shape[0] == checkpoint.vocabulary.n_units


def test_training_reduces_the_loss(pretrained):
    out, _ = pretrained
    evaluations = json.loads((out / "train_state.json").read_text())["evaluations"]
    assert evaluations[-1]["validation"]["total"] < evaluations[0]["validation"]["total"]


def test_interrupted_run_resumes_exactly(tmp_path):
    """Stopped between steps (as Ctrl-C does) and resumed, a run ends where an uninterrupted
    one does: same batches, optimiser state and random state."""
    config = load_config(overrides=[*TINY, "training.max_steps=40"])
    sessions = simulate(config.simulation, config.rig.profile)
    pretrain(sessions, config, tmp_path / "straight", show_progress=False)
    first = pretrain(sessions, config, tmp_path / "resumed", show_progress=False,
                     should_stop=lambda step: step >= 23)
    assert first["stopped_by"] == "interrupted" and first["steps"] == 23
    summary = pretrain(sessions, config, tmp_path / "resumed", resume=True, show_progress=False)
    assert summary["steps"] == 40
    resumed = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    for name, value in straight.items():
        np.testing.assert_allclose(resumed[name], value, atol=1e-6, err_msg=name)


def test_torchrun_two_cpu_ranks_end_identical(tmp_path):
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", "-m"]
    summary = run_rtnf(pretrain_command(out, "--max-steps", "12"), launcher)
    assert summary["world_size"] == 2 and summary["replicas_agree"] is True
    assert summary["steps"] == 12
    assert load_checkpoint(out).model.parameter_count() == summary["parameters"]


def test_bad_checkpoints_are_refused_clearly(tmp_path, pretrained):
    out, _ = pretrained
    with pytest.raises(RtnfError, match="model.json: no such file"):
        load_checkpoint(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.json").write_text((out / "model.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(RtnfError, match="model.safetensors: cannot read weights"):
        load_checkpoint(broken)
    (broken / "model.json").write_text('{"format": "something else"}')
    with pytest.raises(RtnfError, match="not an rtnf model description"):
        load_checkpoint(broken)
    assert torch.equal(load_checkpoint(out).model.unit_embedding.weight,
                       load_checkpoint(out).model.unit_embedding.weight)


def test_default_checkpoint_is_built_once_and_cached(tmp_path, monkeypatch):
    from rtnf.train import pretrain as pretrain_module

    monkeypatch.setenv("RTNF_CACHE", str(tmp_path))
    monkeypatch.setattr(pretrain_module, "DEFAULT_RECIPE",
                        [*TINY, "simulation.sessions=1", "training.max_steps=6",
                         "training.eval_every=3"])
    config = load_config(overrides=["model.preset=rt-small"])
    directory = pretrain_module.default_checkpoint(config, show_progress=False)
    assert directory.parent == tmp_path / "pretrained" and directory.name.startswith("sim-rt-")
    stamp = (directory / "model.safetensors").stat().st_mtime_ns
    assert pretrain_module.default_checkpoint(config, show_progress=False) == directory
    assert (directory / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    assert load_checkpoint(directory).summary["step"] == 6
    other = load_config(overrides=["model.preset=rt-small", "windows.history=0.3"])
    assert pretrain_module.default_checkpoint_dir(other) != directory  # keyed by windows
