"""`rtnf ...`: the one command-line entry point.

Each sub-command is a small function that loads the configuration, calls into the package and
prints the result. Errors meant for the operator (`RtnfError`) are printed as one line and exit
with status 2; Ctrl-C exits with 130 after the command has cleaned up.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

from rtnf import __version__
from rtnf.config import Config, check_config_file, load_config, recipe_path
from rtnf.errors import RtnfError


def _config(args: argparse.Namespace, flags: Sequence[str] = (),
            defaults: Sequence[str] = ()) -> Config:
    """rtnf.yaml, then the --recipe, then --config files, then `defaults`, --set overrides and
    the command's own flags (as overrides, so they get the same checks), in that order."""
    recipe = [recipe_path(args.recipe)] if getattr(args, "recipe", None) else []
    return load_config([*recipe, *(args.config or ())], [*defaults, *(args.set or ()), *flags])


# ----------------------------------------------------------------------------- config


def cmd_config_show(args: argparse.Namespace) -> int:
    config = _config(args)
    print(json.dumps(config.to_dict(), indent=2) if args.json else config.to_yaml(), end="")
    if args.json:
        print()
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    check_config_file(args.file)
    print(f"{args.file}: valid")
    return 0


# ----------------------------------------------------------------------------- info


def cmd_info(args: argparse.Namespace) -> int:
    if args.preset is not None:
        return _model_info(args)
    if args.file is None:
        raise RtnfError("rtnf info: give a session FILE or --preset NAME")
    from rtnf.data.io import read_session
    from rtnf.data.summary import format_summary, summarize

    config = _config(args)
    session = read_session(args.file, nwb_names=config.rig.nwb, xdf_names=config.rig.xdf)
    summary = {"file": str(args.file), **summarize(session)}
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def _model_info(args: argparse.Namespace) -> int:
    from rtnf.model.summary import format_model_summary, model_summary

    config = _config(args, [f"model.preset={args.preset}"])
    summary = model_summary(config, n_units=args.units or config.simulation.neurons)
    print(json.dumps(summary, indent=2) if args.json else format_model_summary(summary))
    return 0


# ----------------------------------------------------------------------------- pretrain


def cmd_pretrain(args: argparse.Namespace) -> int:
    from rtnf.train.loop import Distributed
    from rtnf.train.pretrain import DEFAULT_RECIPE, format_summary, load_sessions, pretrain

    if bool(args.data) == args.simulated:
        raise RtnfError("rtnf pretrain: give --data FILES_OR_DIRS or --simulated (not both)")
    if args.default_recipe and not args.simulated:
        raise RtnfError("rtnf pretrain: --default-recipe goes with --simulated")
    flags = [f"model.preset={args.preset}"] if args.preset else []
    flags += [f"training.{key}={getattr(args, key)}" for key in ("max_steps", "minutes")
              if getattr(args, key) is not None]
    config = _config(args, flags, defaults=DEFAULT_RECIPE if args.default_recipe else ())
    if args.simulated:
        from rtnf.data.sim import simulate

        sessions = simulate(config.simulation, config.rig.profile)
    else:
        sessions = load_sessions(args.data, config)
    distributed = Distributed.from_environment()
    interrupted = threading.Event()  # Ctrl-C / SIGTERM: finish the step, checkpoint, stop
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: interrupted.set())
    try:
        summary = pretrain(sessions, config, args.out, resume=args.resume,
                           distributed=distributed, show_progress=not args.json,
                           should_stop=lambda _: interrupted.is_set())
    finally:
        distributed.close()
    if distributed.main:
        print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


# ----------------------------------------------------------------------------- calibrate


def cmd_calibrate(args: argparse.Namespace) -> int:
    from rtnf.bundle import file_source
    from rtnf.data.io import read_session
    from rtnf.train.calibrate import calibrate

    flags = [f"calibration.method={args.method}"] if args.method else []
    config = _config(args, flags)
    log = (lambda _: None) if args.json else (lambda line: print(line, flush=True))
    if (args.data is None) == (args.source is None):
        raise RtnfError("rtnf calibrate: give either --data FILE or --from lsl|zmq")
    extra_files: dict[str, Path] = {}
    if args.source is not None:
        minutes = config.calibration.minutes if args.minutes is None else args.minutes
        capture_path = _capture_live(args, config, minutes, log)
        session = read_session(capture_path)
        source = {**file_source(capture_path), "kind": "live", "transport": args.source,
                  "streams": session.metadata["streams"], "file": CAPTURE_IN_BUNDLE}
        extra_files[CAPTURE_IN_BUNDLE] = capture_path
    else:
        session = read_session(args.data, nwb_names=config.rig.nwb, xdf_names=config.rig.xdf)
        source = file_source(args.data)
        if args.minutes is not None:
            if args.minutes * 60 > session.duration + 1e-9:
                raise RtnfError(f"--minutes {args.minutes:g}: {args.data} holds only "
                                f"{session.duration / 60:.2f} minutes")
            session = session.first(args.minutes * 60)
    metrics = calibrate(session, config, args.out, pretrained=args.pretrained, source=source,
                        log=log, extra_files=extra_files)
    for path in extra_files.values():  # now inside the bundle
        path.unlink()
    engine = _compile_after_calibration(args.out, config) if not args.no_compile else None
    if args.json:
        print(json.dumps({**metrics, "engine": engine}, indent=2))
        return 0
    verdict = metrics["verdict"]
    if engine is not None:
        print(_compiled_line(engine) if "error" not in engine else
              f"not compiled ({engine['error']}); run: rtnf compile --bundle {args.out}")
    print(f"{'GO' if verdict['go'] else 'NO-GO'}: {verdict['reason']}; the bundle runs "
          f"{verdict['use']}. Wrote {args.out} (report: {args.out / 'report' / 'report.md'})")
    return 0


CAPTURE_IN_BUNDLE = "capture/session.npz"


def _capture_live(args: argparse.Namespace, config: Config, minutes: float,
                  log: Callable[[str], None]) -> Path:
    """Capture the rig's streams for `minutes` into a session file next to the bundle; it is
    kept there (and named) if anything after the capture fails."""
    from datetime import datetime

    from rtnf.data.io import write_session
    from rtnf.stream.capture import CaptureProgress, capture_session
    from rtnf.stream.sources import open_sources

    def show(progress: CaptureProgress) -> None:
        done = progress.elapsed_s / progress.total_s
        bar = "#" * int(30 * done) + "-" * (30 - int(30 * done))
        counts = progress.counts
        print(f"\rcapturing [{bar}] {progress.elapsed_s:5.0f}/{progress.total_s:.0f} s  "
              f"{counts['spikes']} spikes, {counts['behavior']} behaviour samples, "
              f"{counts['frames']} frames, {progress.rejected} rejected", end="", flush=True)

    sources = open_sources(config.rig, args.source, simulation=config.simulation,
                           max_message_bytes=config.realtime.max_message_bytes)
    log(f"capturing {minutes:g} min from {', '.join(s.name for s in sources)}")
    try:
        session = capture_session(sources, minutes * 60, None if args.json else show)
    finally:
        for source in sources:
            source.close()
    if not args.json:
        print()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.out.with_name(f"{args.out.name}-capture-{stamp}.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_session(session, path)
    if session.metadata["interrupted"]:
        raise RtnfError(f"capture interrupted after {session.duration:.1f} s; what arrived is "
                        f"saved in {path} (calibrate from it with --data {path})")
    log(f"captured {session.duration:.1f} s: {session.n_spikes} spikes of {session.n_units} "
        f"units, behaviour {', '.join(session.behavior) or 'none'}; saved {path} until the "
        f"bundle holds it")
    return path


def _compile_after_calibration(bundle: Path, config: Config) -> dict:
    """Compile the new bundle for this machine; a failure leaves the bundle as it is."""
    from rtnf.engine.compile import compile_bundle

    try:
        return compile_bundle(bundle, config.engine)
    except (RtnfError, ImportError, RuntimeError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _compiled_line(report: dict) -> str:
    worst = max(report["parity"].values())
    return (f"compiled: backend {report['backend']} ({json.dumps(report['built'])}); "
            f"parity with torch {worst:.1e} (relative, worst graph); caches in "
            f"{report['engines']}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rtnf.bundle import load_bundle
    from rtnf.data.io import read_session
    from rtnf.train.evaluate import evaluate_bundle, format_evaluation

    bundle = load_bundle(args.bundle)
    rig = bundle.config.rig
    session = read_session(args.data, nwb_names=rig.nwb, xdf_names=rig.xdf)
    result = evaluate_bundle(bundle, session, args.start, args.end)
    print(json.dumps(result, indent=2) if args.json else format_evaluation(result))
    return 0


# ----------------------------------------------------------------------------- compile


def cmd_compile(args: argparse.Namespace) -> int:
    from rtnf.bundle import CONFIG
    from rtnf.engine.compile import compile_bundle

    # The bundle's configuration, then this machine's --config files and --set overrides.
    config = load_config([args.bundle / CONFIG, *(args.config or ())], args.set or ())
    report = compile_bundle(args.bundle, config.engine, args.backend)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for name, record in report["onnx"].items():
        print(f"exported {record['file']} (ONNX parity {record['parity']:.1e})")
    if "cpu_choice" in report:
        figures = report["cpu_choice"]["median_ms"]
        print("measured here: " + "; ".join(
            f"{name} decode {f['decode_ms']:.2f} ms, step {f['step_ms']:.2f} ms"
            for name, f in figures.items()))
    print(_compiled_line(report))
    return 0


# ----------------------------------------------------------------------------- bench


def cmd_bench_model(args: argparse.Namespace) -> int:
    import torch

    from rtnf.bench.model_speed import format_table, run

    config = _config(args, [f"model.preset={args.preset}"] if args.preset else [])
    torch.set_num_threads(args.threads or config.engine.threads)
    return _bench_report(args, run(config, repeats=args.repeats), format_table)


def cmd_bench_engine(args: argparse.Namespace) -> int:
    from rtnf.bench.engine_speed import format_table, run

    config = _config(args, [f"model.preset={args.preset}"] if args.preset else [])
    return _bench_report(args, run(config, repeats=args.repeats), format_table)


def cmd_bench_latency(args: argparse.Namespace) -> int:
    from rtnf.bench.latency import CONFIGURATIONS, format_table, plot_histograms, run

    config = _config(args, [f"model.preset={args.preset}"] if args.preset else [])
    names = tuple(args.configurations or CONFIGURATIONS)
    unknown = [name for name in names if name not in CONFIGURATIONS]
    if unknown:
        raise RtnfError(f"--configurations {unknown[0]}: expected any of "
                        f"{', '.join(CONFIGURATIONS)}")
    report = run(config, args.seconds, names)
    if args.plot is not None:
        plot_histograms(report, args.plot)
    return _bench_report(args, report, format_table)


def _bench_report(args: argparse.Namespace, report: dict,
                  format_table: Callable[[dict], str]) -> int:
    """Write the benchmark's JSON to --out when given; print it (--json) or its table."""
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


# ----------------------------------------------------------------------------- run, demo


def _logging_to_stderr() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="rtnf: %(message)s", stream=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from rtnf.rt.run import RunOptions, fault_lines, run_closed_loop
    from rtnf.rt.telemetry import format_summary

    config = _config(args, ["recording.enabled=false"] if args.no_record else [])
    _logging_to_stderr()
    options = RunOptions(args.bundle, args.stream, args.backend, args.decoder, args.prediction,
                         args.seconds, args.run_dir,
                         live_view=not args.json and not args.quiet and sys.stdout.isatty())

    def started(info: dict) -> None:
        if args.json or args.quiet:
            return
        print(f"running {info['bundle']} ({info['decoder']} on {info['backend']['backend']}); "
              f"inputs {', '.join(info['sources'])}; outputs {', '.join(info['sinks'])}"
              + (f"; recording to {info['run_dir']}" if info["run_dir"] else ""), flush=True)
        for line in info["rules"]:
            print(f"rule {line}", flush=True)
        print("Ctrl-C stops (final flush and summary)", flush=True)

    summary = run_closed_loop(config, options, started)
    report = [json.dumps(summary, indent=2)] if args.json else [format_summary(summary),
                                                                *fault_lines(summary)]
    print("\n".join(report), flush=True)
    if summary["failures"]:
        raise RtnfError("the run failed: " + "; ".join(summary["failures"]))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import tempfile

    from rtnf.rt.demo import format_demo, run_demo

    args.recipe = "quick"  # a 4-minute calibration session; --set still overrides it
    config = _config(args)
    log = (lambda _: None) if args.json else (lambda line: print(line, flush=True))
    with tempfile.TemporaryDirectory(prefix="rtnf-demo-") as scratch:
        workdir = args.workdir or Path(scratch)
        report = run_demo(config, args.seconds, workdir, args.pretrained, log)
    print(json.dumps(report, indent=2) if args.json else format_demo(report))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from rtnf.rt.export import export_nwb

    if not args.nwb:
        raise RtnfError("rtnf export: choose a format (--nwb)")
    out = args.out or args.run.with_suffix(".nwb")
    path = export_nwb(args.run, out, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------- simulate


def _session_paths(out: Path, count: int) -> list[Path]:
    """One file per simulated session: `out` itself, or `stem-sessionK.suffix` for several."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-session{k + 1}{out.suffix}") for k in range(count)]


def cmd_simulate(args: argparse.Namespace) -> int:
    from rtnf.data.sim import simulate

    if args.out is None and args.stream is None:
        raise RtnfError("rtnf simulate: give --out PATH (.nwb, .npz or .xdf) and/or --stream lsl|zmq")
    if args.out is not None and Path(args.out).suffix not in (".nwb", ".npz", ".xdf"):
        raise RtnfError(f"--out {args.out}: expected a .nwb, .npz or .xdf file name")
    # Flags are overrides of the `simulation` section, so they get the config's checks.
    flags = [f"simulation.{key}={getattr(args, key)}"
             for key in ("minutes", "neurons", "seed", "sessions") if getattr(args, key) is not None]
    if args.profile is not None:
        flags.append(f"rig.profile={args.profile}")
    config = _config(args, flags)
    profile = config.rig.profile

    sessions = simulate(config.simulation, profile)
    if args.out is not None:
        from rtnf.data.io import write_session

        for session, path in zip(sessions, _session_paths(Path(args.out), len(sessions))):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_session(session, path)
            print(f"wrote {path}: {session.n_units} units, {session.n_spikes} spikes, "
                  f"{session.duration:.1f} s ({profile})")
    if args.stream is not None:
        from rtnf.stream.sim_stream import stream_session

        session = sessions[-1]
        if args.from_minute:
            if args.from_minute * 60 >= session.duration:
                raise RtnfError(f"--from-minute {args.from_minute:g}: the session lasts "
                                f"{session.duration / 60:.2f} minutes")
            session = session.after(args.from_minute * 60)
        address = args.address or config.rig.sources.spikes.address
        print(f"streaming {session.n_units} units over {args.stream} at {args.speed:g}x "
              f"({'LSL streams rtnf-sim-*' if args.stream == 'lsl' else address}); Ctrl-C stops")
        stats = stream_session(session, args.stream, speed=args.speed, address=address,
                               lsl_setting=config.rig.lsl.config, stop=threading.Event(),
                               loop=args.loop)
        sent = ", ".join(f"{count} {name}" for name, count in stats.sent.items())
        print(f"{'stopped' if stats.stopped else 'finished'}: sent {sent} "
              f"({stats.passes} full pass(es)) via {', '.join(stats.endpoints.values())}")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", action="append", metavar="FILE",
                        help="configuration file merged over rtnf.yaml's defaults (repeatable)")
    common.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override one key, e.g. --set windows.hop=0.02 (repeatable)")

    parser = argparse.ArgumentParser(
        prog="rtnf", description="Real-time Neuroformer: closed-loop neural decoding for rigs.")
    parser.add_argument("--version", action="version", version=f"rtnf {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = commands.add_parser("config", help="show or check configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True,
                                            metavar="ACTION")
    show = config_commands.add_parser("show", parents=[common], help="print the resolved config")
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.add_argument("--recipe", metavar="NAME_OR_FILE",
                      help="include a calibration recipe, as rtnf calibrate --recipe does")
    show.set_defaults(handler=cmd_config_show)
    check = config_commands.add_parser("check", help="validate a configuration file")
    check.add_argument("file", type=Path)
    check.set_defaults(handler=cmd_config_check)

    info = commands.add_parser("info", parents=[common],
                               help="summarise a session file or a model preset")
    info.add_argument("file", type=Path, nargs="?", help="session file (.nwb, .xdf, .npz)")
    info.add_argument("--preset", help="describe this model preset instead (rt-small, paper)")
    info.add_argument("--units", type=int,
                      help="--preset: units the model is sized for (default simulation.neurons)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(handler=cmd_info)

    pre = commands.add_parser("pretrain", parents=[common],
                              help="pretrain a model on sessions (single process or torchrun)")
    pre.add_argument("--data", nargs="+", metavar="FILE_OR_DIR",
                     help="session files, or directories of them")
    pre.add_argument("--simulated", action="store_true",
                     help="train on sessions of the simulated rig (the simulation section)")
    pre.add_argument("--default-recipe", action="store_true",
                     help="with --simulated: the recipe of the default pretrained checkpoint")
    pre.add_argument("--preset", help="model preset (default: model.preset)")
    pre.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    pre.add_argument("--max-steps", type=int, help="optimiser steps (training.max_steps)")
    pre.add_argument("--minutes", type=float, help="wall-time limit (training.minutes)")
    pre.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    pre.add_argument("--json", action="store_true", help="print the summary as JSON")
    pre.set_defaults(handler=cmd_pretrain)

    cal = commands.add_parser("calibrate", parents=[common],
                              help="finetune on a calibration session and write a bundle")
    cal.add_argument("--data", type=Path, help="the calibration session (.nwb, .xdf, .npz)")
    cal.add_argument("--from", dest="source", choices=["lsl", "zmq"],
                     help="capture the rig's live streams (rig.sources) instead, for --minutes")
    cal.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    cal.add_argument("--pretrained", type=Path,
                     help="pretrained checkpoint directory (default: the cached default one)")
    cal.add_argument("--minutes", type=float,
                     help="use only the first M minutes of --data; with --from: capture M "
                          "minutes (default calibration.minutes)")
    cal.add_argument("--recipe", metavar="NAME_OR_FILE",
                     help="calibration recipe: default, quick (a 2-minute session), thorough, or "
                          "a recipe file (see calibration/README.md)")
    cal.add_argument("--method", choices=["embeddings", "full", "scratch"],
                     help="what is finetuned (default: calibration.method)")
    cal.add_argument("--no-compile", action="store_true",
                     help="do not compile the bundle for this machine (rtnf compile later)")
    cal.add_argument("--json", action="store_true", help="print the metrics as JSON")
    cal.set_defaults(handler=cmd_calibrate)

    ev = commands.add_parser("evaluate", help="decode a session with a bundle and score it "
                                              "against the bundle's baselines")
    ev.add_argument("--bundle", type=Path, required=True, help="bundle directory")
    ev.add_argument("--data", type=Path, required=True, help="session file (.nwb, .xdf, .npz)")
    ev.add_argument("--start", type=float, metavar="SECONDS",
                    help="evaluate windows from this session time on (default: the start)")
    ev.add_argument("--end", type=float, metavar="SECONDS",
                    help="... up to this session time (default: the end)")
    ev.add_argument("--json", action="store_true",
                    help="print JSON (the shape of the bundle's report/metrics.json)")
    ev.set_defaults(handler=cmd_evaluate)

    comp = commands.add_parser("compile", parents=[common],
                               help="export a bundle to ONNX and build its inference engine")
    comp.add_argument("--bundle", type=Path, required=True, help="bundle directory")
    comp.add_argument("--backend", choices=["auto", "onnxruntime", "torch", "tensorrt"],
                      help="backend to build (default: engine.backend)")
    comp.add_argument("--json", action="store_true", help="print the report as JSON")
    comp.set_defaults(handler=cmd_compile)

    bench = commands.add_parser("bench", help="benchmarks")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    model = bench_commands.add_parser("model", parents=[common],
                                      help="model speed: decode, sliding history, generation")
    model.add_argument("--preset", help="model preset (default: model.preset)")
    model.add_argument("--repeats", type=int, default=100, help="windows timed per figure")
    model.add_argument("--threads", type=int, help="torch threads (default: engine.threads)")
    model.add_argument("--out", type=Path, help="also write the JSON report here")
    model.add_argument("--json", action="store_true", help="print the JSON report")
    model.set_defaults(handler=cmd_bench_model)
    engine = bench_commands.add_parser(
        "engine", parents=[common],
        help="engine speed per backend: decode, AR step, generation, history length")
    engine.add_argument("--preset", help="model preset (default: model.preset)")
    engine.add_argument("--repeats", type=int, default=100, help="windows timed per figure")
    engine.add_argument("--out", type=Path, help="also write the JSON report here")
    engine.add_argument("--json", action="store_true", help="print the JSON report")
    engine.set_defaults(handler=cmd_bench_engine)
    latency = bench_commands.add_parser(
        "latency", parents=[common],
        help="end-to-end decision latency: simulated rig -> rtnf run -> receiver")
    latency.add_argument("--preset", help="model preset (default: model.preset)")
    latency.add_argument("--seconds", type=float, default=120.0,
                         help="closed-loop run per configuration")
    latency.add_argument("--configurations", nargs="+", metavar="NAME",
                         help="2p-386, 2p-2000, ephys-300 (default: all)")
    latency.add_argument("--out", type=Path, help="also write the JSON report here")
    latency.add_argument("--plot", type=Path, help="write the latency histograms (PNG) here")
    latency.add_argument("--json", action="store_true", help="print the JSON report")
    latency.set_defaults(handler=cmd_bench_latency)

    run = commands.add_parser("run", parents=[common],
                              help="the closed loop: decode the rig's streams with a bundle")
    run.add_argument("--bundle", type=Path, required=True, help="bundle directory")
    run.add_argument("--stream", choices=["lsl", "zmq", "openephys", "replay", "sim"],
                     help="take every input over this transport (default: rig.sources)")
    run.add_argument("--seconds", type=float, help="stop after this long (default: Ctrl-C)")
    run.add_argument("--backend", choices=["auto", "onnxruntime", "torch", "tensorrt"],
                     help="inference backend (default: engine.backend)")
    run.add_argument("--decoder", default="auto",
                     help="behaviour decoder: auto (the calibration verdict's), neuroformer, "
                          "or a baseline of the bundle (ridge, mlp, gru)")
    run.add_argument("--prediction", choices=["rates", "generate"], default="rates",
                     help="next-window activity: the rate head (one pass) or generated tokens")
    run.add_argument("--run-dir", type=Path,
                     help="record into this directory (default: recording.directory/<time>)")
    run.add_argument("--no-record", action="store_true", help="do not record the run")
    run.add_argument("--quiet", action="store_true", help="no live view; print the summary")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.set_defaults(handler=cmd_run)

    demo = commands.add_parser("demo", parents=[common],
                               help="calibrate, compile and run the closed loop on the "
                                    "simulated rig; report decoding and latency")
    demo.add_argument("--seconds", type=float, default=30.0, help="closed-loop run length")
    demo.add_argument("--pretrained", type=Path,
                      help="pretrained checkpoint (default: the cached default one)")
    demo.add_argument("--workdir", type=Path,
                      help="keep the bundle, the run record and the logs here")
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
    demo.set_defaults(handler=cmd_demo)

    export = commands.add_parser("export", help="convert a recorded run")
    export.add_argument("run", type=Path, help="run directory (recording.directory/...)")
    export.add_argument("--nwb", action="store_true", help="write an NWB file")
    export.add_argument("--out", type=Path, help="output file (default: RUN.nwb)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing file")
    export.set_defaults(handler=cmd_export)


    sim = commands.add_parser("simulate", parents=[common],
                              help="simulate a rig: write session files and/or stream live")
    sim.add_argument("--out", type=Path, help="write the session(s) to PATH (.nwb, .npz, .xdf)")
    sim.add_argument("--minutes", type=float, help="minutes per session")
    sim.add_argument("--neurons", type=int, help="number of units")
    sim.add_argument("--profile", choices=["2p", "ephys"], help="rig profile (default: rig.profile)")
    sim.add_argument("--seed", type=int, help="random seed (same seed, same sessions)")
    sim.add_argument("--sessions", type=int, help="sessions (days) of the same animal")
    sim.add_argument("--stream", choices=["lsl", "zmq"], help="stream the (last) session live")
    sim.add_argument("--speed", type=float, default=1.0, help="streaming speed (1 = real time)")
    sim.add_argument("--address", help="ZMQ address to bind (default: the spike source's)")
    sim.add_argument("--loop", action="store_true", help="start over at the end of the session")
    sim.add_argument("--from-minute", type=float, default=0.0, metavar="M",
                     help="stream the session from minute M on (e.g. after a calibration part)")
    sim.set_defaults(handler=cmd_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except RtnfError as exc:
        print(f"rtnf: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rtnf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
