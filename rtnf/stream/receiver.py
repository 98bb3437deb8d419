"""A receiver of rtnf's LSL outputs, as a lab's own program would be: plain pylsl inlets.

`OutputReceiver` resolves `<prefix>-decoded` (and `<prefix>-control`), then a thread pulls every
decoded sample as it arrives and notes this machine's LSL clock at arrival, so the end-to-end
latency of window k is arrival - t_k (the sample's timestamp is the window end, on the same
clock: BENCHMARKS.md section 1). `TruthReceiver` keeps the simulated rig's own behaviour stream
(the ground truth the decoded values are scored against). Both stop with `close()` and hand
over numpy arrays.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from rtnf.errors import RtnfError

PULL_TIMEOUT_S = 0.05


def _resolve(pylsl: ModuleType, name: str, timeout: float):
    found = pylsl.resolve_bypred(f"name='{name}'", 1, timeout)
    if not found:
        raise RtnfError(f"no LSL stream named {name} appeared within {timeout:g} s")
    return found[0]


@dataclass
class ReceivedOutputs:
    sequence: np.ndarray  # (n,) int64
    window_end: np.ndarray  # (n,) float64, LSL clock
    arrival: np.ndarray  # (n,) float64, LSL clock when the receiver got it
    decoded: np.ndarray  # (n, targets) float64
    targets: list[str]
    control: list[tuple[float, str, str]]  # (window end, command, rule)

    @property
    def latency_ms(self) -> np.ndarray:
        return (self.arrival - self.window_end) * 1e3

    def latency_summary(self) -> dict[str, float]:
        latency = self.latency_ms
        if latency.size == 0:
            return {"p50": float("nan"), "p99": float("nan"), "p999": float("nan"),
                    "max": float("nan")}
        return {"p50": float(np.percentile(latency, 50)), "p99": float(np.percentile(latency, 99)),
                "p999": float(np.percentile(latency, 99.9)), "max": float(latency.max())}

    def gaps(self) -> int:
        """Windows missing between the first and last sequence numbers received."""
        if self.sequence.size < 2:
            return 0
        return int(self.sequence[-1] - self.sequence[0] + 1 - np.unique(self.sequence).size)


class OutputReceiver:
    def __init__(self, pylsl: ModuleType, prefix: str = "rtnf", timeout: float = 60.0):
        self.pylsl = pylsl
        decoded = pylsl.StreamInlet(_resolve(pylsl, f"{prefix}-decoded", timeout),
                                    max_buflen=60)
        info = decoded.info(timeout)
        channel = info.desc().child("channels").child("channel")
        self.labels = []
        while not channel.empty():
            self.labels.append(channel.child_value("label"))
            channel = channel.next_sibling()
        self.decoded = decoded
        self.control = pylsl.StreamInlet(_resolve(pylsl, f"{prefix}-control", timeout),
                                         max_buflen=60)
        decoded.open_stream(timeout)
        self.control.open_stream(timeout)
        self.rows: list[tuple[float, float, list[float]]] = []
        self.markers: list[tuple[float, str, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="rtnf-receiver", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        clock = self.pylsl.local_clock
        while not self.stop.is_set():
            sample, stamp = self.decoded.pull_sample(timeout=PULL_TIMEOUT_S)
            if sample is not None:
                self.rows.append((stamp, clock(), sample))
            markers, stamps = self.control.pull_chunk(timeout=0.0)
            for marker, marker_stamp in zip(markers, stamps):
                self.markers.append((marker_stamp, marker[0], marker[1]))

    def close(self) -> ReceivedOutputs:
        self.stop.set()
        self.thread.join(timeout=2.0)
        self.decoded.close_stream()
        self.control.close_stream()
        values = np.array([row[2] for row in self.rows], dtype=np.float64).reshape(
            len(self.rows), len(self.labels))
        return ReceivedOutputs(values[:, 0].astype(np.int64),
                               np.array([row[0] for row in self.rows]),
                               np.array([row[1] for row in self.rows]), values[:, 1:],
                               self.labels[1:], self.markers)


class TruthReceiver:
    """Every sample of the simulated rig's behaviour stream (rtnf-sim-behavior)."""

    def __init__(self, pylsl: ModuleType, name: str = "rtnf-sim-behavior",
                 timeout: float = 60.0):
        self.inlet = pylsl.StreamInlet(_resolve(pylsl, name, timeout), max_buflen=600)
        self.inlet.open_stream(timeout)
        self.chunks: list[tuple[np.ndarray, np.ndarray]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="rtnf-truth", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            samples, stamps = self.inlet.pull_chunk(timeout=0.1)
            if stamps:
                self.chunks.append((np.asarray(stamps), np.asarray(samples, dtype=np.float64)))

    def close(self) -> tuple[np.ndarray, np.ndarray]:
        """Timestamps (n,) and values (n, channels)."""
        self.stop.set()
        self.thread.join(timeout=2.0)
        self.inlet.close_stream()
        if not self.chunks:
            return np.zeros(0), np.zeros((0, 3))
        return (np.concatenate([c[0] for c in self.chunks]),
                np.concatenate([c[1] for c in self.chunks]))
