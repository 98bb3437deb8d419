"""plugins/bpod: the shipped rtnf config, a real `rtnf run` whose control rule reaches a pty
standing in for the state machine's App port (bytes, DTR, reopening a vanished port) and a UDP
socket standing in for pybpod's net_port, the stand-in script, and the two Bpod protocols'
state descriptions (MATLAB and pybpod are not available here: their states are read as data)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import py_compile
import queue
import re
import selectors
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import tty
from pathlib import Path

import numpy as np
import pytest
import yaml

from rtnf.bench.untrained_bundle import write_untrained_bundle
from rtnf.config import load_config
from rtnf.data.sim import simulate
from rtnf.rt.closed_loop import free_tcp_port
from rtnf.rt.rules import Rules
from rtnf.stream.sinks import BpodSerialSink, BpodUdpSink
from rtnf.stream.window_output import Command, OutputLayout, WindowOutput

PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "bpod"
SHIPPED = PLUGIN / "rtnf-bpod.yaml"
# A small simulated rig; `rtnf run --stream sim` gets the same settings through --set, so it
# streams the very session the bundle is written for.
RIG = {"simulation.neurons": 40, "simulation.minutes": 0.5, "simulation.seed": 21,
       "simulation.sessions": 1, "rig.profile": "ephys"}
RUN_SECONDS = 8.0
TOGGLE_WINDOWS = 10  # the test's rule condition flips every 10 windows (0.5 s)


def shipped() -> dict:
    return yaml.safe_load(SHIPPED.read_text())


def layout(n_units: int = 40) -> OutputLayout:
    return OutputLayout(targets=("speed", "gaze_phi", "gaze_theta"),
                        target_units=("cm/s", "deg", "deg"),
                        unit_ids=np.arange(n_units, dtype=np.int64), window=0.05, hop=0.05)


# ---------------------------------------------------------------------------------------------
# (1) The shipped configuration
# ---------------------------------------------------------------------------------------------


def test_shipped_config_validates_and_its_rule_sends_codes_1_and_2():
    config = load_config([SHIPPED])
    assert config.outputs.bpod.net_port == 36000 and config.outputs.bpod.serial_port == ""
    rules = Rules.from_config(config.control.rules, layout())
    (rule,) = rules.rules
    assert (rule.command.name, rule.command.soft_code) == ("running", 1)
    assert (rule.release.name, rule.release.soft_code) == ("resting", 2)
    assert set(rule.command.sinks) == {"lsl", "bpod_serial", "bpod_udp"}
    # The rule fires on decoded running and lets go below the hysteresis band.
    predicted = np.zeros(40, np.float32)
    fired = [rules.evaluate(k, 0.05 * k, np.array([v, 0.0, 0.0], np.float32), predicted)
             for k, v in enumerate([0, 6, 6, 6, 6.0, 4.5, 3.9, 3.9])]
    names = [[c.name for c in commands] for commands in fired]
    assert names == [[], [], [], ["running"], [], [], ["resting"], []]
    result = subprocess.run([sys.executable, "-m", "rtnf.cli", "config", "check", str(SHIPPED)],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip().endswith("valid"), result.stderr


# ---------------------------------------------------------------------------------------------
# (2, 3) A real `rtnf run`: pty for the App port, UDP socket for pybpod
# ---------------------------------------------------------------------------------------------


def toggle_package(root: Path) -> str:
    """A lab rule on sys.path (a module and its *.dist-info, as an installed package): true for
    TOGGLE_WINDOWS windows, false for the next TOGGLE_WINDOWS, and so on; so the shipped rule
    fires `running` and `resting` in turn, at times the test knows."""
    root.mkdir()
    (root / "rtnf_bpod_test_toggle.py").write_text(textwrap.dedent(f"""
        calls = [0]

        def toggle(decoded, predicted, layout):
            calls[0] += 1
            return (calls[0] - 1) // {TOGGLE_WINDOWS} % 2 == 0
        """))
    dist_info = root / "rtnf_bpod_test_toggle-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: rtnf-bpod-test-toggle\n"
                                        "Version: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        "[rtnf.rules]\nbpod-test-toggle = rtnf_bpod_test_toggle:toggle\n")
    return "bpod-test-toggle"


def strace_usable() -> bool:
    """strace is installed and may trace here (ptrace allowed, --seccomp-bpf known)."""
    if shutil.which("strace") is None:
        return False
    probe = subprocess.run(["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=ioctl", "-o",
                            os.devnull, "true"], check=False, capture_output=True, timeout=30)
    return probe.returncode == 0


def raw_pty() -> tuple[int, int]:
    master, slave = os.openpty()
    tty.setraw(master)
    return master, slave


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """An untrained bundle for the simulated rig's session. Not compiled: the run uses the torch
    backend (decoding skill and engine speed do not matter here; compiling for ONNX Runtime
    would add ~15 s)."""
    config = load_config(overrides=[f"{key}={value}" for key, value in RIG.items()])
    (session,) = simulate(config.simulation, RIG["rig.profile"])
    return write_untrained_bundle(session, config, tmp_path_factory.mktemp("bpod") / "bundle")


@pytest.fixture(scope="module")
def closed_loop(bundle, tmp_path_factory):
    """`rtnf run --stream sim --config <rtnf-bpod.yaml, ports replaced>` for RUN_SECONDS, under
    strace (ioctl and openat only) when it is installed. Midway the App port's pty vanishes and
    a new one appears under the same name, as when a USB cable is pulled and plugged back."""
    tmp = tmp_path_factory.mktemp("bpod-run")
    settings = shipped()
    link = tmp / "bpod-app-port"  # what outputs.bpod.serial_port names
    first_master, first_slave = raw_pty()
    link.symlink_to(os.ttyname(first_slave))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    settings["outputs"]["bpod"].update(serial_port=str(link), net_port=udp.getsockname()[1])
    settings["outputs"]["zmq"] = {"address": f"tcp://127.0.0.1:{free_tcp_port()}"}
    settings["recording"] = {"directory": str(tmp / "runs"), "flush_interval": 0.2}
    # The shipped rule, with a condition that is certain to hold (speed above -1e9) ANDed with
    # the toggling lab rule: its commands, soft codes and sinks are as shipped.
    rule = settings["control"]["rules"][0]
    rule["when"] = [{"value": "decoded.speed", "above": -1e9}]
    rule["entry_point"] = toggle_package(tmp / "lab")
    config_file = tmp / "run.yaml"
    config_file.write_text(yaml.safe_dump(settings))

    command = [sys.executable, "-m", "rtnf.cli", "run", "--stream", "sim", "--bundle", str(bundle),
               "--config", str(config_file), "--seconds", str(RUN_SECONDS), "--json",
               "--backend", "torch",
               *[arg for key, value in RIG.items() for arg in ("--set", f"{key}={value}")]]
    trace = tmp / "strace.log"
    if strace_usable():
        command = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=openat,ioctl",
                   "-o", str(trace), *command]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp / "lab"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=environment)
    received = {"first": b"", "second": b"", "udp": []}
    second_master, second_slave = raw_pty()
    selector = selectors.DefaultSelector()
    selector.register(first_master, selectors.EVENT_READ, "first")
    selector.register(udp, selectors.EVENT_READ, "udp")
    swapped = False
    deadline = time.monotonic() + RUN_SECONDS + 60
    try:
        while process.poll() is None and time.monotonic() < deadline:
            for key, _ in selector.select(0.1):
                if key.data == "udp":
                    received["udp"].append(udp.recv(64))
                else:
                    received[key.data] += os.read(key.fd, 64)
            if not swapped and len(received["first"]) >= 2:
                # The device vanishes (its node with it); a new one comes up under the name.
                selector.unregister(first_master)
                os.close(first_master)
                link.unlink()
                link.symlink_to(os.ttyname(second_slave))
                selector.register(second_master, selectors.EVENT_READ, "second")
                swapped = True
        out, err = process.communicate(timeout=30)
        for key, _ in selector.select(0.2):  # what arrived as the run ended
            if key.data == "udp":
                received["udp"].append(udp.recv(64))
            else:
                received[key.data] += os.read(key.fd, 64)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        selector.close()
        for fd in (first_slave, second_master, second_slave):
            os.close(fd)
        if not swapped:
            os.close(first_master)
        udp.close()
    assert process.returncode == 0, err[-3000:]
    return {"summary": json.loads(out), "received": received, "swapped": swapped,
            "link": link, "trace": trace.read_text() if trace.exists() else None}


def alternates(codes: list[int]) -> bool:
    return all(a != b for a, b in itertools.pairwise(codes)) and set(codes) <= {1, 2}


def test_run_sends_the_rules_soft_codes_to_the_app_port_and_pybpod(closed_loop):
    summary, received = closed_loop["summary"], closed_loop["received"]
    assert summary["windows"] > 0.6 * RUN_SECONDS / 0.05
    assert set(summary["started"]["sinks"]) >= {"bpod_serial", "bpod_udp"}
    assert "(soft code 1 / 2)" in " ".join(summary["started"]["rules"])
    # pybpod's stand-in: every command, as the text pybpod's handle_inline parses.
    datagrams = received["udp"]
    assert len(datagrams) >= 6, datagrams
    assert datagrams[:2] == [b"SoftCode1", b"SoftCode2"]
    assert set(datagrams) == {b"SoftCode1", b"SoftCode2"}
    assert alternates([int(d[-1:]) for d in datagrams])
    # The App port: the same commands as single bytes, running (1) first.
    first = list(received["first"])
    assert first[:2] == [1, 2] and alternates(first)


def test_the_app_port_comes_back_after_it_vanished(closed_loop):
    """Pulling the App port's cable loses the commands until rtnf reopens the port (at most
    once a second), then they flow again, to the new device under the same name."""
    received, errors = closed_loop["received"], closed_loop["summary"]["sink_errors"]
    assert closed_loop["swapped"]
    second = list(received["second"])
    assert len(second) >= 2 and alternates(second), second
    serial_errors = errors["bpod_serial"]
    failed = {k: v for k, v in serial_errors.items() if k.startswith("bpod serial: write failed")}
    assert list(failed.values()) == [1], serial_errors  # the write that found the port gone
    unavailable = serial_errors.get("bpod serial: port unavailable, command dropped", 0)
    assert "bpod serial: reopen failed" not in serial_errors
    # Every command reached pybpod; the App port got all but the dropped ones.
    sent = len(received["udp"])
    assert len(received["first"]) + len(second) + 1 + unavailable == sent
    assert "bpod_udp" not in errors


def test_dtr_is_asserted_each_time_the_app_port_opens(closed_loop):
    """A Linux pty has no modem lines (TIOCMGET/TIOCMBIS answer ENOTTY), so DTR cannot be read
    back from the stand-in; what rtnf asks of the port is visible to strace: after each open of
    the App port (the first and the reopen), ioctl(fd, TIOCMBIS, [TIOCM_DTR]) on that fd, which
    a real USB CDC-ACM App port turns into DTR high."""
    if closed_loop["trace"] is None:
        pytest.skip("strace is not usable here: DTR requests cannot be observed")
    link = re.escape(str(closed_loop["link"]))
    lines = closed_loop["trace"].splitlines()
    opens = []  # (line index, fd) of each open of the App port
    for i, line in enumerate(lines):
        if not re.search(rf'openat\(AT_FDCWD, "{link}"', line):
            continue
        if "<unfinished ...>" in line:  # another thread's syscall came in between
            pid = line.split()[0]
            line = next(later for later in lines[i + 1:]
                        if later.startswith(pid) and "<... openat resumed>" in later)
        result = re.search(r"\) += (-?\d+)", line)
        assert result, line
        if result.group(1) != "-1":  # a failed open (ENOENT while the link is swapped) opens nothing
            opens.append((i, result.group(1)))
    assert len(opens) == 2, opens  # the first open and the reopen
    for (index, fd), (end, _) in zip(opens, [*opens[1:], (len(lines), None)]):
        # between this open and the next (an unfinished ioctl line ends before its ")")
        dtr = [line for line in lines[index:end]
               if re.search(rf"ioctl\({fd}, TIOCMBIS, \[TIOCM_DTR\]", line)]
        assert dtr, f"no DTR request on fd {fd} after opening the App port"


# ---------------------------------------------------------------------------------------------
# (4) The stand-in script
# ---------------------------------------------------------------------------------------------


class Lines:
    """A process's stdout lines, read by a thread (so a wait can time out)."""

    def __init__(self, process: subprocess.Popen):
        self.queue: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=lambda: [self.queue.put(line)
                                                       for line in process.stdout], daemon=True)
        self.thread.start()

    def json(self, timeout: float = 10.0) -> dict:
        try:
            return json.loads(self.queue.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(f"nothing printed within {timeout} s") from None


def test_standin_prints_the_soft_codes_rtnf_sinks_send(tmp_path):
    link = tmp_path / "app"
    standin = subprocess.Popen([sys.executable, str(PLUGIN / "standin.py"), "--json",
                                "--udp-port", "0", "--app-link", str(link), "--seconds", "30"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = Lines(standin)
    try:
        ready = lines.json()["ready"]
        port = int(ready["udp"].rsplit(":", 1)[1])
        assert link.is_symlink()
        sinks = [BpodSerialSink(str(link)), BpodUdpSink("127.0.0.1", port)]
        both = ("bpod_serial", "bpod_udp")
        for sequence, (name, code) in enumerate([("running", 1), ("resting", 2)]):
            output = WindowOutput(sequence, 10.0 + 0.05 * sequence, np.zeros(3, np.float32),
                                  np.zeros(40, np.float32), (Command("running", name, both, code),))
            for sink in sinks:
                sink.publish(output)
            time.sleep(0.05)
        for sink in sinks:
            sink.close()
        printed = [lines.json() for _ in range(4)]
        seen = {(line["via"], line["soft_code"], line["event"], line["command"], line["raw"])
                for line in printed}
        assert seen == {("app-port", 1, "APP_SoftCode1", "running", "\x01"),
                        ("app-port", 2, "APP_SoftCode2", "resting", "\x02"),
                        ("udp", 0, "SoftCode1", "running", "SoftCode1"),
                        ("udp", 1, "SoftCode2", "resting", "SoftCode2")}
        assert all(abs(line["t"] - time.time()) < 30 for line in printed)
    finally:
        standin.terminate()
        standin.communicate(timeout=10)
    assert standin.returncode == 0
    assert not link.is_symlink()  # the stand-in removes its link when it stops


# ---------------------------------------------------------------------------------------------
# (5) The protocols: their state descriptions, without MATLAB or pybpod
# ---------------------------------------------------------------------------------------------


def pybpod_protocol():
    path = PLUGIN / "pybpod" / "rtnf_closed_loop.py"
    py_compile.compile(str(path), doraise=True)
    spec = importlib.util.spec_from_file_location("rtnf_bpod_pybpod_protocol", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


EXPECTED_STATES = {  # the README's diagram, for both protocols (event names differ)
    "WaitForRunning": {"running": "Reward", "Tup": "exit"},
    "Reward": {"Tup": "Running", "resting": "Resting"},
    "Running": {"resting": "Resting", "Tup": "Resting"},
    "Resting": {"Tup": "exit"},
}


def named(transitions: dict[str, str], running: str, resting: str) -> dict[str, str]:
    names = {"running": running, "resting": resting}
    return {names.get(event, event): target for event, target in transitions.items()}


def test_pybpod_protocol_reacts_to_rtnfs_udp_soft_codes():
    protocol = pybpod_protocol()
    settings = protocol.Settings()
    rule = shipped()["control"]["rules"][0]
    assert (settings.running_code, settings.resting_code) == (rule["soft_code"],
                                                               rule["release_soft_code"])
    assert settings.net_port == shipped()["outputs"]["bpod"]["net_port"]
    states = protocol.trial_states(settings)
    assert [state.name for state in states] == list(EXPECTED_STATES)
    # rtnf's datagram SoftCode<k> -> pybpod soft code k - 1 -> the event 'SoftCode<k>'.
    for state in states:
        assert state.transitions == named(EXPECTED_STATES[state.name], "SoftCode1", "SoftCode2")
        assert state.timer > 0
    outputs = {state.name: dict(state.outputs) for state in states}
    assert outputs["Reward"]["Valve1"] == 1 and outputs["Running"]["BNC1"] == 1
    assert outputs["WaitForRunning"] == outputs["Resting"] == {}
    other = protocol.trial_states(protocol.Settings(running_code=3, resting_code=7))
    assert other[0].transitions == {"SoftCode3": "Reward", "Tup": "exit"}
    for code in (0, 10):
        with pytest.raises(ValueError):
            protocol.softcode_event(code)
    with pytest.raises(ValueError):
        protocol.trial_states(protocol.Settings(running_code=2, resting_code=2))
    # The protocol's command line works without pybpod installed (it runs only on the rig).
    result = subprocess.run([sys.executable, str(PLUGIN / "pybpod" / "rtnf_closed_loop.py"),
                             "--help"], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--net-port" in result.stdout


def matlab_states(text: str) -> dict[str, dict[str, str]]:
    """Each AddState's name -> its StateChangeConditions, from the MATLAB source."""
    code = "\n".join(line.split("%", 1)[0] for line in text.splitlines())
    code = re.sub(r"\.\.\.\s*\n", " ", code)
    states = {}
    for match in re.finditer(r"AddState\(sma,\s*'Name',\s*'(\w+)',(.*?)\);", code, re.DOTALL):
        conditions = re.search(r"'StateChangeConditions',\s*\{([^}]*)\}", match.group(2))
        items = [item.strip().strip("'") for item in conditions.group(1).split(",")]
        states[match.group(1)] = dict(zip(items[::2], items[1::2]))
    return states


def test_matlab_protocol_reacts_to_app_port_soft_codes():
    text = (PLUGIN / "matlab" / "rtnf_closed_loop.m").read_text()
    assert text.startswith("function rtnf_closed_loop")
    rule = shipped()["control"]["rules"][0]
    assert re.search(rf"S\.GUI\.RunningCode = {rule['soft_code']};", text)
    assert re.search(rf"S\.GUI\.RestingCode = {rule['release_soft_code']};", text)
    assert "runningEvent = ['APP_SoftCode' num2str(S.GUI.RunningCode)];" in text
    assert "restingEvent = ['APP_SoftCode' num2str(S.GUI.RestingCode)];" in text
    states = matlab_states(text)
    assert list(states) == list(EXPECTED_STATES)
    for name, conditions in states.items():
        assert conditions == named(EXPECTED_STATES[name], "runningEvent", "restingEvent")
    for call in ("SendStateMachine(sma);", "RawEvents = RunStateMachine;",
                 "AddTrialEvents(BpodSystem.Data, RawEvents)", "SaveBpodSessionData;",
                 "HandlePauseCondition;", "BpodSystem.HW.AppSerialPortName"):
        assert call in text
