"""LSL discovery scoping: loopback by default, a named file, or liblsl's own configuration."""

import os
import subprocess
import sys
import uuid

import pytest

from rtnf.errors import RtnfError
from rtnf.stream.lslconfig import configure_lsl, loopback_config_text


def test_loopback_text_keeps_discovery_on_this_machine():
    text = loopback_config_text("abc")
    for line in ("ResolveScope = machine", "AddressesOverride = {127.0.0.1}", "TTLOverride = 0",
                 "KnownPeers = {127.0.0.1}", "SessionID = abc", "IPv6 = disable"):
        assert line in text


def test_fresh_process_gets_a_loopback_file_before_pylsl_loads(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LSLAPICFG"}
    env["TMPDIR"] = str(tmp_path)
    code = ("import os; from rtnf.stream.lslconfig import import_pylsl; "
            "pylsl = import_pylsl('loopback'); print(os.environ['LSLAPICFG']); "
            "print(pylsl.library_version())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out[0].startswith(str(tmp_path))
    assert "ResolveScope = machine" in open(out[0]).read()
    assert int(out[1]) >= 100


def test_existing_loopback_file_is_kept():
    assert configure_lsl("loopback") == os.environ["LSLAPICFG"]


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(RtnfError, match="rig.lsl.config = .*nope.cfg.*no such liblsl config"):
        configure_lsl(str(tmp_path / "nope.cfg"))


def test_system_leaves_environment_alone():
    before = os.environ["LSLAPICFG"]
    assert configure_lsl("system") == before
    assert os.environ["LSLAPICFG"] == before


def test_two_rtnf_processes_see_each_other_by_default(tmp_path):
    """Two commands started apart (as in two terminals, without LSLAPICFG) share the default
    session id, so a stream one of them opens is found by the other, still on loopback."""
    env = {k: v for k, v in os.environ.items() if k != "LSLAPICFG"}
    env["TMPDIR"] = str(tmp_path)
    name = f"rtnf-test-{uuid.uuid4().hex[:8]}"
    outlet = subprocess.Popen(
        [sys.executable, "-c",
         "import time; from rtnf.stream.lslconfig import import_pylsl; pylsl = import_pylsl(); "
         f"o = pylsl.StreamOutlet(pylsl.StreamInfo('{name}', 'Test', 1, 0, 'float32', '{name}')); "
         "print('ready', flush=True); time.sleep(20)"],
        env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert outlet.stdout.readline().strip() == "ready"
        found = subprocess.run(
            [sys.executable, "-c",
             "from rtnf.stream.lslconfig import import_pylsl; pylsl = import_pylsl(); "
             f"print(len(pylsl.resolve_bypred(\"name='{name}'\", 1, 8.0)))"],
            env=env, capture_output=True, text=True, timeout=60, check=True).stdout.strip()
        assert found == "1"
    finally:
        outlet.kill()
        outlet.wait()
