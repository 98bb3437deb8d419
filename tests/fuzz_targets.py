"""Fuzz targets: every rtnf parser that sees outside data, the inputs to try on it (hypothesis
strategies) and the contract it must keep. Shared by tests/test_fuzz.py (short, deterministic)
and benchmarks/bench_fuzz.py (long, counted); rtnf itself never imports hypothesis.

The contract, for any input: the parser returns a valid result (checked per target), or raises
its documented error type (MessageError, ConfigError, BundleError, SessionFormatError or
RtnfError) with a non-empty one-line message that names the file for file readers and, for
messages, a short fixed `reason` to count it under. Any other exception is a crash; running
past `HANG_S` seconds is a hang (`Hang`, raised by a timer so a real hang cannot stall the run);
growing the process's peak memory by more than `ALLOCATION_LIMIT_MB` is an unbounded
allocation. Nothing may ever be unpickled or constructed from a YAML tag (`tripwire` notices).

Inputs mix random bytes with structure-aware mutations of valid inputs: valid messages and files
are written with rtnf's own writers first, then bytes are flipped, cut, inserted or overwritten
with edge-case integers, header fields and JSON/YAML values replaced, keys removed.
"""

from __future__ import annotations

import atexit
import io
import json
import re
import resource
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from hypothesis import strategies as st

from rtnf.errors import RtnfError
from rtnf.stream.openephys import (
    DATA_ENVELOPE,
    EVENT_ENVELOPE,
    DataBlock,
    SpikeEvent,
    encode_data,
    encode_spike_event,
    parse_message,
)
from rtnf.stream.zmq_messages import (
    HEADER,
    MAGIC,
    TOPICS,
    BehaviorMessage,
    Kind,
    MessageError,
    decode,
    decode_csv,
    decode_multipart,
    encode_behavior,
    encode_frames,
    encode_spikes,
    message_bytes,
)

HANG_S = 10.0
ALLOCATION_LIMIT_MB = 512
MAX_REASON = 40  # characters of a MessageError reason (a counter key: fixed and short)
SMALL_LIMIT = 4096  # max_bytes the binary target uses, so "too large" is reachable
VALID = "valid"
RECORDS = {Kind.SPIKES: "unit_ids", Kind.BEHAVIOR: "values", Kind.FRAMES: "images"}
EDGE_INTEGERS = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF,
                 2**63 - 1, 2**64 - 1)


class Hang(BaseException):
    """A parser ran past HANG_S (a BaseException, so no parser's `except Exception` eats it)."""


class ContractViolation(AssertionError):
    """A parser's result or error breaks the contract (wrong result, unclear error)."""


# ---------------------------------------------------------------------------------------------
# Running one input
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One parser: what to feed it and how to run it (`run` returns VALID or a rejection)."""

    name: str
    inputs: st.SearchStrategy
    run: Callable[[Any], str]
    file_based: bool = False


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise Hang in the main thread if the block runs longer than `seconds`."""

    def expire(signum: int, frame: object) -> None:
        raise Hang(f"still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def check(target: Target, value: Any) -> str:
    """Run `target` on `value` under the contract: VALID or the rejection's label; raises
    ContractViolation, Hang or the parser's unexpected exception otherwise."""
    before = _peak_mb()
    with time_limit(HANG_S):
        label = target.run(value)
    grown = _peak_mb() - before
    if grown > ALLOCATION_LIMIT_MB:
        raise ContractViolation(f"{target.name}: peak memory grew by {grown:.0f} MB")
    if TRIPWIRE:
        raise ContractViolation(f"{target.name}: the input made the parser run {TRIPWIRE}")
    return label


def rejection(error: Exception, where: str | None = None) -> str:
    """The label of a documented rejection, after checking its message (and reason)."""
    message = str(error)
    if not message.strip() or "\n" in message:
        raise ContractViolation(f"{type(error).__name__} message {message[:200]!r} is empty "
                                "or not one line")
    if where is not None and where not in message:
        raise ContractViolation(f"error {message[:200]!r} does not name {where}")
    if isinstance(error, MessageError):
        if not error.reason or len(error.reason) > MAX_REASON:
            raise ContractViolation(f"MessageError reason {error.reason[:80]!r} is not a short "
                                    "fixed phrase")
        return f"MessageError: {error.reason}"
    return f"{type(error).__name__}: {gist(message, where)}"


def gist(message: str, where: str | None) -> str:
    """The message without the file name, quoted text and numbers: a small counter key."""
    if where:
        message = message.replace(where, "")
    message = re.sub(r"'[^']*'|\"[^\"]*\"|\([^()]*\)|\[[^\]]*\]", "…", message)
    message = re.sub(r"[-+]?\d[\w.+-]*", "N", message).strip(" :")
    return message[:48]


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise ContractViolation(what)


# ---------------------------------------------------------------------------------------------
# Tripwire: proof that nothing was unpickled or built from a YAML tag
# ---------------------------------------------------------------------------------------------

TRIPWIRE: list[str] = []


def tripwire(*args: object) -> None:
    """Called only if a parser unpickles a `Tripwire` or constructs a python/object YAML tag."""
    TRIPWIRE.append("code from the input (unpickling or a YAML python tag)")


class Tripwire:
    """An object whose unpickling calls `tripwire`."""

    def __reduce__(self) -> tuple:
        return tripwire, ()


# ---------------------------------------------------------------------------------------------
# Byte and JSON mutation
# ---------------------------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, seeds: st.SearchStrategy[bytes], max_edits: int = 4,
            resize: bool = True) -> bytes:
    """A valid input with 1..max_edits byte edits: flip, set, cut, insert, delete, or overwrite
    a 1/2/4/8-byte little-endian integer with an edge value (`resize` False: no cut, insert or
    delete, so a file keeps its length and its readers look deeper)."""
    data = bytearray(draw(seeds))
    edits = ("flip", "set", "cut", "insert", "delete", "integer") if resize else (
        "flip", "set", "integer")
    for _ in range(draw(st.integers(1, max_edits))):
        edit = draw(st.sampled_from(edits))
        at = draw(st.integers(0, len(data)))
        if edit == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == "set" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif edit == "cut":
            del data[at:]
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif edit == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif edit == "integer":
            width = draw(st.sampled_from((1, 2, 4, 8)))
            value = draw(st.sampled_from(EDGE_INTEGERS)) & ((1 << 8 * width) - 1)
            data[at:at + width] = value.to_bytes(width, "little")[:len(data) - at]
    return bytes(data)


def deep(depth: int, opening: str = "[", closing: str = "]") -> str:
    return opening * depth + closing * depth


SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
DEEP_MARK = "__rtnf_fuzz_deep__"


def json_text(value: Any, depth: int = 0) -> bytes:
    """JSON with NaN/Infinity as Python writes them; DEEP_MARK becomes `depth` nested lists."""
    text = json.dumps(value, allow_nan=True)
    return text.replace(json.dumps(DEEP_MARK), deep(depth) or "0").encode()


def paths_of(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into nested dicts (and list items) of `value`."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths_of(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value[:4]):
            found += paths_of(item, prefix + (index,))
    return found


@st.composite
def edited(draw: st.DrawFn, document: Any, values: st.SearchStrategy = JSON_VALUES,
           extra_keys: tuple[str, ...] = ()) -> Any:
    """`document` (plain JSON/YAML data) with 1-3 edits: a value replaced, a key removed, or a
    key added (random or from `extra_keys`)."""
    document = json.loads(json.dumps(document))
    for _ in range(draw(st.integers(1, 3))):
        paths = paths_of(document)
        if not paths:
            return draw(values)
        *parents, last = draw(st.sampled_from(paths))
        parent = document
        for key in parents:
            parent = parent[key]
        edit = draw(st.sampled_from(("replace", "remove", "add")))
        if edit == "replace" or isinstance(parent, list):
            parent[last] = draw(values | st.just(DEEP_MARK))
        elif edit == "remove":
            del parent[last]
        else:
            key = draw(st.sampled_from(extra_keys) | st.text(max_size=8)) if extra_keys else (
                draw(st.text(max_size=8)))
            parent[key] = draw(values)
    return document


# ---------------------------------------------------------------------------------------------
# rtnf binary and CSV messages (rtnf.stream.zmq_messages)
# ---------------------------------------------------------------------------------------------


@st.composite
def valid_message(draw: st.DrawFn) -> bytes:
    """A valid binary message of any kind, 0-5 records."""
    kind = draw(st.sampled_from(Kind))
    count = draw(st.integers(0, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    stamps = np.sort(rng.uniform(-10, 1e4, count))
    if kind is Kind.SPIKES:
        return encode_spikes(stamps, rng.integers(-2**31, 2**31, count))
    if kind is Kind.BEHAVIOR:
        return encode_behavior(stamps, rng.normal(size=(count, draw(st.integers(1, 4)))))
    shape = (count, draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    return encode_frames(stamps, rng.integers(0, 256, shape, dtype=np.uint8))


@st.composite
def header_rewritten(draw: st.DrawFn) -> bytes:
    """A valid message with one header field (magic, version, kind, count, dims) rewritten."""
    payload = draw(valid_message())
    fields = list(HEADER.unpack_from(payload))
    field = draw(st.integers(0, 5))
    if field == 0:
        fields[0] = draw(st.binary(min_size=4, max_size=4) | st.just(b"rtnf"))
    else:
        bits = 32 if field == 3 else 16
        fields[field] = draw(st.integers(0, 3) | st.sampled_from(EDGE_INTEGERS).map(
            lambda value: value & ((1 << bits) - 1)))
    return HEADER.pack(*fields) + payload[HEADER.size:]


BINARY_PAYLOADS = st.one_of(
    st.binary(max_size=256),
    valid_message(),
    mutated(valid_message()),
    header_rewritten(),
    st.builds(lambda header, body: header + body, header_rewritten().map(lambda p: p[:16]),
              st.binary(max_size=64)),
    st.integers(SMALL_LIMIT - 16, SMALL_LIMIT + 64).map(lambda n: MAGIC + bytes(n)),
)


def run_binary(payload: bytes) -> str:
    try:
        message = decode(payload, max_bytes=SMALL_LIMIT)
    except MessageError as error:
        return rejection(error)
    stamps = message.timestamps
    expect(bool(np.all(np.isfinite(stamps)) and np.all(np.diff(stamps) >= 0)),
           "accepted timestamps that are not finite and non-decreasing")
    records = getattr(message, RECORDS[message.kind])
    expect(records.shape[0] == stamps.size, "records and timestamps differ in number")
    expect(message_bytes(stamps.size, records.shape[1:], message.kind) == len(payload),
           "accepted a payload whose length does not match its header")
    return VALID


CSV_FIELDS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-2**70, 2**70).map(str),
    st.sampled_from(["", " ", "nan", "NaN", "-inf", "+Infinity", "1e999", "-1e-999", "0x10",
                     "1_000", "+", "-", ".", "e5", "1e", "1.2.3", "yes", "true", " 7 ", "--1"]),
    st.sampled_from((12, 60_000, 200_000)).map(lambda n: "1" * n + "e"),  # then a bad tail
    st.sampled_from((30, 60_000)).map(lambda n: "9" * n + ".5e-"),
    st.sampled_from((11, 4400)).map(lambda n: "0" * n + "1"),
    st.text(max_size=8),
)
CSV_LINES = st.lists(CSV_FIELDS, max_size=6).map(",".join)


@st.composite
def valid_csv(draw: st.DrawFn) -> str:
    """Valid CSV lines (spikes or behaviour), timestamps increasing."""
    count, columns = draw(st.integers(0, 5)), draw(st.integers(1, 3))
    stamps = np.cumsum(draw(st.lists(st.floats(0, 1e3), min_size=count, max_size=count)))
    lines = []
    for stamp in stamps:
        values = draw(st.lists(st.integers(-2**31, 2**31 - 1).map(str) | st.floats(
            allow_nan=True, width=32).map(repr), min_size=columns, max_size=columns))
        lines.append(",".join([repr(float(stamp))] + values))
    return "\n".join(lines)


@st.composite
def edited_csv(draw: st.DrawFn) -> str:
    """Valid CSV with one field replaced (NaN, inf, huge, negative, long digit runs, text), a
    column added or removed, or a junk line inserted."""
    lines = [line.split(",") for line in draw(valid_csv()).split("\n") if line] or [["0.5", "1"]]
    row = draw(st.integers(0, len(lines) - 1))
    edit = draw(st.sampled_from(("field", "field", "add column", "drop column", "junk line")))
    if edit == "field":
        lines[row][draw(st.integers(0, len(lines[row]) - 1))] = draw(CSV_FIELDS)
    elif edit == "add column":
        lines[row].append(draw(CSV_FIELDS))
    elif edit == "drop column":
        lines[row].pop()
    else:
        lines.insert(row, [draw(CSV_LINES)])
    return "\n".join(",".join(line) for line in lines)


@st.composite
def csv_text(draw: st.DrawFn) -> str:
    lines = draw(st.lists(CSV_LINES, max_size=5))
    return draw(st.sampled_from(("\n", "\r\n", "\r", "\n\n"))).join(lines)


CSV_PAYLOADS = st.one_of(
    st.binary(max_size=128),
    valid_csv().map(str.encode),
    edited_csv().map(str.encode),
    csv_text().map(str.encode),
    mutated(valid_csv().map(str.encode)),
    st.builds(lambda text, junk: text.encode() + junk, valid_csv(),
              st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\xe2\x82"])),
)


def run_csv(kind_and_payload: tuple[Kind, bytes]) -> str:
    kind, payload = kind_and_payload
    try:
        message = decode_csv(kind, payload)
    except MessageError as error:
        return rejection(error)
    stamps = message.timestamps
    expect(bool(np.all(np.isfinite(stamps)) and np.all(np.diff(stamps) >= 0)),
           "CSV accepted timestamps that are not finite and non-decreasing")
    if isinstance(message, BehaviorMessage):
        expect(message.values.shape == (stamps.size, 3), "CSV behaviour not (n, 3)")
    else:
        expect(message.unit_ids.dtype == np.int32 and message.unit_ids.size == stamps.size,
               "CSV spikes not one int32 unit per timestamp")
    return VALID


TOPIC_CHOICES = st.sampled_from(list(TOPICS.values())) | st.binary(max_size=10)
MULTIPART = st.one_of(
    st.tuples(TOPIC_CHOICES, BINARY_PAYLOADS | CSV_PAYLOADS).map(list),
    st.tuples(TOPIC_CHOICES, st.lists(st.binary(max_size=16), max_size=3)).map(
        lambda parts: [parts[0], *parts[1]]),
    st.lists(st.binary(max_size=32), max_size=4),
)


def run_multipart(parts: list[bytes]) -> str:
    try:
        decode_multipart(parts)
    except MessageError as error:
        return rejection(error)
    return VALID


# ---------------------------------------------------------------------------------------------
# Open Ephys ZMQ Interface messages (rtnf.stream.openephys)
# ---------------------------------------------------------------------------------------------


@st.composite
def valid_open_ephys(draw: st.DrawFn) -> list[bytes]:
    """A data block, a spike or a TTL event as the plugin sends them."""
    kind = draw(st.sampled_from(("data", "spike", "event")))
    sample = draw(st.integers(0, 2**40))
    if kind == "data":
        samples = np.arange(draw(st.integers(0, 8)), dtype=np.float32)
        return encode_data(samples, sample, draw(st.sampled_from((30000.0, 2500, 1e7))))
    if kind == "spike":
        return encode_spike_event(sample, draw(st.integers(0, 40)))
    header = {"message_num": 1, "type": "event", "data_size": 1, "timestamp": 0,
              "content": {"stream": "example_data", "source_node": 100, "type": 3,
                          "sample_num": sample}}
    return [EVENT_ENVELOPE, json.dumps(header).encode(), b"\x01"]


@st.composite
def edited_open_ephys(draw: st.DrawFn) -> list[bytes]:
    """A valid message with its header edited (values of any JSON type, NaN, deep nesting,
    missing keys), its payload resized, its envelope changed or frames added or dropped."""
    parts = draw(valid_open_ephys())
    edit = draw(st.sampled_from(("header", "payload", "envelope", "frames", "bytes")))
    if edit == "header":
        header = draw(edited(json.loads(parts[1])))
        parts[1] = json_text(header, draw(st.integers(1, 5000)))
    elif edit == "payload" and len(parts) == 3:
        parts[2] = draw(mutated(st.just(parts[2])))
    elif edit == "envelope":
        parts[0] = draw(st.sampled_from((DATA_ENVELOPE, EVENT_ENVELOPE, b"DATA", b"EVENT", b""))
                        | st.binary(max_size=8))
    elif edit == "frames":
        parts = parts[:draw(st.integers(0, len(parts)))] + draw(st.lists(st.binary(max_size=8),
                                                                         max_size=2))
    else:
        parts[1] = draw(mutated(st.just(parts[1])))
    return parts


OPEN_EPHYS = st.one_of(valid_open_ephys(), edited_open_ephys(),
                       st.lists(st.binary(max_size=64), max_size=4))


def run_open_ephys(parts: list[bytes]) -> str:
    try:
        message = parse_message(parts)
    except MessageError as error:
        return rejection(error)
    if isinstance(message, DataBlock):
        expect(len(parts[2]) == 4 * message.num_samples and message.sample_rate > 0,
               "accepted a data block whose payload or rate is wrong")
    elif isinstance(message, SpikeEvent):
        expect(isinstance(message.sorted_id, int) and message.sample_num >= 0,
               "accepted a spike with a bad sorted id or sample number")
    else:
        expect(message is None, f"parse_message returned {type(message).__name__}")
    return VALID


# ---------------------------------------------------------------------------------------------
# Files: a scratch directory for the valid originals
# ---------------------------------------------------------------------------------------------


@cache
def scratch() -> Path:
    path = Path(tempfile.mkdtemp(prefix="rtnf-fuzz-"))
    atexit.register(shutil.rmtree, path, True)
    return path


@contextmanager
def workspace() -> Iterator[Path]:
    """A fresh directory for one example."""
    with tempfile.TemporaryDirectory(dir=scratch()) as directory:
        yield Path(directory)


# ---------------------------------------------------------------------------------------------
# Session files (rtnf.data.io.read_session: npz, NWB, XDF)
# ---------------------------------------------------------------------------------------------


def small_session():
    """A valid session with every part rtnf's formats hold."""
    from rtnf.data.session import BehaviorChannel, Frames, Session

    rng = np.random.default_rng(3)
    times = np.sort(rng.uniform(0, 2, 24))
    index = rng.integers(0, 3, 24).astype(np.int32)
    order = np.lexsort((index, times))
    stamps = np.arange(6) / 3 + 0.01
    return Session(
        unit_ids=np.array([4, 9, 2]), spike_times=times[order], spike_unit_index=index[order],
        behavior={name: BehaviorChannel(stamps, rng.normal(size=6))
                  for name in ("speed", "gaze_phi", "gaze_theta")},
        frames=Frames(stamps[:4], rng.integers(0, 256, (4, 3, 2), dtype=np.uint8)),
        intervals={"train": np.array([[0.0, 1.5]])}, metadata={"source": "fuzz"},
    ).validate()


@cache
def valid_session_bytes(suffix: str) -> bytes:
    """A valid session file of `suffix` written by rtnf's writer."""
    from rtnf.data.io import write_session

    path = scratch() / f"valid{suffix}"
    write_session(small_session(), path)
    return path.read_bytes()


def npz_bytes(arrays: dict[str, Any]) -> bytes:
    """An npz archive of `arrays` (object arrays are pickled into it, as np.savez does)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


ODD_ARRAYS = st.sampled_from([
    np.array([Tripwire()], dtype=object), np.array(Tripwire(), dtype=object),
    np.array(["1", "2"]), np.array([b"x"]), np.zeros((2, 3, 4)), np.zeros(0), np.array(1.5),
    np.array([np.nan, np.inf]), np.array([2**62, -2**62]), np.array([True, False]),
    np.zeros(3, dtype=[("a", "<f8")]), np.array("rtnf-session"), np.array(2), np.array(-1),
    np.array([1 + 2j]), np.array([[1.0, 0.0]]), np.arange(5, dtype=np.uint8),
])


@st.composite
def npz_archives(draw: st.DrawFn) -> bytes:
    """A valid rtnf npz with entries removed, replaced (wrong dtype, shape, pickled objects,
    strings) or added, then written as an npz."""
    from rtnf.data.npz_format import session_arrays

    arrays = dict(session_arrays(small_session()))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(arrays)) | st.sampled_from(
            ["frames/images", "truth/rates", "behavior/x/values", "intervals/test", "other"]))
        if draw(st.booleans()) and key in arrays:
            del arrays[key]
        else:
            arrays[key] = draw(ODD_ARRAYS)
    return npz_bytes(arrays)


def session_files(suffix: str) -> st.SearchStrategy[bytes]:
    valid = st.just(suffix).map(valid_session_bytes)
    options = [valid, mutated(valid, max_edits=3), mutated(valid, 8, resize=False),
               mutated(valid, 64, resize=False), st.binary(max_size=64)]
    if suffix == ".npz":
        options += [npz_archives(), mutated(npz_archives(), max_edits=2)]
    if suffix == ".xdf":
        options.append(st.binary(max_size=64).map(lambda tail: b"XDF:" + tail))
    return st.one_of(options)


def session_runner(suffix: str) -> Callable[[bytes], str]:
    def run(content: bytes) -> str:
        from rtnf.data.io import read_session
        from rtnf.data.session import Session
        from rtnf.errors import SessionFormatError

        with workspace() as directory:
            path = directory / f"fuzzed{suffix}"
            path.write_bytes(content)
            try:
                session = read_session(path)
            except SessionFormatError as error:
                return rejection(error, str(path))
        expect(isinstance(session, Session), "read_session returned no Session")
        return VALID

    return run


# ---------------------------------------------------------------------------------------------
# rtnf.yaml (rtnf.config.check_config_file)
# ---------------------------------------------------------------------------------------------

YAML_EXTRAS = (
    "!!python/object/apply:fuzz_targets.tripwire []",
    "!!python/name:fuzz_targets.tripwire",
    "!!python/object:fuzz_targets.Tripwire {}",
    "!!binary aGVsbG8=", "!!set {a, b}", "!!timestamp 2001-12-14", "!!float .inf", "-.inf",
    ".nan", "0x1F", "0o17", "1_000", "~", "yes", "on", "2001-12-14", "'str'", "&a 1", "*a",
    "{a: [1, {b: 2}]}", "[", "{", "\t1", "'unterminated", "1" * 5000,
)


def alias_bomb(levels: int) -> str:
    """YAML whose aliases expand to 9**levels items inside control.rules, else tiny."""
    lines = ["x0: &x0 [a, a, a, a, a, a, a, a, a]"]
    for level in range(1, levels + 1):
        lines.append(f"x{level}: &x{level} [" + ", ".join([f"*x{level - 1}"] * 9) + "]")
    return ("control:\n  rules:\n  - " + "\n    ".join(lines) + "\n")


@cache
def default_config() -> dict:
    from rtnf.config import default_config_text

    return yaml.safe_load(default_config_text())


@st.composite
def yaml_documents(draw: st.DrawFn) -> bytes:
    """rtnf.yaml documents: the defaults edited, raw YAML with tags and aliases, deep nesting,
    random text and bytes."""
    choice = draw(st.integers(0, 5))
    if choice == 0:
        document = draw(edited(default_config(), extra_keys=("windows", "rig", "hop", "kind")))
        nesting = deep(draw(st.integers(1, 3000)), *draw(st.sampled_from((("[", "]"),
                                                                          ("{a: ", "}")))))
        return yaml.safe_dump(document).replace(DEEP_MARK, nesting).encode()
    if choice == 1:
        section = draw(st.sampled_from(sorted(default_config())))
        key = draw(st.sampled_from(sorted(default_config()[section] or {"x": 0})))
        return f"{section}:\n  {key}: {draw(st.sampled_from(YAML_EXTRAS))}\n".encode()
    if choice == 2:
        return alias_bomb(draw(st.integers(1, 9))).encode()
    if choice == 3:
        return draw(mutated(st.just(yaml.safe_dump(default_config()).encode()), max_edits=3))
    if choice == 4:
        return draw(st.text(max_size=80)).encode()
    return draw(st.binary(max_size=80))


def run_config(content: bytes) -> str:
    from rtnf.config import check_config_file
    from rtnf.errors import ConfigError

    with workspace() as directory:
        path = directory / "rtnf.yaml"
        path.write_bytes(content)
        try:
            config = check_config_file(path)
        except ConfigError as error:
            return rejection(error, str(path))
    expect(len(config.digest()) == 64 and config.to_yaml(), "an accepted config cannot be saved")
    return VALID


# ---------------------------------------------------------------------------------------------
# Bundle manifests (rtnf.bundle.verify_bundle)
# ---------------------------------------------------------------------------------------------

TRAVERSALS = ("../../etc/passwd", "../outside.txt", "/etc/passwd", "C:\\Windows\\x", "C:x",
              "a/../../b", "./model.safetensors", "report//metrics.json", "", ".", "..",
              "report\\metrics.json", "model.safetensors/", "nul\x00", "report/../units.json",
              "\\\\server\\share\\x", "~/x")


@cache
def valid_bundle() -> Path:
    """A bundle written by BundleWriter, and a file beside it (outside.txt)."""
    from rtnf.bundle import BundleWriter, write_json
    from rtnf.config import load_config

    directory = scratch() / "bundle"
    with BundleWriter(directory, load_config(), {"kind": "fuzz"}, {"verdict": "pass"}) as staging:
        (staging / "model.safetensors").write_bytes(b"weights")
        write_json(staging / "units.json", {"unit_ids": [1, 2]})
        (staging / "report").mkdir()
        (staging / "report" / "metrics.json").write_text("{}")
    (scratch() / "outside.txt").write_text("outside the bundle")
    return directory


def _entry_for(relative: str) -> dict:
    """A correct size and hash for `relative` as seen from the bundle (outside files too)."""
    from rtnf.bundle import sha256_file

    path = valid_bundle() / relative
    if path.is_file():
        return {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return {"size": 0, "sha256": "0" * 64}


@st.composite
def manifests(draw: st.DrawFn) -> bytes:
    """manifest.json: the valid one edited, with traversal entries (with their true hashes),
    random JSON, cut or flipped bytes, deep nesting."""
    valid = json.loads((valid_bundle() / "manifest.json").read_text())
    choice = draw(st.integers(0, 4))
    if choice == 0:
        document = draw(edited(valid, extra_keys=("files", "format", "format_version")))
        return json_text(document, draw(st.integers(1, 100_000)))
    if choice == 1:
        relative = draw(st.sampled_from(TRAVERSALS))
        valid["files"][relative] = _entry_for(relative)
        return json.dumps(valid).encode()
    if choice == 2:
        return json_text(draw(JSON_VALUES))
    if choice == 3:
        return draw(mutated(st.just(json.dumps(valid).encode())))
    return draw(st.binary(max_size=64))


def run_manifest(content: bytes) -> str:
    from rtnf.bundle import MANIFEST, verify_bundle
    from rtnf.errors import BundleError

    directory = valid_bundle()
    original = (directory / MANIFEST).read_bytes()
    (directory / MANIFEST).write_bytes(content)
    try:
        manifest = verify_bundle(directory)
    except BundleError as error:
        return rejection(error, str(directory))
    finally:
        (directory / MANIFEST).write_bytes(original)
    inside = directory.resolve()
    for relative in manifest["files"]:
        expect(inside in (directory / relative).resolve().parents,
               f"verify_bundle accepted {relative!r}, outside the bundle")
    return VALID


# ---------------------------------------------------------------------------------------------
# Run recordings (rtnf.rt.recorder.read_run)
# ---------------------------------------------------------------------------------------------

DTYPE_STRINGS = ("O", "|O", "<U3", "V0", "S0", "M8", "<f16", "<c8", "<f8", "u1", "?", "x",
                 "int", "<i8", 7)


@cache
def valid_run() -> Path:
    """A short run recorded by Recorder: every input kind, outputs and a rejection."""
    from rtnf.rt.recorder import Recorder
    from rtnf.stream.sources import Batch
    from rtnf.stream.window_output import OutputLayout, WindowOutput

    layout = OutputLayout(targets=("speed",), target_units=("cm/s",),
                          unit_ids=np.array([3, 7]), window=0.05, hop=0.05)
    directory = scratch() / "run"
    with Recorder(directory, layout, flush_interval=0.05) as recorder:
        recorder.record_inputs(Batch("spikes", np.array([0.01, 0.02]), np.array([3, 7])))
        recorder.record_inputs(Batch("behavior", np.array([0.01]),
                                     np.array([[1.0, np.nan, 2.0]], np.float32)))
        recorder.record_inputs(Batch("frames", np.array([0.02]), np.zeros((1, 2, 3), np.uint8)))
        recorder.record_output(WindowOutput(0, 0.05, np.array([1.5], np.float32),
                                            np.array([0.1, 0.2], np.float32), ()), 0.051)
        recorder.record_rejected("fuzz", 1, 0.03)
    return directory


def record_specs() -> st.SearchStrategy:
    field = st.tuples(st.text(max_size=4) | st.integers(), st.sampled_from(DTYPE_STRINGS),
                      st.lists(st.integers(-2, 2**40), max_size=3)).map(list)
    return st.lists(field, max_size=3) | JSON_VALUES


@st.composite
def run_directories(draw: st.DrawFn) -> dict[str, bytes]:
    """run.json and record files of a valid run, edited: layouts replaced, keys removed,
    random JSON, record files cut, extended or replaced."""
    files = {path.name: path.read_bytes() for path in valid_run().iterdir()}
    info = json.loads(files["run.json"])
    choice = draw(st.integers(0, 3))
    if choice == 0:
        kind = draw(st.sampled_from(sorted(info["records"])))
        info["records"][kind] = draw(record_specs())
        files["run.json"] = json.dumps(info).encode()
    elif choice == 1:
        files["run.json"] = json_text(draw(edited(info, extra_keys=("records", "format"))),
                                      draw(st.integers(1, 100_000)))
    elif choice == 2:
        files["run.json"] = draw(mutated(st.just(files["run.json"])) | st.binary(max_size=32))
    name = draw(st.sampled_from(sorted(files)))
    if name != "run.json" and draw(st.booleans()):
        files[name] = draw(mutated(st.just(files[name])) | st.binary(max_size=64))
    return files


def run_read_run(files: dict[str, bytes]) -> str:
    from rtnf.rt.recorder import KINDS, read_run

    with workspace() as directory:
        for name, content in files.items():
            (directory / name).write_bytes(content)
        try:
            recording = read_run(directory)
        except RtnfError as error:
            return rejection(error, str(directory))
    for kind in KINDS:
        records = getattr(recording, kind)
        expect(isinstance(records, np.ndarray) and not records.dtype.hasobject,
               f"read_run gave {kind} records that are not plain arrays")
    return VALID


# ---------------------------------------------------------------------------------------------
# All targets
# ---------------------------------------------------------------------------------------------

TARGETS = (
    Target("zmq_binary", BINARY_PAYLOADS, run_binary),
    Target("zmq_csv", st.tuples(st.sampled_from((Kind.SPIKES, Kind.BEHAVIOR)), CSV_PAYLOADS),
           run_csv),
    Target("zmq_multipart", MULTIPART, run_multipart),
    Target("openephys", OPEN_EPHYS, run_open_ephys),
    Target("session_npz", session_files(".npz"), session_runner(".npz"), file_based=True),
    Target("session_nwb", session_files(".nwb"), session_runner(".nwb"), file_based=True),
    Target("session_xdf", session_files(".xdf"), session_runner(".xdf"), file_based=True),
    Target("config_yaml", yaml_documents(), run_config, file_based=True),
    Target("bundle_manifest", manifests(), run_manifest, file_based=True),
    Target("run_recording", run_directories(), run_read_run, file_based=True),
)
TARGETS_BY_NAME = {target.name: target for target in TARGETS}


def rejected_multipart(parts: list[bytes]) -> str | None:
    """The reason decode_multipart rejects `parts` under, or None if it decodes."""
    try:
        decode_multipart(parts)
    except MessageError as error:
        return error.reason
    return None

