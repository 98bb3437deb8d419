"""Test-wide set-up: LSL discovery stays on loopback (RIGS.md) before anything loads pylsl."""

import os
import uuid
from pathlib import Path

_CFG = Path(__file__).parent / "lsl-loopback.cfg"
_RUN_CFG = Path(os.environ.get("TMPDIR", "/tmp")) / f"rtnf-test-lsl-{os.getpid()}.cfg"
_RUN_CFG.write_text(_CFG.read_text().replace("rtnf-tests", f"rtnf-tests-{uuid.uuid4().hex[:8]}"))
os.environ["LSLAPICFG"] = str(_RUN_CFG)
