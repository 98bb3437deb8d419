"""Integrity of the backend caches under a bundle's engines/ directory.

The bundle's manifest does not cover engines/: its files are derived on this machine from the
bundle's hashed ONNX graphs (ONNX Runtime's optimised graphs, the measured CPU-backend choice,
TensorRT plans and what builds them) and change legitimately after the bundle is written. So
each cache file rtnf writes there gets its sha256 beside it, in `<file>.sha256` (the format of
`sha256sum`, so `sha256sum -c` checks it too), and every read checks it first. A cache file
whose digest is missing (e.g. written by an older rtnf) or differs (modified, truncated) is
never used: it is deleted with its digest, one warning says so, and the caller rebuilds it from
the verified files.

Like the manifest, the digests catch corruption and files changed without them; whoever can
write the bundle directory can rewrite both, hence the bundle's permissions (README, Security).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from rtnf.bundle import sha256_file
from rtnf.model.checkpoint import atomic_write

DIGEST_SUFFIX = ".sha256"

log = logging.getLogger("rtnf.engine")


def digest_path(path: Path) -> Path:
    """Where the sha256 of the cache file `path` is recorded."""
    return path.with_name(path.name + DIGEST_SUFFIX)


def write_digest(path: Path) -> None:
    """Record the sha256 of the cache file `path`, once it is complete (e.g. written by ONNX
    Runtime)."""
    _record(path, sha256_file(path))


def write_verified(path: Path, data: bytes) -> None:
    """Write the cache file `path` (under a temporary name, then renamed) and its sha256."""
    atomic_write(path, lambda temporary: temporary.write_bytes(data))
    _record(path, hashlib.sha256(data).hexdigest())


def read_verified(path: Path) -> bytes | None:
    """The cache file's contents when they match the sha256 recorded beside them. None when
    there is no such file, or when its digest is missing or differs: then the file and its
    digest are deleted, with a warning, for the caller to rebuild it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    recorded = _recorded(path)
    if recorded == hashlib.sha256(data).hexdigest():
        return data
    _discard(path, "has no recorded sha256" if recorded is None
             else "does not match its recorded sha256 (modified or truncated)")
    return None


def verified(path: Path) -> bool:
    """Whether the cache file `path` is there and matches its recorded sha256 (see
    `read_verified`: an unverified file is discarded)."""
    return read_verified(path) is not None


def _record(path: Path, digest: str) -> None:
    atomic_write(digest_path(path),
                 lambda temporary: temporary.write_text(f"{digest}  {path.name}\n"))


def _recorded(path: Path) -> str | None:
    """The sha256 recorded for `path`, or None when there is none."""
    try:
        fields = digest_path(path).read_text().split()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return fields[0] if fields else None


def _discard(path: Path, reason: str) -> None:
    log.warning("engine cache %s %s: discarded, rebuilding it from the bundle", path, reason)
    path.unlink(missing_ok=True)
    digest_path(path).unlink(missing_ok=True)
