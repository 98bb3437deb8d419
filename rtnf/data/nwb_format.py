"""Sessions in NWB (Neurodata Without Borders) files, through pynwb.

The layout rtnf writes (names in brackets are `NwbNames` fields, defaults shown):

    units                           Units table: one row per unit, `id` = unit id,
                                    `spike_times` = that unit's spike times (float64 s)
    processing/[behavior]           TimeSeries [speed] (cm/s), [gaze_phi], [gaze_theta]
                                    (degrees), each with explicit timestamps
    stimulus/[stimulus]             ImageSeries, uint8 (T, H, W), gzip, with timestamps
    intervals/<name>                one TimeIntervals table per interval name (train, test, ...)
    scratch/rtnf_metadata           the metadata dict as JSON text
    processing/ground_truth         only for simulated sessions:
        rates                       TimeSeries (bins, units) float32 Hz, gzip,
                                    starting_time = t0, rate = 1 / rate_dt (float32 in NWB)
        parameters                  DynamicTable, one row: rate_dt, t0 (exact float64)
        unit_truth                  DynamicTable, one row per unit (id = unit id): `coupling`
                                    (row i = coupling[i, :]) and `tuning_<name>` columns
        hubs                        DynamicTable, one row per hub: `unit_index`

The identifier is metadata `identifier`, else the sha256 of the session's content; the start
time is metadata `session_start_time` (ISO 8601, UTC unless it says otherwise), else 1970-01-01
UTC; the session description is metadata `description`, else "rtnf session". So one session
always gives the same file content.

Reading takes other files' names through `NwbNames` (e.g. module `Behavior`, series
`running_speed`). A behaviour series is looked up in the behaviour module (directly or inside a
BehavioralTimeSeries), then in `acquisition`; a missing one is simply absent, unless its name
was changed from the default (then the file was expected to have it). Every TimeIntervals
table under `intervals` becomes an interval (in other files, `trials` and `epochs` too). Files
without `scratch/rtnf_metadata` get their identifier and session description as metadata.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
from hdmf.backends.hdf5 import H5DataIO
from hdmf.common import DynamicTable, VectorData
from pynwb import NWBHDF5IO, NWBFile, ProcessingModule, TimeSeries
from pynwb.behavior import BehavioralTimeSeries
from pynwb.epoch import TimeIntervals
from pynwb.image import ImageSeries

from rtnf.config import NwbNames
from rtnf.data.npz_format import session_digest
from rtnf.data.session import (BEHAVIOR_UNITS, BehaviorChannel, Frames, GroundTruth, Session,
                               sort_spikes)
from rtnf.errors import SessionFormatError

METADATA_NAME = "rtnf_metadata"
GROUND_TRUTH_MODULE = "ground_truth"
TUNING_PREFIX = "tuning_"
DEFAULT_START = datetime(1970, 1, 1, tzinfo=timezone.utc)
NO_UNIT = "n/a"  # NWB requires a unit string; an empty rtnf unit is written as this


def write_nwb(session: Session, path: str | Path) -> None:
    """Write `session` to `path` in the layout above."""
    session.validate(source=str(path))
    unknown = set(session.behavior) - set(BEHAVIOR_UNITS)
    if unknown:
        raise SessionFormatError(f"{path}: the NWB layout holds the behaviour channels "
                                 f"{', '.join(BEHAVIOR_UNITS)}; cannot write {sorted(unknown)}")
    nwbfile = _new_file(session)
    for index, unit_id in enumerate(session.unit_ids):
        nwbfile.add_unit(spike_times=session.spikes_of_unit(index), id=int(unit_id))
    _add_behavior(nwbfile, session.behavior)
    if session.frames is not None:
        nwbfile.add_stimulus(ImageSeries(
            name=NwbNames().stimulus, data=_gzip(session.frames.images),
            timestamps=session.frames.timestamps, unit=NO_UNIT, format="raw",
            description="stimulus frames, uint8 (frames, height, width)"))
    for name, spans in session.intervals.items():
        nwbfile.add_time_intervals(_time_intervals(name, spans))
    nwbfile.add_scratch(json.dumps(session.metadata), name=METADATA_NAME,
                        description="rtnf session metadata (JSON)")
    if session.ground_truth is not None:
        nwbfile.add_processing_module(_ground_truth_module(session.ground_truth,
                                                           session.unit_ids))
    with NWBHDF5IO(str(path), mode="w") as io:
        io.write(nwbfile)


def read_nwb(path: str | Path, names: NwbNames = NwbNames()) -> Session:
    """Read a session from an NWB file; `names` says where the file keeps rtnf's quantities."""
    source = str(path)
    if not h5py.is_hdf5(source):
        raise SessionFormatError(f"{source}: not an NWB file (not HDF5)")
    with NWBHDF5IO(source, mode="r") as io:
        nwbfile = io.read()
        unit_ids, spike_times, spike_unit_index = _spikes(nwbfile, source)
        session = Session(
            unit_ids=unit_ids,
            spike_times=spike_times,
            spike_unit_index=spike_unit_index,
            behavior=_behavior(nwbfile, names, source),
            frames=_frames(nwbfile, names, source),
            intervals={name: np.column_stack([table["start_time"].data[:],
                                              table["stop_time"].data[:]])
                       for name, table in nwbfile.intervals.items()},
            metadata=_metadata(nwbfile),
            ground_truth=_ground_truth(nwbfile),
        )
    return session.validate(source=source)


def _new_file(session: Session) -> NWBFile:
    """An empty NWBFile whose identifying fields come from the session (see the top)."""
    start = datetime.fromisoformat(session.metadata.get("session_start_time",
                                                        DEFAULT_START.isoformat()))
    if start.tzinfo is None:
        start = start.replace(tzinfo=timezone.utc)
    return NWBFile(
        session_description=str(session.metadata.get("description", "rtnf session")),
        identifier=str(session.metadata.get("identifier") or session_digest(session)),
        session_start_time=start,
        file_create_date=start,
    )


def _add_behavior(nwbfile: NWBFile, behavior: dict[str, BehaviorChannel]) -> None:
    if not behavior:
        return
    names = NwbNames()
    module = nwbfile.create_processing_module(names.behavior_module, "behaviour (rtnf)")
    for name, channel in behavior.items():
        module.add(TimeSeries(name=getattr(names, name), data=channel.values,
                              timestamps=channel.timestamps, unit=channel.unit or NO_UNIT))


def _time_intervals(name: str, spans: np.ndarray) -> TimeIntervals:
    table = TimeIntervals(name=name, description=f"rtnf '{name}' intervals")
    for start_time, stop_time in spans:
        table.add_interval(start_time=float(start_time), stop_time=float(stop_time))
    return table


def _gzip(array: np.ndarray) -> H5DataIO:
    return H5DataIO(data=array, compression="gzip")


def _column(name: str, description: str, data: np.ndarray) -> VectorData:
    return VectorData(name=name, description=description, data=data)


def _ground_truth_module(truth: GroundTruth, unit_ids: np.ndarray) -> ProcessingModule:
    module = ProcessingModule(name=GROUND_TRUTH_MODULE,
                              description="simulator ground truth (rtnf)")
    module.add(TimeSeries(name="rates", data=_gzip(truth.rates), unit="Hz",
                          starting_time=truth.t0, rate=1.0 / truth.rate_dt,
                          description="true firing rate of each unit per bin"))
    module.add(DynamicTable(name="parameters", description="rate bin width and start (s)",
                            columns=[_column("rate_dt", "rate bin width (s)",
                                             np.array([truth.rate_dt])),
                                     _column("t0", "start of the first rate bin (s)",
                                             np.array([truth.t0]))]))
    unit_columns = [_column("coupling", "row i: weight of each unit's spikes on unit i",
                            truth.coupling)]
    unit_columns += [_column(TUNING_PREFIX + name, f"tuning parameter '{name}'", values)
                     for name, values in truth.tuning.items()]
    module.add(DynamicTable(name="unit_truth", description="per-unit ground truth",
                            id=unit_ids.tolist(), columns=unit_columns))
    module.add(DynamicTable(name="hubs", description="hub units",
                            columns=[_column("unit_index", "position in unit ids",
                                             truth.hubs)]))
    return module


def _spikes(nwbfile: NWBFile, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    units = nwbfile.units
    if units is None or "spike_times" not in units.colnames:
        raise SessionFormatError(f"{source}: no units table with spike_times (the spikes)")
    unit_ids = np.asarray(units.id.data[:], dtype=np.int64)
    spike_times = np.asarray(units["spike_times"].target.data[:], dtype=np.float64)
    ends = np.asarray(units["spike_times"].data[:], dtype=np.int64)
    counts = np.diff(ends, prepend=0)
    spike_unit_index = np.repeat(np.arange(unit_ids.size, dtype=np.int32), counts)
    return unit_ids, *sort_spikes(spike_times, spike_unit_index)


def _behavior(nwbfile: NWBFile, names: NwbNames, source: str) -> dict[str, BehaviorChannel]:
    defaults = NwbNames()
    module = nwbfile.processing.get(names.behavior_module)
    if module is None and names.behavior_module != defaults.behavior_module:
        raise SessionFormatError(f"{source}: no processing module '{names.behavior_module}' "
                                 "(NwbNames.behavior_module)")
    places = ([] if module is None else [module.data_interfaces]) + [nwbfile.acquisition]
    behavior = {}
    for name in BEHAVIOR_UNITS:
        file_name = getattr(names, name)
        series = _find_series(places, file_name)
        if series is None:
            if file_name != getattr(defaults, name):
                raise SessionFormatError(f"{source}: no behaviour series '{file_name}' "
                                         f"(NwbNames.{name})")
            continue
        behavior[name] = BehaviorChannel(
            timestamps=np.asarray(series.get_timestamps()[:], dtype=np.float64),
            values=np.asarray(series.get_data_in_units(), dtype=np.float64),
            unit="" if series.unit == NO_UNIT else series.unit)
    return behavior


def _find_series(places: list[dict], name: str) -> TimeSeries | None:
    """The TimeSeries `name` in the first place holding it, directly or in a
    BehavioralTimeSeries."""
    for place in places:
        if isinstance(place.get(name), TimeSeries):
            return place[name]
        for container in place.values():
            if isinstance(container, BehavioralTimeSeries) and name in container.time_series:
                return container.time_series[name]
    return None


def _frames(nwbfile: NWBFile, names: NwbNames, source: str) -> Frames | None:
    series = nwbfile.stimulus.get(names.stimulus)
    if series is None:
        if names.stimulus != NwbNames().stimulus:
            raise SessionFormatError(f"{source}: no stimulus series '{names.stimulus}' "
                                     "(NwbNames.stimulus)")
        return None
    return Frames(timestamps=np.asarray(series.get_timestamps()[:], dtype=np.float64),
                  images=np.asarray(series.data[:]))


def _metadata(nwbfile: NWBFile) -> dict:
    if METADATA_NAME in nwbfile.scratch:
        return json.loads(nwbfile.scratch[METADATA_NAME].data)
    return {"identifier": nwbfile.identifier,
            "session_description": nwbfile.session_description}


def _ground_truth(nwbfile: NWBFile) -> GroundTruth | None:
    module = nwbfile.processing.get(GROUND_TRUTH_MODULE)
    if module is None:
        return None
    parameters = module["parameters"]
    unit_truth = module["unit_truth"]
    return GroundTruth(
        rate_dt=float(parameters["rate_dt"].data[0]),
        rates=np.asarray(module["rates"].data[:]),
        coupling=np.asarray(unit_truth["coupling"].data[:]),
        hubs=np.asarray(module["hubs"]["unit_index"].data[:]),
        tuning={column[len(TUNING_PREFIX):]: np.asarray(unit_truth[column].data[:])
                for column in unit_truth.colnames if column.startswith(TUNING_PREFIX)},
        t0=float(parameters["t0"].data[0]),
    )
