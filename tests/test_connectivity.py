"""Connectivity scores: AUROC, lagged correlation, and attention-derived connectivity."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rtnf.config import SimulationConfig, WindowsConfig
from rtnf.data.sim import simulate
from rtnf.model.connectivity import attention_connectivity, correlation_connectivity
from rtnf.model.inputs import inputs_from_tokens
from rtnf.model.layers import causal_mask
from rtnf.model.neuroformer import Neuroformer
from rtnf.model.spec import PRESETS, ModelDims
from rtnf.tokens import TokenSpec, tokenize_windows, window_ends
from rtnf.train.metrics import auroc

TINY = dataclasses.replace(PRESETS["rt-small"], n_embd=32, n_head=2, n_current_layers=1,
                           n_history_layers=1, n_decoder_layers=1, dropout=0.0,
                           temporal_hidden=16)
WINDOWS = WindowsConfig(current_capacity=30, history_capacity=60)


def test_auroc_hand_computed_cases():
    labels = np.array([False, False, True, True])
    assert auroc(np.array([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    assert auroc(np.array([0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert auroc(np.ones(4), labels) == 0.5
    # Positive 0.35 beats 0.1 and loses to 0.4; positive 0.8 beats both: 3 of 4 pairs.
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), labels) == 0.75
    # Positive 2 beats 1 and ties the negative 2 (one half); positive 3 beats both.
    assert auroc(np.array([1.0, 2.0, 2.0, 3.0]), np.array([0, 1, 0, 1])) == 0.875
    assert np.isnan(auroc(np.arange(3.0), np.zeros(3, dtype=bool)))


def test_correlation_connectivity_finds_a_planted_lagged_dependency():
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, (2000, 5)).astype(float)
    counts[1:, 3] += 2 * counts[:-1, 1]  # unit 1 drives unit 3 one bin later
    counts[:, 4] = 1.0  # a silent-ish unit that never varies
    scores = correlation_connectivity(counts)
    assert scores.shape == (5, 5)
    assert scores[3, 1] > 0.8
    off_diagonal = scores[~np.eye(5, dtype=bool)]
    assert np.sort(np.abs(off_diagonal))[-2] < 0.1  # nothing else, not even the reverse
    assert np.all(scores[4] == 0) and np.all(scores[:, 4] == 0)


@pytest.fixture(scope="module")
def model_and_inputs():
    (session,) = simulate(SimulationConfig(neurons=40, minutes=0.2, seed=3), "ephys")
    spec = TokenSpec.from_config(WINDOWS, session.n_units)
    ends = window_ends(0.0, 6.0, WINDOWS, full_history=True)[:8]
    tokens = tokenize_windows(session.spike_times, session.spike_unit_index, ends, spec)
    inputs = inputs_from_tokens(tokens, ends, spec, np.arange(session.n_units), 0)
    dims = ModelDims(current_bins=5, history_bins=15, current_capacity=WINDOWS.current_capacity,
                     history_capacity=WINDOWS.history_capacity, frame_shape=None)
    torch.manual_seed(0)
    model = Neuroformer(TINY, dims, n_units=session.n_units, n_sessions=1).eval()
    assert int((inputs.current_units[0] < session.n_units).sum()) >= 3  # brute force
    return model, inputs, session.n_units


@pytest.mark.parametrize("source", ["self", "history"])
@pytest.mark.parametrize("query_unit", ["own", "next"])
def test_attention_connectivity_is_a_finite_unit_matrix(model_and_inputs, source, query_unit):
    model, inputs, n_units = model_and_inputs
    scores = attention_connectivity(model, [inputs], n_units, source, query_unit)
    assert scores.shape == (n_units, n_units)
    assert np.all(np.isfinite(scores)) and np.all(scores >= 0) and np.all(scores <= 1)
    assert np.any(scores > 0)


@pytest.mark.parametrize("query_unit", ["own", "next"])
def test_self_attention_connectivity_matches_a_brute_force_window(model_and_inputs, query_unit):
    model, inputs, n_units = model_and_inputs
    window = dataclasses.replace(
        inputs, **{name: getattr(inputs, name)[:1] for name in
                   ("current_units", "current_dts", "current_start_bin", "history_units",
                    "history_dts", "history_start_bin")})
    units, dts = window.current_units[0], window.current_dts[0]
    length = units.shape[0]
    with torch.no_grad():
        states = (model.embed_units(units, window.unit_rows, window.session_row)
                  + model.current_dt(dts) + model.current_position(torch.arange(length)))
        block = model.current_blocks[0]
        normed = block.ln_attn(states)
        heads, width = model.spec.n_head, model.spec.head_dim
        queries = block.attn.query(normed).view(length, heads, width).transpose(0, 1)
        keys = block.attn.key(normed).view(length, heads, width).transpose(0, 1)
        scores = queries @ keys.transpose(-1, -2) / width**0.5 + causal_mask(length, length)
        probabilities = torch.softmax(scores, dim=-1).mean(dim=0).numpy()

    sums, pairs = np.zeros((n_units, n_units)), np.zeros((n_units, n_units))
    for query in range(length - 1):
        # "own": the query token's unit, keys before it; "next": the unit of the token after
        # the query (the one it predicts), keys up to the query itself.
        i = int(units[query]) if query_unit == "own" else int(units[query + 1])
        for key in range(query if query_unit == "own" else query + 1):
            j = int(units[key])
            if i < n_units and j < n_units:
                sums[i, j] += probabilities[query, key]
                pairs[i, j] += 1
    expected = np.divide(sums, pairs, out=np.zeros_like(sums), where=pairs > 0)
    assert pairs.sum() > 0
    np.testing.assert_allclose(attention_connectivity(model, [window], n_units, "self", query_unit),
                               expected, rtol=1e-5, atol=1e-7)
