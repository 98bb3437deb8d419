"""Calibration bundles: manifest contents, refusal of tampered bundles, atomic replacement."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from rtnf import bundle
from rtnf.config import load_config
from rtnf.bundle import (BundleError, BundleWriter, load_manifest, sha256_file,
                               verify_bundle, write_json)

CONFIG = load_config()
SOURCE = {"kind": "file", "path": "/data/session.npz", "sha256": "0" * 64}
VERDICT = {"verdict": "pass", "speed_r2": 0.71}


def write_bundle(final: Path, weights: bytes = b"weights", verdict: dict = VERDICT) -> None:
    with BundleWriter(final, CONFIG, SOURCE, verdict) as staging:
        (staging / "model.safetensors").write_bytes(weights)
        write_json(staging / "units.json", {"units": [1, 2, 3]})
        (staging / "report").mkdir()
        (staging / "report" / "metrics.json").write_text("{}")
        (staging / "report" / "report.md").write_text("# Report\n")
        (staging / "engines").mkdir()
        (staging / "engines" / "plan.bin").write_bytes(b"cache")


def snapshot(directory: Path) -> dict[str, bytes]:
    return {path.relative_to(directory).as_posix(): path.read_bytes()
            for path in sorted(directory.rglob("*")) if path.is_file()}


@pytest.fixture
def final(tmp_path: Path) -> Path:
    path = tmp_path / "bundle"
    write_bundle(path)
    return path


def test_manifest_lists_every_file_but_itself_and_engines(final):
    manifest = verify_bundle(final)
    files = snapshot(final)
    listed = {name for name in files if name != "manifest.json" and not name.startswith("engines/")}
    assert set(manifest["files"]) == listed == {"config.yaml", "model.safetensors", "units.json",
                                               "report/metrics.json", "report/report.md"}
    for name, entry in manifest["files"].items():
        data = files[name]
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest["format"] == "rtnf-bundle" and manifest["format_version"] == 1
    assert manifest["config_digest"] == CONFIG.digest()
    assert (final / "config.yaml").read_text() == CONFIG.to_yaml()
    assert manifest["source"] == SOURCE and manifest["speed_r2"] == 0.71
    assert set(manifest["versions"]) == {"rtnf", "torch", "numpy", "python"}
    assert manifest["created"].endswith("+00:00")
    assert load_manifest(final) == manifest


def test_engines_may_change_after_writing(final):
    (final / "engines" / "plan.bin").write_bytes(b"rebuilt for another GPU")
    (final / "engines" / "new.plan").write_bytes(b"x")
    verify_bundle(final)


def tamper_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, name, expected", [
    (lambda b: tamper_byte(b / "model.safetensors"), "model.safetensors", "modified or truncated"),
    (lambda b: (b / "report" / "report.md").write_text("# Rep"), "report/report.md",
     "modified or truncated"),
    (lambda b: (b / "units.json").unlink(), "units.json", "missing"),
    (lambda b: (b / "report" / "extra.png").write_bytes(b"png"), "report/extra.png",
     "not in manifest.json"),
])
def test_damaged_bundle_is_refused_naming_the_file(final, damage, name, expected):
    damage(final)
    with pytest.raises(BundleError) as error:
        verify_bundle(final)
    message = str(error.value)
    assert str(final) in message and name in message and expected in message
    assert "\n" not in message


def edit_manifest(final: Path, edit) -> None:
    manifest = json.loads((final / "manifest.json").read_text())
    edit(manifest)
    (final / "manifest.json").write_text(json.dumps(manifest))


def test_edited_hash_in_manifest_is_refused(final):
    edit_manifest(final, lambda m: m["files"]["units.json"].update(sha256="f" * 64))
    with pytest.raises(BundleError, match="units.json was modified or truncated"):
        verify_bundle(final)


@pytest.mark.parametrize("entry", ["../x", "report/../../x", "/etc/passwd", "..\\x", "C:x",
                                   "./units.json", ""])
def test_manifest_entries_outside_the_bundle_are_refused(final, entry):
    edit_manifest(final, lambda m: m["files"].update({entry: {"size": 1, "sha256": "0" * 64}}))
    with pytest.raises(BundleError, match="not a plain relative path") as error:
        load_manifest(final)
    assert repr(entry) in str(error.value)


@pytest.mark.parametrize("content, expected", [
    (None, "no manifest.json"),
    ("{not json", "cannot read manifest.json"),
    (json.dumps({"format": "something-else"}), "not an rtnf bundle manifest"),
    (json.dumps({"format": "rtnf-bundle", "format_version": 2, "files": {}}),
     "format version 2 is newer"),
])
def test_bad_manifest_is_refused(final, content, expected):
    if content is None:
        (final / "manifest.json").unlink()
    else:
        (final / "manifest.json").write_text(content)
    with pytest.raises(BundleError, match=expected) as error:
        verify_bundle(final)
    assert str(final) in str(error.value)


def test_exception_inside_the_block_keeps_the_previous_bundle(final):
    before = snapshot(final.parent)
    with pytest.raises(RuntimeError, match="training diverged"):
        with BundleWriter(final, CONFIG, SOURCE) as staging:
            (staging / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("training diverged")
    assert snapshot(final.parent) == before
    assert os.listdir(final.parent) == ["bundle"]


def test_failed_second_rename_puts_the_previous_bundle_back(final, monkeypatch):
    before = snapshot(final.parent)
    real_rename = os.rename

    def rename(source, destination):
        if Path(source).name.startswith(".bundle.staging-"):
            raise OSError("disk full")
        real_rename(source, destination)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="disk full"):
        write_bundle(final, weights=b"new weights")
    assert snapshot(final.parent) == before
    assert os.listdir(final.parent) == ["bundle"]


def test_second_write_replaces_the_first(final):
    write_bundle(final, weights=b"new weights", verdict={"verdict": "fail"})
    manifest = verify_bundle(final)
    assert (final / "model.safetensors").read_bytes() == b"new weights"
    assert manifest["verdict"] == "fail" and "speed_r2" not in manifest
    assert os.listdir(final.parent) == ["bundle"]


def test_crash_between_the_renames_is_recovered_on_load(final):
    before = snapshot(final)
    os.rename(final, final.with_name(".bundle.backup"))
    verify_bundle(final)
    assert snapshot(final) == before and os.listdir(final.parent) == ["bundle"]


def test_crash_between_the_renames_is_recovered_on_write(final):
    os.rename(final, final.with_name(".bundle.backup"))
    write_bundle(final, weights=b"new weights")
    assert (final / "model.safetensors").read_bytes() == b"new weights"
    assert os.listdir(final.parent) == ["bundle"]


def test_leftover_backup_next_to_a_complete_bundle_is_dropped(final, tmp_path):
    write_bundle(tmp_path / "old")
    os.rename(tmp_path / "old", final.with_name(".bundle.backup"))
    verify_bundle(final)
    assert os.listdir(final.parent) == ["bundle"]


def test_extra_manifest_cannot_overwrite_writer_fields(tmp_path):
    with pytest.raises(ValueError, match="files"):
        BundleWriter(tmp_path / "bundle", CONFIG, SOURCE, {"files": {}})


def test_sha256_file_reads_large_files_in_chunks(tmp_path):
    data = os.urandom(bundle.CHUNK_BYTES * 2 + 123)
    (tmp_path / "big").write_bytes(data)
    assert sha256_file(tmp_path / "big") == hashlib.sha256(data).hexdigest()
