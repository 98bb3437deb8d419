"""Sessions in XDF files: LSL recordings (LabRecorder, or rtnf's own writer), read via pyxdf.

What the reader accepts (streams are found by name through `XdfNames`, else by type):

- spikes (type `Spikes`, irregular, integer): one sample per spike with its own timestamp;
  one channel = unit id, or two channels = (channel, unit on that channel), read as unit id
  `channel * UNITS_PER_CHANNEL + unit`. Unit ids are those listed in the stream's
  `desc/unit_ids` (space-separated; rtnf writes it so that silent units survive), else the
  sorted unique ids seen. Required.
- behaviour (type `Behavior`, regular, float): one channel per quantity, named by
  `desc/channels/channel/label` (physical unit in `.../unit`). Optional.
- frames (type `Frames`): each sample one flattened frame (row-major) of H*W pixels, with H and W
  in `desc/frame/height` and `desc/frame/width`. XDF has no uint8 format: int8 samples are read
  as the same bytes in uint8 (rtnf writes pixels this way); other integer formats must hold 0..255.
  A one-channel frame-counter stream carries no pixels and is not read as frames. Optional.

Timestamps are read exactly as stored (no clock synchronisation, no dejittering). rtnf also
keeps the session's metadata and intervals as JSON in the file header (`rtnf_metadata`,
`rtnf_intervals`); ground truth is not stored in XDF. Behaviour is stored as float32, so it comes
back exact only up to float32; everything else round-trips exactly.

The writer follows XDF 1.0: magic `XDF:`, then chunks [NumLengthBytes][Length][Tag][Content].
"""

from __future__ import annotations

import json
import logging
import struct
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyxdf

from rtnf.config import XdfNames
from rtnf.data.session import BehaviorChannel, Frames, Session, sort_spikes
from rtnf.data.summary import sample_rate
from rtnf.errors import SessionFormatError

MAGIC = b"XDF:"
UNITS_PER_CHANNEL = 1000
SPIKES_TYPE, BEHAVIOR_TYPE, FRAMES_TYPE = "Spikes", "Behavior", "Frames"
TAG_FILE_HEADER, TAG_STREAM_HEADER, TAG_SAMPLES, TAG_STREAM_FOOTER = 1, 2, 3, 6
TIMESTAMP_PRESENT = 8  # per-sample TimestampBytes: 8 = a float64 timestamp follows
Stream = tuple[bytes, np.ndarray, np.ndarray]  # (StreamHeader XML, timestamps, (T, C) values)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_xdf(path: str | Path, names: XdfNames = XdfNames()) -> Session:
    """Read a session from an XDF recording; `names` names the spike/behaviour/frame streams."""
    source = str(path)
    with open(path, "rb") as file:
        if file.read(len(MAGIC)) != MAGIC:
            raise SessionFormatError(f"{source}: not an XDF file (it does not start with "
                                     f"{MAGIC.decode()!r})")
    with _pyxdf_errors_raised(source):
        streams, header = pyxdf.load_xdf(source, synchronize_clocks=False,
                                         dejitter_timestamps=False)
    spikes = _find_stream(streams, names.spikes, SPIKES_TYPE, source)
    if spikes is None:
        raise SessionFormatError(f"{source}: no spike stream (name '{names.spikes}' or type "
                                 f"'{SPIKES_TYPE}')")
    behavior = _find_stream(streams, names.behavior, BEHAVIOR_TYPE, source)
    frames = _find_stream(streams, names.frames, FRAMES_TYPE, source)
    header_info = (header or {}).get("info", {})
    session = Session(
        *_spikes(spikes, source),
        behavior={} if behavior is None else _behavior(behavior, source),
        frames=None if frames is None else _frames(frames, source),
        intervals={name: np.asarray(spans, dtype=np.float64).reshape(-1, 2) for name, spans
                   in json.loads(_text(header_info, "rtnf_intervals") or "{}").items()},
        metadata=json.loads(_text(header_info, "rtnf_metadata") or "{}"),
    )
    return session.validate(source=source)


class _ErrorRecords(logging.Handler):
    """Collects the errors pyxdf logs (it logs damaged chunks instead of raising)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _pyxdf_errors_raised(source: str) -> Iterator[None]:
    """Turn the damage pyxdf logs (with tracebacks) or raises as XML errors into one
    SessionFormatError."""
    logger = logging.getLogger(pyxdf.load_xdf.__module__)
    records = _ErrorRecords()
    logger.addHandler(records)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield
    except ElementTree.ParseError as exc:
        raise SessionFormatError(f"{source}: damaged XDF file (unreadable XML: {exc})") from exc
    finally:
        logger.removeHandler(records)
        logger.propagate = propagate
    if records.messages:
        raise SessionFormatError(f"{source}: damaged XDF file ({records.messages[0]})")


def _node(node: Any, *path: str) -> Any:
    """The element at `path` in pyxdf's dict-of-lists XML (a dict, or its text), else None."""
    for key in path:
        if not isinstance(node, dict) or not node.get(key):
            return None
        node = node[key][0]
    return node


def _text(node: Any, *path: str) -> str | None:
    """The text at `path`, or None where anything is missing."""
    found = _node(node, *path)
    return found if isinstance(found, str) else None


def _find_stream(streams: list[dict], name: str, stream_type: str, source: str) -> dict | None:
    by_name = [s for s in streams if _text(s["info"], "name") == name]
    candidates = by_name or [s for s in streams if _text(s["info"], "type") == stream_type]
    if len(candidates) > 1:
        found = ", ".join(repr(_text(s["info"], "name")) for s in candidates)
        raise SessionFormatError(f"{source}: several streams match '{name}' / type "
                                 f"'{stream_type}' ({found}); name the one to use")
    return candidates[0] if candidates else None


def _spikes(stream: dict, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    values = np.asarray(stream["time_series"])
    if values.dtype.kind != "i" or values.ndim != 2 or values.shape[1] not in (1, 2):
        raise SessionFormatError(f"{source}: spike stream must be integer with 1 channel "
                                 f"(unit) or 2 (channel, unit), got {values.dtype} "
                                 f"{values.shape[1:]}")
    ids = values[:, -1].astype(np.int64)
    if values.shape[1] == 2:
        if np.any((ids < 0) | (ids >= UNITS_PER_CHANNEL)):
            raise SessionFormatError(f"{source}: spike stream unit numbers must lie in "
                                     f"0..{UNITS_PER_CHANNEL - 1} within a channel")
        ids += values[:, 0].astype(np.int64) * UNITS_PER_CHANNEL
    declared = _text(stream["info"], "desc", "unit_ids")
    unit_ids = np.unique(ids) if declared is None else np.array(declared.split(), np.int64)
    if not np.all(np.isin(ids, unit_ids)):
        raise SessionFormatError(f"{source}: spike stream has unit ids missing from its "
                                 "desc/unit_ids")
    sorter = np.argsort(unit_ids)
    positions = sorter[np.searchsorted(unit_ids, ids, sorter=sorter)]
    times = np.asarray(stream["time_stamps"], dtype=np.float64)
    return unit_ids, *sort_spikes(times, positions.astype(np.int32))


def _behavior(stream: dict, source: str) -> dict[str, BehaviorChannel]:
    channels = _node(stream["info"], "desc", "channels")
    described = channels.get("channel", []) if isinstance(channels, dict) else []
    values = np.asarray(stream["time_series"], dtype=np.float64)
    labels = [_text(channel, "label") for channel in described]
    if len(labels) != values.shape[1] or None in labels:
        raise SessionFormatError(f"{source}: behaviour stream needs a desc/channels/channel/"
                                 f"label for each of its {values.shape[1]} channels")
    timestamps = np.asarray(stream["time_stamps"], dtype=np.float64)
    return {label: BehaviorChannel(timestamps=timestamps, values=values[:, column],
                                   unit=_text(channel, "unit") or "")
            for column, (label, channel) in enumerate(zip(labels, described))}


def _frames(stream: dict, source: str) -> Frames | None:
    values = np.asarray(stream["time_series"])
    if values.shape[1] == 1:
        return None  # a frame counter: frame times, but no pixels
    height = _text(stream["info"], "desc", "frame", "height")
    width = _text(stream["info"], "desc", "frame", "width")
    if height is None or width is None or int(height) * int(width) != values.shape[1]:
        raise SessionFormatError(f"{source}: frame stream needs desc/frame/height and width "
                                 f"whose product is its {values.shape[1]} channels")
    if values.dtype == np.int8:
        pixels = values.view(np.uint8)
    elif values.dtype.kind == "i" and np.all((values >= 0) & (values <= 255)):
        pixels = values.astype(np.uint8)
    else:
        raise SessionFormatError(f"{source}: frame stream must hold integer pixels 0..255, "
                                 f"got {values.dtype}")
    timestamps = np.asarray(stream["time_stamps"], dtype=np.float64)
    return Frames(timestamps=timestamps, images=pixels.reshape(-1, int(height), int(width)))


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_xdf(session: Session, path: str | Path) -> None:
    """Write `session` as an XDF 1.0 file with the default `XdfNames` stream names.

    Spikes: int32, one channel (unit id). Behaviour: float32, one channel per quantity (all
    quantities must share timestamps). Frames: H*W int8 channels holding the uint8 pixels.
    """
    source = str(path)
    session.validate(source=source)
    names = XdfNames()
    streams = [_spike_stream(session, names.spikes, source)]
    if session.behavior:
        streams.append(_behavior_stream(session, names.behavior, source))
    if session.frames is not None:
        streams.append(_frame_stream(session.frames, names.frames))
    header = _xml("info", {
        "version": "1.0",
        "rtnf_metadata": json.dumps(session.metadata),
        "rtnf_intervals": json.dumps({name: spans.tolist()
                                      for name, spans in session.intervals.items()}),
    })
    with open(path, "wb") as file:
        file.write(MAGIC)
        _write_chunk(file, TAG_FILE_HEADER, header)
        for stream_id, (info, timestamps, values) in enumerate(streams, start=1):
            prefix = struct.pack("<I", stream_id)
            _write_chunk(file, TAG_STREAM_HEADER, prefix + info)
            if timestamps.size:
                _write_chunk(file, TAG_SAMPLES, prefix + _samples(timestamps, values))
            _write_chunk(file, TAG_STREAM_FOOTER, prefix + _footer(timestamps))


def _spike_stream(session: Session, name: str, source: str) -> Stream:
    int32 = np.iinfo(np.int32)
    if np.any((session.unit_ids < int32.min) | (session.unit_ids > int32.max)):
        raise SessionFormatError(f"{source}: XDF spike streams hold int32 unit ids; "
                                 "these unit ids do not fit")
    unit_of_spike = session.unit_ids[session.spike_unit_index].astype(np.int32)
    info = _stream_info(name, SPIKES_TYPE, 1, 0.0, "int32",
                        {"unit_ids": " ".join(map(str, session.unit_ids.tolist()))})
    return info, session.spike_times, unit_of_spike.reshape(-1, 1)


def _behavior_stream(session: Session, name: str, source: str) -> Stream:
    channels = list(session.behavior.items())
    timestamps = channels[0][1].timestamps
    if any(not np.array_equal(channel.timestamps, timestamps) for _, channel in channels):
        raise SessionFormatError(f"{source}: XDF holds behaviour as one stream, so all "
                                 "behaviour channels must share timestamps")
    desc = {"channels": {"channel": [{"label": label, "unit": channel.unit}
                                     for label, channel in channels]}}
    info = _stream_info(name, BEHAVIOR_TYPE, len(channels), sample_rate(timestamps),
                        "float32", desc)
    values = np.column_stack([channel.values for _, channel in channels]).astype(np.float32)
    return info, timestamps, values


def _frame_stream(frames: Frames, name: str) -> Stream:
    count, height, width = frames.images.shape
    info = _stream_info(name, FRAMES_TYPE, height * width, sample_rate(frames.timestamps),
                        "int8", {"frame": {"height": height, "width": width,
                                           "pixels": "uint8 stored as int8 (same bytes)"}})
    return info, frames.timestamps, frames.images.reshape(count, -1).view(np.int8)


def _stream_info(name: str, stream_type: str, channel_count: int, nominal_srate: float,
                 channel_format: str, desc: dict) -> bytes:
    return _xml("info", {
        "name": name, "type": stream_type, "channel_count": channel_count,
        "nominal_srate": repr(nominal_srate), "channel_format": channel_format,
        "source_id": name, "desc": desc,
    })


def _xml(root: str, content: dict) -> bytes:
    """XML from nested dicts; a list value repeats its key (e.g. one <channel> per entry)."""

    def fill(parent: ElementTree.Element, items: dict) -> None:
        for key, value in items.items():
            for item in value if isinstance(value, list) else [value]:
                child = ElementTree.SubElement(parent, key)
                if isinstance(item, dict):
                    fill(child, item)
                else:
                    child.text = str(item)

    element = ElementTree.Element(root)
    fill(element, content)
    return ElementTree.tostring(element, encoding="utf-8", xml_declaration=True)


def _samples(timestamps: np.ndarray, values: np.ndarray) -> bytes:
    """Samples chunk content after the stream id: NumSamples, then per sample
    [TimestampBytes=8][float64 timestamp][values, little-endian]."""
    layout = np.dtype([("timestamp_bytes", "u1"), ("timestamp", "<f8"),
                       ("values", values.dtype.newbyteorder("<"), values.shape[1:])])
    packed = np.empty(timestamps.size, dtype=layout)
    packed["timestamp_bytes"] = TIMESTAMP_PRESENT
    packed["timestamp"] = timestamps
    packed["values"] = values
    return _varlen(timestamps.size) + packed.tobytes()


def _footer(timestamps: np.ndarray) -> bytes:
    summary = {"sample_count": timestamps.size}
    if timestamps.size:
        summary.update(first_timestamp=repr(float(timestamps[0])),
                       last_timestamp=repr(float(timestamps[-1])))
    return _xml("info", summary)


def _varlen(number: int) -> bytes:
    """XDF variable-length integer: [NumBytes: 1, 4 or 8][the number, little-endian]."""
    if number < 2**8:
        return struct.pack("<BB", 1, number)
    if number < 2**32:
        return struct.pack("<BI", 4, number)
    return struct.pack("<BQ", 8, number)


def _write_chunk(file: BinaryIO, tag: int, content: bytes) -> None:
    """One chunk: [NumLengthBytes][Length = 2 + len(content)][Tag, uint16][Content]."""
    file.write(_varlen(2 + len(content)) + struct.pack("<H", tag) + content)
