"""The simulated rig: sessions of one animal with known ground truth, to judge decoders honestly.

`simulate(config, profile)` returns `config.sessions` sessions (days) of one animal:

1. the animal: a pool of units with true tuning and coupling (`sim_neurons.draw_population`);
2. which units each day records: day 0 the first `neurons` of the pool; each later day replaces
   a `unit_turnover` fraction of the previous day's units with new ones (new ids), so shared
   units keep their ids; tuning and baselines drift by `gain_drift` from day to day;
3. per day: behaviour and stimulus (`sim_behavior`), true spikes and rates on the `rate_dt`
   grid (`sim_neurons.simulate_spikes`), and what the rig records (`sim_observe`: deconvolved
   2p events on imaging frames, or 30 kHz ephys spikes);
4. a validated `Session` with the ground truth (true rates, coupling, hubs, tuning).

One `np.random.default_rng(config.seed)` is threaded through every step, so a seed reproduces
every array exactly.
"""

from __future__ import annotations

import numpy as np

from rtnf.config import SimulationConfig
from rtnf.data.session import (BEHAVIOR_UNITS, BehaviorChannel, Frames, GroundTruth, Session,
                               sort_spikes)
from rtnf.data.sim_behavior import simulate_gaze, simulate_speed, simulate_stimulus
from rtnf.data.sim_neurons import (VISUAL_LATENCY_S, Drive, Population, draw_population,
                                   drift_tuning, simulate_spikes, speed_response,
                                   visual_response)
from rtnf.data.sim_observe import observe_2p, observe_ephys
from rtnf.errors import ConfigError

PROFILES = ("2p", "ephys")


def _sample_times(duration: float, rate: float) -> np.ndarray:
    """Times of a regular stream at `rate` Hz covering [0, duration)."""
    return np.arange(int(np.floor(duration * rate + 1e-9))) / rate


def _index_at(times: np.ndarray, rate: float, count: int) -> np.ndarray:
    """Index of the regular sample (at `rate` Hz, `count` of them) current at each time."""
    return np.clip(np.floor(times * rate + 1e-9).astype(np.int64), 0, count - 1)


def session_units(rng: np.random.Generator, neurons: int, sessions: int,
                  turnover: float) -> list[np.ndarray]:
    """Pool indices (= unit ids) recorded on each day; consecutive days share 1 - turnover."""
    replaced = int(round(turnover * neurons))
    days = [np.arange(neurons)]
    for day in range(1, sessions):
        kept = np.delete(days[-1], rng.choice(neurons, replaced, replace=False))
        new = neurons + (day - 1) * replaced + np.arange(replaced)
        days.append(np.sort(np.concatenate([kept, new])))
    return days


def _simulate_day(rng: np.random.Generator, config: SimulationConfig, profile: str,
                  population: Population, tuning: dict[str, np.ndarray], units: np.ndarray,
                  index: int) -> Session:
    duration = config.minutes * 60.0
    behavior_times = _sample_times(duration, config.behavior_rate)
    frame_times = _sample_times(duration, config.frame_rate)
    speed = simulate_speed(rng, behavior_times.size, config.behavior_rate)
    gaze_phi, gaze_theta = simulate_gaze(rng, behavior_times.size, config.behavior_rate)
    images = simulate_stimulus(rng, frame_times.size, config.frame_rate, config.frame_height,
                               config.frame_width)

    day_tuning = {name: values[units] for name, values in tuning.items()}
    coupling = population.coupling[np.ix_(units, units)]
    bin_times = np.arange(int(round(duration / config.rate_dt))) * config.rate_dt
    drive = Drive(
        log_baseline=np.log(day_tuning["baseline_hz"]),
        visual=day_tuning["visual_gain"] * visual_response(population.receptive_fields[units],
                                                           images),
        behavior=(speed_response(day_tuning, speed)
                  + np.outer(gaze_phi, day_tuning["gaze_phi_gain"])
                  + np.outer(gaze_theta, day_tuning["gaze_theta_gain"])),
        frame_of_bin=_index_at(bin_times - VISUAL_LATENCY_S, config.frame_rate, frame_times.size),
        behavior_of_bin=_index_at(bin_times, config.behavior_rate, behavior_times.size),
    )
    activity = simulate_spikes(rng, drive, coupling, config.rate_dt)
    if profile == "2p":
        times, unit_index = observe_2p(rng, activity, config.rate_dt, config.imaging_rate,
                                       duration)
    else:
        times, unit_index = observe_ephys(rng, activity, config.rate_dt)
    spike_times, spike_unit_index = sort_spikes(times, unit_index)

    behavior = {name: BehaviorChannel(behavior_times, values, BEHAVIOR_UNITS[name])
                for name, values in (("speed", speed), ("gaze_phi", gaze_phi),
                                     ("gaze_theta", gaze_theta))}
    hubs = np.flatnonzero(np.isin(units, population.hubs))
    session = Session(
        unit_ids=units,
        spike_times=spike_times,
        spike_unit_index=spike_unit_index,
        behavior=behavior,
        frames=Frames(frame_times, images),
        intervals={"calibration": np.array([[0.0, duration]])},
        metadata={
            "profile": profile,
            "source": "simulator",
            "seed": config.seed,
            "session_index": index,
            "animal": f"sim-animal-{config.seed}",
            "identifier": f"{profile}-seed{config.seed}-session{index}",
            "start_time": 0.0,
            "end_time": duration,
        },
        ground_truth=GroundTruth(rate_dt=config.rate_dt, rates=activity.rates,
                                 coupling=coupling, hubs=hubs, tuning=day_tuning),
    )
    return session.validate(source=f"simulated session {index}")


def simulate(config: SimulationConfig, profile: str) -> list[Session]:
    """Simulate `config.sessions` sessions of one animal on the `profile` rig ('2p' or 'ephys')."""
    if profile not in PROFILES:
        raise ConfigError(f"rig.profile = {profile!r}: expected one of {', '.join(PROFILES)}")
    rng = np.random.default_rng(config.seed)
    days = session_units(rng, config.neurons, config.sessions, config.unit_turnover)
    population = draw_population(rng, max(int(day.max()) for day in days) + 1, config.frame_height,
                                 config.frame_width)
    sessions = []
    tuning = population.tuning
    for index, units in enumerate(days):
        if index:
            tuning = drift_tuning(rng, tuning, config.gain_drift)
        sessions.append(_simulate_day(rng, config, profile, population, tuning, units, index))
    return sessions
