"""Read and write sessions by file suffix (.npz, .nwb, .xdf), with one-line errors.

Whatever goes wrong while reading or writing (unknown suffix, missing file, damaged or foreign
content, a missing optional library) comes out as one `SessionFormatError` that names the file
and the problem, never as a raw h5py / zipfile / pyxdf traceback. The NWB and XDF modules are
imported only when needed: pynwb and pyxdf are optional extras and slow to import.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from rtnf.config import NwbNames, XdfNames
from rtnf.data.session import Session
from rtnf.errors import RtnfError, SessionFormatError

FORMATS = {".npz": "rtnf npz", ".nwb": "NWB", ".xdf": "XDF"}
MODULES = {".npz": "rtnf.data.npz_format", ".nwb": "rtnf.data.nwb_format",
           ".xdf": "rtnf.data.xdf_format"}
EXTRAS = {"pynwb": "nwb", "hdmf": "nwb", "h5py": "nwb", "pyxdf": "xdf"}


def read_session(path: str | Path, nwb_names: NwbNames = NwbNames(),
                 xdf_names: XdfNames = XdfNames()) -> Session:
    """Read the session in `path`; `nwb_names` / `xdf_names` say where NWB / XDF files keep it."""
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise SessionFormatError(f"{path}: no such file")
    module = _format_module(path, suffix)
    with _one_line_errors(path, f"cannot read as {FORMATS[suffix]}"):
        if suffix == ".nwb":
            return module.read_nwb(path, nwb_names)
        if suffix == ".xdf":
            return module.read_xdf(path, xdf_names)
        return module.read_npz(path)


def write_session(session: Session, path: str | Path) -> None:
    """Write `session` to `path` in the format its suffix names."""
    path = Path(path)
    suffix = _suffix(path)
    module = _format_module(path, suffix)
    with _one_line_errors(path, f"cannot write as {FORMATS[suffix]}"):
        if suffix == ".nwb":
            module.write_nwb(session, path)
        elif suffix == ".xdf":
            module.write_xdf(session, path)
        else:
            module.write_npz(session, path)


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise SessionFormatError(f"{path}: unknown session format '{path.suffix}' "
                                 f"(expected one of {', '.join(FORMATS)})")
    return suffix


def _format_module(path: Path, suffix: str) -> ModuleType:
    """The module for `suffix`, imported on first use; a missing optional library is named."""
    try:
        return importlib.import_module(MODULES[suffix])
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        raise SessionFormatError(f"{path}: {FORMATS[suffix]} files need {exc.name} "
                                 f"(pip install 'rtnf[{extra}]')") from exc


@contextmanager
def _one_line_errors(path: Path, doing: str) -> Iterator[None]:
    """Re-raise any failure inside as a SessionFormatError naming `path`."""
    try:
        yield
    except RtnfError:
        raise
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        raise SessionFormatError(f"{path}: {doing}: {lines[0] if lines else type(exc).__name__}"
                                 ) from exc
