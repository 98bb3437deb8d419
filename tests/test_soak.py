"""The soak in CI size (BENCHMARKS.md sections 5 and 6): `rtnf run` against the simulated rig
over LSL for SECONDS (three processes, `rtnf.bench.soak`), with the benchmark's assertions at
bounds loose enough for a shared CI machine: no crash, RSS growth after the warm-up < 10%, at
most a few skipped windows, latency p99 of the last 10% of the windows below 3x that of the first
10% (plus a few milliseconds of scheduling noise). The benchmark form is
`python benchmarks/bench_soak.py --minutes 60`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from random_bundle import write_bundle

from rtnf.bench.soak import (
    MemoryTrace,
    format_table,
    latency_stability,
    memory_growth,
    prepare_rig,
    soak,
)
from rtnf.config import EngineConfig, load_config
from rtnf.stream.lslconfig import import_pylsl

SECONDS = 45.0
WARMUP_S = 10.0
SPAN_S = 5.0
MAX_GROWTH = 0.10
MAX_SKIPPED = 3
P99_RATIO, P99_NOISE_MS = 3.0, 5.0


def test_soak_ci_sized(tmp_path):
    config = dataclasses.replace(load_config(),
                                 engine=EngineConfig(backend="onnxruntime", threads=1))
    rig = prepare_rig(config, tmp_path, profile="ephys", neurons=40, hop=0.05, minutes=0.5,
                      seed=21, bundle_writer=lambda session, out: write_bundle(
                          session, out, behavior_inputs=()))
    report = soak(rig, SECONDS, tmp_path, import_pylsl(), sample_every_s=1.0,
                  warmup_s=WARMUP_S, span_s=SPAN_S)
    print(format_table(report))  # shown with pytest -s or on failure
    assert report["crashes"] == 0, report.get("error")
    memory = report["memory"]
    assert memory["samples"] >= 0.8 * SECONDS
    assert memory["growth"] < MAX_GROWTH, memory
    assert report["windows"] >= 0.8 * SECONDS / rig.hop
    assert report["skipped"] <= MAX_SKIPPED and report["lost_in_transit"] == 0
    stability = report["latency_stability"]
    assert stability["p99_last"] < P99_RATIO * stability["p99_first"] + P99_NOISE_MS, stability


def test_memory_growth_sees_a_leak():
    """The growth figure compares the stretch after the warm-up with the end, not the start."""
    times = np.arange(0.0, 120.0, 1.0)
    flat = np.where(times < 30, 50, 100) * 2.0 ** 20  # start-up, then steady
    leaking = flat + times * 2.0 ** 20  # +1 MB per second
    steady = memory_growth(MemoryTrace(times, flat.astype(np.int64)), 30.0, 10.0)
    leak = memory_growth(MemoryTrace(times, leaking.astype(np.int64)), 30.0, 10.0)
    assert steady["growth"] == 0.0 and steady["peak_mb"] == 100.0
    assert leak["growth"] > 0.4 and leak["trend_mb_per_hour"] == pytest.approx(3600, rel=0.01)


def test_latency_stability_compares_first_and_last_tenth():
    latency = np.r_[np.full(90, 1.0), np.full(10, 9.0)]
    stability = latency_stability(latency)
    assert stability["windows_each"] == 10
    assert stability["p99_first"] == 1.0 and stability["p99_last"] == 9.0
    assert stability["p99_last_over_first"] == 9.0
