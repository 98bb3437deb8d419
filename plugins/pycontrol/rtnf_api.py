"""rtnf -> pyControl: a user `Api` class for pyControl's GUI that turns rtnf's ZeroMQ outputs into
task events (`trigger_event`) and task variables (`set_variable`).

What pyControl expects of this file (read in pyControl/code at GUI version 2.0.2):

- source/gui/api.py, class `Api`: the hooks a user class overrides are `__init__()` (when the
  task is uploaded), `run_start()`, `run_stop()`, `process_data_user(data)` and
  `plot_update()`; the calls it makes are `set_variable(v_name, v_value)`,
  `trigger_event(event)` and `print_message(msg)`. The GUI calls `interface(board,
  print_to_log)` right after `__init__`, which gives the instance `self.board` and
  `self.print_to_log`. `trigger_event` / `set_variable` only act on names the task file
  defines (`board.sm_info.events` / `.variables`); any other name is reported in the GUI's log.
  `data` is a dict with the keys 'states', 'events', 'prints', 'vars' and 'analog', each a list
  of namedtuples (Event(name, time), State(name, time), Print(data, time),
  Var(name, value, time), Analog(name, data, time)); times are ms since the run started.
- source/gui/run_task_tab.py, `initialise_API`: a task file that sets `v.api_class = "NAME"`
  gets the class NAME from the module `api_classes.NAME`, i.e. the file `api_classes/NAME.py`
  in the pyControl folder: the file name and the class name must be the same. Hence the alias
  `rtnf_api = RtnfApi` below. `start_task` calls `run_start()`, `stop_task` calls
  `run_stop()`, and a QTimer calls `plot_update()` every plotting `update_interval`
  (source/gui/settings.py: 10 ms by default; Settings in the GUI change it).
- source/communication/pycboard.py, `Pycboard.process_data`: data consumers (and so
  `process_data_user`) are called only when the board sent something. This class therefore
  reads rtnf in `plot_update()`, every update interval, and also in `process_data_user()`.
  Both run on the GUI's thread: nothing here ever waits. An exception escaping a hook reaches
  the GUI's excepthook, which stops the run, so parsing never raises.

  Earlier GUI versions named the periodic hook `update()` and the event call `generate_event`
  (seen in older copies of source/gui/api.py); `update()` below does the same as
  `plot_update()` and events fall back to `generate_event` when `trigger_event` is missing.

What it reads (rtnf/stream/sinks.py, the public contract; rtnf.yaml `outputs.zmq.format: csv`):
rtnf binds a PUB socket (`outputs.zmq.address`, default tcp://127.0.0.1:5557) and sends
two-frame messages [topic, payload]. This class connects a SUB socket to it and subscribes to

    control   seq,window_end,command,rule         one per command a rule routes to "zmq"
    decoded   seq,window_end,<target 1>,...       one per window, targets in rtnf.yaml
                                                  decoding.targets order (DECODED_TARGETS)

seq is the window's index k (integer; windows rtnf skipped leave gaps), window_end is t_k in
seconds on rtnf's stream clock ('%.6f'), values are '%.6g' or NaN / Infinity / -Infinity.
Messages are drained without waiting (zmq.NOBLOCK), at most MAX_MESSAGES_PER_CALL per call.

What it does:
- a `control` message whose command is in COMMAND_EVENTS -> `trigger_event(event)`, in arrival
  order; other commands are counted (`counts["unmapped"]`) and named once in the log. A command
  whose window ended more than MAX_COMMAND_AGE_S before the newest window already received is
  dropped as stale (`counts["stale"]`): a late command is worse than none in a closed loop.
- `decoded` values named in DECODED_VARIABLES -> `set_variable(variable, value)`, rounded to
  VARIABLE_DECIMALS, at most once per VARIABLE_INTERVAL_S of stream time per variable (the
  newest value when it is due; each set is a serial message to the board); NaN / infinite
  values are never sent (`counts["non_finite"]`).
- sequence gaps between consecutive `decoded` messages are counted: `gaps` (occurrences) and
  `missing_windows` (windows missing in all). They are windows rtnf skipped or messages lost on
  the way (the slow-joiner start, a full queue); rtnf's own telemetry counts its skips. A
  sequence number that goes back means rtnf was restarted (`counts["restarts"]`); tracking
  starts over. Without the `decoded` subscription (SUBSCRIBE_DECODED = False) gaps cannot be
  seen: commands come only on the windows where a rule fired.
- malformed messages (not two frames, another topic, not UTF-8, wrong field count, bad
  numbers or names, oversized) are skipped and counted by reason in `malformed`; the first of
  each reason is named in the log.
- `run_stop()` closes the socket and prints a one-line summary to the log.

Configuration: edit the class attributes of `RtnfApi` below, or subclass it in your own
api_classes/<name>.py (class <name>(RtnfApi) with `v.api_class = "<name>"` in the task).

Outside pyControl (no `source.gui.api` to import) a minimal stand-in `Api` is defined so that
the module can be imported and dry-run: `python rtnf_api.py [ADDRESS ...]` prints the events and
variables it would send, until Ctrl-C. Inside pyControl's GUI the real base class is used.
Needs pyzmq in the Python environment that runs pyControl's GUI.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections import Counter
from typing import ClassVar

import zmq

try:  # inside pyControl's GUI (run from the pyControl folder)
    from source.gui.api import Api

    PYCONTROL_GUI = True
except ImportError:  # outside pyControl only: a stand-in with the real base's names
    PYCONTROL_GUI = False

    class Api:
        """Stand-in for pyControl's source/gui/api.py `Api`, used only outside pyControl: the
        hooks do nothing and the calls print what the GUI would send to the board."""

        def run_start(self):
            pass

        def run_stop(self):
            pass

        def process_data_user(self, data):
            pass

        def plot_update(self):
            pass

        def set_variable(self, v_name, v_value):
            self.print_to_log(f"set_variable({v_name!r}, {v_value!r})")

        def trigger_event(self, event):
            self.print_to_log(f"trigger_event({event!r})")

        def print_message(self, msg):
            self.print_to_log(msg)

        def interface(self, board, print_to_log):
            self.board = board
            self.print_to_log = print_to_log

        def print_to_log(self, text, end="\n"):
            print(text, end=end, flush=True)


TOPICS = (b"control", b"decoded")
SEQUENCE = re.compile(r"[0-9]+")
NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
                    r"|NaN|Infinity|-Infinity")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")  # rtnf's rule and command names
TIME_TOLERANCE_S = 2e-6  # window ends are written with 6 decimals


class MalformedMessage(ValueError):
    """A message that does not follow rtnf's CSV format; `reason` is a short fixed text."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _text_fields(payload: bytes) -> list[str]:
    try:
        return payload.decode("utf-8").split(",")
    except UnicodeDecodeError:
        raise MalformedMessage("not UTF-8 text") from None


def _head(fields: list[str]) -> tuple[int, float]:
    """seq and window_end, the first two fields of every rtnf CSV payload."""
    if not SEQUENCE.fullmatch(fields[0]):
        raise MalformedMessage("bad sequence number")
    if not NUMBER.fullmatch(fields[1]) or not math.isfinite(float(fields[1])):
        raise MalformedMessage("bad window_end")
    return int(fields[0]), float(fields[1])


def parse_control(payload: bytes) -> tuple[int, float, str, str]:
    """`seq,window_end,command,rule` -> (seq, window_end, command, rule)."""
    fields = _text_fields(payload)
    if len(fields) != 4:
        raise MalformedMessage("control: expected seq,window_end,command,rule")
    seq, window_end = _head(fields)
    command, rule = fields[2], fields[3]
    if not NAME.fullmatch(command) or not NAME.fullmatch(rule):
        raise MalformedMessage("control: bad command or rule name")
    return seq, window_end, command, rule


def parse_decoded(payload: bytes, targets: int) -> tuple[int, float, list[float]]:
    """`seq,window_end,v1,...,vT` with T = `targets` -> (seq, window_end, values)."""
    fields = _text_fields(payload)
    if len(fields) != 2 + targets:
        raise MalformedMessage(f"decoded: expected seq,window_end and {targets} values")
    seq, window_end = _head(fields)
    if not all(NUMBER.fullmatch(field) for field in fields[2:]):
        raise MalformedMessage("decoded: bad value")
    return seq, window_end, [float(field) for field in fields[2:]]


class RtnfApi(Api):
    """Subscribes to rtnf's ZeroMQ outputs and drives the task (module docstring)."""

    # rtnf's PUB endpoint(s) (rtnf.yaml outputs.zmq.address; rtnf binds, this class connects).
    # On another PC: rtnf must bind an address that PC can reach, e.g. tcp://10.0.0.2:5557.
    ADDRESSES: ClassVar[tuple[str, ...]] = ("tcp://127.0.0.1:5557",)
    # rtnf command name (a rule's `command` / `release_command`) -> pyControl event name.
    # Every event named here must be listed in the task file's `events`.
    COMMAND_EVENTS: ClassVar[dict[str, str]] = {"running": "rtnf_running", "still": "rtnf_still"}
    # rtnf.yaml decoding.targets, in order: the columns of the decoded payload.
    DECODED_TARGETS: ClassVar[tuple[str, ...]] = ("speed", "gaze_phi", "gaze_theta")
    # decoded target -> task variable (v.<name> in the task file); {} sets no variables.
    DECODED_VARIABLES: ClassVar[dict[str, str]] = {"speed": "rtnf_speed"}
    # Subscribe to `decoded` (variables and gap counting; 20 small messages/s at a 50 ms hop).
    SUBSCRIBE_DECODED: ClassVar[bool] = True
    # At most one set_variable per variable per this many seconds of stream time.
    VARIABLE_INTERVAL_S: ClassVar[float] = 0.25
    VARIABLE_DECIMALS: ClassVar[int] = 2
    # Commands whose window ended this long before the newest window received are dropped.
    MAX_COMMAND_AGE_S: ClassVar[float] = 0.5
    # Messages read per call (the rest wait for the next call: the GUI's timer must not stall).
    MAX_MESSAGES_PER_CALL: ClassVar[int] = 200
    MAX_PAYLOAD_BYTES: ClassVar[int] = 65536
    RECEIVE_HWM: ClassVar[int] = 1000

    def __init__(self):
        super().__init__()
        unknown = sorted(set(self.DECODED_VARIABLES) - set(self.DECODED_TARGETS))
        if unknown:
            raise ValueError(f"DECODED_VARIABLES names {unknown}, not in DECODED_TARGETS "
                             f"{list(self.DECODED_TARGETS)} (rtnf.yaml decoding.targets)")
        if self.DECODED_VARIABLES and not self.SUBSCRIBE_DECODED:
            raise ValueError("DECODED_VARIABLES needs SUBSCRIBE_DECODED = True")
        self._socket: zmq.Socket | None = None
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.counts: Counter[str] = Counter()
        self.malformed: Counter[str] = Counter()
        self.gaps = 0
        self.missing_windows = 0
        self.last_sequence: int | None = None  # of the last decoded message
        self._newest_window_end: float | None = None
        self._sent_at: dict[str, float] = {}  # variable -> window_end of its last set
        self._logged: set[str] = set()

    # ------------------------------------------------------------------------------------
    # pyControl hooks
    # ------------------------------------------------------------------------------------

    def run_start(self):
        self._close()
        self._reset_counters()
        self._check_task_names()
        socket = zmq.Context.instance().socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVHWM, self.RECEIVE_HWM)
        socket.setsockopt(zmq.SUBSCRIBE, b"control")
        if self.SUBSCRIBE_DECODED:
            socket.setsockopt(zmq.SUBSCRIBE, b"decoded")
        try:
            for address in self.ADDRESSES:
                socket.connect(address)  # returns at once; ZeroMQ (re)connects in the background
        except zmq.ZMQError as exc:
            socket.close(linger=0)
            self._log(f"rtnf_api: cannot connect to {address} ({exc}); check ADDRESSES")
            raise
        self._socket = socket
        self._log(f"rtnf_api: listening to rtnf at {', '.join(self.ADDRESSES)}")

    def run_stop(self):
        if self._socket is not None:
            self.drain()  # what arrived before the stop
            self._close()
            self._log(f"rtnf_api: {self.summary()}")

    def process_data_user(self, data):
        self.drain()

    def plot_update(self):
        self.drain()

    update = plot_update  # the periodic hook's name in earlier pyControl GUIs

    # ------------------------------------------------------------------------------------
    # Reading rtnf
    # ------------------------------------------------------------------------------------

    def drain(self) -> int:
        """Read what is waiting (at most MAX_MESSAGES_PER_CALL, never waiting) and act on it.
        Returns the number of messages read."""
        if self._socket is None:
            return 0
        messages = []
        for _ in range(self.MAX_MESSAGES_PER_CALL):
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            except zmq.ZMQError as exc:
                self._note("receive failed", f"rtnf_api: receive failed ({exc})")
                break
            parsed = self._parse(frames)
            if parsed is not None:
                messages.append(parsed)
        decoded_latest: tuple[float, list[float]] | None = None
        for topic, seq, window_end, rest in messages:  # decoded first: newest window, gaps
            if topic == "decoded":
                self.counts["decoded"] += 1
                self._track_sequence(seq, window_end)
                decoded_latest = (window_end, rest)
        for topic, seq, window_end, rest in messages:  # then commands, in arrival order
            if topic == "control":
                self.counts["control"] += 1
                self._command(window_end, rest)
        if decoded_latest is not None:
            self._set_variables(*decoded_latest)
        return len(messages)

    def _parse(self, frames: list[bytes]):
        """(topic, seq, window_end, command or values), or None for a malformed message."""
        try:
            if len(frames) != 2:
                raise MalformedMessage("not two frames")
            topic, payload = frames
            if topic not in TOPICS:
                raise MalformedMessage("unknown topic")
            if len(payload) > self.MAX_PAYLOAD_BYTES:
                raise MalformedMessage("payload too large")
            if topic == b"control":
                seq, window_end, command, _rule = parse_control(payload)
                return "control", seq, window_end, command
            seq, window_end, values = parse_decoded(payload, len(self.DECODED_TARGETS))
            return "decoded", seq, window_end, values
        except MalformedMessage as exc:
            self.malformed[exc.reason] += 1
            self._note(f"malformed {exc.reason}",
                       f"rtnf_api: malformed message skipped ({exc.reason}); "
                       "further ones are only counted")
            return None

    def _track_sequence(self, seq: int, window_end: float) -> None:
        if self.last_sequence is not None:
            if seq <= self.last_sequence:  # rtnf started again: its windows count from 0
                self.counts["restarts"] += 1
                self._newest_window_end = None
                self._sent_at.clear()
            elif seq > self.last_sequence + 1:
                self.gaps += 1
                self.missing_windows += seq - self.last_sequence - 1
        self.last_sequence = seq
        if self._newest_window_end is None or window_end > self._newest_window_end:
            self._newest_window_end = window_end

    def _command(self, window_end: float, command: str) -> None:
        newest = self._newest_window_end
        if newest is None or window_end > newest:
            self._newest_window_end = newest = window_end
        if newest - window_end > self.MAX_COMMAND_AGE_S + TIME_TOLERANCE_S:
            self.counts["stale"] += 1
            self._note("stale", f"rtnf_api: command {command!r} arrived "
                       f"{newest - window_end:.3f} s after a newer window: dropped "
                       "(further ones are only counted)")
            return
        event = self.COMMAND_EVENTS.get(command)
        if event is None:
            self.counts["unmapped"] += 1
            self._note(f"unmapped {command}",
                       f"rtnf_api: rtnf command {command!r} is not in COMMAND_EVENTS")
            return
        trigger = getattr(self, "trigger_event", None) or self.generate_event
        trigger(event)
        self.counts["events"] += 1

    def _set_variables(self, window_end: float, values: list[float]) -> None:
        for target, variable in self.DECODED_VARIABLES.items():
            value = values[self.DECODED_TARGETS.index(target)]
            if not math.isfinite(value):
                self.counts["non_finite"] += 1
                continue
            last = self._sent_at.get(variable)
            if last is not None and window_end - last < self.VARIABLE_INTERVAL_S - TIME_TOLERANCE_S:
                continue
            self.set_variable(variable, round(value, self.VARIABLE_DECIMALS))
            self._sent_at[variable] = window_end
            self.counts["variables"] += 1

    # ------------------------------------------------------------------------------------
    # Helpers
    # ------------------------------------------------------------------------------------

    def summary(self) -> str:
        malformed = sum(self.malformed.values())
        return (f"{self.counts['control']} commands ({self.counts['events']} events, "
                f"{self.counts['unmapped']} unmapped, {self.counts['stale']} stale), "
                f"{self.counts['decoded']} decoded windows ({self.counts['variables']} "
                f"variables set), {self.missing_windows} windows missing in {self.gaps} gaps, "
                f"{self.counts['restarts']} restarts, {malformed} malformed messages")

    def _check_task_names(self) -> None:
        """Name, in the log, mapped events and variables the uploaded task does not define."""
        sm_info = getattr(getattr(self, "board", None), "sm_info", None)
        events = getattr(sm_info, "events", None)
        variables = getattr(sm_info, "variables", None)
        if isinstance(events, dict):
            missing = sorted(set(self.COMMAND_EVENTS.values()) - set(events))
            if missing:
                self._log(f"rtnf_api: events {missing} are not in the task's events list")
        if isinstance(variables, dict):
            missing = sorted(set(self.DECODED_VARIABLES.values()) - set(variables))
            if missing:
                self._log(f"rtnf_api: variables {missing} are not defined in the task (v.NAME)")

    def _note(self, key: str, text: str) -> None:
        """Log `text` the first time `key` happens in a run (the GUI's log is slow to write)."""
        if key not in self._logged:
            self._logged.add(key)
            self._log(text)

    def _log(self, text: str) -> None:
        print_to_log = getattr(self, "print_to_log", None)
        if print_to_log is not None:
            print_to_log(text)

    def _close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None


rtnf_api = RtnfApi  # pyControl looks the class up by the file's name (v.api_class = "rtnf_api")


def _dry_run(addresses: list[str]) -> None:
    """Print what the Api would send to the board, without pyControl, until Ctrl-C."""

    class DryRun(RtnfApi):
        if addresses:
            ADDRESSES = tuple(addresses)

        def trigger_event(self, event):
            print(f"{time.strftime('%H:%M:%S')} trigger_event({event!r})", flush=True)

        def set_variable(self, v_name, v_value):
            print(f"{time.strftime('%H:%M:%S')} set_variable({v_name!r}, {v_value!r})",
                  flush=True)

    api = DryRun()
    api.print_to_log = print
    api.run_start()
    try:
        while True:
            api.plot_update()
            time.sleep(0.01)  # pyControl's default plotting update interval
    except KeyboardInterrupt:
        pass
    finally:
        api.run_stop()


if __name__ == "__main__":
    _dry_run(sys.argv[1:])
