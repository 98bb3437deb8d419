"""Session files: exact round trips (npz, NWB, XDF), other files' names, and one-line errors."""

from __future__ import annotations

import json
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from rtnf.config import NwbNames, XdfNames
from rtnf.data import BehaviorChannel, Frames, GroundTruth, Session
from rtnf.data.io import read_session, write_session
from rtnf.data.npz_format import session_arrays
from rtnf.data.summary import format_summary, summarize
from rtnf.errors import SessionFormatError

pynwb = pytest.importorskip("pynwb")
pyxdf = pytest.importorskip("pyxdf")

N_UNITS, N_SPIKES, BEHAVIOR_RATE, DURATION = 7, 400, 20.0, 10.0


@pytest.fixture
def session() -> Session:
    rng = np.random.default_rng(7)
    unit_ids = rng.permutation(np.arange(100, 100 + 3 * N_UNITS, 3))  # unsorted, one is silent
    spike_times = np.sort(rng.uniform(0.0, DURATION, N_SPIKES))
    spike_times[5] = spike_times[4]  # a tie: order by unit index
    spike_unit_index = rng.integers(0, N_UNITS - 1, N_SPIKES).astype(np.int32)
    order = np.lexsort((spike_unit_index, spike_times))
    behavior_times = np.arange(int(DURATION * BEHAVIOR_RATE)) / BEHAVIOR_RATE + 0.013
    behavior = {name: BehaviorChannel(behavior_times, rng.normal(size=behavior_times.size) * 10)
                for name in ("speed", "gaze_phi", "gaze_theta")}
    frame_times = np.arange(40) / 4.0 + 0.021
    truth = GroundTruth(
        rate_dt=0.03, t0=0.1,
        rates=rng.gamma(2.0, 2.0, (333, N_UNITS)).astype(np.float32),
        coupling=rng.normal(size=(N_UNITS, N_UNITS)).astype(np.float32),
        hubs=np.array([4, 1]),
        tuning={"speed_gain": rng.normal(size=N_UNITS), "preferred": rng.normal(size=(N_UNITS, 2))},
    )
    return Session(
        unit_ids=unit_ids,
        spike_times=spike_times[order],
        spike_unit_index=spike_unit_index[order],
        behavior=behavior,
        frames=Frames(frame_times, rng.integers(0, 256, (40, 6, 5), dtype=np.uint8)),
        intervals={"train": np.array([[0.0, 6.0]]), "test": np.array([[6.0, 8.5], [9.0, 10.0]]),
                   "calibration": np.zeros((0, 2))},
        metadata={"profile": "2p", "source": "test", "seed": 7, "rig": "ünï"},
        ground_truth=truth,
    ).validate()


def assert_same(read: Session, written: Session, behavior_rtol: float = 0.0) -> None:
    """Equal content: every array bitwise (behaviour values up to `behavior_rtol`)."""
    if behavior_rtol:
        for name, channel in written.behavior.items():
            np.testing.assert_allclose(read.behavior[name].values, channel.values,
                                       rtol=behavior_rtol)
            read.behavior[name].values = channel.values
    expected, actual = session_arrays(written), session_arrays(read)
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        np.testing.assert_array_equal(actual[key], value, err_msg=key)


def without_truth(session: Session) -> Session:
    session.ground_truth = None
    return session


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


def test_npz_round_trip_is_exact(session: Session, tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    write_session(session, path)
    assert_same(read_session(path), session)


def test_nwb_round_trip_is_exact(session: Session, tmp_path: Path) -> None:
    path = tmp_path / "s.nwb"
    write_session(session, path)
    assert_same(read_session(path), session)


def test_xdf_round_trip_is_exact_up_to_float32_behaviour(session: Session, tmp_path: Path) -> None:
    path = tmp_path / "s.xdf"
    write_session(session, path)
    assert_same(read_session(path), without_truth(session), behavior_rtol=1e-6)


def test_nwb_writes_the_same_content_twice(session: Session, tmp_path: Path) -> None:
    for name in ("a.nwb", "b.nwb"):
        write_session(session, tmp_path / name)
    with pynwb.NWBHDF5IO(str(tmp_path / "a.nwb"), "r") as a, \
            pynwb.NWBHDF5IO(str(tmp_path / "b.nwb"), "r") as b:
        first, second = a.read(), b.read()
        assert first.identifier == second.identifier
        assert first.session_start_time == second.session_start_time
    assert_same(read_session(tmp_path / "a.nwb"), read_session(tmp_path / "b.nwb"))


# ---------------------------------------------------------------------------------------------
# Layouts other tools see
# ---------------------------------------------------------------------------------------------


def test_nwb_layout_is_plain_pynwb(session: Session, tmp_path: Path) -> None:
    path = tmp_path / "s.nwb"
    write_session(session, path)
    with pynwb.NWBHDF5IO(str(path), "r") as io:
        nwbfile = io.read()
        np.testing.assert_array_equal(nwbfile.units.id[:], session.unit_ids)
        first_unit_spikes = nwbfile.units.get_unit_spike_times(0)
        np.testing.assert_array_equal(first_unit_spikes, session.spikes_of_unit(0))
        behavior = nwbfile.processing["behavior"]
        assert {"speed", "gaze_phi", "gaze_theta"} <= set(behavior.data_interfaces)
        assert behavior["speed"].unit == "cm/s" and behavior["gaze_phi"].unit == "degrees"
        assert nwbfile.stimulus["stimulus"].data.shape == (40, 6, 5)
        assert set(nwbfile.intervals) == {"train", "test", "calibration"}
        assert json.loads(nwbfile.scratch["rtnf_metadata"].data) == session.metadata
        assert nwbfile.processing["ground_truth"]["rates"].data.compression == "gzip"


def test_xdf_layout_is_plain_pyxdf(session: Session, tmp_path: Path) -> None:
    path = tmp_path / "s.xdf"
    write_session(session, path)
    assert path.read_bytes()[:4] == b"XDF:"
    streams, _ = pyxdf.load_xdf(str(path), synchronize_clocks=False, dejitter_timestamps=False)
    by_type = {s["info"]["type"][0]: s for s in streams}
    spikes = by_type["Spikes"]
    assert spikes["info"]["channel_format"][0] == "int32"
    np.testing.assert_array_equal(spikes["time_stamps"], session.spike_times)
    np.testing.assert_array_equal(spikes["time_series"][:, 0],
                                  session.unit_ids[session.spike_unit_index])
    channels = by_type["Behavior"]["info"]["desc"][0]["channels"][0]["channel"]
    assert [c["label"][0] for c in channels] == ["speed", "gaze_phi", "gaze_theta"]
    assert float(by_type["Behavior"]["info"]["nominal_srate"][0]) == pytest.approx(BEHAVIOR_RATE)
    assert by_type["Frames"]["time_series"].shape == (40, 30)


def write_foreign_nwb(session: Session, path: Path) -> None:
    """An NWB file laid out the way other labs do: module `Behavior`, series renamed,
    speed inside a BehavioralTimeSeries, gaze in acquisition, speed stored in mm/s."""
    nwbfile = pynwb.NWBFile(session_description="foreign", identifier="lab-42",
                            session_start_time=datetime(2024, 5, 1, tzinfo=timezone.utc))
    for index, unit_id in enumerate(session.unit_ids):
        nwbfile.add_unit(spike_times=session.spikes_of_unit(index)[::-1].copy(), id=int(unit_id))
    speed = session.behavior["speed"]
    running = pynwb.behavior.BehavioralTimeSeries(name="running")
    running.create_timeseries(name="running_speed", data=speed.values * 10.0, unit="cm/s",
                              timestamps=speed.timestamps, conversion=0.1)
    module = nwbfile.create_processing_module("Behavior", "behaviour")
    module.add(running)
    gaze = session.behavior["gaze_phi"]
    nwbfile.add_acquisition(pynwb.TimeSeries(name="eye_azimuth", data=gaze.values,
                                             unit="degrees", starting_time=gaze.timestamps[0],
                                             rate=BEHAVIOR_RATE))
    with pynwb.NWBHDF5IO(str(path), "w") as io:
        io.write(nwbfile)


def test_nwb_with_other_names_reads_through_nwb_names(session: Session, tmp_path: Path) -> None:
    path = tmp_path / "lab.nwb"
    write_foreign_nwb(session, path)
    names = NwbNames(behavior_module="Behavior", speed="running_speed", gaze_phi="eye_azimuth")
    read = read_session(path, nwb_names=names)
    np.testing.assert_array_equal(read.unit_ids, session.unit_ids)
    np.testing.assert_array_equal(read.spike_times, session.spike_times)
    np.testing.assert_array_equal(read.spike_unit_index, session.spike_unit_index)
    assert set(read.behavior) == {"speed", "gaze_phi"}
    np.testing.assert_allclose(read.behavior["speed"].values, session.behavior["speed"].values)
    np.testing.assert_allclose(read.behavior["gaze_phi"].timestamps,
                               session.behavior["gaze_phi"].timestamps)
    assert read.metadata == {"identifier": "lab-42", "session_description": "foreign"}
    assert read.frames is None and read.ground_truth is None


def test_nwb_renamed_series_that_is_missing_is_an_error(session: Session,
                                                        tmp_path: Path) -> None:
    path = tmp_path / "lab.nwb"
    write_foreign_nwb(session, path)
    assert set(read_session(path).behavior) == set()  # default names: absent, not an error
    with pytest.raises(SessionFormatError, match=r"lab\.nwb.*'pupil_x'"):
        read_session(path, nwb_names=NwbNames(gaze_theta="pupil_x"))
    with pytest.raises(SessionFormatError, match=r"lab\.nwb.*'Behaviour'"):
        read_session(path, nwb_names=NwbNames(behavior_module="Behaviour"))


def test_xdf_streams_found_by_name_or_type(session: Session, tmp_path: Path) -> None:
    path = tmp_path / "s.xdf"
    write_session(without_truth(session), path)
    by_type = read_session(path, xdf_names=XdfNames(spikes="x", behavior="y", frames="z"))
    assert_same(by_type, read_session(path))


# ---------------------------------------------------------------------------------------------
# Malformed files: one SessionFormatError that names the file
# ---------------------------------------------------------------------------------------------


def corrupt(kind: str, valid: Path) -> Path:
    """A damaged copy of `valid` (same suffix): empty, random bytes, or cut in half."""
    path = valid.with_name(f"{kind}{valid.suffix}")
    data = valid.read_bytes()
    path.write_bytes({"empty": b"",
                      "random": np.random.default_rng(0).bytes(4096),
                      "truncated": data[:len(data) // 2]}[kind])
    return path


@pytest.mark.parametrize("suffix", [".npz", ".nwb", ".xdf"])
@pytest.mark.parametrize("kind", ["empty", "random", "truncated"])
def test_damaged_files_give_one_clear_error(session: Session, tmp_path: Path, suffix: str,
                                            kind: str) -> None:
    valid = tmp_path / f"valid{suffix}"
    write_session(session if suffix != ".xdf" else without_truth(session), valid)
    path = corrupt(kind, valid)
    with pytest.raises(SessionFormatError, match=rf"{kind}\{suffix}") as error:
        read_session(path)
    assert "\n" not in str(error.value)


def write_npz_entries(path: Path, session: Session, drop: str = "", **changes: object) -> Path:
    arrays = {key: value for key, value in session_arrays(session).items() if key != drop}
    np.savez(path, **{**arrays, **changes})
    return path


@pytest.mark.parametrize("problem, entries, message", [
    ("missing-key", {"drop": "spike_times"}, "no 'spike_times' entry"),
    ("newer", {"format_version": np.array(2)}, "version 2 is newer"),
    ("foreign", {"format": np.array("something-else")}, "not an rtnf session file"),
    ("pickled", {"metadata": np.array([{"a": 1}], dtype=object)}, "cannot read"),
    ("unsorted", {"spike_times": np.linspace(10, 0, N_SPIKES)}, "not sorted"),
])
def test_bad_npz_contents_are_named(session: Session, tmp_path: Path, problem: str,
                                    entries: dict, message: str) -> None:
    path = write_npz_entries(tmp_path / f"{problem}.npz", session, **entries)
    with pytest.raises(SessionFormatError, match=rf"{problem}\.npz.*{message}"):
        read_session(path)


def test_npz_that_is_not_a_zip_member_archive(tmp_path: Path) -> None:
    path = tmp_path / "plain.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(SessionFormatError, match=r"plain\.npz.*not an rtnf session file"):
        read_session(path)


def test_nwb_without_units_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nounits.nwb"
    nwbfile = pynwb.NWBFile(session_description="x", identifier="x",
                            session_start_time=datetime(2024, 1, 1, tzinfo=timezone.utc))
    with pynwb.NWBHDF5IO(str(path), "w") as io:
        io.write(nwbfile)
    with pytest.raises(SessionFormatError, match=r"nounits\.nwb.*no units table"):
        read_session(path)


def test_xdf_without_spike_stream_is_named(session: Session, tmp_path: Path) -> None:
    path = tmp_path / "nospikes.xdf"
    write_session(without_truth(session), path)
    data = path.read_bytes().replace(b"<type>Spikes</type>", b"<type>Events</type>")
    path.write_bytes(data.replace(b"<name>rtnf-sim-spikes</name>", b"<name>rtnf-sim-events</name>"))
    with pytest.raises(SessionFormatError, match=r"nospikes\.xdf.*no spike stream"):
        read_session(path)


@pytest.mark.parametrize("name, message", [
    ("session.csv", "unknown session format '.csv'"),
    ("missing.nwb", "no such file"),
])
def test_unknown_suffix_and_missing_file(tmp_path: Path, name: str, message: str) -> None:
    with pytest.raises(SessionFormatError, match=rf"{name}.*{message}"):
        read_session(tmp_path / name)


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def test_summary_counts(session: Session) -> None:
    summary = summarize(session)
    json.dumps(summary)  # plain JSON types only
    assert summary["units"] == N_UNITS and summary["spikes"] == N_SPIKES
    assert summary["frames"] == 40 and summary["frame_size"] == [6, 5]
    assert summary["behavior"] == ["speed", "gaze_phi", "gaze_theta"]
    assert summary["behavior_channels"]["speed"]["samples"] == int(DURATION * BEHAVIOR_RATE)
    assert summary["behavior_channels"]["speed"]["rate_hz"] == pytest.approx(BEHAVIOR_RATE)
    assert summary["behavior_channels"]["speed"]["unit"] == "cm/s"
    assert summary["duration_s"] == pytest.approx(session.end_time - session.start_time)
    assert summary["rate_hz"]["min"] == 0.0  # the silent unit
    assert summary["rate_hz"]["mean"] == pytest.approx(N_SPIKES / N_UNITS / summary["duration_s"])
    assert summary["intervals"]["test"] == {"count": 2, "total_s": 3.5}
    assert summary["profile"] == "2p" and summary["ground_truth"] is True
    text = format_summary(summary)
    assert f"{N_UNITS} ({N_SPIKES} spikes" in text and "6x5" in text and "speed" in text
