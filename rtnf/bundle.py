"""Calibration bundles: the directory `rtnf calibrate` writes and `rtnf run` loads.

A bundle holds `manifest.json`, `config.yaml` and whatever the caller writes (model.safetensors +
model.json, units.json, normalization.json, report/...). The manifest records the format, when and
with which library versions the bundle was made, the configuration's digest, the data source, the
caller's extra fields (the calibration verdict) and the size and sha256 of every other file.
`engines/` (backend caches) is not in the manifest: it is derived from the hashed files, specific
to the machine and library versions, and rebuilt when stale, so it changes legitimately after
writing. Each cache file there carries its own sha256 instead, checked before it is used; one
that does not match is discarded and rebuilt (`rtnf.engine.cache_integrity`).

`BundleWriter` builds a bundle in a sibling staging directory and swaps it into place with two
renames (existing bundle -> sibling backup, staging -> final), so the final path only ever holds a
complete bundle; `BundleAmender` adds files to a bundle the same way (from a copy of it). A
crash between the two renames leaves only the backup; the next write or load puts it back.
`verify_bundle` refuses a bundle whose files do not match its manifest. One writer at a time is
assumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PureWindowsPath
from types import TracebackType
from typing import Any

import numpy as np
import torch

from rtnf import __version__
from rtnf.config import Config, load_config
from rtnf.durable import fsync_directory
from rtnf.errors import BundleError
from rtnf.model.checkpoint import Checkpoint, atomic_write, load_checkpoint

FORMAT = "rtnf-bundle"
FORMAT_VERSION = 1
MANIFEST, CONFIG, UNITS = "manifest.json", "config.yaml", "units.json"
SMOOTHING = "smoothing.json"  # per decoder and target, the output filter's time constant (s)
ENGINES = "engines"
WRITER_FIELDS = ("format", "format_version", "created", "versions", "config_digest", "source",
                 "files", "amended")
CHUNK_BYTES = 1 << 20




def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks (model files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON under a temporary name, then rename it into place."""
    atomic_write(Path(path), lambda p: p.write_text(json.dumps(data, indent=2)))


class BundleWriter:
    """Write a bundle atomically: `with BundleWriter(final_dir, ...) as staging: <write files>`.

    On a clean exit, config.yaml and manifest.json are added, everything is fsynced and the
    staging directory replaces `final_dir`. On an exception (inside the block or while
    finalising) the staging directory is removed and any previous bundle is left untouched.
    """

    def __init__(self, final_dir: str | Path, config: Config | None, source: Mapping[str, Any],
                 extra_manifest: Mapping[str, Any] | None = None) -> None:
        self.final_dir = Path(final_dir)
        self.config = config
        self.source = dict(source)
        self.extra = dict(extra_manifest or {})
        clash = sorted(set(self.extra) & set(WRITER_FIELDS))
        if clash:
            raise ValueError(f"extra_manifest cannot set {clash}: BundleWriter writes them")
        json.dumps([self.source, self.extra])  # fail before the caller's work, not after it
        self.staging: Path | None = None

    def __enter__(self) -> Path:
        _restore_backup(self.final_dir)
        self.final_dir.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{self.final_dir.name}.staging-"
        for leftover in self.final_dir.parent.glob(prefix + "*"):  # a killed writer's (one
            shutil.rmtree(leftover, ignore_errors=True)            # writer at a time)
        self.staging = Path(tempfile.mkdtemp(prefix=prefix, dir=self.final_dir.parent))
        return self.staging

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        try:
            if exc_type is None:
                self._finalise()
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)  # already gone after a success

    def _finalise(self) -> None:
        (self.staging / CONFIG).write_text(self.config.to_yaml())
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "created": _now(), "versions": _versions(),
            "config_digest": self.config.digest(), "source": self.source, **self.extra,
        }
        _seal(self.staging, manifest, self.final_dir)


class BundleAmender(BundleWriter):
    """Add or replace files of an existing, verified bundle atomically (e.g. the ONNX graphs
    `rtnf compile` exports): `with BundleAmender(bundle, extra) as staging: <write files>`.

    The staging directory starts as a copy of the bundle; on a clean exit the manifest keeps
    its fields, takes `extra_manifest`'s, records when and by which versions it was amended and
    hashes every file again, and the copy replaces the bundle as `BundleWriter` does.
    """

    def __init__(self, directory: str | Path, extra_manifest: Mapping[str, Any]) -> None:
        self.manifest = verify_bundle(directory)
        super().__init__(directory, None, self.manifest["source"], extra_manifest)

    def __enter__(self) -> Path:
        staging = super().__enter__()
        shutil.copytree(self.final_dir, staging, dirs_exist_ok=True)
        (staging / MANIFEST).unlink()
        return staging

    def _finalise(self) -> None:
        manifest = {key: value for key, value in self.manifest.items() if key != "files"}
        manifest.update(self.extra, amended={"at": _now(), "versions": _versions()})
        _seal(self.staging, manifest, self.final_dir)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    return {"rtnf": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _seal(staging: Path, manifest: dict[str, Any], final_dir: Path) -> None:
    """Hash every file of `staging` into `manifest`, write it, persist, swap into place."""
    manifest["files"] = {relative: {"size": (staging / relative).stat().st_size,
                                    "sha256": sha256_file(staging / relative)}
                         for relative in _bundle_files(staging)}
    write_json(staging / MANIFEST, manifest)
    _fsync_tree(staging)
    _swap_into_place(staging, final_dir)


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and check a bundle's manifest (format, version, file entries); files are not read."""
    directory = Path(directory)
    _restore_backup(directory)
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"bundle {directory}: no {MANIFEST} (not an rtnf bundle)") from None
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise BundleError(f"bundle {directory}: cannot read {MANIFEST} "
                          f"({exc or type(exc).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"bundle {directory}: {MANIFEST} is not an rtnf bundle manifest "
                          f"(format {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise BundleError(f"bundle {directory}: {MANIFEST} has no integer format_version")
    if version > FORMAT_VERSION:
        raise BundleError(f"bundle {directory}: {MANIFEST} format version {version} is newer "
                          f"than this rtnf reads ({FORMAT_VERSION}); upgrade rtnf")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError(f"bundle {directory}: {MANIFEST} has no 'files' table")
    for relative, entry in files.items():
        if not _is_safe_relative(relative):
            raise BundleError(f"bundle {directory}: {MANIFEST} lists {relative!r}, which is not "
                              f"a plain relative path inside the bundle; refusing it")
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                and isinstance(entry.get("sha256"), str)):
            raise BundleError(f"bundle {directory}: {MANIFEST} entry for {relative} needs an "
                              f"integer 'size' and a 'sha256' string")
    return manifest


def verify_bundle(directory: str | Path) -> dict[str, Any]:
    """Check every file against the manifest and refuse extra files; returns the manifest."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    for relative, entry in manifest["files"].items():
        path = directory / relative
        if not path.is_file():
            raise BundleError(f"bundle {directory}: {relative} is missing")
        try:
            intact = path.stat().st_size == entry["size"] and sha256_file(path) == entry["sha256"]
        except OSError as exc:
            raise BundleError(f"bundle {directory}: cannot read {relative} ({exc.strerror})"
                              ) from None
        if not intact:
            raise BundleError(f"bundle {directory}: {relative} was modified or truncated "
                              f"(size or sha256 differs from {MANIFEST})")
    for relative in _bundle_files(directory):
        if relative not in manifest["files"]:
            raise BundleError(f"bundle {directory}: {relative} is not in {MANIFEST} "
                              f"(unexpected file; only {ENGINES}/ may hold unlisted files)")
    return manifest


def _bundle_files(directory: Path) -> list[str]:
    """Relative POSIX paths of the files the manifest covers: all but itself and engines/."""
    found = []
    for root, subdirectories, names in os.walk(directory):
        if Path(root) == directory and ENGINES in subdirectories:
            subdirectories.remove(ENGINES)
        found += [(Path(root) / name).relative_to(directory).as_posix() for name in names]
    return sorted(name for name in found if name != MANIFEST)


def _is_safe_relative(relative: Any) -> bool:
    """A canonical relative path: no drive or root, no `..` or `.`, `/` separators only."""
    if not isinstance(relative, str):
        return False
    path = PureWindowsPath(relative)  # splits on both separators and knows drives
    return (not path.anchor and ".." not in path.parts and bool(path.name)
            and path.as_posix() == relative)


def _backup_path(final_dir: Path) -> Path:
    return final_dir.with_name(f".{final_dir.name}.backup")


def _restore_backup(final_dir: Path) -> None:
    """Finish a swap that crashed: restore the backup if the final directory is missing,
    otherwise drop it (the final directory is then the complete new bundle)."""
    backup = _backup_path(final_dir)
    if not backup.exists():
        return
    if final_dir.exists():
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.rename(backup, final_dir)
        fsync_directory(final_dir.parent)


def _swap_into_place(staging: Path, final_dir: Path) -> None:
    backup = _backup_path(final_dir)
    if not final_dir.exists():
        os.rename(staging, final_dir)
    else:
        os.rename(final_dir, backup)
        try:
            os.rename(staging, final_dir)
        except BaseException:
            os.rename(backup, final_dir)
            raise
    fsync_directory(final_dir.parent)
    # The new bundle is in place: whatever of the backup cannot be removed now, the next
    # _restore_backup removes.
    shutil.rmtree(backup, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    for root, _, names in os.walk(directory):
        for name in names:
            with open(Path(root) / name, "rb+") as file:  # Windows flushes only writable handles
                os.fsync(file.fileno())
        fsync_directory(Path(root))


def file_source(path: str | Path) -> dict[str, Any]:
    """The manifest's `source` for a bundle calibrated from a session file."""
    path = Path(path)
    return {"kind": "file", "path": str(path.resolve()), "sha256": sha256_file(path),
            "size": path.stat().st_size}


@dataclass
class Bundle:
    """A verified bundle, loaded: what the engines and the loop need from it."""

    directory: Path
    manifest: dict[str, Any]
    config: Config
    checkpoint: Checkpoint
    unit_ids: np.ndarray  # (N,) the calibration session's unit ids, in local order
    unit_rows: torch.Tensor  # (N,) the model's table row of each local unit
    session_row: torch.Tensor  # () the model's session row
    mean_next_counts: np.ndarray | None  # (N,) training mean spikes per next window, if kept


def load_bundle(directory: str | Path) -> Bundle:
    """Verify every file of the bundle against its manifest, then load it."""
    directory = Path(directory)
    manifest = verify_bundle(directory)
    units_path = directory / UNITS
    try:
        units = json.loads(units_path.read_text())
        unit_ids = np.asarray(units["unit_ids"], dtype=np.int64)
        rows = torch.as_tensor(units["rows"], dtype=torch.long)
        session_row = torch.tensor(int(units["session_row"]))
        mean = units.get("mean_next_counts")
        mean_next_counts = None if mean is None else np.asarray(mean, dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"bundle {directory}: {UNITS} is not a unit map ({exc!r})") from None
    if rows.shape != unit_ids.shape:
        raise BundleError(f"bundle {directory}: {UNITS} has {unit_ids.size} unit ids but "
                          f"{rows.numel()} rows")
    return Bundle(directory, manifest, load_config([directory / CONFIG]),
                  load_checkpoint(directory), unit_ids, rows, session_row, mean_next_counts)
