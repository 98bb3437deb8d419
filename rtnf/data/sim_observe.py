"""How a rig sees the simulated spikes: two-photon imaging or extracellular electrophysiology.

- `2p`: each spike adds a calcium transient (exponential decay, CALCIUM_TAU_S) to the unit's
  fluorescence, sampled at the imaging rate with per-unit noise. A simple deconvolution inverts
  the AR(1) decay (s[n] = F[n] - gamma * F[n-1]) and keeps frames whose estimate crosses a
  threshold set from the unit's own noise level (a robust SD, as imaging pipelines do), rounded
  to integer event counts. Event times are imaging frame times, so events are noisy, sometimes
  missed or spurious, and binned to frames.
- `ephys`: spike times at the acquisition clock's resolution (30 kHz samples) inside their bin,
  with a few percent of spikes missed and a few percent of spurious ones added (sorting errors).

Both return (times, unit index) pairs, unsorted; `sim.py` sorts them into a `Session`.
"""

from __future__ import annotations

import numpy as np

from rtnf.data.sim_behavior import ar1
from rtnf.data.sim_neurons import Activity

CALCIUM_TAU_S = 0.7
CALCIUM_NOISE_MEDIAN = 0.45  # fluorescence noise SD, in units of one spike's transient
CALCIUM_NOISE_LOG_SD = 0.3
EVENT_THRESHOLD_SD = 3.0

EPHYS_SAMPLE_RATE = 30000
EPHYS_MISSED_FRACTION = 0.03
EPHYS_EXTRA_FRACTION = 0.02


def _robust_sd(values: np.ndarray) -> np.ndarray:
    """Per-column noise SD from the median absolute deviation (insensitive to events)."""
    deviation = np.abs(values - np.median(values, axis=0))
    return 1.4826 * np.median(deviation, axis=0)


def observe_2p(rng: np.random.Generator, activity: Activity, dt: float, imaging_rate: float,
               duration: float) -> tuple[np.ndarray, np.ndarray]:
    """Deconvolved calcium events: (frame times repeated per event, unit index)."""
    n_units = activity.rates.shape[1]
    n_frames = int(np.floor(duration * imaging_rate + 1e-9))
    spike_time = (activity.bins + 0.5) * dt
    frame = (spike_time * imaging_rate).astype(np.int64)
    imaged = frame < n_frames  # spikes after the last whole frame are not imaged
    frame, spike_time = frame[imaged], spike_time[imaged]
    decayed = activity.counts[imaged] * np.exp(-((frame + 1) / imaging_rate - spike_time)
                                               / CALCIUM_TAU_S)
    arrived = np.bincount(frame * n_units + activity.units[imaged], decayed, n_frames * n_units)
    gamma = np.exp(-1.0 / (imaging_rate * CALCIUM_TAU_S))
    calcium = ar1(arrived.reshape(n_frames, n_units).astype(np.float32), gamma)
    noise_sd = (CALCIUM_NOISE_MEDIAN
                * np.exp(CALCIUM_NOISE_LOG_SD * rng.standard_normal(n_units))).astype(np.float32)
    fluorescence = calcium + rng.standard_normal((n_frames, n_units), dtype=np.float32) * noise_sd
    estimate = fluorescence.copy()  # s[n] = F[n] - gamma * F[n-1]
    estimate[1:] -= gamma * fluorescence[:-1]
    above = estimate > EVENT_THRESHOLD_SD * _robust_sd(estimate)
    events = np.where(above, np.maximum(np.rint(estimate), 1), 0).astype(np.int64)
    frame_index, unit_index = np.nonzero(events)
    counts = events[frame_index, unit_index]
    return np.repeat(frame_index / imaging_rate, counts), np.repeat(unit_index, counts)


def observe_ephys(rng: np.random.Generator, activity: Activity, dt: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Sorted-unit spikes at 30 kHz resolution: (times, unit index), with misses and extras."""
    n_bins, n_units = activity.rates.shape
    samples_per_bin = int(round(dt * EPHYS_SAMPLE_RATE))
    bins = np.repeat(activity.bins, activity.counts)
    units = np.repeat(activity.units, activity.counts)
    samples = bins * samples_per_bin + rng.integers(0, samples_per_bin, bins.size)
    kept = rng.random(bins.size) >= EPHYS_MISSED_FRACTION
    n_extra = rng.poisson(EPHYS_EXTRA_FRACTION * bins.size)
    extra_samples = rng.integers(0, n_bins * samples_per_bin, n_extra)
    extra_units = rng.integers(0, n_units, n_extra)
    samples = np.concatenate([samples[kept], extra_samples])
    return samples / EPHYS_SAMPLE_RATE, np.concatenate([units[kept], extra_units])
