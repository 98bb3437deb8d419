"""The simulated animal's neurons: true parameters, and spikes on the `rate_dt` grid.

Each unit's log-rate in bin k is

    log(baseline) + visual_gain * RF response to the frame on screen (standardised)
                  + speed tuning (about 30% of units: saturating or band-pass in speed)
                  + gaze gain fields (about 20% of units: linear in phi and theta)
                  + sum_j coupling[i, j] * (exponentially filtered recent spikes of unit j)

clipped at log(MAX_RATE_HZ); spikes are Poisson counts per bin. The coupling matrix is sparse
random (excitatory and inhibitory) plus a few hub units that excite many others, and its
diagonal is negative (refractoriness). Because spikes feed back, bins are simulated one after
another; each step is vectorised over units and spreads the new spikes through the outgoing edges
of the units that fired (a sparse edge list and `np.bincount`).

An animal has a pool of units; each session records a subset of it (`sim.py` picks which) with
parameters that drift from day to day (`drift_tuning`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_RATE_HZ = 100.0
VISUAL_LATENCY_S = 0.05
COUPLING_TAU_S = 0.02

BASELINE_MEDIAN_HZ = 2.5
BASELINE_LOG_SD = 0.8
BASELINE_RANGE_HZ = (0.2, 30.0)
VISUAL_GAIN_SHAPE_SCALE = (2.0, 0.25)  # gamma: mean 0.5 log-units per SD of RF response
RF_SIGMA_PX = (1.5, 4.0)
RF_CYCLES_PER_PIXEL = (0.04, 0.12)
SPEED_TUNED_FRACTION = 0.3
SPEED_GAIN_RANGE = (0.8, 2.0)
SPEED_POSITIVE_FRACTION = 0.75
SPEED_PREF_RANGE_CM_S = (5.0, 35.0)
GAZE_TUNED_FRACTION = 0.2
GAZE_GAIN_SD_PER_DEG = (0.06, 0.09)  # (phi, theta): ~0.5 log-units over one SD of gaze
COUPLING_IN_DEGREE = 8.0
COUPLING_WEIGHT_SD = 0.6
HUB_FRACTION = 0.01
HUB_COUNT_RANGE = (2, 8)  # a few hubs, however large the pool (more would drive runaway)
HUB_TARGET_FRACTION = 0.3
HUB_WEIGHT_RANGE = (0.3, 0.8)
REFRACTORY_WEIGHT_RANGE = (-3.0, -1.5)

SPEED_MONOTONIC, SPEED_BANDPASS = 1, 2  # values of tuning["speed_kind"]; 0 = untuned
DRIFTING_GAINS = ("visual_gain", "speed_gain", "gaze_phi_gain", "gaze_theta_gain")


@dataclass
class Population:
    """An animal's pool of units: tuning (pool-indexed arrays), receptive fields, coupling."""

    tuning: dict[str, np.ndarray]
    receptive_fields: np.ndarray  # (P, H*W), unit L2 norm
    coupling: np.ndarray  # (P, P); [i, j] = weight of unit j's filtered spikes on unit i
    hubs: np.ndarray  # pool indices of hub units

    @property
    def size(self) -> int:
        return int(self.coupling.shape[0])


def _gabors(tuning: dict[str, np.ndarray], height: int, width: int) -> np.ndarray:
    """Unit-norm Gabor receptive fields (P, H*W) from the rf_* tuning arrays."""
    y, x = np.mgrid[0:height, 0:width]
    dx = x.ravel()[None, :] - tuning["rf_x"][:, None]
    dy = y.ravel()[None, :] - tuning["rf_y"][:, None]
    theta = tuning["rf_orientation"][:, None]
    along = dx * np.cos(theta) + dy * np.sin(theta)
    envelope = np.exp(-(dx**2 + dy**2) / (2 * tuning["rf_sigma"][:, None] ** 2))
    carrier = np.cos(2 * np.pi * tuning["rf_frequency"][:, None] * along
                     + tuning["rf_phase"][:, None])
    fields = envelope * carrier
    return fields / (np.linalg.norm(fields, axis=1, keepdims=True) + 1e-12)


def _coupling(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sparse random coupling plus hubs projecting to many units; negative diagonal."""
    coupling = np.zeros((size, size))
    edges = rng.random((size, size)) < COUPLING_IN_DEGREE / size
    coupling[edges] = rng.normal(0.0, COUPLING_WEIGHT_SD, int(edges.sum()))
    n_hubs = min(size, int(np.clip(round(HUB_FRACTION * size), *HUB_COUNT_RANGE)))
    hubs = np.sort(rng.choice(size, n_hubs, replace=False))
    hub_edges = rng.random((size, hubs.size)) < HUB_TARGET_FRACTION
    coupling[:, hubs] = np.where(hub_edges, rng.uniform(*HUB_WEIGHT_RANGE, hub_edges.shape),
                                 coupling[:, hubs])
    np.fill_diagonal(coupling, rng.uniform(*REFRACTORY_WEIGHT_RANGE, size))
    return coupling, hubs


def draw_population(rng: np.random.Generator, size: int, height: int, width: int) -> Population:
    """Draw a pool of `size` units with their true tuning, receptive fields and coupling."""
    baseline = BASELINE_MEDIAN_HZ * np.exp(BASELINE_LOG_SD * rng.standard_normal(size))
    speed_tuned = rng.random(size) < SPEED_TUNED_FRACTION
    speed_kind = np.where(speed_tuned, rng.choice([SPEED_MONOTONIC, SPEED_BANDPASS], size), 0)
    speed_sign = np.where((speed_kind == SPEED_MONOTONIC)
                          & (rng.random(size) > SPEED_POSITIVE_FRACTION), -1.0, 1.0)
    speed_pref = rng.uniform(*SPEED_PREF_RANGE_CM_S, size)
    gaze_tuned = rng.random(size) < GAZE_TUNED_FRACTION
    tuning = {
        "baseline_hz": np.clip(baseline, *BASELINE_RANGE_HZ),
        "visual_gain": rng.gamma(*VISUAL_GAIN_SHAPE_SCALE, size),
        "rf_x": rng.uniform(0, width - 1, size),
        "rf_y": rng.uniform(0, height - 1, size),
        "rf_sigma": rng.uniform(*RF_SIGMA_PX, size),
        "rf_orientation": rng.uniform(0, np.pi, size),
        "rf_frequency": rng.uniform(*RF_CYCLES_PER_PIXEL, size),
        "rf_phase": rng.uniform(0, 2 * np.pi, size),
        "speed_kind": speed_kind.astype(np.int64),
        "speed_gain": np.where(speed_tuned, speed_sign * rng.uniform(*SPEED_GAIN_RANGE, size),
                               0.0),
        "speed_pref": speed_pref,
        "speed_width": 0.3 * speed_pref + 3.0,
        "gaze_phi_gain": np.where(gaze_tuned, rng.normal(0, GAZE_GAIN_SD_PER_DEG[0], size), 0.0),
        "gaze_theta_gain": np.where(gaze_tuned, rng.normal(0, GAZE_GAIN_SD_PER_DEG[1], size), 0.0),
    }
    coupling, hubs = _coupling(rng, size)
    return Population(tuning, _gabors(tuning, height, width), coupling, hubs)


def drift_tuning(rng: np.random.Generator, tuning: dict[str, np.ndarray],
                 drift: float) -> dict[str, np.ndarray]:
    """One day later: baselines and gains each scaled by exp(N(0, drift)), independently."""
    drifted = dict(tuning)
    for name in ("baseline_hz", *DRIFTING_GAINS):
        drifted[name] = tuning[name] * np.exp(drift * rng.standard_normal(tuning[name].shape))
    drifted["baseline_hz"] = np.clip(drifted["baseline_hz"], *BASELINE_RANGE_HZ)
    return drifted


def speed_response(tuning: dict[str, np.ndarray], speed: np.ndarray) -> np.ndarray:
    """Log-rate change (T, N) caused by running `speed` (T,) in cm/s."""
    s = speed[:, None]
    monotonic = 1.0 - np.exp(-s / tuning["speed_pref"])
    bandpass = np.exp(-0.5 * ((s - tuning["speed_pref"]) / tuning["speed_width"]) ** 2)
    shape = np.where(tuning["speed_kind"] == SPEED_MONOTONIC, monotonic,
                     np.where(tuning["speed_kind"] == SPEED_BANDPASS, bandpass, 0.0))
    return tuning["speed_gain"] * shape


def visual_response(receptive_fields: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """Standardised RF responses (T_frames, N) to uint8 `frames` (T_frames, H, W)."""
    pixels = (frames.reshape(frames.shape[0], -1).astype(np.float32) - 127.5) / 127.5
    response = pixels @ receptive_fields.T.astype(np.float32)
    response -= response.mean(axis=0)
    return response / (response.std(axis=0) + 1e-6)


@dataclass
class Drive:
    """Everything but coupling, ready to add up per bin: log-rate = the sum of these terms."""

    log_baseline: np.ndarray  # (N,)
    visual: np.ndarray  # (T_frames, N), already scaled by visual gain
    behavior: np.ndarray  # (T_behavior, N), speed + gaze terms
    frame_of_bin: np.ndarray  # (bins,) index into visual
    behavior_of_bin: np.ndarray  # (bins,) index into behavior

    def chunk(self, start: int, stop: int) -> np.ndarray:
        """External log-rate drive (stop - start, N) of bins start..stop-1."""
        return (self.log_baseline + self.visual[self.frame_of_bin[start:stop]]
                + self.behavior[self.behavior_of_bin[start:stop]])


@dataclass
class Activity:
    """True spikes on the rate grid (`counts[e]` spikes of `units[e]` in bin `bins[e]`), rates."""

    bins: np.ndarray  # (E,) int64
    units: np.ndarray  # (E,) int64
    counts: np.ndarray  # (E,) int64
    rates: np.ndarray  # (bins, N) float32 Hz, the true rates


def simulate_spikes(rng: np.random.Generator, drive: Drive, coupling: np.ndarray,
                    dt: float, chunk_bins: int = 1000) -> Activity:
    """Run the coupled Poisson population bin by bin; return spikes and true rates."""
    n_bins, n_units = drive.frame_of_bin.size, drive.log_baseline.size
    sources, targets = np.nonzero(coupling.T)  # edges grouped by source unit
    weights = coupling.T[sources, targets]
    edge_start = np.searchsorted(sources, np.arange(n_units + 1))
    decay = np.exp(-dt / COUPLING_TAU_S)
    log_max = np.log(MAX_RATE_HZ)
    rates = np.empty((n_bins, n_units), dtype=np.float32)
    recent = np.zeros(n_units)  # coupling input: sum_j coupling[i, j] * filtered spikes of j
    fired_bins, fired_units, fired_counts = [], [], []
    for start in range(0, n_bins, chunk_bins):
        external = drive.chunk(start, min(start + chunk_bins, n_bins))
        for offset, log_rate in enumerate(external):
            rate = np.exp(np.minimum(log_rate + recent, log_max))
            rates[start + offset] = rate
            counts = rng.poisson(rate * dt)
            fired = np.flatnonzero(counts)
            recent *= decay
            if fired.size == 0:
                continue
            fired_bins.append(np.full(fired.size, start + offset))
            fired_units.append(fired)
            fired_counts.append(counts[fired])
            lengths = edge_start[fired + 1] - edge_start[fired]
            first = np.repeat(edge_start[fired] - (np.cumsum(lengths) - lengths), lengths)
            edges = first + np.arange(lengths.sum())
            recent += np.bincount(targets[edges], minlength=n_units,
                                  weights=weights[edges] * np.repeat(counts[fired], lengths))
    empty = np.zeros(0, dtype=np.int64)
    return Activity(np.concatenate(fired_bins or [empty]).astype(np.int64),
                  np.concatenate(fired_units or [empty]).astype(np.int64),
                  np.concatenate(fired_counts or [empty]).astype(np.int64), rates)
