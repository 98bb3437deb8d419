"""Engines: graphs vs the model, ONNX export, backend parity, selection, `rtnf compile`."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from rtnf.bundle import load_bundle, verify_bundle
from rtnf.config import EngineConfig, SimulationConfig
from rtnf.data.sim import simulate
from rtnf.engine.buckets import bucket, in_chunks, lengths, pad_inputs, trim_outputs
from rtnf.engine.cache_integrity import digest_path, verified
from rtnf.engine.compile import backend_parity, compile_bundle
from rtnf.engine.export import relative_error
from rtnf.engine.graphs import dynamic_axes, example_inputs, session_graphs
from rtnf.engine.onnxruntime_backend import OnnxRuntimeBackend
from rtnf.engine.select import (cpu_choice_path, make_backend, open_engine, resolve,
                                tensorrt_unavailable, write_cpu_choice)
from rtnf.engine.tensorrt_plan import (FP16_PARITY, cached_or_built, dimension_ranges,
                                       fp16_graph, plan_key, profile_shapes)
from rtnf.engine.torch_backend import TorchBackend
from rtnf.errors import EngineError
from rtnf.model.generation import Sampling, generate_window
from rtnf.model.history import HistoryCache, as_layers, model_keys_values
from rtnf.model.inputs import inputs_from_tokens
from rtnf.model.neuroformer import Neuroformer
from rtnf.tokens import TokenSpec, absolute_bins, tokenize_windows, window_ends
from random_bundle import FRAMES, WINDOWS, write_bundle

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def session():
    (s,) = simulate(SimulationConfig(neurons=40, minutes=0.3, seed=5), "ephys")
    return s


@pytest.fixture(scope="module")
def token_spec(session) -> TokenSpec:
    return TokenSpec.from_config(WINDOWS, session.n_units)


@pytest.fixture(scope="module")
def bundle_dir(session, tmp_path_factory):
    return write_bundle(session, tmp_path_factory.mktemp("bundles") / "b")


@pytest.fixture(scope="module")
def compiled(bundle_dir):
    return compile_bundle(bundle_dir, EngineConfig(backend="onnxruntime", threads=1))


def window_inputs(session, token_spec, bundle, ends):
    tokens = tokenize_windows(session.spike_times, session.spike_unit_index, ends, token_spec)
    rng = np.random.default_rng(1)
    clip = rng.integers(0, 256, (ends.size, *FRAMES), dtype=np.uint8)
    behavior = rng.standard_normal((ends.size, 1))
    return inputs_from_tokens(tokens, ends, token_spec, bundle.unit_rows, bundle.session_row,
                              clip, behavior)


def slide(engine_or_model, session, token_spec, bundle, ends):
    """Decode windows hop by hop, the history's keys/values cached per spike: with an
    `Engine`, or (reference) the torch model on the same cached history."""
    model = bundle.checkpoint.model
    keys_values = (model_keys_values(model, bundle.unit_rows, bundle.session_row)
                   if engine_or_model is model else engine_or_model.history_keys_values)
    cache = HistoryCache(keys_values, session.n_units, token_spec)
    added_until, outputs = 0.0, []
    for end in ends:
        new = (session.spike_times >= added_until) & (session.spike_times < end - WINDOWS.current)
        cache.add(session.spike_unit_index[new],
                  absolute_bins(session.spike_times[new], end, token_spec))
        added_until = end - WINDOWS.current
        inputs = window_inputs(session, token_spec, bundle, np.array([end])).trimmed()
        history = cache.window(int(inputs.history_start_bin[0]))
        if engine_or_model is model:
            with torch.inference_mode():
                out = model(inputs, model.context(inputs, history=as_layers(history)))
            outputs.append((out.behavior, out.log_rates))
        else:
            context = engine_or_model.context(history, inputs.frames, inputs.behavior_inputs)
            outputs.append(engine_or_model.decode(inputs.current_units, inputs.current_dts,
                                                  int(inputs.current_start_bin[0]), context))
    return outputs


def test_torch_engine_decodes_and_generates_like_the_model(session, token_spec, bundle_dir):
    bundle = load_bundle(bundle_dir)
    engine = open_engine(bundle, EngineConfig(threads=1), "torch")
    ends = window_ends(0.0, session.duration, WINDOWS, full_history=True)[10:25]
    for (behavior, rates), (ref_behavior, ref_rates) in zip(
            slide(engine, session, token_spec, bundle, ends),
            slide(bundle.checkpoint.model, session, token_spec, bundle, ends)):
        torch.testing.assert_close(behavior, ref_behavior, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(rates, ref_rates, atol=1e-5, rtol=1e-4)

    inputs = window_inputs(session, token_spec, bundle, ends[:1])
    reference = generate_window(bundle.checkpoint.model, inputs, Sampling(greedy=True))
    context = engine.context(
        model_keys_values(bundle.checkpoint.model, bundle.unit_rows, bundle.session_row)(
            *_history_tokens(inputs)), inputs.frames, inputs.behavior_inputs)
    generated = engine.generate(int(inputs.current_start_bin[0]), context, Sampling(greedy=True))
    assert torch.equal(generated.units, reference.units)
    assert torch.equal(generated.dts, reference.dts)


def _history_tokens(inputs):
    """The window's history tokens (SOS + spikes, no padding) and their absolute bins."""
    kept = inputs.history_units[0] != inputs.n_units + 2
    kept &= inputs.history_units[0] != inputs.n_units + 1
    units, dts = inputs.history_units[:, kept], inputs.history_dts[:, kept]
    n_bins = round(WINDOWS.history / WINDOWS.dt_resolution)
    return units, Neuroformer.token_bins(dts, inputs.history_start_bin, n_bins)


def test_compile_exports_checked_onnx_and_updates_the_manifest(compiled, bundle_dir):
    assert compiled["backend"] == "onnxruntime"
    assert set(compiled["onnx"]) == {"history", "context", "decode", "step"}
    assert max(compiled["parity"].values()) <= 1e-4
    assert max(record["parity"] for record in compiled["onnx"].values()) <= 1e-4
    manifest = verify_bundle(bundle_dir)
    assert manifest["onnx"]["opset"] >= 17 and "amended" in manifest
    for name in compiled["onnx"]:
        path = bundle_dir / "onnx" / f"{name}.onnx"
        assert f"onnx/{name}.onnx" in manifest["files"]
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        for tensor in model.graph.initializer:  # finite masks: no -inf constant anywhere
            assert np.isfinite(onnx.numpy_helper.to_array(tensor)).all(), tensor.name
    optimised = list((bundle_dir / "engines").glob("onnxruntime-*/*.optimized.onnx"))
    assert len(optimised) == 4


def test_onnxruntime_engine_matches_torch_on_real_windows(compiled, session, token_spec,
                                                          bundle_dir):
    bundle = load_bundle(bundle_dir)
    ends = window_ends(0.0, session.duration, WINDOWS, full_history=True)[30:40]
    engines = {name: open_engine(bundle, EngineConfig(threads=1), name)
               for name in ("onnxruntime", "torch")}
    decoded = {name: slide(engine, session, token_spec, bundle, ends)
               for name, engine in engines.items()}
    for (behavior, rates), (ref_behavior, ref_rates) in zip(decoded["onnxruntime"],
                                                             decoded["torch"]):
        torch.testing.assert_close(behavior, ref_behavior, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(rates, ref_rates, atol=1e-4, rtol=1e-4)
    inputs = window_inputs(session, token_spec, bundle, ends[:1])
    history = engines["torch"].history_keys_values(*_history_tokens(inputs))
    windows = [engine.generate(int(inputs.current_start_bin[0]),
                               engine.context(history, inputs.frames, inputs.behavior_inputs),
                               Sampling(greedy=True), spikes=12)
               for engine in engines.values()]
    assert torch.equal(windows[0].units, windows[1].units)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_tampered_onnx_graph_is_refused(compiled, bundle_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle_dir, copy)
    flip_a_byte(copy / "onnx" / "step.onnx")
    with pytest.raises(Exception, match="onnx/step.onnx was modified or truncated"):
        load_bundle(copy)


CACHE_DAMAGE = {
    "one byte flipped": (flip_a_byte, "does not match its recorded sha256"),
    "truncated": (lambda path: path.write_bytes(path.read_bytes()[:1000]),
                  "does not match its recorded sha256"),
    "digest missing": (lambda path: digest_path(path).unlink(), "has no recorded sha256"),
}


@pytest.mark.parametrize("damage", CACHE_DAMAGE)
def test_a_damaged_optimised_graph_is_discarded_and_rebuilt(compiled, bundle_dir, tmp_path,
                                                            caplog, damage):
    """engines/ is outside the manifest: its optimised graphs carry their own sha256."""
    copy = tmp_path / "copy"
    shutil.copytree(bundle_dir, copy)
    (cache,) = copy.glob("engines/onnxruntime-*/decode.*.optimized.onnx")
    intact = cache.read_bytes()
    damage_cache, reason = CACHE_DAMAGE[damage]
    damage_cache(cache)
    bundle = load_bundle(copy)  # the bundle itself verifies
    with caplog.at_level(logging.WARNING, logger="rtnf.engine"):
        engine = open_engine(bundle, EngineConfig(threads=1), "onnxruntime")
    (message,) = caplog.messages
    assert message.startswith(f"engine cache {cache} {reason}")
    assert message.endswith("discarded, rebuilding it from the bundle")
    assert cache.read_bytes() == intact and verified(cache)  # optimised again from onnx/
    graphs = session_graphs(bundle.checkpoint.model, bundle.unit_rows, bundle.session_row)
    assert max(backend_parity(engine.backend, graphs).values()) <= 1e-4
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rtnf.engine"):
        open_engine(bundle, EngineConfig(threads=1), "onnxruntime")
    assert caplog.messages == []  # said once: the rebuilt graph verifies


def test_an_optimised_graph_belongs_to_the_graph_it_was_optimised_from(compiled, bundle_dir,
                                                                       tmp_path):
    """A graph exported again (another rtnf or torch) is optimised afresh, not served from the
    cache of the earlier export, and the earlier export's optimised graph is removed."""
    copy = tmp_path / "copy"
    shutil.copytree(bundle_dir, copy)
    (earlier,) = copy.glob("engines/onnxruntime-*/decode.*.optimized.onnx")
    model = onnx.load(copy / "onnx" / "decode.onnx")
    model.producer_version += "+reexported"  # the same graph, other bytes
    onnx.save(model, copy / "onnx" / "decode.onnx")
    OnnxRuntimeBackend({"decode": copy / "onnx" / "decode.onnx"}, copy / "engines", 1, False)
    (later,) = copy.glob("engines/onnxruntime-*/decode.*.optimized.onnx")
    assert later != earlier and verified(later)
    assert not earlier.exists() and not digest_path(earlier).exists()


def test_a_damaged_cpu_choice_falls_back_to_onnxruntime(compiled, bundle_dir, tmp_path,
                                                         caplog):
    copy = tmp_path / "copy"
    shutil.copytree(bundle_dir, copy)
    bundle, engine = load_bundle(copy), EngineConfig(threads=1)
    write_cpu_choice(copy, engine, {"chosen": "torch"})
    assert resolve("auto", bundle, engine) == "torch"
    path = cpu_choice_path(copy, engine)
    path.write_bytes(path.read_bytes()[:-1])  # truncated: no longer JSON
    with caplog.at_level(logging.WARNING, logger="rtnf.engine"):
        assert resolve("auto", bundle, engine) == "onnxruntime"  # as when none is recorded
    assert len(caplog.messages) == 1 and "does not match its recorded sha256" in caplog.text
    assert not path.exists() and not digest_path(path).exists()


def test_backend_selection_without_tensorrt(compiled, bundle_dir):
    bundle = load_bundle(bundle_dir)
    engine = EngineConfig(threads=1)
    assert tensorrt_unavailable() is not None  # no GPU / TensorRT on the machines here
    with pytest.raises(EngineError, match=r"^engine.backend = tensorrt: ") as error:
        resolve("tensorrt", bundle, engine)
    assert "\n" not in str(error.value)
    assert resolve("auto", bundle, engine) in ("onnxruntime", "torch")
    with pytest.raises(EngineError, match="expected auto, onnxruntime, torch or tensorrt"):
        make_backend("tpu", bundle, engine)


def test_auto_on_cpu_is_measured_and_recorded(bundle_dir):
    report = compile_bundle(bundle_dir, EngineConfig(backend="auto", threads=1))
    choice = report["cpu_choice"]
    assert choice["chosen"] in ("onnxruntime", "torch") and report["backend"] == choice["chosen"]
    assert all(figures["decode_ms"] > 0 for figures in choice["median_ms"].values())
    assert resolve("auto", load_bundle(bundle_dir), EngineConfig(threads=1)) == choice["chosen"]


def test_uncompiled_bundle_says_how_to_compile(session, tmp_path):
    bundle = load_bundle(write_bundle(session, tmp_path / "fresh"))
    with pytest.raises(EngineError, match="no ONNX graphs yet .run: rtnf compile --bundle"):
        resolve("onnxruntime", bundle, EngineConfig())
    assert resolve("auto", bundle, EngineConfig()) == "torch"


def test_compile_command_prints_what_it_built(bundle_dir):
    result = subprocess.run([sys.executable, "-m", "rtnf.cli", "compile", "--bundle",
                             str(bundle_dir), "--backend", "torch", "--set", "engine.threads=1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "compiled: backend torch" in result.stdout and "parity with torch" in result.stdout


def test_padding_to_buckets_changes_no_result(bundle_dir):
    """What the CUDA-graph paths rely on: padded tokens, history and spikes, run and trimmed,
    give the unpadded results."""
    bundle = load_bundle(bundle_dir)
    graphs = session_graphs(bundle.checkpoint.model, bundle.unit_rows, bundle.session_row)
    model = bundle.checkpoint.model
    unit_pad, dt_pad = int(bundle.unit_rows.numel()) + 2, model.dims.current_bins + 2
    assert [bucket(n, 40) for n in (1, 8, 9, 33, 40)] == [8, 8, 16, 40, 40]
    with pytest.raises(ValueError):
        bucket(41, 40)
    for name, graph in graphs.items():
        inputs = example_inputs(graph, torch.Generator().manual_seed(4), tokens=11, history=21)
        found = lengths(name, inputs)
        sizes = {label: bucket(n, 64) for label, n in found.items()}
        padded = pad_inputs(name, inputs, sizes, unit_pad, dt_pad)
        assert all(padded[n].shape[a] == sizes[label] for n, axes in
                   dynamic_axes(name, graph.inputs).items() for a, label in axes.items())
        with torch.inference_mode():
            expected = graph(*inputs.values())
            actual = trim_outputs(name, graph.outputs, graph(*padded.values()), found)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)
    history = graphs["history"]
    inputs = example_inputs(history, torch.Generator().manual_seed(5), history=23)
    with torch.inference_mode():
        chunked = in_chunks(lambda part: history(*part.values()), inputs, 23, 8)
        for a, e in zip(chunked, history(*inputs.values())):
            torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)


def test_tensorrt_preparation_without_tensorrt(compiled, bundle_dir, tmp_path):
    """Profiles, cache key and the fp16 graph are decided without TensorRT."""
    model = load_bundle(bundle_dir).checkpoint.model
    ranges = dimension_ranges(model.dims)
    assert ranges["tokens"] == (1, 16, WINDOWS.current_capacity)
    decode = profile_shapes(bundle_dir / "onnx" / "decode.onnx", ranges)
    assert decode["units"] == ((1, 1), (1, 16), (1, WINDOWS.current_capacity))
    low, typical, high = decode["history_keys"]
    assert low[3] == 1 and high[3] == WINDOWS.history_capacity and low[:3] == high[:3]
    assert "frame_keys" not in decode  # static inputs need no profile
    base = ("NVIDIA H200", (9, 0), "10.14.1", "ab" * 32, "fp32", decode)
    key = plan_key(*base)
    assert plan_key(*base) == key and len(key) == 16
    for changed in (("NVIDIA L4",), ((8, 9),), ("11.4.0",), ("cd" * 32,), ("fp16",)):
        index = {"NVIDIA L4": 0, (8, 9): 1, "11.4.0": 2, "cd" * 32: 3, "fp16": 4}[changed[0]]
        assert plan_key(*base[:index], changed[0], *base[index + 1:]) != key

    graphs = session_graphs(model, load_bundle(bundle_dir).unit_rows,
                            load_bundle(bundle_dir).session_row)
    for name, graph in graphs.items():
        target = fp16_graph(bundle_dir / "onnx" / f"{name}.onnx", tmp_path / f"{name}.onnx")
        converted = onnx.shape_inference.infer_shapes(onnx.load(str(target)))
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in converted.graph.initializer)
        types = {info.name: info.type.tensor_type.elem_type
                 for info in (*converted.graph.value_info, *converted.graph.input)}
        for node in converted.graph.node:  # LayerNorm and softmax run in fp32
            if node.op_type in ("LayerNormalization", "Softmax"):
                assert types[node.input[0]] == onnx.TensorProto.FLOAT, node.name
        session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        inputs = example_inputs(graph, torch.Generator().manual_seed(6))
        actual = session.run(None, {n: v.numpy() for n, v in inputs.items()})
        assert all(output.dtype == np.float32 for output in actual)
        with torch.inference_mode():
            expected = [out.numpy() for out in graph(*inputs.values())]
        assert relative_error(actual, expected) <= FP16_PARITY, name


def test_tensorrt_plan_cache_is_verified_without_tensorrt(tmp_path, caplog):
    """The plan cache the TensorRT backend uses (`cached_or_built`), with stand-ins for
    TensorRT's builder and deserialiser: a plan is loaded only when it matches its recorded
    sha256, and rebuilt otherwise."""
    plan_path = tmp_path / "decode-0123456789abcdef.plan"
    built: list[bytes] = []
    loaded: list[bytes] = []
    unloadable: set[bytes] = set()  # plans "another TensorRT" built

    def build() -> bytes:
        built.append(f"plan {len(built)}".encode())
        return built[-1]

    def load(plan: bytes) -> str | None:
        loaded.append(plan)
        return None if plan in unloadable else plan.decode()

    def open_plan() -> str:
        return cached_or_built(plan_path, build, load)

    assert open_plan() == "plan 0" and open_plan() == "plan 0" and len(built) == 1  # cached
    flip_a_byte(plan_path)
    with caplog.at_level(logging.WARNING, logger="rtnf.engine"):
        assert open_plan() == "plan 1"
    assert "does not match its recorded sha256" in caplog.text
    digest_path(plan_path).unlink()
    assert open_plan() == "plan 2" and "has no recorded sha256" in caplog.text
    assert set(loaded) <= set(built)  # a damaged plan never reached the deserialiser
    unloadable.add(b"plan 2")
    assert open_plan() == "plan 3" and open_plan() == "plan 3" and len(built) == 4
    unloadable.add(b"plan 4")
    plan_path.unlink()
    with pytest.raises(EngineError, match="TensorRT built decode-0123456789abcdef.plan but "
                                          "cannot load it"):
        open_plan()


@pytest.mark.skipif(tensorrt_unavailable() is not None, reason="needs an NVIDIA GPU + TensorRT")
@pytest.mark.parametrize("precision, bound", [("fp32", 1e-4), ("fp16", FP16_PARITY)])
def test_tensorrt_backend_matches_torch(compiled, bundle_dir, precision, bound):
    bundle = load_bundle(bundle_dir)
    backend = make_backend("tensorrt", bundle, EngineConfig(precision=precision))
    graphs = session_graphs(bundle.checkpoint.model, bundle.unit_rows, bundle.session_row)
    assert max(backend_parity(backend, graphs).values()) <= bound
    rebuilt = make_backend("tensorrt", bundle, EngineConfig(precision=precision))
    assert rebuilt.plans == backend.plans  # the cached plans are reused


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision, bound", [("fp32", 1e-4), ("fp16", FP16_PARITY)])
def test_torch_cuda_graphs_match_torch_cpu(bundle_dir, precision, bound):
    bundle = load_bundle(bundle_dir)
    graphs = session_graphs(bundle.checkpoint.model, bundle.unit_rows, bundle.session_row)
    backend = TorchBackend(session_graphs(load_bundle(bundle_dir).checkpoint.model,
                                          bundle.unit_rows, bundle.session_row), 1, "cuda",
                           precision)
    assert max(backend_parity(backend, graphs).values()) <= bound
    assert max(backend_parity(backend, graphs, seed=12).values()) <= bound  # replayed graphs


def test_bench_engine_reports_every_summary_figure():
    """`rtnf bench engine --json` on a tiny model: every backend and summary key is there."""
    tiny = ["model.n_embd=32", "model.n_head=2", "model.n_current_layers=1",
            "model.n_history_layers=1", "model.n_frame_encoder_layers=1",
            "model.n_frame_layers=1", "model.n_decoder_layers=1", "windows.current_capacity=40"]
    result = subprocess.run([sys.executable, "-m", "rtnf.cli", "bench", "engine", "--repeats",
                             "2", "--json", *[a for item in tiny for a in ("--set", item)]],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["backends"]) >= {"torch-eager-uncached", "torch", "onnxruntime"}
    for backend in report["backends"].values():
        assert set(backend["decode_ms"]) == {"p50", "p99"} and backend["ar_step_ms"]["p50"] > 0
    assert all(report[key] > 0 for key in ("compiled_vs_eager", "kv_speedup", "history_ratio"))
    assert report["setup"]["tokens"] == [16, 40, 40]  # capped at the window's capacity
