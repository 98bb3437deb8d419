"""Fuzzing of every parser that sees outside data (targets and contract: tests/fuzz_targets.py):
rtnf's ZMQ messages (binary, CSV, multipart), Open Ephys messages, npz/NWB/XDF session files,
rtnf.yaml, bundle manifests and run recordings; then a live ZmqSource fed fuzzed messages.

Deterministic (derandomized hypothesis), a few hundred inputs per in-memory parser and a few
dozen per file reader; each example has a deadline and a hang timer. The long form is
benchmarks/bench_fuzz.py. Regression tests for what the fuzzing found follow the properties.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import timedelta

import numpy as np
import pytest
import zmq
from fuzz_targets import (
    MULTIPART,
    TARGETS,
    TRIPWIRE,
    VALID,
    Target,
    Tripwire,
    alias_bomb,
    check,
    npz_bytes,
    rejected_multipart,
    small_session,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtnf.bundle import verify_bundle
from rtnf.config import check_config_file, parse_override
from rtnf.data.io import read_session
from rtnf.data.npz_format import session_arrays
from rtnf.errors import BundleError, ConfigError, RtnfError, SessionFormatError
from rtnf.rt.recorder import read_run
from rtnf.stream.sources import ZmqSource
from rtnf.stream.zmq_messages import TOPICS, Kind, MessageError, decode_csv, encode_spikes

EXAMPLES = {"zmq_binary": 300, "zmq_csv": 600, "zmq_multipart": 200, "openephys": 300,
            "session_npz": 40, "session_nwb": 12, "session_xdf": 30, "config_yaml": 60,
            "bundle_manifest": 60, "run_recording": 60}
SLOW_CHECKS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]


def fuzz_settings(examples: int) -> settings:
    return settings(derandomize=True, database=None, max_examples=examples,
                    deadline=timedelta(seconds=5), suppress_health_check=SLOW_CHECKS)


@pytest.mark.parametrize("target", TARGETS, ids=lambda target: target.name)
def test_parser_returns_a_valid_result_or_a_clear_error(target: Target):
    @fuzz_settings(EXAMPLES[target.name])
    @given(target.inputs)
    def property_holds(value):
        check(target, value)

    property_holds()
    assert not TRIPWIRE


def test_every_target_has_a_size():
    assert set(EXAMPLES) == {target.name for target in TARGETS}


# ---------------------------------------------------------------------------------------------
# The live path: a ZmqSource on 127.0.0.1
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def context():
    context = zmq.Context()
    yield context
    context.term()


def poll_until(source: ZmqSource, wanted, timeout: float = 5.0) -> list:
    batches, deadline = [], time.monotonic() + timeout
    while not any(wanted(batch) for batch in batches) and time.monotonic() < deadline:
        batches += source.poll(0.05)
    return batches


def has_unit(unit: int):
    return lambda batch: batch.kind == "spikes" and unit in batch.records


@fuzz_settings(12)
@given(st.lists(MULTIPART, min_size=1, max_size=30))
def test_live_source_counts_every_fuzzed_message_and_still_takes_the_next(messages):
    context = zmq.Context.instance()
    publisher = context.socket(zmq.PUB)
    publisher.setsockopt(zmq.LINGER, 0)
    port = publisher.bind_to_random_port("tcp://127.0.0.1")
    source = ZmqSource(f"tcp://127.0.0.1:{port}", ["spikes", "behavior", "frames"],
                       context=context)
    try:
        while not poll_until(source, has_unit(1), timeout=0.1):  # the subscription is live
            publisher.send_multipart([b"spikes", encode_spikes([0.0], [1])])
        subscribed = [parts for parts in messages  # SUB drops other topics unseen
                      if parts and parts[0].startswith(tuple(TOPICS.values()))]
        bad = [(parts, reason) for parts in subscribed
               if (reason := rejected_multipart(parts)) is not None]
        for parts, _ in bad:
            publisher.send_multipart(parts)
        publisher.send_multipart([b"spikes", b"1e9,42"])
        arrived = poll_until(source, has_unit(42))
    finally:
        source.close()
        publisher.close()
    assert arrived, "the valid message after the fuzzed ones never arrived"
    assert source.rejected == Counter(reason for _, reason in bad)
    assert sum(source.rejected.values()) == len(bad)


# ---------------------------------------------------------------------------------------------
# Regressions: what the fuzzing found
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["1" * 200_000 + "e", "9" * 100_000 + ".5e"])
def test_a_long_run_of_digits_is_rejected_at_once(field):
    """The decimal pattern backtracked quadratically: a 1 MB field held the receiver for hours."""
    started = time.perf_counter()
    for kind, line in ((Kind.BEHAVIOR, f"1,{field}"), (Kind.SPIKES, f"{field},1")):
        with pytest.raises(MessageError, match="not a number"):
            decode_csv(kind, line.encode())
    assert time.perf_counter() - started < 1.0


def test_a_unit_with_thousands_of_digits_is_out_of_range_or_read_exactly():
    """int() refused > 4300 digits with a plain ValueError, which ZmqSource did not catch."""
    with pytest.raises(MessageError) as raised:
        decode_csv(Kind.SPIKES, f"1.0,{'1' * 5000}".encode())
    assert raised.value.reason == "unit out of range"
    text = f"1.0,-{'0' * 5000}7\n2.0,+{'0' * 4999}\n3.0,-2147483648".encode()
    assert decode_csv(Kind.SPIKES, text).unit_ids.tolist() == [-7, 0, -2**31]


def write_config(tmp_path, text: str | bytes):
    path = tmp_path / "rtnf.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize("text, complaint", [
    ("windows:\n  hop: .inf\n", "windows.hop = inf: expected a finite number"),
    ("windows:\n  hop: 1" + "0" * 400 + "\n", "windows.hop = 1000.*: expected a finite number"),
    ("windows:\n  current: 1.0e+300\n  dt_resolution: 1.0e-300\n", "windows.current"),
    ("control:\n  rules: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    ("control:\n  rules:\n  - " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", "nested too deeply"),
    (alias_bomb(8), "more than 100000 values"),
    (b"windows:\n  hop: \xff\n", "not UTF-8 text"),
    ("windows:\n  hop: " + "1" * 5000 + "\n", "not valid YAML: Exceeds the limit"),
])
def test_hostile_config_files_are_config_errors(tmp_path, text, complaint):
    """Found: OverflowError (infinity, huge ints), RecursionError (deep nesting),
    UnicodeDecodeError, ValueError (an integer of 5000 digits), and YAML aliases expanding to
    billions of values."""
    path = write_config(tmp_path, text)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=complaint) as raised:
        check_config_file(path)
    assert str(path) in str(raised.value) and len(str(raised.value)) < 1000
    assert time.perf_counter() - started < 5.0


def test_a_deep_override_is_a_config_error():
    with pytest.raises(ConfigError, match="--set 'control.rules=.*nested too deeply"):
        parse_override("control.rules=" + "[" * 3000)


def test_yaml_tags_never_construct_python_objects(tmp_path):
    path = write_config(tmp_path, "windows:\n  hop: !!python/object/apply:"
                                  "fuzz_targets.tripwire []\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        check_config_file(path)
    assert not TRIPWIRE


@pytest.mark.parametrize("content", ["[" * 100_000 + "]" * 100_000, "1" * 5000])
def test_a_manifest_nested_too_deeply_is_a_bundle_error(tmp_path, content):
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(BundleError, match="cannot read manifest.json"):
        verify_bundle(tmp_path)


RUN_INFO = {"format": "rtnf-run", "format_version": 1, "run_id": "r", "started": "now",
            "layout": {}}


@pytest.mark.parametrize("records, complaint", [
    ([], "'records' is not a mapping"),
    ({"spikes": [["a", "O", []]]}, "records.spikes.*holds Python objects"),
    ({"spikes": [["a", "|O", [2]]]}, "records.spikes.*holds Python objects"),
    ({"spikes": []}, "records.spikes.*zero-size records"),
    ({"spikes": [["a", "<f8", [0]]]}, "records.spikes.*zero-size records"),
    ({"spikes": [["a", "<f8", [10**30]]]}, "records.spikes' is not a record layout"),
])
def test_hostile_record_layouts_are_rtnf_errors(tmp_path, records, complaint):
    """Found: AttributeError (records a list), ValueError from np.fromfile (object fields),
    ZeroDivisionError (zero-size records), OverflowError (huge dims)."""
    (tmp_path / "run.json").write_text(json.dumps({**RUN_INFO, "records": records}))
    (tmp_path / "spikes.bin").write_bytes(bytes(64))
    with pytest.raises(RtnfError, match=complaint):
        read_run(tmp_path)


@pytest.mark.parametrize("content", ["[" * 100_000 + "]" * 100_000, '{"format": ' + "1" * 5000
                                     + "}"])
def test_an_unreadable_run_json_is_an_rtnf_error(tmp_path, content):
    """Found: RecursionError and the > 4300-digit ValueError escaped read_run."""
    (tmp_path / "run.json").write_text(content)
    with pytest.raises(RtnfError, match="cannot read the run description"):
        read_run(tmp_path)


def test_pickled_object_arrays_in_an_npz_are_refused_unopened(tmp_path):
    arrays = dict(session_arrays(small_session()))
    arrays["unit_ids"] = np.array([Tripwire()], dtype=object)
    path = tmp_path / "pickled.npz"
    path.write_bytes(npz_bytes(arrays))
    with pytest.raises(SessionFormatError, match=str(path)):
        read_session(path)
    assert not TRIPWIRE


def test_the_contract_check_fails_a_parser_that_breaks_it():
    """The harness itself can fail: a crash, an unclear error and a wrong result are caught."""
    def crash(value):
        raise KeyError(value)

    def unclear(value):
        from fuzz_targets import rejection
        return rejection(MessageError("", "a reason far too long to be a fixed counter key"))

    with pytest.raises(KeyError):
        check(Target("crash", st.none(), crash), None)
    with pytest.raises(AssertionError):
        check(Target("unclear", st.none(), unclear), None)
    assert check(Target("fine", st.none(), lambda value: VALID), None) == VALID
