"""Three processes on one machine, as on a rig: the simulated rig streaming over LSL, `rtnf run`,
and this process receiving rtnf's outputs (BENCHMARKS.md section 1; used by `rtnf demo` and
`rtnf bench latency`).

The children inherit this process's environment, so its LSL configuration (loopback by default)
and session id: they see each other and nothing else. Their stderr goes to log files in the
work directory, quoted in the error when `rtnf run` fails to start or exits with an error.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from rtnf.errors import RtnfError
from rtnf.stream.receiver import OutputReceiver, ReceivedOutputs, TruthReceiver

START_TIMEOUT_S = 180.0  # the sender's simulation, the engine's load, the first outputs
LOG_TAIL = 2000


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a run's ZeroMQ output)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _spawn(arguments: list[str], log_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rtnf.cli", *arguments],
                            stdout=subprocess.PIPE, stderr=log_path.open("w"), text=True,
                            env=dict(os.environ))


def _tail(path: Path) -> str:
    return path.read_text()[-LOG_TAIL:] if path.is_file() else ""


def run_against_simulated_rig(bundle: Path, run_config: Path, simulated_rig: list[str],
                              seconds: float, workdir: Path, pylsl: ModuleType,
                              prefix: str = "rtnf", run_flags: list[str] | None = None
                              ) -> tuple[ReceivedOutputs, tuple[np.ndarray, np.ndarray],
                                         dict[str, Any]]:
    """Stream a simulated rig (`rtnf simulate --stream lsl` + `simulated_rig` flags), run the
    loop on it for `seconds` with `run_config`, and receive its outputs and the rig's true
    behaviour; returns what was received, the truth (timestamps, values) and the run's
    summary."""
    sender = _spawn(["simulate", "--stream", "lsl", *simulated_rig], workdir / "sender.log")
    runner = None
    try:
        try:
            truth_receiver = TruthReceiver(pylsl, timeout=START_TIMEOUT_S)
        except RtnfError:
            raise RtnfError(f"the simulated rig did not start streaming:\n"
                            f"{_tail(workdir / 'sender.log')}") from None
        runner = _spawn(["run", "--config", str(run_config), "--bundle", str(bundle),
                         "--stream", "lsl", "--seconds", f"{seconds:g}", "--json",
                         *(run_flags or [])], workdir / "run.log")
        try:
            receiver = OutputReceiver(pylsl, prefix, START_TIMEOUT_S)
        except RtnfError:
            runner.kill()
            raise RtnfError(f"rtnf run did not start:\n{_tail(workdir / 'run.log')}") from None
        out, _ = runner.communicate(timeout=seconds + START_TIMEOUT_S)
        received = receiver.close()
        truth = truth_receiver.close()
    finally:
        for process in (runner, sender):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=10)
    if runner.returncode != 0:
        raise RtnfError(f"rtnf run failed ({runner.returncode}):\n{_tail(workdir / 'run.log')}")
    return received, truth, json.loads(out)
