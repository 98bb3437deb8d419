"""Test-wide set-up: LSL discovery stays on loopback (RIGS.md) before anything loads pylsl;
the `one_torch_thread` fixture for modules that run small models."""

import os
import uuid
from pathlib import Path

import pytest
import torch

_CFG = Path(__file__).parent / "lsl-loopback.cfg"
_RUN_CFG = Path(os.environ.get("TMPDIR", "/tmp")) / f"rtnf-test-lsl-{os.getpid()}.cfg"
_RUN_CFG.write_text(_CFG.read_text().replace("rtnf-tests", f"rtnf-tests-{uuid.uuid4().hex[:8]}"))
os.environ["LSLAPICFG"] = str(_RUN_CFG)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module: the suite shares 2 cores and small models are faster
    on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
