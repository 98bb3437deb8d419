"""What the real-time loop sends out for each window: the contract between the loop (`rtnf.rt`),
which makes them, and the sinks, the recorder and any receiver.

- `OutputLayout`: fixed for a run: the decoded targets (and their physical units), the rig's
  unit ids in the order of the predicted counts, the prediction's window and the hop.
- `WindowOutput`: one per processed window k: its sequence number k on the run's window grid
  (windows skipped because inference fell behind leave gaps, so receivers can count them), the
  window end t_k on the stream clock (pylsl.local_clock seconds on this machine), the decoded
  behaviour in physical units, each unit's expected spike count in [t_k, t_k + window), and the
  control commands the rules fired at this window.
- `Command`: a named command from a control rule, with the sinks it goes to and, for Bpod, the
  soft code (the byte written to the App serial port; `SoftCode<n>` over pybpod's UDP port).
- `TelemetrySample`: per window, the time spent in each stage of the loop and the running
  counters, for the telemetry stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SINKS = ("lsl", "zmq", "bpod_serial", "bpod_udp")
STAGES = ("ingest", "close", "tokenize", "infer", "publish")


@dataclass(frozen=True)
class OutputLayout:
    targets: tuple[str, ...]  # decoded quantities, e.g. ("speed", "gaze_phi", "gaze_theta")
    target_units: tuple[str, ...]  # their physical units, e.g. ("cm/s", "deg", "deg")
    unit_ids: np.ndarray  # (N,) int64: the rig's unit ids, in the order of `predicted`
    window: float  # seconds covered by a prediction: [t_k, t_k + window)
    hop: float  # seconds between successive windows


@dataclass(frozen=True)
class Command:
    rule: str  # the rule that fired
    name: str  # the command's name (LSL marker string, ZMQ payload)
    sinks: tuple[str, ...]  # any of SINKS
    soft_code: int | None = None  # Bpod: App-port byte value / pybpod SoftCode number


@dataclass(frozen=True)
class WindowOutput:
    sequence: int  # k: index of the window on the run's grid (gaps = skipped windows)
    window_end: float  # t_k, stream clock seconds
    decoded: np.ndarray  # (targets,) float32, physical units, OutputLayout.targets order
    predicted: np.ndarray  # (N,) float32 expected spikes per unit in the next window
    commands: tuple[Command, ...] = ()


@dataclass(frozen=True)
class TelemetrySample:
    sequence: int
    window_end: float
    stage_ms: dict[str, float]  # STAGES -> milliseconds spent on this window
    latency_ms: float  # from t_k to the moment the outputs were handed to the sinks
    counters: dict[str, int] = field(default_factory=dict)  # windows, skipped, late, rejected...
