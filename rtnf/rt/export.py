"""`rtnf export RUN --nwb`: a recorded run (rtnf.rt.recorder) as one NWB file.

The inputs are written as a session by `rtnf.data.nwb_format` (so `read_session` reads them
back): the Units table holds the spikes of the layout's units (then of any other unit that
fired), processing/behavior the behaviour channels, stimulus/stimulus the frames, and
scratch/rtnf_metadata the run's run.json (key `rtnf_run`). The outputs are added beside them:

    processing/decoded      TimeSeries per decoded target (float32, the target's unit),
                            timestamps = window ends t_k; DynamicTable `windows`: sequence,
                            window_end, sent_time of every window the loop sent
    processing/predicted    TimeSeries `predicted` (windows, units) float32: expected spikes of
                            each unit in [t_k, t_k + window); the description lists the unit ids
                            in column order
    processing/control      DynamicTable `commands`: window_end, sequence, command, rule,
                            soft_code (-1: none), sinks ("+"-joined)
    processing/telemetry    TimeSeries `latency` (ms) and `stage_ms` (windows, stages; the
                            description lists the stages); DynamicTable `rejected`: time,
                            reason, count of the inputs the loop rejected

All times are seconds on the run's stream clock (pylsl.local_clock of the recording machine).
The file is written next to its destination as `<name>.partial.nwb`, fsynced and renamed, so a
failed export never leaves a half-written file under the destination's name.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from hdmf.common import DynamicTable, VectorData
from pynwb import NWBHDF5IO, NWBFile, TimeSeries

from rtnf.data.io import write_session
from rtnf.data.nwb_format import NO_UNIT
from rtnf.errors import RtnfError
from rtnf.rt.recorder import RunRecording, read_run, sinks_of_mask
from rtnf.stream.window_output import STAGES


def export_nwb(run_directory: str | Path, out_path: str | Path,
               overwrite: bool = False) -> Path:
    """Write the run in `run_directory` to the NWB file `out_path`; returns `out_path`.
    An existing file is replaced only with `overwrite=True`."""
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".nwb":
        raise RtnfError(f"{out_path}: an NWB export needs a name ending in .nwb")
    if out_path.exists() and not overwrite:
        raise RtnfError(f"{out_path}: already exists; choose another name or overwrite it "
                        "(rtnf export --overwrite)")
    run = read_run(run_directory)
    partial = out_path.with_name(out_path.name + ".partial.nwb")
    try:
        write_session(run.input_session(), partial)
        _add_outputs(partial, run)
        _fsync_file(partial)
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)
    return out_path


def _add_outputs(path: Path, run: RunRecording) -> None:
    with NWBHDF5IO(str(path), mode="a") as io:
        nwbfile = io.read()
        _add_decoded(nwbfile, run)
        _add_predicted(nwbfile, run)
        _add_control(nwbfile, run)
        _add_telemetry(nwbfile, run)
        io.write(nwbfile)


def _add_decoded(nwbfile: NWBFile, run: RunRecording) -> None:
    layout, decoded = run.layout, run.decoded
    module = nwbfile.create_processing_module("decoded", "behaviour decoded by rtnf per window")
    for column, (target, unit) in enumerate(zip(layout.targets, layout.target_units)):
        module.add(TimeSeries(name=target, data=np.ascontiguousarray(decoded["values"][:, column]),
                              timestamps=decoded["window_end"], unit=unit or NO_UNIT,
                              description=f"decoded {target}; timestamps are window ends t_k"))
    module.add(_table("windows", "the windows whose outputs rtnf sent", [
        ("sequence", "window index on the run's grid (gaps: skipped windows)",
         decoded["sequence"]),
        ("window_end", "t_k (s, stream clock)", decoded["window_end"]),
        ("sent_time", "when the outputs left rtnf (s, stream clock)", decoded["sent_time"]),
    ]))


def _add_predicted(nwbfile: NWBFile, run: RunRecording) -> None:
    layout, predicted = run.layout, run.predicted
    unit_order = ", ".join(str(unit) for unit in layout.unit_ids)
    module = nwbfile.create_processing_module("predicted", "next-window activity predicted "
                                              "by rtnf per window")
    module.add(TimeSeries(
        name="predicted", data=np.ascontiguousarray(predicted["values"]),
        timestamps=predicted["window_end"], unit="spikes",
        description=f"expected spikes of each unit in [t_k, t_k + {layout.window:g} s); "
                    f"timestamps are t_k; columns are unit ids {unit_order}"))


def _add_control(nwbfile: NWBFile, run: RunRecording) -> None:
    control = run.control
    module = nwbfile.create_processing_module("control", "commands fired by rtnf's rules")
    module.add(_table("commands", "one row per command sent", [
        ("window_end", "t_k of the window that fired it (s, stream clock)",
         control["window_end"]),
        ("sequence", "window index on the run's grid", control["sequence"]),
        ("command", "command name (LSL marker, ZMQ payload)", _texts(control["command"])),
        ("rule", "the control rule that fired", _texts(control["rule"])),
        ("soft_code", "Bpod soft code (-1: none)", control["soft_code"]),
        ("sinks", "sinks it went to, '+'-joined",
         np.array(["+".join(sinks_of_mask(int(mask))) for mask in control["sinks"]], dtype=str)),
    ]))


def _add_telemetry(nwbfile: NWBFile, run: RunRecording) -> None:
    telemetry, rejected = run.telemetry, run.rejected
    module = nwbfile.create_processing_module("telemetry", "rtnf loop telemetry per window")
    module.add(TimeSeries(name="latency", data=telemetry["latency_ms"],
                          timestamps=telemetry["window_end"], unit="ms",
                          description="decision latency: from t_k to the outputs' hand-over"))
    module.add(TimeSeries(name="stage_ms", data=np.ascontiguousarray(telemetry["stage_ms"]),
                          timestamps=telemetry["window_end"], unit="ms",
                          description=f"time per stage (NaN: not reported); columns are "
                                      f"{', '.join(STAGES)}"))
    module.add(_table("rejected", "inputs the loop rejected", [
        ("time", "when they were received (s, stream clock)", rejected["time"]),
        ("reason", "why", _texts(rejected["reason"])),
        ("count", "how many", rejected["count"]),
    ]))


def _table(name: str, description: str,
           columns: list[tuple[str, str, np.ndarray]]) -> DynamicTable:
    return DynamicTable(name=name, description=description, columns=[
        VectorData(name=column, description=about, data=np.ascontiguousarray(data))
        for column, about, data in columns])


def _texts(names: np.ndarray) -> np.ndarray:
    """Fixed-width UTF-8 names as a str array (typed even when empty, as hdmf needs)."""
    return np.array([name.decode("utf-8") for name in names], dtype=str)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())
