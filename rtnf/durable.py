"""Making writes survive a crash: what every durable writer in rtnf (bundles, run records) shares.

A file's data is made durable with `os.fsync` on the file; its name (a new file, a rename) only
with an fsync of the directory that holds it, which `fsync_directory` does.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Persist a directory's entries (new files, renames); Windows cannot open directories."""
    if os.name == "nt":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
