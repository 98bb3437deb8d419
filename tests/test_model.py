"""The Neuroformer model: presets, masks, causality, the KV cache and incremental decoding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rtnf.config import SimulationConfig, WindowsConfig
from rtnf.data.sim import simulate
from rtnf.model.generation import Sampling, generate_ahead, generate_window, sample
from rtnf.model.history import HistoryCache, as_layers, model_keys_values
from rtnf.model.inputs import ModelTargets, inputs_from_tokens
from rtnf.model.losses import losses
from rtnf.model.neuroformer import Neuroformer
from rtnf.model.spec import PRESETS, ModelDims, ModelSpec
from rtnf.tokens import TokenSpec, absolute_bins, tokenize_windows, window_ends

TINY = dataclasses.replace(PRESETS["rt-small"], n_embd=32, n_head=2, n_current_layers=1,
                           n_history_layers=2, n_frame_encoder_layers=1, n_frame_layers=1,
                           n_behavior_layers=1, n_decoder_layers=1, dropout=0.0,
                           temporal_hidden=16)
WINDOWS = WindowsConfig(hop=0.05, current=0.05, history=0.15, current_capacity=40,
                        history_capacity=30)


@pytest.fixture(scope="module")
def session():
    (s,) = simulate(SimulationConfig(neurons=80, minutes=0.3, seed=4), "ephys")
    return s


@pytest.fixture(scope="module")
def token_spec(session) -> TokenSpec:
    return TokenSpec.from_config(WINDOWS, session.n_units)


def make_model(session, inputs: tuple[str, ...] = (), frames: bool = True,
               spec: ModelSpec = TINY, objective: str = "regression") -> Neuroformer:
    torch.manual_seed(0)
    dims = ModelDims(current_bins=5, history_bins=15, current_capacity=WINDOWS.current_capacity,
                     history_capacity=WINDOWS.history_capacity,
                     frame_shape=(3, 24, 32) if frames else None, behavior_inputs=inputs,
                     objective=objective, n_classes=4 if objective == "classification" else 0)
    return Neuroformer(spec, dims, n_units=session.n_units + 5, n_sessions=2).eval()


def batch(session, spec: TokenSpec, ends: np.ndarray, frames: bool = True, inputs: int = 0):
    tokens = tokenize_windows(session.spike_times, session.spike_unit_index, ends, spec)
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (ends.size, 3, 24, 32), dtype=np.uint8) if frames else None
    behavior = rng.standard_normal((ends.size, inputs)) if inputs else None
    return inputs_from_tokens(tokens, ends, spec, np.arange(session.n_units) + 5, 1, clip,
                              behavior)


def test_presets_sizes():
    dims = ModelDims(5, 15, 100, 700, (3, 30, 100))
    paper = Neuroformer(PRESETS["paper"], dims, n_units=2023, n_sessions=1)
    assert 20e6 <= paper.parameter_count() <= 30e6
    small = Neuroformer(PRESETS["rt-small"], dims, n_units=386, n_sessions=1)
    assert small.parameter_count() < paper.parameter_count() / 5
    with pytest.raises(Exception, match="model.n_embd = 30"):
        dataclasses.replace(TINY, n_embd=30, n_head=4)


def test_forward_shapes_and_finite_losses(session, token_spec):
    model = make_model(session, inputs=("speed",))
    ends = window_ends(0.0, 10.0, WINDOWS)[:6]
    inputs = batch(session, token_spec, ends, inputs=1)
    output = model(inputs)
    n = session.n_units
    assert output.unit_logits.shape == (6, 40, n + 3)
    assert output.dt_logits.shape == (6, 40, 8)
    assert output.behavior.shape == (6, 3) and output.log_rates.shape == (6, n)
    assert output.frame_feature.shape == output.behavior_feature.shape == (6, 32)
    targets = ModelTargets(torch.randn(6, 3), torch.poisson(torch.ones(6, n)))
    parts = losses(output, inputs, targets, model.spec, model.dims, model.contrastive_projection)
    assert set(parts) == {"unit", "dt", "behavior", "rate", "contrastive", "total"}
    assert all(torch.isfinite(v) for v in parts.values())
    parts["total"].backward()
    assert model.unit_embedding.weight.grad is not None
    assert model.behavior_tokenizer.weight.grad.abs().sum() > 0  # behaviour inputs are seen


def test_classification_head(session, token_spec):
    model = make_model(session, objective="classification")
    inputs = batch(session, token_spec, window_ends(0.0, 5.0, WINDOWS)[:4])
    output = model(inputs)
    assert output.behavior.shape == (4, 3, 4)
    targets = ModelTargets(torch.randint(0, 4, (4, 3)), torch.zeros(4, session.n_units))
    parts = losses(output, inputs, targets, model.spec, model.dims, model.contrastive_projection)
    assert torch.isfinite(parts["behavior"])


def test_causal_and_padding_masks(session, token_spec):
    model = make_model(session)
    inputs = batch(session, token_spec, window_ends(0.0, 10.0, WINDOWS)[40:42])
    reference = model(inputs)
    # Changing a later current token leaves every earlier position's logits unchanged.
    length = int((inputs.current_units[0] != session.n_units + 2).sum())
    assert length > 4
    changed = dataclasses.replace(inputs, current_units=inputs.current_units.clone())
    changed.current_units[0, length - 2] = (changed.current_units[0, length - 2] + 1) % 80
    after = model(changed)
    torch.testing.assert_close(after.unit_logits[0, :length - 2],
                               reference.unit_logits[0, :length - 2])
    # Padding: a longer history capacity (more PAD) changes nothing.
    padded = dataclasses.replace(
        inputs,
        history_units=torch.nn.functional.pad(inputs.history_units, (0, 25),
                                              value=session.n_units + 2),
        history_dts=torch.nn.functional.pad(inputs.history_dts, (0, 25), value=17))
    torch.testing.assert_close(model(padded).log_rates, reference.log_rates)
    trimmed = padded.trimmed()  # and dropping the padding every window has changes nothing
    assert trimmed.history_units.shape[1] < padded.history_units.shape[1]
    torch.testing.assert_close(model(trimmed).behavior, reference.behavior)


def test_history_time_encoding_is_shift_invariant(session, token_spec):
    """Only time differences matter, even hours into a session (millions of bins)."""
    model = make_model(session)
    inputs = batch(session, token_spec, window_ends(0.0, 10.0, WINDOWS)[50:53])
    shift = 3_600 * 100 * 3  # three hours of 10 ms bins
    shifted = dataclasses.replace(inputs, current_start_bin=inputs.current_start_bin + shift,
                                  history_start_bin=inputs.history_start_bin + shift)
    torch.testing.assert_close(model(shifted).behavior, model(inputs).behavior,
                               atol=1e-5, rtol=1e-4)


def test_cached_steps_give_the_same_logits_as_full_recomputation(session, token_spec):
    model = make_model(session, inputs=("gaze_phi",))
    inputs = batch(session, token_spec, window_ends(0.0, 10.0, WINDOWS)[60:62], inputs=1)
    length = int((inputs.current_units != session.n_units + 2).sum(dim=1).min())
    full = model(inputs)
    context = model.context(inputs)
    caches = model.new_caches(2)
    with torch.inference_mode():
        for position in range(length):
            states = model.hidden_states(
                inputs.current_units[:, position:position + 1],
                inputs.current_dts[:, position:position + 1], inputs.current_start_bin,
                inputs.unit_rows, inputs.session_row, context, caches, position)
            unit_logits, dt_logits = model.token_logits(states, inputs.unit_rows)
            assert (unit_logits[:, 0] - full.unit_logits[:, position]).abs().max() <= 1e-5
            assert (dt_logits[:, 0] - full.dt_logits[:, position]).abs().max() <= 1e-5


def test_generation_with_and_without_cache_agree(session, token_spec):
    model = make_model(session)
    inputs = batch(session, token_spec, window_ends(0.0, 10.0, WINDOWS)[70:73])
    cached = generate_window(model, inputs, Sampling(greedy=True))
    recomputed = generate_window(model, inputs, Sampling(greedy=True), use_cache=False)
    torch.testing.assert_close(cached.units, recomputed.units)
    torch.testing.assert_close(cached.dts, recomputed.dts)
    drawn = [generate_window(model, inputs, Sampling(temperature=1.0, top_p=0.9),
                             torch.Generator().manual_seed(7), use_cache=cache)
             for cache in (True, False)]
    torch.testing.assert_close(drawn[0].units, drawn[1].units)


def test_generated_windows_are_well_formed(session, token_spec):
    model = make_model(session)
    inputs = batch(session, token_spec, window_ends(0.0, 10.0, WINDOWS)[80:84])
    window = generate_window(model, inputs, Sampling(top_k=10), torch.Generator().manual_seed(1))
    n = session.n_units
    for units, dts, count in zip(window.units, window.dts, window.n_spikes):
        count = int(count)
        assert units[0] == n and units[count + 1] == n + 1  # SOS, spikes, EOS
        assert bool((units[1:count + 1] < n).all()) and bool((units[count + 2:] == n + 2).all())
        spike_dts = dts[1:count + 1]
        assert bool((spike_dts < 5).all()) and bool((spike_dts[1:] >= spike_dts[:-1]).all())
        assert count <= WINDOWS.current_capacity - 2
    fixed = generate_window(model, inputs, Sampling(), torch.Generator().manual_seed(2), spikes=7)
    assert fixed.n_spikes.tolist() == [7] * 4 and bool((fixed.units[:, 8] == n + 1).all())


def test_generate_ahead_feeds_generated_spikes_back(session, token_spec):
    model = make_model(session, frames=False)
    times, units = generate_ahead(model, session.spike_times, session.spike_unit_index, 5.0, 3,
                                  token_spec, np.arange(session.n_units) + 5, 1,
                                  sampling=Sampling(), generator=torch.Generator().manual_seed(3))
    assert times.size == units.size
    assert np.all((times >= 5.0) & (times < 5.15)) and np.all(np.diff(times) >= 0)
    assert np.all(units < session.n_units)


def test_incremental_decoding_equals_from_scratch(session, token_spec):
    """Hop after hop, keys/values of only the spikes entering the history are computed, and
    every head matches decoding each window from scratch (history capacity small enough that
    some windows truncate their history)."""
    model = make_model(session, frames=False)
    ends = window_ends(0.0, session.duration, WINDOWS, full_history=True)[:60]
    scratch = model(batch(session, token_spec, ends, frames=False))
    tokens = tokenize_windows(session.spike_times, session.spike_unit_index, ends, token_spec)
    assert tokens.history.truncated.max() > 0
    keys_values = model_keys_values(model, torch.arange(session.n_units) + 5, torch.tensor(1))
    cache = HistoryCache(keys_values, session.n_units, token_spec)
    added_until = 0.0
    for k, end in enumerate(ends):
        history_end = end - WINDOWS.current
        new = (session.spike_times >= added_until) & (session.spike_times < history_end)
        cache.add(session.spike_unit_index[new],
                  absolute_bins(session.spike_times[new], end, token_spec))
        added_until = history_end
        inputs = batch(session, token_spec, ends[k:k + 1], frames=False)
        with torch.inference_mode():
            history = as_layers(cache.window(int(inputs.history_start_bin[0])))
            out = model(inputs, model.context(inputs, history=history))
        assert (out.log_rates[0] - scratch.log_rates[k]).abs().max() <= 1e-5
        assert (out.behavior[0] - scratch.behavior[k]).abs().max() <= 1e-5
        assert (out.unit_logits[0] - scratch.unit_logits[k]).abs().max() <= 1e-5
    assert len(cache) <= 3 * token_spec.history.max_spikes  # old spikes are dropped


def test_extending_tables_keeps_known_units(session, token_spec):
    model = make_model(session)
    inputs = batch(session, token_spec, window_ends(0.0, 10.0, WINDOWS)[20:23])
    before = model(inputs)
    model.extend(n_units=model.unit_embedding.num_embeddings + 7, n_sessions=4)
    assert model.unit_embedding.num_embeddings == session.n_units + 12
    assert model.session_embedding.num_embeddings == 4
    after = model(inputs)
    torch.testing.assert_close(after.log_rates, before.log_rates)
    torch.testing.assert_close(after.unit_logits, before.unit_logits)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    assert int(sample(logits, Sampling(greedy=True))) == 2
    generator = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, Sampling(top_k=2), generator)) for _ in range(50)}
    assert draws <= {2, 3}
    draws = {int(sample(logits, Sampling(top_p=0.5), generator)) for _ in range(50)}
    assert draws == {2}
