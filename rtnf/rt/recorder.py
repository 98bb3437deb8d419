"""The run recorder: every input the loop received and every output it sent, kept on disk.

`Recorder` is fed by the real-time loop and never makes it wait on the disk: `record_inputs`,
`record_output`, `record_telemetry` and `record_rejected` only turn their arguments into numpy
records and hand them to a writer thread through a bounded queue (`queue_items` chunks and
`queue_bytes` bytes at most). When the queue is full (a disk far too slow) the records are
counted in `dropped` and the call returns at once. The writer thread appends each chunk to its
file and, every `flush_interval` seconds, flushes and fsyncs the files it wrote to; `flushed`
then holds the records per kind that are durably on disk. `close()` (or leaving the `with`
block) drains the queue, flushes, fsyncs and writes the summary into run.json. A process killed
with SIGKILL loses at most what arrived since the last flush; a process that ends without
`close()` has its writer drain and flush once the main thread is gone (run.json then lacks the
summary). A disk error (full, gone) is kept in `failure`; from then on nothing more is written
(so no record lands after a torn one), the records are counted in `dropped`, and `close()`
raises it after writing the summary (when the disk still takes run.json; otherwise run.json
keeps its previous, complete content). A run directory that exists and is not empty is refused:
a recording is never overwritten or appended to; one that cannot be created or written is an
RtnfError naming recording.directory and the path.

`read_run` reads a run directory, complete, still being written or left by a crash, into a
`RunRecording`; `RunRecording.input_session()` gives the inputs as a `Session`.

On-disk format (format "rtnf-run", version 1), one directory per run:

    run.json        written atomically (temporary file, fsync, rename, directory fsync) when the
                    run starts, when the first frame arrives (the frame shape), and at close
                    (the summary). Keys: format, format_version, run_id, started (ISO 8601 UTC),
                    layout {targets, target_units, unit_ids, window, hop}, behavior_channels,
                    stages, sinks, frame_shape ([H, W] or null), metadata (the caller's),
                    records {kind: [[field, numpy type, shape], ...]} and, once closed,
                    summary {finished, records, dropped, failure, loop}.
    <kind>.bin      one append-only file per record kind (created with its first record):
                    fixed-size little-endian records, packed, laid out as records.<kind> says.
                    A reader takes floor(size / record size) records, so a torn last record
                    (a crash in the middle of a write) is simply not read.

Record kinds (times in seconds on the stream clock; `number` counts the records of one input
kind from 0 in receive order, `batch` counts input batches of all kinds in receive order;
records dropped on a full queue use up their numbers, so they show as gaps):

    spikes          number, batch, timestamp f8, unit i8 (the rig's unit id)
    behavior        number, batch, timestamp f8, values f4[3] (BEHAVIOR_CHANNELS order, NaN
                    where the stream lacks one)
    frames          number, batch, timestamp f8, image u1[H, W] (H, W fixed by the first frame;
                    frames of another shape are recorded as rejected, reason "frame_shape")
    decoded         sequence i8, window_end f8, sent_time f8, values f4[targets]
    predicted       sequence i8, window_end f8, values f4[units] (layout unit order)
    control         sequence i8, window_end f8, rule S64, command S64, soft_code i2 (-1: none),
                    sinks u1 (bit i set: sent to SINKS[i])
    telemetry       sequence i8, window_end f8, latency_ms f8, stage_ms f8[STAGES] (NaN: stage
                    not reported)
    rejected        time f8 (receipt), count i8, reason S64

Names longer than 64 bytes (UTF-8) are cut at a character boundary.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from rtnf.data.session import BEHAVIOR_UNITS, BehaviorChannel, Frames, Session, sort_spikes
from rtnf.durable import fsync_directory
from rtnf.errors import RtnfError
from rtnf.stream.sources import Batch
from rtnf.stream.window_output import SINKS, STAGES, OutputLayout, TelemetrySample, WindowOutput
from rtnf.stream.zmq_messages import BEHAVIOR_CHANNELS

if TYPE_CHECKING:
    from typing import Self

FORMAT = "rtnf-run"
FORMAT_VERSION = 1
INFO_FILE = "run.json"
NAME_BYTES = 64
NO_SOFT_CODE = -1
INPUT_KINDS = ("spikes", "behavior", "frames")
OUTPUT_KINDS = ("decoded", "predicted", "control", "telemetry", "rejected")
KINDS = INPUT_KINDS + OUTPUT_KINDS
DEFAULT_QUEUE_ITEMS = 4096
DEFAULT_QUEUE_BYTES = 256 << 20
FRAME_SHAPE_REASON = "frame_shape"
EXIT_CHECK_S = 0.1  # how often an idle writer looks whether the program has ended

Chunk = tuple[tuple[str, np.ndarray], ...]  # what one queue item carries: (kind, records) pairs
_STOP = None  # the queue item that ends the writer thread


def record_dtypes(layout: OutputLayout) -> dict[str, np.dtype]:
    """The record layout of every kind but frames (whose shape comes with the first frame)."""
    received = [("number", "<i8"), ("batch", "<i8"), ("timestamp", "<f8")]
    window = [("sequence", "<i8"), ("window_end", "<f8")]
    name = f"S{NAME_BYTES}"
    return {
        "spikes": np.dtype(received + [("unit", "<i8")]),
        "behavior": np.dtype(received + [("values", "<f4", (len(BEHAVIOR_CHANNELS),))]),
        "decoded": np.dtype(window + [("sent_time", "<f8"),
                                      ("values", "<f4", (len(layout.targets),))]),
        "predicted": np.dtype(window + [("values", "<f4", (len(layout.unit_ids),))]),
        "control": np.dtype(window + [("rule", name), ("command", name), ("soft_code", "<i2"),
                                      ("sinks", "u1")]),
        "telemetry": np.dtype(window + [("latency_ms", "<f8"),
                                        ("stage_ms", "<f8", (len(STAGES),))]),
        "rejected": np.dtype([("time", "<f8"), ("count", "<i8"), ("reason", name)]),
    }


def frame_dtype(frame_shape: tuple[int, int]) -> np.dtype:
    return np.dtype([("number", "<i8"), ("batch", "<i8"), ("timestamp", "<f8"),
                     ("image", "u1", tuple(frame_shape))])


def dtype_to_json(dtype: np.dtype) -> list[list]:
    """A structured dtype as [[field, numpy type string, shape], ...] (run.json `records`)."""
    fields = []
    for name in dtype.names:
        field = dtype.fields[name][0]
        fields.append([name, field.base.str, list(field.shape)])
    return fields


def dtype_from_json(fields: list[list]) -> np.dtype:
    return np.dtype([(name, type_string, tuple(shape)) for name, type_string, shape in fields])


def fixed_bytes(text: str, width: int = NAME_BYTES) -> bytes:
    """`text` in UTF-8, cut to `width` bytes at a character boundary."""
    encoded = text.encode("utf-8")
    if len(encoded) <= width:
        return encoded
    return encoded[:width].decode("utf-8", errors="ignore").encode("utf-8")


def sinks_mask(sinks: tuple[str, ...]) -> int:
    """Bit i set for each sink SINKS[i] in `sinks`."""
    unknown = set(sinks) - set(SINKS)
    if unknown:
        raise RtnfError(f"command sinks {sorted(unknown)} are not among {', '.join(SINKS)}")
    return sum(1 << SINKS.index(sink) for sink in set(sinks))


def sinks_of_mask(mask: int) -> tuple[str, ...]:
    return tuple(sink for bit, sink in enumerate(SINKS) if mask & (1 << bit))


def write_json_atomic(path: Path, content: dict[str, Any]) -> None:
    """Replace `path` with `content` so that a reader (or a crash) sees the old or the new file,
    never a mixture: write a temporary file, fsync it, rename it, fsync the directory."""
    temporary = path.with_name(path.name + ".partial")
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(content, file, indent=1, default=_json_value)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(path.parent)


def _json_value(value: object) -> object:
    """numpy scalars and arrays as numbers and lists, anything else JSON lacks as its text."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return str(value)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _claim_directory(directory: Path) -> None:
    """Create the run directory; an existing non-empty one is refused (never overwritten)."""
    if directory.exists():
        if not directory.is_dir():
            raise RtnfError(f"{directory}: exists and is not a directory; choose another run "
                            "directory")
        entries = sorted(entry.name for entry in directory.iterdir())
        if entries:
            raise RtnfError(f"{directory}: run directory is not empty (holds {len(entries)} "
                            f"entries, e.g. '{entries[0]}'); a recording is never overwritten, "
                            "choose a new directory")
    directory.mkdir(parents=True, exist_ok=True)


class _AppendFiles:
    """The run's record files: opened (created) on first use, appended to, flushed + fsynced."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.open_files = ExitStack()
        self.files: dict[str, BinaryIO] = {}
        self.written: Counter = Counter()
        self.unsynced: set[str] = set()

    def append(self, kind: str, records: np.ndarray) -> None:
        file = self.files.get(kind)
        if file is None:
            path = self.directory / f"{kind}.bin"
            file = self.open_files.enter_context(open(path, "ab"))  # noqa: SIM115 (run-long)
            self.files[kind] = file
            fsync_directory(self.directory)
        file.write(records.tobytes())
        self.written[kind] += len(records)
        self.unsynced.add(kind)

    def sync(self) -> dict[str, int]:
        """Flush and fsync what was appended since the last sync; the records now durable."""
        for kind in sorted(self.unsynced):
            self.files[kind].flush()
            os.fsync(self.files[kind].fileno())
        self.unsynced.clear()
        return {kind: self.written[kind] for kind in KINDS}

    def close(self) -> None:
        self.open_files.close()


class Recorder:
    """Records a run into `directory` (see the module docstring for the format)."""

    def __init__(self, directory: str | Path, layout: OutputLayout, flush_interval: float = 1.0,
                 metadata: dict[str, Any] | None = None, queue_items: int = DEFAULT_QUEUE_ITEMS,
                 queue_bytes: int = DEFAULT_QUEUE_BYTES):
        if not flush_interval > 0:
            raise RtnfError(f"recording.flush_interval must be a positive number of seconds, "
                            f"got {flush_interval!r}")
        if queue_items < 1 or queue_bytes < 1:
            raise RtnfError(f"the recorder's queue needs room for at least one chunk, got "
                            f"queue_items={queue_items}, queue_bytes={queue_bytes}")
        self.directory = Path(directory)
        self.layout = layout
        self.flush_interval = float(flush_interval)
        self.dropped: Counter = Counter()  # records lost to a full queue or a failed disk
        self.flushed: dict[str, int] = {kind: 0 for kind in KINDS}  # records durable on disk
        self.failure: str | None = None  # the writer's first disk error, if any
        self.summary_written = False  # run.json holds the summary (close() wrote it)
        self._dtypes = record_dtypes(layout)
        self._frame_shape: tuple[int, int] | None = None
        self._numbers: Counter = Counter()
        self._batches = 0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_items)
        self._queue_bytes = queue_bytes
        self._queued_bytes = 0
        self._lock = threading.Lock()  # numbering, drop counts and queue bytes
        self._closed = False
        self._info = self._start_info(metadata or {})
        self._start_directory()
        self._files = _AppendFiles(self.directory)
        self._writer = threading.Thread(target=self._write_loop, name="rtnf-recorder")
        self._writer.start()

    def _start_directory(self) -> None:
        """Claim the run directory and write run.json, or say what is wrong with the place."""
        try:
            _claim_directory(self.directory)
            write_json_atomic(self.directory / INFO_FILE, self._info)
        except OSError as error:
            raise RtnfError(f"recording.directory: cannot record into {self.directory} "
                            f"({error.strerror or error}: {error.filename or self.directory}); "
                            "choose a writable directory (recording.directory or --run-dir), "
                            "or run with --no-record") from None

    def _start_info(self, metadata: dict[str, Any]) -> dict[str, Any]:
        layout = self.layout
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "run_id": uuid.uuid4().hex,
            "started": _now_iso(),
            "layout": {"targets": list(layout.targets), "target_units": list(layout.target_units),
                       "unit_ids": [int(unit) for unit in layout.unit_ids],
                       "window": float(layout.window), "hop": float(layout.hop)},
            "behavior_channels": list(BEHAVIOR_CHANNELS), "stages": list(STAGES),
            "sinks": list(SINKS), "frame_shape": None, "metadata": metadata,
            "records": {kind: dtype_to_json(dtype) for kind, dtype in self._dtypes.items()},
        }

    # -- the loop's side: convert and enqueue, never wait -------------------------------------

    def record_inputs(self, batch: Batch) -> None:
        """Every record of `batch` (spikes, behavior or frames), numbered in receive order."""
        timestamps = np.asarray(batch.timestamps, dtype=np.float64).reshape(-1)
        values = np.asarray(batch.records)
        if batch.kind not in INPUT_KINDS:
            raise RtnfError(f"batch kind '{batch.kind}' is not one of {', '.join(INPUT_KINDS)}")
        if values.shape[:1] != timestamps.shape:
            raise RtnfError(f"{batch.kind} batch has {timestamps.size} timestamps but records "
                            f"of shape {values.shape}")
        if not timestamps.size:
            return
        records = self._input_records(batch.kind, values, timestamps)
        if records is not None:
            records["timestamp"] = timestamps
            self._enqueue(((batch.kind, records),), numbered=batch.kind)

    def _input_records(self, kind: str, values: np.ndarray,
                       timestamps: np.ndarray) -> np.ndarray | None:
        """The batch as records (numbers and timestamps still to fill); None when its frames
        do not have the run's shape (they are recorded as rejected)."""
        if kind == "frames":
            return self._frame_records(values, timestamps)
        if kind == "spikes" and values.ndim != 1:
            raise RtnfError(f"spikes batch records must be (n,) unit ids, got {values.shape}")
        if kind == "behavior" and values.shape[1:] != (len(BEHAVIOR_CHANNELS),):
            raise RtnfError(f"behavior batch records must be (n, {len(BEHAVIOR_CHANNELS)}) "
                            f"({', '.join(BEHAVIOR_CHANNELS)}), got {values.shape}")
        records = np.zeros(len(values), self._dtypes[kind])
        records["unit" if kind == "spikes" else "values"] = values
        return records

    def _frame_records(self, images: np.ndarray, timestamps: np.ndarray) -> np.ndarray | None:
        """Frame records; None when the frames' shape is not the run's (they are rejected)."""
        if images.ndim != 3 or images.dtype != np.uint8:
            raise RtnfError(f"frames batch records must be uint8 (n, H, W), got {images.dtype} "
                            f"{images.shape}")
        shape = (int(images.shape[1]), int(images.shape[2]))
        with self._lock:
            if self._frame_shape is None:
                self._frame_shape = shape
        if shape != self._frame_shape:
            self.record_rejected(FRAME_SHAPE_REASON, timestamps.size, float(timestamps[-1]))
            return None
        records = np.zeros(timestamps.size, frame_dtype(shape))
        records["image"] = images
        return records

    def record_output(self, output: WindowOutput, sent_time: float) -> None:
        """The window's decoded values, predictions and commands; `sent_time` on the stream
        clock, when the outputs left for the sinks."""
        decoded = np.zeros(1, self._dtypes["decoded"])
        decoded["sequence"], decoded["window_end"] = output.sequence, output.window_end
        decoded["sent_time"] = sent_time
        decoded["values"] = self._checked(output.decoded, "decoded", len(self.layout.targets))
        predicted = np.zeros(1, self._dtypes["predicted"])
        predicted["sequence"], predicted["window_end"] = output.sequence, output.window_end
        predicted["values"] = self._checked(output.predicted, "predicted",
                                            len(self.layout.unit_ids))
        parts: list[tuple[str, np.ndarray]] = [("decoded", decoded), ("predicted", predicted)]
        if output.commands:
            parts.append(("control", self._control_records(output)))
        self._enqueue(tuple(parts))

    @staticmethod
    def _checked(values: np.ndarray, what: str, size: int) -> np.ndarray:
        values = np.asarray(values)
        if values.shape != (size,):
            raise RtnfError(f"WindowOutput.{what} must have shape ({size},) as the run's "
                            f"layout says, got {values.shape}")
        return values

    def _control_records(self, output: WindowOutput) -> np.ndarray:
        records = np.zeros(len(output.commands), self._dtypes["control"])
        records["sequence"], records["window_end"] = output.sequence, output.window_end
        for row, command in enumerate(output.commands):
            records["rule"][row] = fixed_bytes(command.rule)
            records["command"][row] = fixed_bytes(command.name)
            records["soft_code"][row] = (NO_SOFT_CODE if command.soft_code is None
                                         else command.soft_code)
            records["sinks"][row] = sinks_mask(command.sinks)
        return records

    def record_telemetry(self, sample: TelemetrySample) -> None:
        """The window's latency and stage times (stages in STAGES order, NaN if not given)."""
        unknown = set(sample.stage_ms) - set(STAGES)
        if unknown:
            raise RtnfError(f"TelemetrySample.stage_ms has stages {sorted(unknown)} not among "
                            f"{', '.join(STAGES)}")
        record = np.zeros(1, self._dtypes["telemetry"])
        record["sequence"], record["window_end"] = sample.sequence, sample.window_end
        record["latency_ms"] = sample.latency_ms
        record["stage_ms"] = [sample.stage_ms.get(stage, np.nan) for stage in STAGES]
        self._enqueue((("telemetry", record),))

    def record_rejected(self, reason: str, count: int, when: float) -> None:
        """`count` inputs rejected for `reason`, received at `when` (stream clock)."""
        record = np.zeros(1, self._dtypes["rejected"])
        record["time"], record["count"] = when, count
        record["reason"] = fixed_bytes(reason)
        self._enqueue((("rejected", record),))

    def _enqueue(self, chunk: Chunk, numbered: str | None = None) -> None:
        """Hand `chunk` to the writer, or count its records as dropped when the queue is full.
        Input records get their numbers here, under the lock, so file order = number order;
        dropped inputs use up their numbers, so the gaps in a run show where they were."""
        size = sum(records.nbytes for _, records in chunk)
        with self._lock:
            if self._closed:
                raise RtnfError(f"the recorder of {self.directory} is closed; nothing more can "
                                "be recorded")
            if numbered is not None:
                self._number(numbered, chunk[0][1])
            if self._queued_bytes + size > self._queue_bytes or self._queue.full():
                for kind, records in chunk:
                    self.dropped[kind] += len(records)
                return
            self._queued_bytes += size
            self._queue.put_nowait(chunk)

    def _number(self, kind: str, records: np.ndarray) -> None:
        """Number input records in receive order (per kind) and by batch (all kinds)."""
        records["number"] = self._numbers[kind] + np.arange(len(records))
        records["batch"] = self._batches
        self._numbers[kind] += len(records)
        self._batches += 1

    # -- the writer thread ----------------------------------------------------------------------

    def _write_loop(self) -> None:
        next_sync = time.monotonic() + self.flush_interval
        try:
            while True:
                try:
                    wait = min(EXIT_CHECK_S, max(0.0, next_sync - time.monotonic()))
                    chunk = self._queue.get(timeout=wait)
                except queue.Empty:
                    chunk = ()
                if chunk is _STOP:
                    break
                self._store(chunk)
                if time.monotonic() >= next_sync:
                    self._sync()
                    next_sync = time.monotonic() + self.flush_interval
                if not threading.main_thread().is_alive() and self._queue.empty():
                    break  # the program ended without close(): keep what it recorded
            self._sync()
        finally:
            self._close_files()

    def _store(self, chunk: Chunk) -> None:
        with self._lock:
            self._queued_bytes -= sum(records.nbytes for _, records in chunk)
        for kind, records in chunk:
            if self.failure is not None:
                with self._lock:
                    self.dropped[kind] += len(records)
                continue
            try:
                if kind == "frames" and self._info["frame_shape"] is None:
                    self._describe_frames(records.dtype)
                self._files.append(kind, records)
            except OSError as error:
                self._fail(error, self.directory / f"{kind}.bin")
                with self._lock:
                    self.dropped[kind] += len(records)

    def _describe_frames(self, dtype: np.dtype) -> None:
        """Put the frame record layout into run.json before the first frame reaches the disk."""
        self._info["frame_shape"] = list(dtype.fields["image"][0].shape)
        self._info["records"]["frames"] = dtype_to_json(dtype)
        write_json_atomic(self.directory / INFO_FILE, self._info)

    def _sync(self) -> None:
        if self.failure is not None:
            return
        try:
            self.flushed = self._files.sync()
        except OSError as error:
            self._fail(error, self.directory)

    def _close_files(self) -> None:
        """Close the record files; on a failed disk their buffers may not empty (counted)."""
        try:
            self._files.close()
        except OSError as error:
            self._fail(error, self.directory)

    def _fail(self, error: OSError, where: Path) -> None:
        if self.failure is None:
            self.failure = f"{error.filename or where}: {error.strerror or error}"

    # -- closing --------------------------------------------------------------------------------

    def close(self, summary: dict[str, Any] | None = None) -> dict[str, Any]:
        """Drain the queue, flush and fsync, and write the run's summary (with the loop's
        `summary`, if given) into run.json. Returns the summary; calling again returns it too.
        Raises RtnfError if the writer hit a disk error (the summary names it)."""
        with self._lock:
            already_closed, self._closed = self._closed, True
        if not already_closed:
            self._stop_writer()
            self._info["summary"] = {
                "finished": _now_iso(), "records": dict(self.flushed),
                "dropped": {kind: self.dropped[kind] for kind in KINDS},
                "failure": self.failure, "loop": summary or {},
            }
            self._write_summary()
        if self.failure is not None:
            unsaved = "" if self.summary_written else f"; {INFO_FILE} holds no summary"
            raise RtnfError(f"recording {self.directory} failed: {self.failure} "
                            f"({sum(self.dropped.values())} records not written{unsaved})")
        return self._info["summary"]

    def _write_summary(self) -> None:
        """run.json with the summary; a disk that refuses it leaves the previous run.json."""
        try:
            write_json_atomic(self.directory / INFO_FILE, self._info)
        except OSError as error:
            self._fail(error, self.directory / INFO_FILE)
        else:
            self.summary_written = True

    def _stop_writer(self) -> None:
        while self._writer.is_alive():
            try:
                self._queue.put(_STOP, timeout=0.1)
                break
            except queue.Full:
                continue
        self._writer.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close, unless `close()` was called already (its error, if any, was raised then)."""
        if not self._closed:
            self.close()


@dataclass
class RunRecording:
    """A recorded run: run.json as `info` and one structured array per record kind."""

    directory: Path
    info: dict[str, Any]
    spikes: np.ndarray
    behavior: np.ndarray
    frames: np.ndarray
    decoded: np.ndarray
    predicted: np.ndarray
    control: np.ndarray
    telemetry: np.ndarray
    rejected: np.ndarray

    @property
    def finished(self) -> bool:
        """Whether the recorder was closed (False while running or after a crash)."""
        return "summary" in self.info

    @property
    def layout(self) -> OutputLayout:
        layout = self.info["layout"]
        return OutputLayout(targets=tuple(layout["targets"]),
                            target_units=tuple(layout["target_units"]),
                            unit_ids=np.asarray(layout["unit_ids"], dtype=np.int64),
                            window=float(layout["window"]), hop=float(layout["hop"]))

    def input_session(self) -> Session:
        """The run's inputs as a `Session`: the layout's units (then any other unit that fired),
        behaviour channels that carried a value (NaN samples kept), frames if any."""
        layout_ids = self.layout.unit_ids
        fired = np.unique(self.spikes["unit"])
        unit_ids = np.concatenate([layout_ids, np.setdiff1d(fired, layout_ids)])
        order = np.argsort(unit_ids)
        unit_index = order[np.searchsorted(unit_ids[order], self.spikes["unit"])]
        spike_times, spike_unit_index = sort_spikes(self.spikes["timestamp"],
                                                    unit_index.astype(np.int32))
        behavior = {}
        for column, name in enumerate(BEHAVIOR_CHANNELS):
            values = self.behavior["values"][:, column].astype(np.float64)
            if not np.isnan(values).all():
                behavior[name] = BehaviorChannel(self.behavior["timestamp"], values,
                                                 BEHAVIOR_UNITS[name])
        frames = None
        if len(self.frames):
            frames = Frames(self.frames["timestamp"], np.ascontiguousarray(self.frames["image"]))
        metadata = {"identifier": self.info["run_id"],
                    "description": f"rtnf run {self.directory.name}",
                    "session_start_time": self.info["started"],
                    "rtnf_run": json.dumps(self.info)}
        return Session(unit_ids, spike_times, spike_unit_index, behavior, frames,
                       metadata=metadata).validate(source=str(self.directory))


def read_run(directory: str | Path) -> RunRecording:
    """Read the run in `directory`: finished, still being written, or left by a crash (a torn
    trailing record is not read)."""
    directory = Path(directory)
    info = _read_info(directory / INFO_FILE)
    arrays = {kind: _read_records(directory, info, kind) for kind in KINDS}
    return RunRecording(directory=directory, info=info, **arrays)


def _read_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RtnfError(f"{path}: not found; not an rtnf run directory (or the run never "
                        "started)") from None
    except (OSError, ValueError, RecursionError) as error:  # ValueError: bad UTF-8 or JSON
        raise RtnfError(f"{path}: cannot read the run description: "
                        f"{error or type(error).__name__}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise RtnfError(f"{path}: key 'format' is {found!r}, expected '{FORMAT}'")
    if info.get("format_version") != FORMAT_VERSION:
        raise RtnfError(f"{path}: format_version {info.get('format_version')!r} is not "
                        f"supported (this rtnf reads version {FORMAT_VERSION})")
    for key in ("run_id", "started", "layout", "records"):
        if key not in info:
            raise RtnfError(f"{path}: key '{key}' is missing")
    if not isinstance(info["records"], dict):
        raise RtnfError(f"{path}: key 'records' is not a mapping of record layouts")
    return info


def _read_records(directory: Path, info: dict[str, Any], kind: str) -> np.ndarray:
    path = directory / f"{kind}.bin"
    size = path.stat().st_size if path.exists() else 0
    spec = info["records"].get(kind)
    if spec is None:
        if kind == "frames" and size == 0:
            return np.zeros(0, frame_dtype((0, 0)))
        raise RtnfError(f"{directory / INFO_FILE}: key 'records.{kind}' is missing, so "
                        f"{path} ({size} bytes) cannot be read")
    try:
        dtype = dtype_from_json(spec)
    except (TypeError, ValueError, OverflowError, RecursionError) as error:
        raise RtnfError(f"{directory / INFO_FILE}: key 'records.{kind}' is not a record "
                        f"layout ({error})") from None
    if dtype.hasobject or dtype.itemsize == 0:
        problem = "holds Python objects" if dtype.hasobject else "gives zero-size records"
        raise RtnfError(f"{directory / INFO_FILE}: key 'records.{kind}' {problem}; not a record "
                        "layout rtnf writes")
    count = size // dtype.itemsize
    if count == 0:
        return np.zeros(0, dtype)
    return np.fromfile(path, dtype=dtype, count=count)
