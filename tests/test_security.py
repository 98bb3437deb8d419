"""Security defaults (README "Security"):

- nothing in the package can run code from data: no pickle (or its relatives), eval / exec,
  unsafe YAML loading, `allow_pickle=True`, `torch.load` without `weights_only=True`, or a shell
  (a scan of rtnf/**/*.py's syntax trees; the scanner itself is tested on a bad example);
- every default socket address, in the configuration's dataclasses, in both copies of
  rtnf.yaml and in the code, is on this machine (127.0.0.1), and LSL discovery defaults to
  loopback;
- message size limits: an oversized message sent through a real ZeroMQ socket never reaches the
  loop and the source keeps working (counted by rtnf, or dropped by ZeroMQ once the SUB socket
  sets ZMQ_MAXMSGSIZE), and the SUB sockets of `ZmqSource` and `OpenEphysSource` should set
  ZMQ_MAXMSGSIZE so that ZeroMQ drops such a message before it is read into memory. (libzmq
  then treats the message as a protocol error and closes the connection WITHOUT reconnecting:
  a source that sets the option must notice the disconnect and connect again, which the first
  test checks.)
- memory limits: a real ZeroMQ publisher flooding a `ZmqSource` that is not polled fills its
  queue to its byte budget and no further (ZeroMQ's RCVHWM x MAXMSGSIZE within it too), every
  message beyond counted, and the source goes on; a real LSL outlet declaring more channels
  than rtnf takes for its kind, a string format or more data than an inlet may buffer is
  refused with one line naming it, the value and the limit, before any inlet exists; an
  accepted one buffers as long as fits in the budget (and delivers).

A bundle whose files were modified is refused: tests/test_bundle.py
(test_damaged_bundle_is_refused_naming_the_file, test_edited_hash_in_manifest_is_refused).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import ipaddress
import itertools
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
import zmq

import rtnf
from rtnf.config import Config, LslSourceConfig, SourceConfig, default_config_text
from rtnf.errors import RtnfError
from rtnf.stream.handover import QUEUE_FULL
from rtnf.stream.lslconfig import configure_lsl, import_pylsl
from rtnf.stream.openephys import OpenEphysSource, encode_spike_event
from rtnf.stream.sim_stream import stream_session
from rtnf.stream.sources import LSL_BUFFER_BYTES, LSL_RESERVE_S, LslSource, ZmqSource
from rtnf.stream.zmq_messages import HEADER, encode_spikes

PACKAGE = Path(rtnf.__file__).parent
ROOT_CONFIG = PACKAGE.parent / "rtnf.yaml"
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal",
              "shelve"}
UNSAFE_CALLS = {"eval": "eval()", "exec": "exec()", "os.system": "a shell (os.system)",
                "os.popen": "a shell (os.popen)", "yaml.unsafe_load": "yaml.unsafe_load()",
                "yaml.full_load": "yaml.full_load()", "yaml.load_all": "yaml.load_all()"}
SAFE_LOADERS = ("SafeLoader", "CSafeLoader")
NETWORK_ENDPOINT = re.compile(r"^(?:tcp|udp|pgm|epgm|ws|wss)://(\[[^\]]*\]|[^:/]+)")
LOCAL_SCHEMES = ("ipc://", "inproc://")  # Unix sockets, in-process: on this machine by nature
LOOPBACK_NAMES = {"localhost"}


# ---------------------------------------------------------------------------------------------
# No code from data
# ---------------------------------------------------------------------------------------------


def _aliases(tree: ast.AST) -> dict[str, str]:
    """`import numpy as np` -> {"np": "numpy"}."""
    return {alias.asname: alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
            for alias in node.names if alias.asname}


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str:
    """The dotted name of a call's target (`yaml.load`), with import aliases undone."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _call_problem(call: ast.Call, aliases: dict[str, str]) -> str | None:
    name = _dotted(call.func, aliases)
    keywords = {keyword.arg: keyword.value for keyword in call.keywords if keyword.arg}
    if name in UNSAFE_CALLS:
        return UNSAFE_CALLS[name]
    if name == "yaml.load":
        loader = keywords.get("Loader", call.args[1] if len(call.args) > 1 else None)
        if not (loader is not None and _dotted(loader, aliases).endswith(SAFE_LOADERS)):
            return "yaml.load() without SafeLoader"
    if name == "torch.load" and not _is_true(keywords.get("weights_only")):
        return "torch.load() without weights_only=True"
    if _is_true(keywords.get("allow_pickle")):
        return "allow_pickle=True"
    if _is_true(keywords.get("shell")):
        return "shell=True"
    return None


def unsafe_code(source: str, name: str) -> list[str]:
    """`name:line: what` for every way in `source` to run code that came from data."""
    tree = ast.parse(source, name)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        problem = None
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
            problem = next((f"import {m}" for m in modules if m.split(".")[0] in UNPICKLERS),
                           None)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLERS:
            problem = f"from {node.module} import"
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "yaml"):
            names = {alias.name for alias in node.names}
            if names & {"load", "unsafe_load", "full_load"}:
                problem = f"from {node.module} import a loader (call it by its module)"
        elif isinstance(node, ast.Call):
            problem = _call_problem(node, aliases)
        if problem:
            found.append(f"{name}:{node.lineno}: {problem}")
    return found


def package_sources() -> Iterator[tuple[str, str]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield str(path.relative_to(PACKAGE.parent)), path.read_text()


def test_the_package_never_runs_code_from_data():
    sources = list(package_sources())
    assert len(sources) > 50
    found = [problem for name, text in sources for problem in unsafe_code(text, name)]
    assert found == []


BAD_EXAMPLE = """
import pickle
from marshal import loads
import yaml as y
import numpy as np
import subprocess
import torch
eval("1")
exec("x = 1")
y.load(text)
y.load(text, Loader=y.SafeLoader)
y.safe_load(text)
torch.load("weights.pt")
torch.load("weights.pt", weights_only=True)
np.load("a.npy", allow_pickle=True)
np.load("a.npy")
subprocess.run("ls", shell=True)
model.eval()
"""


def test_the_scan_finds_each_unsafe_pattern():
    found = unsafe_code(BAD_EXAMPLE, "bad.py")
    assert [line.split(": ", 1)[1] for line in found] == [
        "import pickle", "from marshal import", "eval()", "exec()",
        "yaml.load() without SafeLoader", "torch.load() without weights_only=True",
        "allow_pickle=True", "shell=True"]


# ---------------------------------------------------------------------------------------------
# Default addresses stay on this machine
# ---------------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", "" or a host name: not loopback
        return False


def _on_this_machine(value: str) -> bool:
    """An address (`tcp://host:port`, `ipc://path`, ...) or a bare host on this machine."""
    if value.startswith(LOCAL_SCHEMES):
        return True
    match = NETWORK_ENDPOINT.match(value)
    return _is_loopback(match.group(1) if match else value)


def endpoints(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(key path, value) of every string under a key ending in `address` or `host`."""
    if dataclasses.is_dataclass(value):
        value = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    if isinstance(value, dict):
        for key, item in value.items():
            yield from endpoints(item, f"{path}.{key}".lstrip("."))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from endpoints(item, f"{path}[{index}]")
    elif isinstance(value, str) and path.rsplit(".", 1)[-1].endswith(("address", "host")):
        yield path, value


@pytest.mark.parametrize("defaults", [
    pytest.param(Config(), id="config dataclasses"),
    pytest.param(yaml.safe_load(default_config_text()), id="rtnf/resources/rtnf.yaml"),
    pytest.param(yaml.safe_load(ROOT_CONFIG.read_text()), id="rtnf.yaml")])
def test_default_addresses_are_on_this_machine(defaults):
    found = dict(endpoints(defaults))
    # the three sources' ZeroMQ addresses, rtnf's ZeroMQ output, pybpod's UDP host
    assert len(found) >= 5, found
    assert {path: value for path, value in found.items() if not _on_this_machine(value)} == {}
    lsl = defaults.rig.lsl.config if isinstance(defaults, Config) else \
        defaults["rig"]["lsl"]["config"]
    assert lsl == "loopback"


def _code_strings(tree: ast.AST) -> Iterator[ast.Constant]:
    """String constants that are not docstrings (f-string parts included)."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                       ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings:
            yield node


def _bound_hosts(tree: ast.AST) -> Iterator[ast.Constant]:
    """The host of every `x.bind(("host", port))`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "bind" and node.args \
                and isinstance(node.args[0], ast.Tuple) \
                and isinstance(node.args[0].elts[0], ast.Constant):
            yield node.args[0].elts[0]


def test_addresses_in_the_code_are_on_this_machine():
    found, wide = [], []
    for name, text in package_sources():
        tree = ast.parse(text, name)
        for constant in _code_strings(tree):
            if NETWORK_ENDPOINT.match(constant.value):
                found.append(f"{name}:{constant.lineno}: {constant.value}")
                if not _on_this_machine(constant.value):
                    wide.append(found[-1])
        wide += [f"{name}:{host.lineno}: bind to {host.value!r}" for host in _bound_hosts(tree)
                 if not _is_loopback(str(host.value))]
    assert len(found) >= 3  # config defaults, Open Ephys, the simulated rig's publisher
    assert wide == []


@pytest.mark.parametrize("value, on_this_machine", [
    ("tcp://127.0.0.1:5556", True), ("tcp://localhost:5556", True), ("tcp://[::1]:5556", True),
    ("ipc:///tmp/rtnf.ipc", True), ("127.0.0.1", True), ("tcp://*:5556", False),
    ("tcp://0.0.0.0:5556", False), ("tcp://10.0.0.5:5556", False), ("0.0.0.0", False),
    ("", False)])
def test_the_address_check(value, on_this_machine):
    assert _on_this_machine(value) == on_this_machine


def test_the_bind_scan_finds_every_interface_binds():
    tree = ast.parse('probe.bind(("", 0))\nother.bind(("127.0.0.1", 0))\n')
    assert [host.value for host in _bound_hosts(tree)] == ["", "127.0.0.1"]


@pytest.mark.parametrize("function, parameter", [(import_pylsl, "setting"),
                                                 (configure_lsl, "setting"),
                                                 (stream_session, "lsl_setting")])
def test_lsl_discovery_defaults_to_loopback(function, parameter):
    assert inspect.signature(function).parameters[parameter].default == "loopback"


# ---------------------------------------------------------------------------------------------
# Message size limits
# ---------------------------------------------------------------------------------------------

LIMIT = 4096  # bytes: the sources' max_message_bytes here
VALID_UNIT, OVERSIZED_UNIT = 3, 7777
Case = Callable[[str, Callable[[], float]], tuple[Any, Callable[[], list[bytes]], list[bytes]]]


def zmq_case(address: str, clock: Callable[[], float]):
    """rtnf's spike messages: a source, a valid message (maker), an oversized message."""
    source = ZmqSource(address, ["spikes"], max_message_bytes=LIMIT)
    oversized = [b"spikes", encode_spikes(np.full(LIMIT // 12 + 1, clock()),
                                          np.full(LIMIT // 12 + 1, OVERSIZED_UNIT))]
    return source, lambda: [b"spikes", encode_spikes(np.array([clock()]),
                                                     np.array([VALID_UNIT]))], oversized


def openephys_case(address: str, clock: Callable[[], float]):
    """Open Ephys spike events; the oversized one carries a long waveform."""
    source = OpenEphysSource(address, clock=clock, max_message_bytes=LIMIT)
    samples = itertools.count(30, 30)
    oversized = encode_spike_event(0, OVERSIZED_UNIT, num_samples=LIMIT)
    return source, lambda: encode_spike_event(next(samples), VALID_UNIT), oversized


CASES = [pytest.param(zmq_case, id="ZmqSource"), pytest.param(openephys_case, id="OpenEphys")]


def _until_valid_arrives(publisher, source, valid: Callable[[], list[bytes]],
                         timeout: float = 10.0) -> list[int]:
    """Send valid messages until one comes out of the source (ZeroMQ connects, or reconnects,
    in the background); every unit delivered meanwhile."""
    units: list[int] = []
    deadline = time.monotonic() + timeout
    while VALID_UNIT not in units:
        assert time.monotonic() < deadline, "the source delivered nothing"
        publisher.send_multipart(valid())
        units += [int(u) for batch in source.poll(0.05) for u in batch.records]
    return units


@pytest.mark.parametrize("case", CASES)
def test_oversized_message_never_reaches_the_loop(case: Case):
    context = zmq.Context.instance()
    publisher = context.socket(zmq.PUB)
    publisher.setsockopt(zmq.LINGER, 0)
    publisher.bind("tcp://127.0.0.1:0")
    source, valid, oversized = case(publisher.getsockopt_string(zmq.LAST_ENDPOINT),
                                    time.monotonic)
    try:
        _until_valid_arrives(publisher, source, valid)
        assert len(b"".join(oversized)) > LIMIT
        publisher.send_multipart(oversized)
        units = _until_valid_arrives(publisher, source, valid)
        assert OVERSIZED_UNIT not in units
        if source.socket.getsockopt(zmq.MAXMSGSIZE) <= 0:  # else ZeroMQ dropped it unread
            assert source.rejected["message too large"] == 1
    finally:
        source.close()
        publisher.close()


@pytest.mark.parametrize("case", CASES)
def test_sub_sockets_limit_message_size_in_zeromq(case: Case):
    """ZeroMQ drops a message over the limit before it is read into memory (it disconnects
    the peer, which reconnects), so a flood of huge messages costs no memory."""
    source, _, _ = case("tcp://127.0.0.1:9", time.monotonic)  # nothing listens: no traffic
    try:
        assert LIMIT <= source.socket.getsockopt(zmq.MAXMSGSIZE) <= 2 * LIMIT
    finally:
        source.close()


# ---------------------------------------------------------------------------------------------
# Memory limits: what a source holds, whatever its input sends or declares
# ---------------------------------------------------------------------------------------------

QUEUE_LIMIT = 64 << 10  # bytes: the ZmqSource's max_queued_bytes here
SPIKES_PER_MESSAGE = (LIMIT - HEADER.size) // 12  # a binary spike message just under LIMIT


def _flood(clock: Callable[[], float], count: int) -> list[list[bytes]]:
    """`count` binary spike messages of SPIKES_PER_MESSAGE spikes each, in time order."""
    rng = np.random.default_rng(0)
    start = clock()
    return [[b"spikes", encode_spikes(start + 1e-4 * np.arange(k * SPIKES_PER_MESSAGE,
                                                               (k + 1) * SPIKES_PER_MESSAGE),
                                      rng.integers(0, 50, SPIKES_PER_MESSAGE))]
            for k in range(count)]


def test_a_zeromq_flood_is_held_within_the_byte_budget_and_the_rest_is_counted():
    context = zmq.Context.instance()
    publisher = context.socket(zmq.PUB)
    publisher.setsockopt(zmq.LINGER, 0)
    publisher.setsockopt(zmq.SNDHWM, 0)  # the publisher queues everything: only rtnf drops
    publisher.bind("tcp://127.0.0.1:0")
    address = publisher.getsockopt_string(zmq.LAST_ENDPOINT)
    source = ZmqSource(address, ["spikes"], max_message_bytes=LIMIT, max_queued_bytes=QUEUE_LIMIT)
    valid = zmq_case(address, time.monotonic)[1]
    try:
        _until_valid_arrives(publisher, source, valid)
        while source.poll(0.1):  # every probe taken: the queue is empty
            pass
        flood = _flood(time.monotonic, 400)
        size = sum(len(part) for part in flood[0])
        assert LIMIT - 12 < size <= LIMIT + len(b"spikes")
        for message in flood:
            publisher.send_multipart(message)
        fits = QUEUE_LIMIT // size
        queue = source.subscriber.queue
        deadline = time.monotonic() + 10.0
        while source.rejected[QUEUE_FULL] + queue.queued_bytes // size < len(flood):
            assert time.monotonic() < deadline, "the flood did not get through"
            time.sleep(0.01)
        assert queue.queued_bytes == fits * size <= QUEUE_LIMIT  # never beyond the budget
        assert source.rejected == Counter({QUEUE_FULL: len(flood) - fits})
        hwm, largest = (source.socket.getsockopt(option) for option in (zmq.RCVHWM,
                                                                        zmq.MAXMSGSIZE))
        assert 1 <= hwm and hwm * largest <= QUEUE_LIMIT  # ZeroMQ's own queue: the same bound
        delivered = source.poll(0.0)
        assert sum(len(batch.records) for batch in delivered) == fits * SPIKES_PER_MESSAGE
        assert queue.queued_bytes == 0
        _until_valid_arrives(publisher, source, valid)  # and the source goes on
    finally:
        source.close()
        publisher.close()


def test_a_zeromq_source_refuses_a_message_limit_beyond_its_queue():
    with pytest.raises(RtnfError, match="messages of up to 2048 bytes .* do not fit its queue "
                                        "of 1024 bytes"):
        ZmqSource("tcp://127.0.0.1:9", ["spikes"], max_message_bytes=2048, max_queued_bytes=1024)


@pytest.fixture(scope="module")
def pylsl():
    return import_pylsl("loopback")


@pytest.fixture
def inlets(pylsl, monkeypatch) -> list[dict]:
    """The keyword arguments of every StreamInlet created during the test."""
    created, real = [], pylsl.StreamInlet

    def spy(*args, **kwargs):
        created.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(pylsl, "StreamInlet", spy)
    return created


def _outlet(pylsl, channels: int, rate: float, channel_format: str,
            frame: tuple[int, int] | None = None, labels: tuple[str, ...] = ()):
    """A real outlet on loopback under a fresh name, and the SourceConfig that finds it."""
    name = f"rtnf-test-{uuid.uuid4().hex[:8]}"
    info = pylsl.StreamInfo(name, "Test", channels, rate, getattr(pylsl, channel_format), name)
    if frame is not None:
        described = info.desc().append_child("frame")
        described.append_child_value("height", str(frame[0]))
        described.append_child_value("width", str(frame[1]))
    described = info.desc().append_child("channels")
    for label in labels:
        described.append_child("channel").append_child_value("label", label)
    return pylsl.StreamOutlet(info), SourceConfig(lsl=LslSourceConfig(name=name, type=""))


@pytest.mark.parametrize("kind, channels, rate, channel_format, frame, complaint", [
    ("spikes", 3, 0.0, "cf_int32", None, "declares 3 channels; rtnf takes 1 to 2 for spikes"),
    ("behavior", 257, 100.0, "cf_float32", None,
     "declares 257 channels; rtnf takes 1 to 256 for behavior"),
    ("spikes", 1, 0.0, "cf_string", None, ("declares channel format cf_string; rtnf takes "
                                           "numbers (cf_float32, cf_double64, cf_int32, "
                                           "cf_int16, cf_int8, cf_int64)")),
    ("frames", 512 * 512, 0.0, "cf_int16", (512, 512),  # (128 reserved + 100) x 512 KiB
     ("declares samples of 524288 bytes at 0 Hz: 114 MiB to buffer; rtnf buffers at most "
      "64 MiB per stream")),
])
def test_an_lsl_stream_declaring_too_much_is_refused_before_any_inlet(
        pylsl, inlets, kind, channels, rate, channel_format, frame, complaint):
    outlet, config = _outlet(pylsl, channels, rate, channel_format, frame)
    with pytest.raises(RtnfError) as refused:
        LslSource(kind, config, pylsl)
    assert str(refused.value) == f"LSL stream lsl:{config.lsl.name} {complaint}"
    assert inlets == [] and not outlet.have_consumers()


def test_an_lsl_inlet_buffers_as_long_as_fits_in_its_budget_and_still_delivers(pylsl, inlets):
    height, width, rate = 64, 64, 30.0  # int16 pixels: 8 KiB a frame
    outlet, config = _outlet(pylsl, height * width, rate, "cf_int16", frame=(height, width))
    source = LslSource("frames", config, pylsl)
    try:
        (kwargs,) = inlets
        assert kwargs["max_chunklen"] == 0

        def buffered(seconds: int) -> float:  # liblsl's reserve and queue, in bytes
            return (LSL_RESERVE_S + seconds) * rate * height * width * 2

        assert buffered(kwargs["max_buflen"]) <= LSL_BUFFER_BYTES < buffered(
            kwargs["max_buflen"] + 1)
        assert outlet.wait_for_consumers(5)
        pixels = np.random.default_rng(1).integers(0, 256, (height, width))
        outlet.push_sample(pixels.ravel().tolist(), pylsl.local_clock())
        deadline, frames = time.monotonic() + 5.0, []
        while not frames:
            assert time.monotonic() < deadline, "no frame arrived"
            frames = source.poll(0.05)
    finally:
        source.close()
    np.testing.assert_array_equal(frames[0].records, pixels[None])


def test_an_lsl_frame_size_that_is_not_positive_is_refused(pylsl):
    _, config = _outlet(pylsl, 4, 0.0, "cf_int16", frame=(-2, -2))
    with pytest.raises(RtnfError, match="frame -2x-2 does not match its 4 channels"):
        LslSource("frames", config, pylsl)


def test_behaviour_labels_beyond_the_declared_channels_are_ignored(pylsl):
    _, config = _outlet(pylsl, 1, 0.0, "cf_float32", labels=("gaze_phi", "speed"))
    source = LslSource("behavior", config, pylsl)
    source.close()
    assert source.behavior_columns == [None, 0, None]  # speed: described, but not sent
