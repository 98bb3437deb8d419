"""plugins/pycontrol/rtnf_api.py against rtnf's real ZmqSink, with a stand-in for pyControl's GUI.

The stand-in replaces pyControl's source/gui/api.py `Api` (pyControl/code, GUI 2.0.2): the same
hook and call names, `interface(board, print_to_log)`, and the same check that events and
variables exist in the task (`board.sm_info.events` / `.variables`) before the board is asked
to act. It is put into sys.modules as `source.gui.api`, so rtnf_api takes the import path it
takes inside pyControl. Sockets are real, on 127.0.0.1 only.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zmq

from rtnf.config import ZmqOutputConfig
from rtnf.stream.sinks import ZmqSink
from rtnf.stream.window_output import Command, OutputLayout, WindowOutput

API_FILE = Path(__file__).resolve().parents[1] / "plugins" / "pycontrol" / "rtnf_api.py"
TASK_FILE = API_FILE.with_name("rtnf_task.py")
HOP = 0.05
T0 = 1000.0  # window ends on the stream clock (seconds)
LAYOUT = OutputLayout(targets=("speed", "gaze_phi", "gaze_theta"),
                      target_units=("cm/s", "deg", "deg"), unit_ids=np.arange(4),
                      window=HOP, hop=HOP)
TIMEOUT_S = 5.0

# The names of pyControl's Api (source/gui/api.py): hooks a user class may override, and calls.
PYCONTROL_HOOKS = {"__init__", "run_start", "run_stop", "process_data_user", "plot_update"}
PYCONTROL_CALLS = {"set_variable", "trigger_event", "print_message"}
PYCONTROL_INTERNAL = {"interface", "process_data"}


class StandInBoard:
    """What the Api base touches on pyControl's Pycboard: sm_info and the two board calls."""

    def __init__(self, events, variables):
        self.sm_info = SimpleNamespace(name="rtnf_task", events=dict(events),
                                       variables=dict(variables))
        self.calls: list[tuple] = []

    def trigger_event(self, event_name, source="u"):
        self.calls.append(("trigger_event", event_name, source))

    def set_variable(self, v_name, v_value, source="s"):
        self.calls.append(("set_variable", v_name, v_value, source))


class StandInApi:
    """Stand-in for pyControl's GUI `Api` base (names and behaviour as in source/gui/api.py)."""

    def __init__(self):
        pass

    def run_start(self):
        pass

    def run_stop(self):
        pass

    def process_data_user(self, data):
        pass

    def plot_update(self):
        pass

    def set_variable(self, v_name, v_value):
        if v_name in self.board.sm_info.variables:
            self.board.set_variable(v_name, v_value, source="a")
        else:
            self.print_to_log(f"Variable {v_name} not defined in task file "
                              f"{self.board.sm_info.name} so cannot be set by API")

    def trigger_event(self, event):
        if event in self.board.sm_info.events:
            self.board.trigger_event(event, "a")
        else:
            self.print_to_log(f"Event {event} not defined in task file "
                              f"{self.board.sm_info.name} so cannot be set by API")

    def print_message(self, msg):
        self.print_to_log(msg)

    def interface(self, board, print_to_log):
        self.board = board
        self.print_to_log = print_to_log

    def process_data(self, new_data):
        self.process_data_user({"states": [], "events": [], "prints": [], "vars": [],
                                "analog": []})


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, API_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rtnf_api():
    """rtnf_api.py loaded with the stand-in injected as pyControl's `source.gui.api`."""
    names = ("source", "source.gui", "source.gui.api")
    saved = {name: sys.modules.get(name) for name in names}
    source, gui, api = (types.ModuleType(name) for name in names)
    api.Api = StandInApi
    gui.api = api
    source.gui = gui
    sys.modules.update(dict(zip(names, (source, gui, api))))
    try:
        module = _load("rtnf_api_in_pycontrol")
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def sink(context):
    s = ZmqSink(LAYOUT, ZmqOutputConfig(address="tcp://127.0.0.1:*"), context)
    yield s
    s.close()


def _output(seq: int, speed: float = 0.0, commands: tuple[str, ...] = ()) -> WindowOutput:
    return WindowOutput(
        sequence=seq, window_end=T0 + seq * HOP,
        decoded=np.array([speed, 1.0, -2.0], dtype=np.float32),
        predicted=np.zeros(4, dtype=np.float32),
        commands=tuple(Command(rule=f"rule-{name}", name=name, sinks=("zmq",))
                       for name in commands))


def _until(condition, api, what: str) -> None:
    """Call the GUI's periodic hook (as its timer does) until `condition()` holds."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; counts {dict(api.counts)}")
        api.plot_update()
        time.sleep(0.001)


def _events(board: StandInBoard) -> list[str]:
    return [call[1] for call in board.calls if call[0] == "trigger_event"]


def _make_api(rtnf_api, addresses, **attributes):
    cls = type("ApiUnderTest", (rtnf_api.RtnfApi,), {"ADDRESSES": tuple(addresses),
                                                      **attributes})
    api = cls()
    board = StandInBoard(events={"rtnf_running": 1, "rtnf_still": 2},
                         variables={"rtnf_speed": 0.0, "api_class": "rtnf_api"})
    log: list[str] = []
    api.interface(board, lambda text, end="\n": log.append(text))
    return api, board, log


def _join(api, sink, first_seq: int = 0) -> int:
    """Publish windows until the Api receives one (PUB/SUB slow joiner); returns the next seq
    after every warm-up window has been received. Warm-up speeds are NaN, which the Api never
    sends to the task, so the warm-up leaves no set_variable behind."""
    seq = first_seq
    deadline = time.monotonic() + TIMEOUT_S
    while api.counts["decoded"] == 0:
        assert time.monotonic() < deadline, "the Api never received rtnf's messages"
        sink.publish(_output(seq, speed=float("nan")))
        seq += 1
        time.sleep(0.002)
        api.plot_update()
    _until(lambda: api.last_sequence == seq - 1, api, "the last warm-up window")
    assert api.board.calls == []
    return seq


def _publish_and_wait(api, sink, output: WindowOutput) -> None:
    """One window at a time, waiting until its decoded message and its commands (separate
    messages, which may arrive in different GUI updates) have all been read."""
    controls = api.counts["control"] + len(output.commands)
    sink.publish(output)
    _until(lambda: api.last_sequence == output.sequence and api.counts["control"] == controls,
           api, f"window {output.sequence}")


def test_loaded_through_pycontrols_import_path(rtnf_api):
    assert rtnf_api.PYCONTROL_GUI is True
    assert rtnf_api.Api is StandInApi
    # pyControl imports api_classes.<name> and takes the class <name> from it.
    assert rtnf_api.rtnf_api is rtnf_api.RtnfApi
    assert issubclass(rtnf_api.rtnf_api, StandInApi)


def test_overrides_only_pycontrols_hooks(rtnf_api):
    own = {name for name, value in vars(rtnf_api.RtnfApi).items() if callable(value)}
    overridden = own & set(dir(StandInApi))
    assert overridden <= PYCONTROL_HOOKS, overridden
    assert not overridden & (PYCONTROL_CALLS | PYCONTROL_INTERNAL)
    assert (PYCONTROL_HOOKS - {"__init__"}) <= own


def test_fallback_stand_in_only_outside_pycontrol():
    if importlib.util.find_spec("source") is not None:
        pytest.skip("a package named `source` is importable here")
    module = _load("rtnf_api_outside_pycontrol")
    assert module.PYCONTROL_GUI is False
    for name in PYCONTROL_HOOKS | PYCONTROL_CALLS | {"interface"}:
        assert hasattr(module.Api, name), name


def test_events_and_variables_in_order(rtnf_api, sink):
    api, board, log = _make_api(rtnf_api, [sink.endpoint], VARIABLE_INTERVAL_S=0.2)
    api.run_start()
    seq = _join(api, sink)
    script = {1: ("running",), 4: ("still",), 6: ("reward",), 8: ("running", "still")}
    for i in range(10):
        _publish_and_wait(api, sink, _output(seq + i, speed=10.0 + i,
                                             commands=script.get(i, ())))

    assert _events(board) == ["rtnf_running", "rtnf_still", "rtnf_running", "rtnf_still"]
    assert all(call[2] == "a" for call in board.calls if call[0] == "trigger_event")
    # The first finite value at once, then one set per 0.2 s of stream time (4 windows).
    variables = [call[1:3] for call in board.calls if call[0] == "set_variable"]
    assert variables == [("rtnf_speed", 10.0), ("rtnf_speed", 14.0), ("rtnf_speed", 18.0)]
    assert api.counts["unmapped"] == 1
    assert any("'reward'" in line and "COMMAND_EVENTS" in line for line in log)
    assert api.counts["events"] == 4 and api.counts["control"] == 5
    assert api.gaps == 0 and api.missing_windows == 0 and not api.malformed
    # pyControl only calls process_data_user when the board sent data: it drains as well.
    sink.publish(_output(seq + 10, commands=("running",)))
    deadline = time.monotonic() + TIMEOUT_S
    while api.last_sequence != seq + 10 or api.counts["control"] != 6:
        assert time.monotonic() < deadline
        api.process_data_user({"states": [], "events": [], "prints": [], "vars": [],
                               "analog": []})
        time.sleep(0.001)
    assert _events(board)[-1] == "rtnf_running" and len(_events(board)) == 5
    api.run_stop()
    assert log[-1].startswith("rtnf_api: 6 commands (5 events, 1 unmapped, 0 stale)")


def test_sequence_gaps_and_restart(rtnf_api, sink):
    api, _board, log = _make_api(rtnf_api, [sink.endpoint])
    api.run_start()
    seq = _join(api, sink)
    _publish_and_wait(api, sink, _output(seq))
    _publish_and_wait(api, sink, _output(seq + 4))  # 3 windows missing
    _publish_and_wait(api, sink, _output(seq + 5))
    _publish_and_wait(api, sink, _output(seq + 7))  # 1 more
    assert (api.gaps, api.missing_windows) == (2, 4)
    _publish_and_wait(api, sink, _output(0))  # rtnf restarted: sequence back at 0
    _publish_and_wait(api, sink, _output(1))
    assert api.counts["restarts"] == 1
    assert (api.gaps, api.missing_windows) == (2, 4)
    api.run_stop()
    assert "4 windows missing in 2 gaps" in log[-1] and "1 restarts" in log[-1]


def test_malformed_messages_are_counted_and_skipped(rtnf_api, sink, context):
    garbage = context.socket(zmq.XPUB)  # XPUB: its subscription messages say the Api joined
    garbage.setsockopt(zmq.LINGER, 0)
    port = garbage.bind_to_random_port("tcp://127.0.0.1")
    api, board, log = _make_api(rtnf_api, [sink.endpoint, f"tcp://127.0.0.1:{port}"])
    api.run_start()
    subscriptions = set()
    deadline = time.monotonic() + TIMEOUT_S
    while subscriptions != {b"\x01control", b"\x01decoded"}:
        assert time.monotonic() < deadline
        if garbage.poll(10):
            subscriptions.add(garbage.recv())
    seq = _join(api, sink)
    newest = f"{T0 + (seq - 1) * HOP:.6f}".encode()
    bad = [
        [b"control"],                                        # one frame
        [b"control", b"1,2.0,running,r", b"extra"],          # three frames
        [b"controls", b"1,2.0,running,r"],                   # prefix-matched, other topic
        [b"control", b"\xff\xfe\x00"],                       # not UTF-8
        [b"control", b"1,2.0,running"],                      # three fields
        [b"control", b"x,2.0,running,r"],                    # bad seq
        [b"control", b"-1,2.0,running,r"],                   # negative seq
        [b"control", b"1,nan,running,r"],                    # non-finite window_end
        [b"control", b"1,2.0,run ning,r"],                   # not an rtnf name
        [b"decoded", b"1,2.0,1,2"],                          # two values for three targets
        [b"decoded", b"1,2.0,1,2,1_0"],                      # float() would take it
        [b"decoded", b"1,2.0," + b"9" * 70000 + b",1,2"],    # oversized
        [b"control", b"7," + newest + b",sentinel,r"],       # valid: marks the end
    ]
    for frames in bad:
        garbage.send_multipart(frames)
    _until(lambda: api.counts["unmapped"] == 1, api, "the sentinel")
    assert sum(api.malformed.values()) == len(bad) - 1
    assert api.malformed["not two frames"] == 2
    assert api.malformed["unknown topic"] == 1
    assert api.malformed["not UTF-8 text"] == 1
    assert api.malformed["bad sequence number"] == 2
    assert api.malformed["payload too large"] == 1
    assert board.calls == []  # nothing reached the task
    # It carries on: rtnf's next windows still act.
    _publish_and_wait(api, sink, _output(seq, commands=("running",)))
    assert _events(board) == ["rtnf_running"]
    # Each reason is logged once, not once per message.
    assert sum("bad sequence number" in line for line in log) == 1
    api.run_stop()
    assert f"{len(bad) - 1} malformed" in log[-1]


def test_late_command_dropped_non_finite_not_sent(rtnf_api, sink):
    api, board, _log = _make_api(rtnf_api, [sink.endpoint])
    api.run_start()
    seq = _join(api, sink)
    non_finite = api.counts["non_finite"]
    _publish_and_wait(api, sink, _output(seq + 20, speed=float("nan")))
    assert api.counts["non_finite"] == non_finite + 1
    assert not [call for call in board.calls if call[0] == "set_variable"]
    # A command for a window 1 s older than the newest one received is stale.
    late = _output(seq, commands=("running",))
    sink.publish(WindowOutput(late.sequence, late.window_end, late.decoded[:0],
                              late.predicted[:0], late.commands))  # control only
    _until(lambda: api.counts["control"] == 1, api, "the late command")
    assert api.counts["stale"] == 1 and board.calls == []
    api.run_stop()


def test_bounded_per_call(rtnf_api, sink):
    api, _board, _log = _make_api(rtnf_api, [sink.endpoint], MAX_MESSAGES_PER_CALL=5)
    api.run_start()
    seq = _join(api, sink)
    for i in range(12):
        sink.publish(_output(seq + i))
    time.sleep(0.2)  # let them all reach the Api's socket
    reads = []
    while sum(reads) < 12:
        reads.append(api.drain())
        assert len(reads) < 100
    assert max(reads) == 5 and reads[:3] == [5, 5, 2]
    api.run_stop()


def test_never_blocks(rtnf_api, context):
    # Nothing bound at the address: connecting and polling still return at once.
    probe = context.socket(zmq.PUB)
    port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(linger=0)
    api, board, _log = _make_api(rtnf_api, [f"tcp://127.0.0.1:{port}"])
    started = time.perf_counter()
    api.run_start()
    durations = []
    for _ in range(200):
        t = time.perf_counter()
        api.plot_update()
        durations.append(time.perf_counter() - t)
    api.run_stop()
    assert time.perf_counter() - started < 1.0
    assert max(durations) < 0.05 and sorted(durations)[100] < 0.001
    assert board.calls == []


def test_run_stop_closes_and_run_start_reopens(rtnf_api, sink):
    api, board, _log = _make_api(rtnf_api, [sink.endpoint])
    api.run_start()
    seq = _join(api, sink)
    api.run_stop()
    assert api.drain() == 0
    for i in range(5):
        sink.publish(_output(seq + i, commands=("running",)))
    api.plot_update()
    assert board.calls == []
    api.run_start()  # the next run: counters start over
    assert api.counts["decoded"] == 0
    _join(api, sink, first_seq=seq + 5)
    api.run_stop()


def test_configuration_mistakes_refused(rtnf_api):
    with pytest.raises(ValueError, match="DECODED_TARGETS"):
        type("Bad", (rtnf_api.RtnfApi,), {"DECODED_VARIABLES": {"pupil": "v_pupil"}})()
    with pytest.raises(ValueError, match="SUBSCRIBE_DECODED"):
        type("Bad", (rtnf_api.RtnfApi,), {"SUBSCRIBE_DECODED": False})()


def test_task_names_checked_at_start(rtnf_api, context):
    api, board, log = _make_api(rtnf_api, ["tcp://127.0.0.1:1"])
    del board.sm_info.events["rtnf_still"]
    api.run_start()
    api.run_stop()
    assert any("['rtnf_still']" in line and "events" in line for line in log)


@pytest.mark.parametrize("payload, expected", [
    (b"12,1000.050000,running,run-detector", (12, 1000.05, "running", "run-detector")),
    (b"0,-0.000000,a.b:c_d-e,r", (0, -0.0, "a.b:c_d-e", "r")),
])
def test_parse_control(rtnf_api, payload, expected):
    assert rtnf_api.parse_control(payload) == expected


def test_parse_decoded(rtnf_api):
    seq, t, values = rtnf_api.parse_decoded(b"3,12.500000,1e+06,NaN,-Infinity", 3)
    assert (seq, t, values[0]) == (3, 12.5, 1e6)
    assert np.isnan(values[1]) and values[2] == -np.inf
    with pytest.raises(rtnf_api.MalformedMessage, match="bad value"):
        rtnf_api.parse_decoded(b"3,12.5,inf,1,2", 3)  # rtnf writes Infinity


def test_task_file_matches_the_api(rtnf_api):
    """The example task lists the events and variables the Api's defaults use."""
    text = TASK_FILE.read_text()
    assert 'v.api_class = "rtnf_api"' in text
    for event in rtnf_api.RtnfApi.COMMAND_EVENTS.values():
        assert f'"{event}"' in text.split("events =", 1)[1].split("\n", 1)[0]
    for variable in rtnf_api.RtnfApi.DECODED_VARIABLES.values():
        assert f"v.{variable} =" in text
    compile(text, str(TASK_FILE), "exec")  # valid Python syntax (MicroPython runs it)
