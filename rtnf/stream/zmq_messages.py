"""rtnf's ZeroMQ messages for spikes, behaviour and stimulus frames: binary (format version 1)
and CSV text (what a Bonsai.ZeroMQ Publisher sends).

A message is a two-part ZMQ multipart message `[topic, payload]`; the topic (`spikes`,
`behavior` or `frames`) names the payload's kind, so subscribers can filter by prefix. A payload
that starts with the magic b"RTNF" is binary; any other payload is read as CSV text. Nothing is
ever unpickled.

Binary: a fixed 16-byte header, then the timestamps, then the records, all little-endian and
unpadded:

    offset  size        field
    0       4           magic b"RTNF"
    4       2           version, uint16 (this module writes and reads 1)
    6       2           kind, uint16: 1 spikes, 2 behaviour, 3 frames
    8       4           count, uint32: number of records (spikes, samples or frames)
    12      2           dim0, uint16: behaviour: channels; frames: height; spikes: 0
    14      2           dim1, uint16: frames: width; otherwise 0
    16      8 * count   timestamps, float64 seconds on the sender's clock (rtnf's streamer uses
                        pylsl.local_clock), finite and non-decreasing
    then the records, `count` of them:
      spikes     int32[count]                 unit ids (the rig's identifiers)
      behaviour  float32[count, dim0]         values in BEHAVIOR_CHANNELS order (speed cm/s,
                                              gaze_phi and gaze_theta in degrees); NaN = none
      frames     uint8[count, dim0, dim1]     pixels, row-major

CSV text (spikes and behaviour only; frames need the binary form): the payload is UTF-8 text,
one record per line (`\\n` or `\\r\\n`; blank lines are skipped), fields separated by commas:

    topic      line                                        fields
    spikes     timestamp,unit                              unit: an integer in int32 range
    behavior   timestamp,speed[,gaze_phi[,gaze_theta]]     fewer columns = the first channels;
                                                           NaN (any case) = no value

Numbers are decimal (`12`, `-0.5`, `1.5e3`); timestamps are on the same clock as in binary
messages, finite and non-decreasing within the message. A Bonsai workflow builds such a
string (e.g. with a Format node, pattern `{0},{1}`) and publishes it;
`rtnf.stream.sources.ZmqSource` takes both forms from the same publisher.

`encode_*` build binary payloads; `decode` (any kind), `decode_spikes` / `decode_behavior` /
`decode_frames` (one kind) read binary payloads and `decode_csv` CSV ones; `decode_multipart`
(topic and payload together) reads either. They check the magic, version, kind, dimensions,
exact length, a size limit, the text and the timestamps, and raise `MessageError` (a
`ValueError`) saying what is wrong, with a short fixed `reason` to count rejections by. Decoded
binary arrays are read-only views of the payload.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

import numpy as np

from rtnf.data.session import BEHAVIOR_UNITS
from rtnf.errors import RtnfError

MAGIC = b"RTNF"
VERSION = 1
HEADER = struct.Struct("<4sHHIHH")
DEFAULT_MAX_BYTES = 1 << 20  # rtnf.yaml realtime.max_message_bytes
MAX_DIM = 0xFFFF
BEHAVIOR_CHANNELS = tuple(BEHAVIOR_UNITS)  # ("speed", "gaze_phi", "gaze_theta")
TIMESTAMP = np.dtype("<f8")


class Kind(IntEnum):
    SPIKES = 1
    BEHAVIOR = 2
    FRAMES = 3


TOPICS = {Kind.SPIKES: b"spikes", Kind.BEHAVIOR: b"behavior", Kind.FRAMES: b"frames"}
KIND_OF_TOPIC = {topic: kind for kind, topic in TOPICS.items()}
RECORD_DTYPE = {Kind.SPIKES: np.dtype("<i4"), Kind.BEHAVIOR: np.dtype("<f4"),
                Kind.FRAMES: np.dtype("u1")}


class MessageError(RtnfError, ValueError):
    """A message that is not a valid rtnf message (or data that cannot be encoded as one).

    `str(error)` says what is wrong in detail; `reason` is a short fixed phrase (e.g. "bad
    magic") under which receivers count the rejection, so counters stay small whatever arrives.
    """

    def __init__(self, detail: str, reason: str | None = None):
        super().__init__(detail)
        self.reason = reason or detail


@dataclass(frozen=True)
class SpikeMessage:
    kind: ClassVar[Kind] = Kind.SPIKES
    timestamps: np.ndarray  # (n,) float64
    unit_ids: np.ndarray  # (n,) int32


@dataclass(frozen=True)
class BehaviorMessage:
    kind: ClassVar[Kind] = Kind.BEHAVIOR
    timestamps: np.ndarray  # (n,) float64
    values: np.ndarray  # (n, channels) float32, BEHAVIOR_CHANNELS order


@dataclass(frozen=True)
class FrameMessage:
    kind: ClassVar[Kind] = Kind.FRAMES
    timestamps: np.ndarray  # (n,) float64
    images: np.ndarray  # (n, height, width) uint8


Message = SpikeMessage | BehaviorMessage | FrameMessage


def message_bytes(count: int, record_shape: tuple[int, ...], kind: Kind) -> int:
    """Payload size of `count` records of `record_shape` values of `kind`."""
    return HEADER.size + count * (TIMESTAMP.itemsize
                                  + int(np.prod(record_shape)) * RECORD_DTYPE[kind].itemsize)


def records_per_message(record_shape: tuple[int, ...], kind: Kind,
                        max_bytes: int = DEFAULT_MAX_BYTES) -> int:
    """The most records of `record_shape` that fit one message of at most `max_bytes`."""
    per_record = message_bytes(1, record_shape, kind) - HEADER.size
    return max(1, (max_bytes - HEADER.size) // per_record)


def _check_timestamps(timestamps: np.ndarray) -> None:
    if not np.all(np.isfinite(timestamps)):
        raise MessageError("timestamps contain NaN or infinity", "timestamp not finite")
    if np.any(np.diff(timestamps) < 0):
        raise MessageError("timestamps go backwards within the message", "time went backwards")


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def _encode(kind: Kind, timestamps: np.ndarray, records: np.ndarray) -> bytes:
    timestamps = np.ascontiguousarray(timestamps, dtype=TIMESTAMP).reshape(-1)
    if records.shape[0] != timestamps.size:
        raise MessageError(f"{timestamps.size} timestamps but {records.shape[0]} records")
    dims = records.shape[1:] + (0,) * (3 - records.ndim)
    if timestamps.size > 0xFFFFFFFF or max(dims) > MAX_DIM:
        raise MessageError(f"too many records or values per record: {records.shape}")
    _check_timestamps(timestamps)
    header = HEADER.pack(MAGIC, VERSION, kind, timestamps.size, *dims)
    values = np.ascontiguousarray(records, RECORD_DTYPE[kind])
    return header + timestamps.tobytes() + values.tobytes()


def encode_spikes(timestamps: np.ndarray, unit_ids: np.ndarray) -> bytes:
    """Spikes: one timestamp (s) and one unit id (int32 range) per spike."""
    ids = np.asarray(unit_ids).reshape(-1)
    info = np.iinfo(np.int32)
    if not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise MessageError(f"unit ids must be integers, got {ids.dtype}")
    if ids.size and (ids.min() < info.min or ids.max() > info.max):
        raise MessageError("unit ids do not fit in int32")
    return _encode(Kind.SPIKES, timestamps, ids)


def encode_behavior(timestamps: np.ndarray, values: np.ndarray) -> bytes:
    """Behaviour samples: values (n, channels), channels in BEHAVIOR_CHANNELS order."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2 or values.shape[1] == 0:
        raise MessageError(f"behaviour values must be (samples, channels), got {values.shape}")
    return _encode(Kind.BEHAVIOR, timestamps, values)


def encode_frames(timestamps: np.ndarray, images: np.ndarray) -> bytes:
    """Stimulus frames: uint8 images (n, height, width)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or 0 in images.shape[1:]:
        raise MessageError(f"frames must be uint8 (n, height, width), got {images.dtype} "
                           f"{images.shape}")
    return _encode(Kind.FRAMES, timestamps, images)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def _record_shape(kind: Kind, dim0: int, dim1: int) -> tuple[int, ...]:
    """The shape of one record, checking the header's dimensions against its kind."""
    if kind is Kind.SPIKES and dim0 == 0 and dim1 == 0:
        return ()
    if kind is Kind.BEHAVIOR and dim0 > 0 and dim1 == 0:
        return (dim0,)
    if kind is Kind.FRAMES and dim0 > 0 and dim1 > 0:
        return (dim0, dim1)
    expected = {Kind.SPIKES: "0 and 0", Kind.BEHAVIOR: "channels > 0 and 0",
                Kind.FRAMES: "height > 0 and width > 0"}[kind]
    raise MessageError(f"{kind.name.lower()} message with dims ({dim0}, {dim1}); "
                       f"expected {expected}", "bad dimensions")


def decode(payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Decode and check one payload of any kind."""
    size = len(payload)
    _check_size(size, max_bytes)
    if size < HEADER.size:
        raise MessageError(f"message of {size} bytes is shorter than the {HEADER.size}-byte "
                           "header", "message too short")
    magic, version, kind_code, count, dim0, dim1 = HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise MessageError(f"bad magic {magic!r}; expected {MAGIC!r} (not an rtnf message)",
                           "bad magic")
    if version != VERSION:
        raise MessageError(f"unsupported message version {version}; this rtnf reads {VERSION}",
                           "unsupported version")
    try:
        kind = Kind(kind_code)
    except ValueError:
        raise MessageError(f"unknown message kind {kind_code}", "unknown kind") from None
    shape = _record_shape(kind, dim0, dim1)
    expected = message_bytes(count, shape, kind)
    if size != expected:
        raise MessageError(f"{kind.name.lower()} message with {count} records should be "
                           f"{expected} bytes, got {size}", "wrong length")
    timestamps = np.frombuffer(payload, TIMESTAMP, count, HEADER.size)
    _check_timestamps(timestamps)
    records = np.frombuffer(payload, RECORD_DTYPE[kind], count * int(np.prod(shape)),
                            HEADER.size + timestamps.nbytes).reshape(count, *shape)
    if kind is Kind.SPIKES:
        return SpikeMessage(timestamps, records)
    if kind is Kind.BEHAVIOR:
        return BehaviorMessage(timestamps, records)
    return FrameMessage(timestamps, records)


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise MessageError(f"message of {size} bytes exceeds the limit of {max_bytes}",
                           "message too large")


def _decode_kind(kind: Kind, payload: bytes, max_bytes: int) -> Message:
    message = decode(payload, max_bytes)
    if message.kind is not kind:
        raise MessageError(f"expected a {kind.name.lower()} message, got "
                           f"{message.kind.name.lower()}", "kind does not match topic")
    return message


def decode_spikes(payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> SpikeMessage:
    return _decode_kind(Kind.SPIKES, payload, max_bytes)


def decode_behavior(payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> BehaviorMessage:
    return _decode_kind(Kind.BEHAVIOR, payload, max_bytes)


def decode_frames(payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> FrameMessage:
    return _decode_kind(Kind.FRAMES, payload, max_bytes)


# ---------------------------------------------------------------------------------------------
# CSV text
# ---------------------------------------------------------------------------------------------

CSV_CHARACTERS = re.compile(r"[0-9eE+\-.,nNaAiIfFtTyY \t\r\n]*")  # all a CSV payload can hold
# Unambiguous (no way to split a run of digits two ways), so a failed match backtracks in
# linear time: `\d+\.?\d*` took quadratic time on a long run of digits with a bad tail.
DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
NON_FINITE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
INTEGER = re.compile(r"[+-]?\d+")
CSV_COLUMNS = {Kind.SPIKES: (2, 2), Kind.BEHAVIOR: (2, 1 + len(BEHAVIOR_CHANNELS))}


def _csv_number(field: str, line: int) -> float:
    """A decimal number, NaN or infinity (checked for finiteness by the caller)."""
    if not (DECIMAL.fullmatch(field) or NON_FINITE.fullmatch(field)):
        raise MessageError(f"CSV line {line}: {field[:32]!r} is not a number", "CSV not a number")
    return float(field)


def _csv_unit(field: str, line: int) -> int:
    if not INTEGER.fullmatch(field):
        raise MessageError(f"CSV line {line}: unit {field[:32]!r} is not an integer",
                           "unit not an integer")
    digits = field.lstrip("+-").lstrip("0") or "0"
    info = np.iinfo(np.int32)
    if len(digits) > 10:  # beyond int32 (and int() refuses over 4300 digits with a ValueError)
        raise MessageError(f"CSV line {line}: unit {field[:32]}... does not fit in int32",
                           "unit out of range")
    unit = -int(digits) if field.startswith("-") else int(digits)
    if not info.min <= unit <= info.max:
        raise MessageError(f"CSV line {line}: unit {unit} does not fit in int32",
                           "unit out of range")
    return unit


def _csv_rows(kind: Kind, payload: bytes, max_bytes: int) -> list[tuple[int, list[str]]]:
    """(line number, stripped fields) of each non-blank line, column counts checked."""
    _check_size(len(payload), max_bytes)
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError:
        raise MessageError(f"payload {bytes(payload[:8])!r}... is neither rtnf binary (bad magic)"
                           " nor UTF-8 text", "bad magic, not CSV text") from None
    if not CSV_CHARACTERS.fullmatch(text):
        raise MessageError(f"payload {text[:16]!r}... is neither rtnf binary (bad magic) nor CSV "
                           "text (numbers and commas)", "bad magic, not CSV text")
    lowest, highest = CSV_COLUMNS[kind]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split(",")]
        if not lowest <= len(fields) <= highest:
            expected = str(lowest) if lowest == highest else f"{lowest} to {highest}"
            raise MessageError(f"CSV {kind.name.lower()} line {number} has {len(fields)} columns;"
                               f" expected {expected}", "CSV wrong column count")
        rows.append((number, fields))
    return rows


def decode_csv(kind: Kind, payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES
               ) -> SpikeMessage | BehaviorMessage:
    """Decode and check one CSV text payload of `kind` (spikes or behaviour)."""
    if kind not in CSV_COLUMNS:
        raise MessageError(f"{kind.name.lower()} have no CSV form; send rtnf binary messages",
                           "no CSV form for this kind")
    rows = _csv_rows(kind, payload, max_bytes)
    timestamps = np.array([_csv_number(fields[0], number) for number, fields in rows],
                          dtype=np.float64)
    _check_timestamps(timestamps)
    if kind is Kind.SPIKES:
        units = np.array([_csv_unit(fields[1], number) for number, fields in rows], np.int32)
        return SpikeMessage(timestamps, units)
    values = np.full((len(rows), len(BEHAVIOR_CHANNELS)), np.nan, np.float32)
    with np.errstate(over="ignore"):  # beyond float32: infinity, rejected by the receiver
        for row, (number, fields) in enumerate(rows):
            values[row, :len(fields) - 1] = [_csv_number(field, number) for field in fields[1:]]
    return BehaviorMessage(timestamps, values)


def decode_multipart(parts: Sequence[bytes], max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Decode `[topic, payload]` as received from a SUB socket: binary when the payload starts
    with the magic, CSV text otherwise; the topic must match the kind."""
    if len(parts) != 2:
        raise MessageError(f"expected 2 message parts [topic, payload], got {len(parts)}",
                           "wrong number of parts")
    topic, payload = bytes(parts[0]), parts[1]
    if topic not in KIND_OF_TOPIC:
        raise MessageError(f"unknown topic {topic[:32]!r}; expected one of "
                           f"{', '.join(t.decode() for t in KIND_OF_TOPIC)}", "unknown topic")
    if bytes(payload[:len(MAGIC)]) == MAGIC:
        return _decode_kind(KIND_OF_TOPIC[topic], payload, max_bytes)
    return decode_csv(KIND_OF_TOPIC[topic], payload, max_bytes)
