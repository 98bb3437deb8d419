"""The simulated animal's behaviour and the stimulus it watches (part of the simulated rig).

- Running speed (cm/s): still and running bouts with exponential durations (a two-state Markov
  process); each running bout has its own level, modulated by a slow log-normal fluctuation and
  softly capped at a top speed, and the whole trace is smoothed so the animal speeds up and slows
  down gradually. Never negative; overall roughly 7 +/- 14 cm/s.
- Gaze phi / theta (degrees): slow mean-reverting drift (Ornstein-Uhlenbeck) plus saccades,
  sudden jumps at random times that then relax back.
- Stimulus movie: smooth noise made of a few drifting plane waves whose amplitudes wander, as
  small uint8 frames.

Every function draws from the `np.random.Generator` it is given, so a seed fixes everything.
"""

from __future__ import annotations

import numpy as np

# Running speed (cm/s and seconds).
STILL_BOUT_MEAN_S = 16.0
RUN_BOUT_MEAN_S = 6.0
RUN_LEVEL_MEDIAN_CM_S = 21.0
RUN_LEVEL_LOG_SD = 0.75
RUN_FLUCTUATION_LOG_SD = 0.35
RUN_FLUCTUATION_TAU_S = 2.0
SPEED_SMOOTHING_TAU_S = 0.3
STILL_JITTER_CM_S = 0.3
TOP_SPEED_CM_S = 80.0

# Gaze (degrees and seconds): (phi, theta).
GAZE_DRIFT_SD_DEG = (8.0, 5.0)
GAZE_DRIFT_TAU_S = 3.0
SACCADE_RATE_HZ = 0.4
SACCADE_SD_DEG = (10.0, 5.0)

# Stimulus movie.
STIMULUS_COMPONENTS = 12
STIMULUS_CYCLES_PER_PIXEL = (0.02, 0.12)
STIMULUS_DRIFT_HZ = (0.2, 1.5)
STIMULUS_AMPLITUDE_TAU_S = 1.0


def ar1(inputs: np.ndarray, decay: float, first: np.ndarray | float = 0.0) -> np.ndarray:
    """y[0] = first + inputs[0]; y[n] = decay * y[n-1] + inputs[n] (along axis 0, float input)."""
    out = np.empty_like(inputs)
    state = first + inputs[0]
    out[0] = state
    for n in range(1, inputs.shape[0]):
        state = decay * state + inputs[n]
        out[n] = state
    return out


def ornstein_uhlenbeck(rng: np.random.Generator, n: int, tau_samples: float, sd: float,
                       size: tuple[int, ...] = ()) -> np.ndarray:
    """A stationary OU process (n samples, standard deviation `sd`, time constant in samples)."""
    decay = np.exp(-1.0 / tau_samples)
    kicks = rng.standard_normal((n, *size)) * sd * np.sqrt(1.0 - decay**2)
    return ar1(kicks, decay, first=rng.standard_normal(size) * sd)


def _smooth(values: np.ndarray, tau_samples: float) -> np.ndarray:
    """Causal smoothing with a gamma-shaped (t * exp(-t / tau)) kernel; keeps values >= 0."""
    lags = np.arange(int(np.ceil(8 * tau_samples)) + 1)
    kernel = lags * np.exp(-lags / tau_samples)
    kernel /= kernel.sum()
    padded = np.concatenate([np.full(lags.size - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def running_state(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """Boolean (n,): alternating still / running bouts with exponential durations."""
    bout_means = np.array([STILL_BOUT_MEAN_S, RUN_BOUT_MEAN_S]) * rate
    running = rng.random() < RUN_BOUT_MEAN_S / (RUN_BOUT_MEAN_S + STILL_BOUT_MEAN_S)
    state = np.empty(n, dtype=bool)
    filled = 0
    while filled < n:
        length = max(1, int(round(rng.exponential(bout_means[int(running)]))))
        state[filled:filled + length] = running
        filled += length
        running = not running
    return state


def simulate_speed(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """Running speed (cm/s) at `rate` Hz: still/run bouts, smooth, never negative."""
    running = running_state(rng, n, rate)
    bout_id = np.cumsum(np.diff(running.astype(np.int8), prepend=0) != 0)
    bout_level = RUN_LEVEL_MEDIAN_CM_S * np.exp(
        RUN_LEVEL_LOG_SD * rng.standard_normal(bout_id[-1] + 1))
    fluctuation = np.exp(ornstein_uhlenbeck(rng, n, RUN_FLUCTUATION_TAU_S * rate,
                                            RUN_FLUCTUATION_LOG_SD))
    running_speed = TOP_SPEED_CM_S * np.tanh(bout_level[bout_id] * fluctuation / TOP_SPEED_CM_S)
    target = np.where(running, running_speed, 0.0)
    target += STILL_JITTER_CM_S * rng.random(n)
    return _smooth(target, SPEED_SMOOTHING_TAU_S * rate)


def simulate_gaze(rng: np.random.Generator, n: int, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Gaze (phi, theta) in degrees at `rate` Hz: OU drift plus saccadic jumps."""
    decay = np.exp(-1.0 / (GAZE_DRIFT_TAU_S * rate))
    sd = np.array(GAZE_DRIFT_SD_DEG)
    kicks = rng.standard_normal((n, 2)) * sd * np.sqrt(1.0 - decay**2)
    saccades = rng.random(n) < SACCADE_RATE_HZ / rate
    kicks[saccades] += rng.standard_normal((int(saccades.sum()), 2)) * np.array(SACCADE_SD_DEG)
    gaze = ar1(kicks, decay, first=rng.standard_normal(2) * sd)
    return gaze[:, 0], gaze[:, 1]


def simulate_stimulus(rng: np.random.Generator, n: int, rate: float, height: int,
                      width: int) -> np.ndarray:
    """Smooth-noise movie, uint8 (n, height, width): drifting plane waves, wandering amplitudes."""
    k = STIMULUS_COMPONENTS
    orientation = rng.uniform(0.0, np.pi, k)
    frequency = rng.uniform(*STIMULUS_CYCLES_PER_PIXEL, k)
    drift = rng.uniform(*STIMULUS_DRIFT_HZ, k) * rng.choice([-1.0, 1.0], k)
    spatial_phase = rng.uniform(0.0, 2 * np.pi, k)
    y, x = np.mgrid[0:height, 0:width]
    along = np.cos(orientation)[:, None] * x.ravel() + np.sin(orientation)[:, None] * y.ravel()
    angle = 2 * np.pi * frequency[:, None] * along + spatial_phase[:, None]  # (k, H*W)
    amplitude = ornstein_uhlenbeck(rng, n, STIMULUS_AMPLITUDE_TAU_S * rate, 1.0, (k,))
    temporal = 2 * np.pi * drift[None, :] * (np.arange(n)[:, None] / rate)  # (n, k)
    # cos(angle - temporal) = cos(angle) cos(temporal) + sin(angle) sin(temporal)
    image = ((amplitude * np.cos(temporal)) @ np.cos(angle)
             + (amplitude * np.sin(temporal)) @ np.sin(angle))
    image /= image.std() + 1e-12
    pixels = 127.5 + 110.0 * np.tanh(image / 2.0)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8).reshape(n, height, width)
