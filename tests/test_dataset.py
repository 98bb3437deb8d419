"""rtnf.train.dataset: the split, what each window reads and is scored against, and batching.

References are written independently of the module: times are compared as whole microseconds
(the tokenizer's tick at 10 ms bins), behaviour and frames are looked up window by window, and
spikes are counted directly.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from rtnf.config import Config, SimulationConfig, WindowsConfig
from rtnf.data.session import Frames, Session
from rtnf.data.sim import simulate
from rtnf.errors import RtnfError
from rtnf.model.spec import spec_from_config
from rtnf.model.vocabulary import Vocabulary
from rtnf.tokens import TokenSpec, tokenize_windows, window_ends, window_start_bins
from rtnf.train.dataset import (Normalization, SessionWindows, TrainingData, contiguous_split,
                                dims_for_sessions)

US = 1e-6  # seconds per microsecond: the integer time unit of the references


def us(times: np.ndarray | float) -> np.ndarray:
    return np.rint(np.asarray(times) / US).astype(np.int64)


def make_config(**decoding: object) -> Config:
    config = Config()
    config.model.frame_window = 0.3  # 6 frames at 20 Hz: the first windows need padding
    config.decoding = dataclasses.replace(config.decoding, **decoding)
    return config


@pytest.fixture(scope="module")
def sessions() -> list[Session]:
    """Two days of one animal: 40 units each, 36 shared, 30 s, 8x10 frames at 20 Hz."""
    return simulate(SimulationConfig(neurons=40, minutes=0.5, sessions=2, frame_height=8,
                                     frame_width=10), "2p")


@pytest.fixture(scope="module")
def config() -> Config:
    return make_config()


@pytest.fixture(scope="module")
def data(sessions: list[Session], config: Config) -> TrainingData:
    dims = dims_for_sessions(sessions, config, spec_from_config(config))
    return TrainingData(sessions, config, dims)


def random_indices(windows: SessionWindows, n: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).choice(len(windows), n, replace=False)


# ---------------------------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------------------------


def overlaps(a_start: np.ndarray, a_stop: np.ndarray, b_start: np.ndarray,
             b_stop: np.ndarray) -> bool:
    """Whether any [a_start, a_stop) overlaps any [b_start, b_stop) (microseconds)."""
    return bool(np.any((a_start[:, None] < b_stop[None]) & (b_start[None] < a_stop[:, None])))


@pytest.mark.parametrize("windows, next_window", [
    (WindowsConfig(), 0.05),
    (WindowsConfig(hop=0.01), 0.05),
    (WindowsConfig(history=0.0), 0.05),  # the rate target sets the gap
    (WindowsConfig(hop=0.02, current=0.04, history=0.3), 0.04),
])
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_split_is_contiguous_with_a_gap(windows: WindowsConfig, next_window: float,
                                        fraction: float) -> None:
    ends = window_ends(1000.0, 1010.0, windows)
    train, validation = contiguous_split(ends, fraction, windows, next_window)
    assert validation.size == math.ceil(fraction * ends.size - 1e-9)
    assert np.array_equal(validation, ends[ends.size - validation.size:])
    assert np.array_equal(train, ends[:train.size])  # a leading block: never interleaved
    assert train[-1] < validation[0]

    current, history = us(windows.current), us(windows.history)
    t_train, t_val = us(train), us(validation)
    # No validation history or current window overlaps a training current window ...
    assert not overlaps(t_val - current - history, t_val, t_train - current, t_train)
    # ... nor a training window's rate target a validation current window.
    assert not overlaps(t_train, t_train + us(next_window), t_val - current, t_val)
    # Only the windows in the gap are dropped: the next one would break the rule.
    first_dropped = us(ends[train.size])
    assert first_dropped > t_val[0] - current - max(history, us(next_window))


def test_split_fraction_zero_keeps_everything() -> None:
    ends = window_ends(0.0, 5.0, WindowsConfig())
    train, validation = contiguous_split(ends, 0.0, WindowsConfig())
    assert np.array_equal(train, ends) and validation.size == 0


def test_training_data_splits_each_session(data: TrainingData, sessions: list[Session],
                                           config: Config) -> None:
    for session, train, validation in zip(sessions, data.train, data.validation):
        ends = window_ends(session.start_time, session.end_time - data.next_window,
                           config.windows)
        expected = contiguous_split(ends, config.training.validation_fraction, config.windows,
                                    data.next_window)
        assert np.array_equal(train.ends, expected[0])
        assert np.array_equal(validation.ends, expected[1])
        assert validation.ends[-1] + data.next_window <= session.end_time + 1e-9


# ---------------------------------------------------------------------------------------------
# What a window reads and is scored against
# ---------------------------------------------------------------------------------------------


def test_tokens_and_start_bins_match_the_tokenizer(data: TrainingData,
                                                   sessions: list[Session],
                                                   config: Config) -> None:
    windows, session = data.train[1], sessions[1]
    indices = random_indices(windows)
    inputs, _ = windows.batch(indices)
    spec = TokenSpec.from_config(config.windows, session.n_units)
    expected = tokenize_windows(session.spike_times, session.spike_unit_index,
                                windows.ends[indices], spec)
    # The batch drops only the padding columns that every window of it has.
    current, history = inputs.current_units.shape[1], inputs.history_units.shape[1]
    assert current == expected.current.lengths.max() and history == expected.history.lengths.max()
    assert np.array_equal(inputs.current_units.numpy(), expected.current.units[:, :current])
    assert np.array_equal(inputs.current_dts.numpy(), expected.current.dts[:, :current])
    assert np.array_equal(inputs.history_units.numpy(), expected.history.units[:, :history])
    assert np.array_equal(inputs.history_dts.numpy(), expected.history.dts[:, :history])
    current_start, history_start = window_start_bins(windows.ends[indices], spec)
    assert np.array_equal(inputs.current_start_bin.numpy(), current_start)
    assert np.array_equal(inputs.history_start_bin.numpy(), history_start)


def test_frame_clips_end_strictly_before_the_window(data: TrainingData,
                                                    sessions: list[Session]) -> None:
    windows, session = data.train[0], sessions[0]
    n_frames = data.train[0].dims.frame_shape[0]
    assert n_frames == 6
    timestamps = session.frames.timestamps
    for index in np.concatenate([np.arange(8), random_indices(windows)]):
        t = windows.ends[index]
        clip = windows.frame_clips[index]
        before = np.flatnonzero(us(timestamps) < us(t))
        expected = before[-n_frames:]
        expected = np.concatenate([np.full(n_frames - expected.size, expected[0]), expected])
        assert np.array_equal(clip, expected)  # the last T, padded with the earliest frame
        assert np.all(timestamps[clip] < t)
    inputs, _ = windows.batch(np.array([0, 5, 100]))
    assert inputs.frames.dtype == torch.uint8
    assert tuple(inputs.frames.shape) == (3, n_frames, 8, 10)
    assert np.array_equal(inputs.frames[2].numpy(), session.frames.images[windows.frame_clips[100]])


def shifted_frames(session: Session, shift: float) -> Session:
    frames = Frames(session.frames.timestamps + shift, session.frames.images)
    return dataclasses.replace(session, frames=frames)


def test_a_frame_shown_at_the_window_end_is_not_in_its_clip(data: TrainingData,
                                                            sessions: list[Session]) -> None:
    """Frames 1e-9 s before a window end (float noise in a recorded clock) count as at it."""
    windows = data.train[0]
    session = shifted_frames(sessions[0], -1e-9)
    noisy = SessionWindows(session, windows.ends, TokenSpec.from_config(WindowsConfig(), 40),
                           windows.dims, data.normalization, np.arange(40), 0, 0.05)
    assert np.array_equal(noisy.frame_clips, windows.frame_clips)


def test_windows_before_the_first_frame_get_a_blank_clip(data: TrainingData,
                                                         sessions: list[Session]) -> None:
    windows = data.train[0]
    session = shifted_frames(sessions[0], 0.5)  # first frame at 0.5 s
    late = SessionWindows(session, windows.ends[:12], TokenSpec.from_config(WindowsConfig(), 40),
                          windows.dims, data.normalization, np.arange(40), 0, 0.05)
    frames = late.frames(np.arange(12))
    blank = late.ends <= 0.5
    assert blank.sum() == 10
    assert np.all(frames[blank] == 0)
    assert np.array_equal(frames[10], np.repeat(session.frames.images[:1], 6, axis=0))


def test_behavior_target_is_the_last_sample_before_the_window_end(
        data: TrainingData, sessions: list[Session]) -> None:
    windows, session = data.validation[1], sessions[1]
    indices = np.arange(len(windows))
    _, targets = windows.batch(indices)
    for column, name in enumerate(windows.dims.behavior_targets):
        channel = session.behavior[name]
        assert np.isin(us(windows.ends), us(channel.timestamps)).all()  # samples at t: excluded
        last = [np.flatnonzero(us(channel.timestamps) < us(t))[-1] for t in windows.ends]
        expected = channel.values[last]
        got = data.normalization.unstandardize(name, targets.behavior[:, column].numpy())
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    assert targets.behavior.dtype.is_floating_point


def test_next_counts_are_the_spikes_of_the_next_window(data: TrainingData,
                                                       sessions: list[Session]) -> None:
    windows, session = data.train[0], sessions[0]
    indices = random_indices(windows, seed=1)
    _, targets = windows.batch(indices)
    spikes = us(session.spike_times)
    for row, t in enumerate(us(windows.ends[indices])):
        inside = (spikes >= t) & (spikes < t + us(data.next_window))
        expected = np.bincount(session.spike_unit_index[inside], minlength=session.n_units)
        assert np.array_equal(targets.next_counts[row].numpy(), expected)
    assert targets.next_counts.sum() > 0


# ---------------------------------------------------------------------------------------------
# Rows, normalization, batches
# ---------------------------------------------------------------------------------------------


def test_unit_rows_are_shared_across_days_of_one_animal(data: TrainingData,
                                                        sessions: list[Session]) -> None:
    rows = [windows.unit_rows.numpy() for windows in data.train]
    for session, session_rows in zip(sessions, rows):
        expected, known, _ = data.vocabulary.rows_of(session)
        assert known.all() and np.array_equal(session_rows, expected)
    shared, first, second = np.intersect1d(sessions[0].unit_ids, sessions[1].unit_ids,
                                           return_indices=True)
    assert shared.size == 36
    assert np.array_equal(rows[0][first], rows[1][second])
    new = np.setdiff1d(np.arange(40), second)
    assert not np.isin(rows[1][new], rows[0]).any()
    assert data.vocabulary.n_units == 44
    assert [int(w.session_row) for w in data.train] == [0, 1]


def test_a_given_vocabulary_is_extended(sessions: list[Session], config: Config,
                                        data: TrainingData) -> None:
    vocabulary = Vocabulary()
    vocabulary.add_session(sessions[1])
    extended = TrainingData(sessions[:1], config, data.train[0].dims, vocabulary)
    assert extended.vocabulary is vocabulary
    assert int(extended.train[0].session_row) == 1
    assert vocabulary.n_units == 44


def test_normalization_is_fitted_on_training_windows_only(data: TrainingData,
                                                          sessions: list[Session]) -> None:
    for name in data.train[0].dims.behavior_targets:
        values = []
        for windows, session in zip(data.train, sessions):
            channel = session.behavior[name]
            values += [channel.values[np.flatnonzero(us(channel.timestamps) < us(t))[-1]]
                       for t in windows.ends]
        assert data.normalization.mean[name] == pytest.approx(np.mean(values))
        assert data.normalization.std[name] == pytest.approx(np.std(values))


def test_normalization_round_trips_through_json() -> None:
    values = {"speed": np.array([0.0, 0.0, 1.0, 4.0, 9.0]), "gaze_phi": np.full(5, 2.0)}
    normalization = Normalization.fit(values, classified=["speed"], n_classes=3)
    assert normalization.std["gaze_phi"] > 0  # floored
    loaded = Normalization.from_dict(json.loads(json.dumps(normalization.to_dict())))
    assert loaded == normalization
    z = loaded.standardize("speed", values["speed"])
    np.testing.assert_allclose(loaded.unstandardize("speed", z), values["speed"])
    assert loaded.classify("speed", values["speed"]).tolist() == [0, 0, 1, 2, 2]


def batch_rows(data: TrainingData, split: str, batch_size: int,
               seed: int) -> list[tuple[int, list[int]]]:
    """(session row, current start bins) of each batch of an epoch."""
    return [(int(inputs.session_row), inputs.current_start_bin.tolist())
            for inputs, _ in data.batches(split, batch_size, np.random.default_rng(seed), True)]


def test_batches_hold_one_session_and_repeat_for_a_seed(data: TrainingData) -> None:
    batch_size = 50
    epoch = batch_rows(data, "train", batch_size, seed=3)
    assert epoch == batch_rows(data, "train", batch_size, seed=3)
    assert epoch != batch_rows(data, "train", batch_size, seed=4)
    assert len(epoch) == data.epoch_size("train", batch_size)

    sessions_in_order = [row for row, _ in epoch]
    assert sessions_in_order != sorted(sessions_in_order)  # sessions interleave
    for row, windows in enumerate(data.train):
        bins = [b for batch_row, batch in epoch if batch_row == row for b in batch]
        assert sorted(bins) == windows.current_start_bin.tolist()  # each window once
    for (inputs, targets), (row, bins) in zip(
            data.batches("train", batch_size, np.random.default_rng(3), True), epoch):
        windows = data.train[row]
        positions = np.searchsorted(windows.current_start_bin, bins)
        history = windows.tokens.history.units[positions]  # one session's windows
        assert np.array_equal(inputs.history_units.numpy(),
                              history[:, :inputs.history_units.shape[1]])
        assert inputs.unit_rows is windows.unit_rows
        assert len(targets.behavior) == len(bins) >= 2


def test_partial_batches_of_one_window_are_left_out(data: TrainingData) -> None:
    assert [len(windows) for windows in data.validation] == [60, 60]
    assert data.epoch_size("validation", 59) == 2  # 59 + a single window left out
    assert data.epoch_size("validation", 58) == 4  # 58 + 2 kept
    plain = [len(inputs.current_start_bin) for inputs, _ in
             data.batches("validation", 58, np.random.default_rng(0), shuffle=False)]
    assert plain == [58, 2, 58, 2]


def test_classification_targets_and_behavior_inputs(sessions: list[Session]) -> None:
    config = make_config(targets=["gaze_phi", "gaze_theta"], inputs=["speed"],
                         objective="classification", classes=4)
    dims = dims_for_sessions(sessions, config, spec_from_config(config))
    assert dims.n_classes == 4 and dims.behavior_inputs == ("speed",)
    data = TrainingData(sessions, config, dims)
    inputs, targets = data.train[0].batch(np.arange(len(data.train[0])))
    assert targets.behavior.dtype == torch.int64
    assert targets.behavior.shape == (len(data.train[0]), 2)
    assert targets.behavior.min() >= 0 and targets.behavior.max() < 4
    classes = np.concatenate([windows.behavior_targets for windows in data.train])
    for column in range(2):  # quantiles of the training windows of all sessions
        shares = np.bincount(classes[:, column], minlength=4) / len(classes)
        np.testing.assert_allclose(shares, 0.25, atol=0.01)
    assert inputs.behavior_inputs.shape == (len(data.train[0]), 1)
    assert inputs.behavior_inputs.dtype.is_floating_point
    assert abs(float(inputs.behavior_inputs.mean())) < 0.5  # standardised


# ---------------------------------------------------------------------------------------------
# Dims
# ---------------------------------------------------------------------------------------------


def test_dims_follow_the_first_session(sessions: list[Session], config: Config) -> None:
    dims = dims_for_sessions(sessions, config, spec_from_config(config))
    assert dims.frame_shape == (6, 8, 10)
    no_frames = [dataclasses.replace(s, frames=None) for s in sessions]
    assert dims_for_sessions(no_frames, config, spec_from_config(config)).frame_shape is None


def test_dims_name_the_session_at_fault(sessions: list[Session], config: Config) -> None:
    spec = spec_from_config(config)
    cropped = dataclasses.replace(sessions[1], frames=Frames(sessions[1].frames.timestamps,
                                                             sessions[1].frames.images[:, :4]))
    with pytest.raises(RtnfError, match="2p-seed0-session1.*4x10.*8x10"):
        dims_for_sessions([sessions[0], cropped], config, spec)
    without = dataclasses.replace(sessions[1], behavior={
        k: v for k, v in sessions[1].behavior.items() if k != "gaze_theta"})
    with pytest.raises(RtnfError, match="2p-seed0-session1.*gaze_theta"):
        dims_for_sessions([sessions[0], without], config, spec)
    with pytest.raises(RtnfError, match="2p-seed0-session1.*no stimulus frames"):
        dims_for_sessions([sessions[0], dataclasses.replace(sessions[1], frames=None)], config,
                          spec)


def test_model_dims_without_frames_give_no_frames(data: TrainingData,
                                                  sessions: list[Session]) -> None:
    dims = dataclasses.replace(data.train[0].dims, frame_shape=None)
    windows = SessionWindows(sessions[0], data.train[0].ends[:4],
                             TokenSpec.from_config(WindowsConfig(), 40), dims, data.normalization,
                             np.arange(40), 0, 0.05)
    inputs, _ = windows.batch(np.arange(4))
    assert inputs.frames is None and inputs.behavior_inputs is None
