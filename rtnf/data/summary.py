"""What a session holds, in numbers (`summarize`) and as text (`format_summary`): `rtnf info`.

The summary is plain JSON-serialisable Python (dicts, lists, str, int, float, bool, None), so the
CLI can print it as text or dump it as JSON.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rtnf.data.session import Session


def summarize(session: Session) -> dict[str, Any]:
    """Counts, rates and ranges of everything in `session`."""
    duration = session.duration
    counts = np.bincount(session.spike_unit_index, minlength=session.n_units)
    rates = counts / duration if duration > 0 else np.zeros(session.n_units)
    frames = session.frames
    return {
        "units": session.n_units,
        "spikes": session.n_spikes,
        "start_s": session.start_time,
        "duration_s": duration,
        "rate_hz": _stats(rates, ("mean", "median", "min", "max")),
        "behavior": list(session.behavior),
        "behavior_channels": {
            name: {"samples": int(channel.values.size),
                   "rate_hz": sample_rate(channel.timestamps),
                   "unit": channel.unit,
                   **_stats(channel.values, ("mean", "std", "min", "max"))}
            for name, channel in session.behavior.items()
        },
        "frames": 0 if frames is None else int(frames.timestamps.size),
        "frame_size": None if frames is None else list(frames.images.shape[1:]),
        "frame_rate_hz": None if frames is None else sample_rate(frames.timestamps),
        "intervals": {name: {"count": int(spans.shape[0]),
                             "total_s": float(np.sum(spans[:, 1] - spans[:, 0]))}
                      for name, spans in session.intervals.items()},
        "profile": session.metadata.get("profile"),
        "source": session.metadata.get("source"),
        "ground_truth": session.ground_truth is not None,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A short human-readable block from `summarize`'s output."""
    rate = summary["rate_hz"]
    lines = [
        f"units         {summary['units']} ({summary['spikes']} spikes"
        + (f"; rate per unit mean {rate['mean']:.2f} Hz, median {rate['median']:.2f} Hz, "
           f"range {rate['min']:.2f}-{rate['max']:.2f} Hz)" if rate else ")"),
        f"duration      {summary['duration_s']:.3f} s (from {summary['start_s']:.3f} s)",
    ]
    for name, channel in summary["behavior_channels"].items():
        values = (f", mean {channel['mean']:.3g} (sd {channel['std']:.3g}, "
                  f"{channel['min']:.3g} .. {channel['max']:.3g}) {channel['unit']}"
                  if "mean" in channel else "")
        lines.append(f"behaviour     {name}: {channel['samples']} samples at "
                     f"{channel['rate_hz']:.2f} Hz{values}")
    if summary["frames"]:
        height, width = summary["frame_size"]
        lines.append(f"frames        {summary['frames']} of {height}x{width} at "
                     f"{summary['frame_rate_hz']:.2f} Hz")
    for name, spans in summary["intervals"].items():
        lines.append(f"interval      {name}: {spans['count']} span(s), {spans['total_s']:.3f} s")
    lines.append(f"profile       {summary['profile'] or '-'}    source {summary['source'] or '-'}")
    lines.append(f"ground truth  {'yes' if summary['ground_truth'] else 'no'}")
    return "\n".join(lines)


def _stats(values: np.ndarray, names: tuple[str, ...]) -> dict[str, float]:
    """Named statistics of the finite values (empty when there are none)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {}
    return {name: float(getattr(np, name)(finite)) for name in names}


def sample_rate(timestamps: np.ndarray) -> float:
    """Mean samples per second between the first and last timestamp (0 for < 2 samples)."""
    if timestamps.size < 2:
        return 0.0
    return float((timestamps.size - 1) / (timestamps[-1] - timestamps[0]))
