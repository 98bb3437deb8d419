"""What the loop measures about itself, and the operator's live view of it.

- `Histogram`: fixed log-spaced bins from 10 us to 100 s (bounded memory however long the run);
  percentiles are read from the bins (within 2.5% of the true value) and the exact maximum is
  kept.
- `Telemetry`: per window, the milliseconds spent in each stage of `STAGES` (ingest: handling
  input since the previous window; close: from the window end t_k until processing began, grace
  included; tokenize; infer; publish: rules, sinks and the recorder hand-off) and the latency
  (t_k to the outputs handed to the sinks); counters (windows, skipped, missed: latency over one
  hop, late spikes, rejected inputs by reason, reconnects, truncated spikes, engine errors and
  windows skipped while the engine fails); the latest decoded values; `counter_values()`, the
  counters the telemetry stream carries (`rtnf.stream.sinks.TELEMETRY_COUNTERS`); `summary()`
  for `--json` and the exit report.
- `LiveView`: a rich table redrawn a few times a second from its own thread (decoded values,
  latency p50/p99, stage times, counters); the loop never waits for it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import numpy as np

from rtnf.stream.sinks import TELEMETRY_COUNTERS
from rtnf.stream.window_output import STAGES

BINS_PER_DECADE = 40
LOWEST_MS, HIGHEST_MS = 0.01, 100_000.0


class Histogram:
    """Counts of values (milliseconds) in log-spaced bins."""

    def __init__(self) -> None:
        decades = np.log10(HIGHEST_MS / LOWEST_MS)
        self.edges = LOWEST_MS * 10 ** (np.arange(int(decades * BINS_PER_DECADE) + 1)
                                        / BINS_PER_DECADE)
        self.counts = np.zeros(self.edges.size + 1, dtype=np.int64)
        self.count, self.max = 0, 0.0

    def add(self, value_ms: float) -> None:
        self.counts[np.searchsorted(self.edges, value_ms)] += 1
        self.count += 1
        self.max = max(self.max, value_ms)

    def percentile(self, q: float) -> float:
        """The value below which a fraction q of the values lie (bin's geometric middle)."""
        if self.count == 0:
            return float("nan")
        index = int(np.searchsorted(np.cumsum(self.counts), q * self.count))
        if index == 0:
            return float(self.edges[0])
        if index >= self.edges.size:
            return self.max
        return float(min(np.sqrt(self.edges[index - 1] * self.edges[index]), self.max))

    def summary(self) -> dict[str, float]:
        return {"p50": self.percentile(0.5), "p99": self.percentile(0.99),
                "p999": self.percentile(0.999), "max": self.max, "count": self.count}


class Telemetry:
    def __init__(self, hop_s: float, targets: tuple[str, ...]):
        self.hop_ms, self.targets = hop_s * 1e3, targets
        self.latency = Histogram()
        self.stages = {stage: Histogram() for stage in STAGES}
        self.heap_trim = Histogram()  # returning free heap memory, between windows
        self.counters: Counter = Counter()
        self.rejected: Counter = Counter()
        self.decoded = np.full(len(targets), np.nan)
        self.started = time.monotonic()

    def window(self, stage_ms: dict[str, float], latency_ms: float, decoded: np.ndarray) -> None:
        for stage, value in stage_ms.items():
            self.stages[stage].add(value)
        self.latency.add(latency_ms)
        self.counters["windows"] += 1
        if latency_ms > self.hop_ms:
            self.counters["missed"] += 1
        self.decoded = decoded

    def reject(self, reason: str, count: int = 1) -> None:
        self.rejected[reason] += count

    def counter_values(self) -> dict[str, int]:
        """The counters the telemetry stream carries (TELEMETRY_COUNTERS, in that order);
        `rejected` sums the rejections of every reason."""
        return {name: sum(self.rejected.values()) if name == "rejected" else self.counters[name]
                for name in TELEMETRY_COUNTERS}

    def summary(self) -> dict[str, Any]:
        return {
            "seconds": round(time.monotonic() - self.started, 3),
            "windows": self.counters["windows"],
            "skipped": self.counters["skipped"],
            "missed": self.counters["missed"],
            "latency_ms": self.latency.summary(),
            "stages_ms": {stage: {"p50": h.percentile(0.5), "p99": h.percentile(0.99),
                                  "max": h.max} for stage, h in self.stages.items()},
            "heap_trim_ms": self.heap_trim.summary(),
            "counters": {key: value for key, value in sorted(self.counters.items())
                         if key not in ("windows", "skipped", "missed")},
            "rejected": dict(sorted(self.rejected.items())),
        }


def format_summary(summary: dict[str, Any]) -> str:
    """The exit report for the operator."""
    latency = summary["latency_ms"]
    lines = [f"{summary['windows']} windows in {summary['seconds']:.1f} s; skipped "
             f"{summary['skipped']}, missed (later than one hop) {summary['missed']}",
             f"latency ms (window end -> outputs sent): p50 {latency['p50']:.2f}, p99 "
             f"{latency['p99']:.2f}, p99.9 {latency['p999']:.2f}, max {latency['max']:.2f}",
             "stages ms p50/p99: " + ", ".join(f"{stage} {v['p50']:.2f}/{v['p99']:.2f}"
                                               for stage, v in summary["stages_ms"].items())]
    counters = {**summary["counters"], **{f"rejected ({k})": v
                                           for k, v in summary["rejected"].items()}}
    if counters:
        lines.append("counters: " + ", ".join(f"{k} {v}" for k, v in counters.items()))
    return "\n".join(lines)


class LiveView:
    """The operator's terminal view, redrawn every `period_s` by its own thread."""

    def __init__(self, telemetry: Telemetry, title: str, period_s: float = 0.25):
        self.telemetry, self.title, self.period_s = telemetry, title, period_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="rtnf-live-view", daemon=True)

    def __enter__(self) -> LiveView:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=2.0)

    def _table(self):
        from rich.table import Table

        t = self.telemetry
        table = Table(title=self.title, show_header=False, expand=False)
        table.add_column(style="bold")
        table.add_column()
        for name, value in zip(t.targets, t.decoded):
            table.add_row(name, f"{value:8.2f}")
        table.add_row("latency ms", f"p50 {t.latency.percentile(0.5):.2f}   p99 "
                      f"{t.latency.percentile(0.99):.2f}   max {t.latency.max:.2f}")
        table.add_row("stages ms p50", "  ".join(f"{stage} {h.percentile(0.5):.2f}"
                                                 for stage, h in t.stages.items()))
        counters = t.counter_values() | {"missed": t.counters["missed"]}
        table.add_row("counters", "  ".join(f"{k} {v}" for k, v in counters.items()))
        if t.rejected:
            table.add_row("rejected", "  ".join(f"{k}: {v}" for k, v in t.rejected.items()))
        return table

    def _run(self) -> None:
        from rich.live import Live

        with Live(self._table(), refresh_per_second=1 / self.period_s, transient=False) as live:
            while not self.stop.wait(self.period_s):
                live.update(self._table())
