"""The loop process's CPU placement and scheduling priority (realtime.cpu_affinity, .priority).

- cpu_affinity: pin the process to these cores (e.g. one core left to the loop alone); checked
  against the cores that exist.
- priority: normal; high (nice -10); realtime (SCHED_FIFO at a middle priority, Linux, needs
  root or CAP_SYS_NICE). On a shared 2-core VM, pinning plus SCHED_FIFO cut the p99 of timer
  wake-ups from 0.13 to 0.09 ms (BENCHMARKS.md).
A setting the system refuses is an error naming the key, never silently ignored.
"""

from __future__ import annotations

import os

import psutil

from rtnf.config import RealtimeConfig
from rtnf.errors import RtnfError

FIFO_PRIORITY = 50


def apply_process_settings(realtime: RealtimeConfig) -> dict[str, object]:
    """Apply the affinity and priority of `realtime` to this process; returns what was set."""
    process = psutil.Process()
    applied: dict[str, object] = {}
    if realtime.cpu_affinity:
        cores = list(range(psutil.cpu_count(logical=True) or 1))
        unknown = [core for core in realtime.cpu_affinity if core not in cores]
        if unknown:
            raise RtnfError(f"realtime.cpu_affinity = {realtime.cpu_affinity}: no core "
                            f"{unknown[0]} (this machine has {cores})")
        try:
            process.cpu_affinity(list(realtime.cpu_affinity))
        except (psutil.Error, AttributeError, OSError) as exc:
            raise RtnfError(f"realtime.cpu_affinity = {realtime.cpu_affinity}: {exc}") from None
        applied["cpu_affinity"] = list(realtime.cpu_affinity)
    try:
        if realtime.priority == "high":
            process.nice(-10)
        elif realtime.priority == "realtime":
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(FIFO_PRIORITY))
    except (psutil.Error, AttributeError, OSError) as exc:
        raise RtnfError(f"realtime.priority = {realtime.priority}: the system refused ({exc}); "
                        f"run with the privileges it needs or use normal") from None
    applied["priority"] = realtime.priority
    return applied
