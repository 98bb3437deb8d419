"""rtnf's own session file: a versioned, compressed npz of plain arrays (nothing is pickled).

Layout (every entry is a numpy array; names are the npz keys):

    format                      "rtnf-session"
    format_version              1
    unit_ids                    (N,) int64
    spike_times                 (S,) float64, sorted by time then unit
    spike_unit_index            (S,) int32, position in unit_ids
    behavior/<name>/timestamps  (T,) float64
    behavior/<name>/values      (T,) float64
    behavior/<name>/unit        0-d string, e.g. "cm/s"
    frames/timestamps           (T,) float64              (only with frames)
    frames/images               (T, H, W) uint8           (only with frames)
    intervals/<name>            (K, 2) float64 [start, stop)
    metadata                    (1,) string: the metadata dict as JSON
    truth/rates, truth/coupling, truth/hubs, truth/rate_dt, truth/t0, truth/tuning/<name>
                                the ground truth, only for simulated sessions

`session_arrays` is this encoding as a dict; `session_digest` hashes it (a content identifier
other formats use, e.g. the NWB writer's default identifier).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np

from rtnf.data.session import BehaviorChannel, Frames, GroundTruth, Session
from rtnf.errors import SessionFormatError

FORMAT_NAME = "rtnf-session"
FORMAT_VERSION = 1


def session_arrays(session: Session) -> dict[str, np.ndarray]:
    """The session as named plain arrays (the npz layout above)."""
    arrays = {
        "format": np.array(FORMAT_NAME),
        "format_version": np.array(FORMAT_VERSION),
        "unit_ids": session.unit_ids,
        "spike_times": session.spike_times,
        "spike_unit_index": session.spike_unit_index,
        "metadata": np.array([json.dumps(session.metadata)]),
    }
    for name, channel in session.behavior.items():
        arrays[f"behavior/{name}/timestamps"] = channel.timestamps
        arrays[f"behavior/{name}/values"] = channel.values
        arrays[f"behavior/{name}/unit"] = np.array(channel.unit)
    if session.frames is not None:
        arrays["frames/timestamps"] = session.frames.timestamps
        arrays["frames/images"] = session.frames.images
    for name, spans in session.intervals.items():
        arrays[f"intervals/{name}"] = spans
    truth = session.ground_truth
    if truth is not None:
        arrays.update({
            "truth/rates": truth.rates,
            "truth/coupling": truth.coupling,
            "truth/hubs": truth.hubs,
            "truth/rate_dt": np.array(truth.rate_dt, dtype=np.float64),
            "truth/t0": np.array(truth.t0, dtype=np.float64),
        })
        for name, values in truth.tuning.items():
            arrays[f"truth/tuning/{name}"] = values
    return arrays


def session_digest(session: Session) -> str:
    """sha256 (hex) of the session's content: equal sessions give equal digests."""
    digest = hashlib.sha256()
    for key, array in sorted(session_arrays(session).items()):
        array = np.ascontiguousarray(array)
        digest.update(f"{key}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def write_npz(session: Session, path: str | Path) -> None:
    """Write `session` to `path` as a compressed rtnf npz (the exact name is kept)."""
    session.validate(source=str(path))
    with open(path, "wb") as file:
        np.savez_compressed(file, **session_arrays(session))


def read_npz(path: str | Path) -> Session:
    """Read an rtnf npz written by `write_npz` (any format version up to this one)."""
    source = str(path)
    if not zipfile.is_zipfile(path):
        raise SessionFormatError(f"{source}: not an npz file, or cut short (no zip archive found)")
    with np.load(path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    _check_format(arrays, source)

    def entry(key: str) -> np.ndarray:
        if key not in arrays:
            raise SessionFormatError(f"{source}: rtnf session file has no '{key}' entry")
        return arrays[key]

    def names_under(prefix: str, suffix: str = "") -> list[str]:
        return [key[len(prefix):len(key) - len(suffix)] for key in arrays
                if key.startswith(prefix) and key.endswith(suffix)]

    behavior = {
        name: BehaviorChannel(timestamps=entry(f"behavior/{name}/timestamps"),
                              values=entry(f"behavior/{name}/values"),
                              unit=str(entry(f"behavior/{name}/unit")))
        for name in names_under("behavior/", "/values")
    }
    frames = None
    if "frames/images" in arrays:
        frames = Frames(timestamps=entry("frames/timestamps"), images=entry("frames/images"))
    ground_truth = None
    if "truth/rates" in arrays:
        ground_truth = GroundTruth(
            rate_dt=float(entry("truth/rate_dt")),
            rates=entry("truth/rates"),
            coupling=entry("truth/coupling"),
            hubs=entry("truth/hubs"),
            tuning={name: entry(f"truth/tuning/{name}") for name in names_under("truth/tuning/")},
            t0=float(entry("truth/t0")),
        )
    session = Session(
        unit_ids=entry("unit_ids"),
        spike_times=entry("spike_times"),
        spike_unit_index=entry("spike_unit_index"),
        behavior=behavior,
        frames=frames,
        intervals={name: entry(f"intervals/{name}") for name in names_under("intervals/")},
        metadata=_metadata(entry("metadata"), source),
        ground_truth=ground_truth,
    )
    return session.validate(source=source)


def _check_format(arrays: dict[str, np.ndarray], source: str) -> None:
    if "format" not in arrays or str(arrays["format"]) != FORMAT_NAME:
        raise SessionFormatError(f"{source}: not an rtnf session file (no '{FORMAT_NAME}' "
                                 "format entry)")
    version = int(arrays.get("format_version", -1))
    if version > FORMAT_VERSION:
        raise SessionFormatError(
            f"{source}: rtnf session format version {version} is newer than this rtnf reads "
            f"(up to {FORMAT_VERSION}); upgrade rtnf")
    if version < 1:
        raise SessionFormatError(f"{source}: rtnf session file has no valid 'format_version'")


def _metadata(encoded: np.ndarray, source: str) -> dict:
    metadata = json.loads(str(encoded.reshape(-1)[0]))
    if not isinstance(metadata, dict):
        raise SessionFormatError(f"{source}: 'metadata' entry is not a JSON object")
    return metadata
