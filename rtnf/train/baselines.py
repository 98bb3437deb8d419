"""The decoders Neuroformer is judged against in calibration: ridge (Wiener filter), MLP, GRU.

Every baseline reads the same features, each unit's spike counts in a few consecutive bins ending
at the window end (`binned_history`, on the tokenizer's integer bin-edge rule), and regresses
whatever targets it is given (the caller standardises behaviour with the model's `Normalization`,
fitted on the training windows, so all decoders and the model score against the same numbers).

All decoders share one interface (`BaselineDecoder`): `fit(train_x, train_y, validation_x,
validation_y)`, `predict(x)`, and `to_tensors()` + `config()` with `from_state(tensors, config)`
(or `decoder_from_state`, which picks the class) to rebuild one, so a bundle stores a decoder as
safetensors + JSON (nothing is unpickled) and the real-time loop can run it. A decoder's `x` is
always (windows, bins, units) from `decoder.features(session, ends)`.

Same training time for all: every decoder fits its parameters on the training windows only. The
validation windows choose the ridge penalty and stop the networks' training early; ridge is NOT
refitted on train + validation afterwards, so no decoder sees more data than another.

`fit_baselines` does the whole calibration step for one session; `decoding_scores` (and its
wrapper `evaluate`) give per-target Pearson r and R^2 plus the variance-weighted R^2 (FALCON).
"""

from __future__ import annotations

import copy
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rtnf.config import WindowsConfig
from rtnf.data.session import Session
from rtnf.errors import RtnfError
from rtnf.tokens import TICKS_PER_BIN, to_seconds, to_ticks
from rtnf.train.dataset import Normalization, encode_values, behavior_before
from rtnf.train.metrics import pearson_r, r_squared

RIDGE_PENALTIES = tuple(10.0 ** np.arange(-2, 8))
BASELINES = "baselines"  # the bundle's directory of fitted baseline decoders
"""The ridge penalties tried (on standardised features); validation R^2 picks one."""


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------


def binned_history(session: Session, ends: np.ndarray, bin_s: float, n_bins: int) -> np.ndarray:
    """Spike counts of each unit in the `n_bins` bins of `bin_s` seconds before each window end
    of `session` (`binned_counts` of its spikes)."""
    return binned_counts(session.spike_times, session.spike_unit_index, session.n_units, ends,
                         bin_s, n_bins)


def binned_counts(spike_times: np.ndarray, spike_units: np.ndarray, n_units: int,
                  ends: np.ndarray, bin_s: float, n_bins: int) -> np.ndarray:
    """Spike counts of each unit in the `n_bins` bins of `bin_s` seconds before each window end,
    from sorted spike times and their local unit indices.

    Returns float32 (n_windows, n_bins, n_units), oldest bin first: bin k of the window ending at
    t is [t - (n_bins - k) * bin_s, t - (n_bins - k - 1) * bin_s). Times are snapped to integer
    ticks of bin_s / TICKS_PER_BIN as in `rtnf.tokens` (the same grid as the tokenizer's when
    bin_s = dt_resolution), so a spike exactly on an edge goes to the later bin, a spike at t is
    not in the window, and only a time within half a tick of an edge counts as on it.
    """
    end_ticks = to_ticks(np.atleast_1d(ends), bin_s)
    start_ticks = end_ticks - n_bins * TICKS_PER_BIN
    n_windows = end_ticks.size
    span = (0, 0)
    if n_windows:
        # Only the spikes the windows span (cut with one tick of margin), then exactly on ticks.
        margin = np.array([start_ticks.min() - 1, end_ticks.max() + 1])
        span = np.searchsorted(spike_times, to_seconds(margin, bin_s))
    ticks = to_ticks(spike_times[span[0]:span[1]], bin_s)
    units = np.asarray(spike_units[span[0]:span[1]], dtype=np.int64)

    first = np.searchsorted(ticks, start_ticks)
    per_window = np.searchsorted(ticks, end_ticks) - first
    rows = np.repeat(np.arange(n_windows), per_window)
    within = np.arange(rows.size) - np.repeat(np.cumsum(per_window) - per_window, per_window)
    spikes = np.repeat(first, per_window) + within
    bins = (ticks[spikes] - start_ticks[rows]) // TICKS_PER_BIN
    counts = np.bincount((rows * n_bins + bins) * n_units + units[spikes],
                         minlength=n_windows * n_bins * n_units)
    return counts.reshape(n_windows, n_bins, n_units).astype(np.float32)


def _unit_statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each unit's mean and standard deviation over windows and bins of `x` (windows, bins,
    units), float64; a unit that never varies gets scale 1, so standardising never divides by 0."""
    x = np.asarray(x, dtype=np.float64)
    std = x.std(axis=(0, 1))
    return x.mean(axis=(0, 1)), np.where(std > 0, std, 1.0)


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------


class BaselineDecoder(ABC):
    """A decoder from `binned_history` features (windows, n_bins, units) to targets (windows, T).

    `bin_s` and `n_bins` say which features it reads (`features`); `n_units` and `n_targets` are
    set by `fit` (or `from_state`).
    """

    kind: ClassVar[str]

    def __init__(self, bin_s: float, n_bins: int) -> None:
        self.bin_s = float(bin_s)
        self.n_bins = int(n_bins)
        self.n_units = 0
        self.n_targets = 0

    def features(self, session: Session, ends: np.ndarray) -> np.ndarray:
        """This decoder's input for the windows ending at `ends`."""
        return binned_history(session, ends, self.bin_s, self.n_bins)

    @abstractmethod
    def fit(self, train_x: np.ndarray, train_y: np.ndarray, validation_x: np.ndarray,
            validation_y: np.ndarray) -> BaselineDecoder:
        """Fit on the training windows; the validation windows only tune (penalty, stopping)."""

    @abstractmethod
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted targets, float32 (windows, n_targets)."""

    @abstractmethod
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The fitted parameters, for safetensors."""

    def config(self) -> dict[str, Any]:
        """Everything else `from_state` needs, JSON-serialisable."""
        return {"kind": self.kind, "bin_s": self.bin_s, "n_bins": self.n_bins,
                "n_units": self.n_units, "n_targets": self.n_targets}

    @classmethod
    @abstractmethod
    def from_state(cls, tensors: dict[str, torch.Tensor],
                   config: dict[str, Any]) -> BaselineDecoder:
        """The decoder saved as `to_tensors()` and `config()`."""

    def _start_fit(self, train_x: np.ndarray, train_y: np.ndarray, validation_x: np.ndarray,
                   validation_y: np.ndarray) -> None:
        """Check the shapes of the data `fit` got and take `n_units` and `n_targets` from it."""
        for name, x, y in (("training", train_x, train_y),
                           ("validation", validation_x, validation_y)):
            if x.ndim != 3 or x.shape[1] != self.n_bins or y.ndim != 2 or len(x) != len(y):
                raise RtnfError(f"{self.kind} decoder: {name} features {x.shape} and targets "
                                f"{y.shape} should be (windows, {self.n_bins}, units) and "
                                "(windows, targets)")
            if len(x) == 0:
                raise RtnfError(f"{self.kind} decoder: no {name} windows")
        self.n_units, self.n_targets = train_x.shape[2], train_y.shape[1]
        self._check_features(validation_x)

    def _check_features(self, x: np.ndarray) -> None:
        if x.ndim != 3 or x.shape[1:] != (self.n_bins, self.n_units):
            raise RtnfError(f"{self.kind} decoder: features {x.shape} should be "
                            f"(windows, {self.n_bins}, {self.n_units})")


# ---------------------------------------------------------------------------------------------
# Ridge regression (Wiener filter)
# ---------------------------------------------------------------------------------------------


def _ridge_eigensystem(z: np.ndarray, y: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(eigenvalues e, basis B, coefficients c) with ridge weights W(p) = B @ (c / (e + p)).

    Primal, (Z'Z + pI)^-1 Z'y, when there are no more features than rows; dual,
    Z'(ZZ' + pI)^-1 y, otherwise: one eigendecomposition of the smaller Gram matrix serves every
    penalty.
    """
    if z.shape[1] <= z.shape[0]:
        eigenvalues, vectors = np.linalg.eigh(z.T @ z)
        basis, coefficients = vectors, vectors.T @ (z.T @ y)
    else:
        eigenvalues, vectors = np.linalg.eigh(z @ z.T)
        basis, coefficients = z.T @ vectors, vectors.T @ y
    return np.maximum(eigenvalues, 0.0), basis, coefficients


class RidgeDecoder(BaselineDecoder):
    """Ridge regression on the flattened history (a Wiener filter): by default 4 bins of 50 ms,
    200 ms.

    Features are standardised per unit on the training windows and solved in closed form for
    every penalty in `penalties`; the one with the best variance-weighted validation R^2 is kept,
    fitted on the training windows only. The standardisation is folded into `weight` and `bias`,
    so `predict` is one matrix product on raw counts (cheap enough for the loop's fallback).
    """

    kind = "ridge"

    def __init__(self, bin_s: float = 0.05, n_bins: int = 4,
                 penalties: Sequence[float] = RIDGE_PENALTIES) -> None:
        super().__init__(bin_s, n_bins)
        self.penalties = [float(p) for p in penalties]
        self.penalty = float("nan")
        self.weight = np.zeros((0, 0), dtype=np.float32)  # (n_bins * n_units, n_targets)
        self.bias = np.zeros(0, dtype=np.float32)  # (n_targets,)

    def fit(self, train_x: np.ndarray, train_y: np.ndarray, validation_x: np.ndarray,
            validation_y: np.ndarray) -> RidgeDecoder:
        self._start_fit(train_x, train_y, validation_x, validation_y)
        mean, scale = _unit_statistics(train_x)

        def standardized(x: np.ndarray) -> np.ndarray:
            return ((np.asarray(x, dtype=np.float64) - mean) / scale).reshape(len(x), -1)

        target_mean = train_y.mean(axis=0, dtype=np.float64)
        eigenvalues, basis, coefficients = _ridge_eigensystem(standardized(train_x),
                                                              train_y - target_mean)
        validation_projected = standardized(validation_x) @ basis

        def validation_r2(penalty: float) -> float:
            shrunk = coefficients / (eigenvalues + penalty)[:, None]
            return r_squared(validation_projected @ shrunk + target_mean, validation_y)

        self.penalty = max(self.penalties, key=validation_r2)
        weight = basis @ (coefficients / (eigenvalues + self.penalty)[:, None])
        per_count = weight.reshape(self.n_bins, self.n_units, self.n_targets) / scale[:, None]
        self.weight = per_count.reshape(-1, self.n_targets).astype(np.float32)
        self.bias = (target_mean - np.einsum("but,u->t", per_count, mean)).astype(np.float32)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        self._check_features(x)
        return np.asarray(x, dtype=np.float32).reshape(len(x), -1) @ self.weight + self.bias

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": torch.from_numpy(self.weight.copy()),
                "bias": torch.from_numpy(self.bias.copy())}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "penalties": self.penalties, "penalty": self.penalty}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> RidgeDecoder:
        decoder = cls(config["bin_s"], config["n_bins"], config["penalties"])
        decoder.n_units, decoder.n_targets = config["n_units"], config["n_targets"]
        decoder.penalty = float(config["penalty"])
        decoder.weight = tensors["weight"].numpy().astype(np.float32)
        decoder.bias = tensors["bias"].numpy().astype(np.float32)
        return decoder


# ---------------------------------------------------------------------------------------------
# Neural-network decoders (MLP, GRU)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingSettings:
    """How the network decoders train: AdamW on the mean squared error, mini-batches in an
    order drawn from `seed`, stopped when the validation loss has not improved for `patience`
    epochs (at most `max_epochs`); the weights of the best validation epoch are kept."""

    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    max_epochs: int = 60
    patience: int = 6
    batch_size: int = 256
    seed: int = 0


class _Standardize(nn.Module):
    """(x - mean) / scale per unit, with the training statistics stored as buffers."""

    def __init__(self, n_units: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_units))
        self.register_buffer("scale", torch.ones(n_units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


class _MLPReadout(nn.Module):
    """Standardised counts, flattened -> 2 hidden ReLU layers, each followed by dropout ->
    linear readout."""

    def __init__(self, n_bins: int, n_units: int, n_targets: int, hidden: int,
                 dropout: float) -> None:
        super().__init__()
        self.standardize = _Standardize(n_units)
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(n_bins * n_units, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, n_targets))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.standardize(x))


class _GRUReadout(nn.Module):
    """Standardised counts -> GRU over the bins (oldest first) -> dropout -> linear readout of
    the last state."""

    def __init__(self, n_units: int, n_targets: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.standardize = _Standardize(n_units)
        self.gru = nn.GRU(n_units, hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.readout = nn.Linear(hidden, n_targets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, last = self.gru(self.standardize(x))
        return self.readout(self.dropout(last[0]))


class _NetworkDecoder(BaselineDecoder):
    """A torch network trained with `TrainingSettings`; subclasses say which network."""

    def __init__(self, bin_s: float, n_bins: int, hidden: int, dropout: float,
                 training: TrainingSettings) -> None:
        super().__init__(bin_s, n_bins)
        self.hidden = int(hidden)
        self.dropout = float(dropout)
        self.training = training
        self.best_epoch = 0
        self.network: nn.Module | None = None

    @abstractmethod
    def _network(self) -> nn.Module:
        """A freshly initialised network for `n_units` inputs and `n_targets` outputs."""

    def fit(self, train_x: np.ndarray, train_y: np.ndarray, validation_x: np.ndarray,
            validation_y: np.ndarray) -> _NetworkDecoder:
        self._start_fit(train_x, train_y, validation_x, validation_y)
        settings = self.training
        self.best_epoch = 0
        x, y = _as_tensor(train_x), _as_tensor(train_y)
        validation = _as_tensor(validation_x), _as_tensor(validation_y)
        # The global generator drives initialisation, shuffling and dropout; forking it makes
        # the fit depend on the seed alone and leaves the caller's random state untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            network = self._network()
            mean, scale = _unit_statistics(train_x)
            network.standardize.mean.copy_(torch.from_numpy(mean))
            network.standardize.scale.copy_(torch.from_numpy(scale))
            optimizer = torch.optim.AdamW(network.parameters(), lr=settings.learning_rate,
                                          weight_decay=settings.weight_decay)
            best_loss, best_state = float("inf"), copy.deepcopy(network.state_dict())
            for epoch in range(1, settings.max_epochs + 1):
                network.train()
                for batch in torch.randperm(len(x)).split(settings.batch_size):
                    loss = nn.functional.mse_loss(network(x[batch]), y[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                network.eval()
                with torch.no_grad():
                    validation_loss = nn.functional.mse_loss(network(validation[0]),
                                                             validation[1]).item()
                if validation_loss < best_loss:
                    best_loss, self.best_epoch = validation_loss, epoch
                    best_state = copy.deepcopy(network.state_dict())
                elif epoch - self.best_epoch >= settings.patience:
                    break
        network.load_state_dict(best_state)
        self.network = network.eval()
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        self._check_features(x)
        with torch.inference_mode():
            return self.network(_as_tensor(x)).numpy()

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().clone().contiguous()
                for name, tensor in self.network.state_dict().items()}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "hidden": self.hidden, "dropout": self.dropout,
                "training": asdict(self.training), "best_epoch": self.best_epoch}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor],
                   config: dict[str, Any]) -> _NetworkDecoder:
        decoder = cls(config["bin_s"], config["n_bins"], config["hidden"], config["dropout"],
                      TrainingSettings(**config["training"]))
        decoder.n_units, decoder.n_targets = config["n_units"], config["n_targets"]
        decoder.best_epoch = config["best_epoch"]
        network = decoder._network()
        network.load_state_dict(tensors)
        decoder.network = network.eval()
        return decoder


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


class MLPDecoder(_NetworkDecoder):
    """A multilayer perceptron (`_MLPReadout`) on the flattened history, by default the ridge's
    4 bins of 50 ms."""

    kind = "mlp"

    def __init__(self, bin_s: float = 0.05, n_bins: int = 4, hidden: int = 256,
                 dropout: float = 0.5, training: TrainingSettings = TrainingSettings()) -> None:
        super().__init__(bin_s, n_bins, hidden, dropout, training)

    def _network(self) -> nn.Module:
        return _MLPReadout(self.n_bins, self.n_units, self.n_targets, self.hidden, self.dropout)


class GRUDecoder(_NetworkDecoder):
    """A causal GRU over the history (by default 20 bins of 10 ms, 200 ms) with a linear readout
    of its last state.

    The paper's strongest baseline is a bidirectional GRU over the window. Its backward pass
    reads every bin from the last one back, so its output needs the whole window before any of
    it is decoded; a real-time decoder answers at the window end from what came before it, so
    this GRU runs forwards (causally) over the history only, which the loop can run.
    """

    kind = "gru"

    def __init__(self, bin_s: float = 0.01, n_bins: int = 20, hidden: int = 64,
                 dropout: float = 0.2, training: TrainingSettings = TrainingSettings()) -> None:
        super().__init__(bin_s, n_bins, hidden, dropout, training)

    def _network(self) -> nn.Module:
        return _GRUReadout(self.n_units, self.n_targets, self.hidden, self.dropout)


DECODERS: dict[str, type[BaselineDecoder]] = {
    decoder.kind: decoder for decoder in (RidgeDecoder, MLPDecoder, GRUDecoder)}
"""Decoder classes by `kind` (the `kind` in a decoder's `config()`)."""


def decoder_from_state(tensors: dict[str, torch.Tensor],
                       config: dict[str, Any]) -> BaselineDecoder:
    """The decoder saved as `to_tensors()` + `config()`, of the class named by config["kind"]."""
    kind = config.get("kind")
    if kind not in DECODERS:
        raise RtnfError(f"unknown baseline decoder kind {kind!r} (known: {', '.join(DECODERS)})")
    return DECODERS[kind].from_state(tensors, config)


def save_baselines(directory: Path, decoders: dict[str, BaselineDecoder]) -> None:
    """Each decoder as `<kind>.safetensors` (weights) + `<kind>.json` (settings) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    for kind, decoder in decoders.items():
        save_file(decoder.to_tensors(), str(directory / f"{kind}.safetensors"))
        (directory / f"{kind}.json").write_text(json.dumps(decoder.config(), indent=2))


def load_baselines(directory: Path) -> dict[str, BaselineDecoder]:
    """Every decoder `save_baselines` wrote in `directory`, keyed by kind."""
    decoders = {}
    for settings in sorted(directory.glob("*.json")):
        try:
            tensors = load_file(str(settings.with_suffix(".safetensors")))
            decoders[settings.stem] = decoder_from_state(tensors, json.loads(settings.read_text()))
        except (OSError, ValueError, KeyError) as exc:
            raise RtnfError(f"{settings}: cannot load the baseline decoder ({exc})") from None
    return decoders


def default_decoders(seed: int = 0) -> list[BaselineDecoder]:
    """Ridge (4 x 50 ms), MLP (4 x 50 ms) and GRU (20 x 10 ms), the networks seeded by `seed`."""
    training = TrainingSettings(seed=seed)
    return [RidgeDecoder(), MLPDecoder(training=training), GRUDecoder(training=training)]


# ---------------------------------------------------------------------------------------------
# Scores and the calibration step
# ---------------------------------------------------------------------------------------------


def decoding_scores(predicted: np.ndarray, actual: np.ndarray,
                    names: Sequence[str] | None = None) -> dict[str, Any]:
    """Pearson r and R^2 of each target column (keyed by `names`, default "0", "1", ...) and
    the R^2 over all targets, variance-weighted (as in FALCON)."""
    names = [str(i) for i in range(actual.shape[1])] if names is None else list(names)
    return {
        "r": {name: pearson_r(predicted[:, i], actual[:, i]) for i, name in enumerate(names)},
        "r2": {name: r_squared(predicted[:, i], actual[:, i]) for i, name in enumerate(names)},
        "r2_weighted": r_squared(predicted, actual),
    }


def evaluate(decoder: BaselineDecoder, x: np.ndarray, y: np.ndarray,
             names: Sequence[str] | None = None) -> dict[str, Any]:
    """`decoding_scores` of the decoder's predictions for features `x` against targets `y`."""
    return decoding_scores(decoder.predict(x), y, names)


def standardized_targets(session: Session, names: Sequence[str], ends: np.ndarray,
                         normalization: Normalization, dt_resolution: float) -> np.ndarray:
    """The model's regression targets for `ends`: float32 (windows, len(names)), each channel's
    last sample before the window end, standardised by `normalization`."""
    values = behavior_before(session, names, ends, dt_resolution)
    return encode_values(values, normalization.standardize, len(ends), np.float32)


@dataclass
class BaselineFit:
    """Fitted decoders by kind, the target normalisation they regress, and each decoder's
    `decoding_scores` on the validation windows."""

    decoders: dict[str, BaselineDecoder]
    normalization: Normalization
    validation: dict[str, dict[str, Any]]


def fit_baselines(session: Session, train_ends: np.ndarray, validation_ends: np.ndarray,
                  targets: Sequence[str], decoders: Sequence[BaselineDecoder] | None = None,
                  dt_resolution: float = WindowsConfig().dt_resolution) -> BaselineFit:
    """Fit baseline decoders (default: `default_decoders()`, at most one of each kind) on one
    session's windows.

    Targets are standardised with a `Normalization` fitted on the training windows, exactly as
    for the model (`rtnf.train.dataset`); pass the model's own windows (`contiguous_split`) so
    that every decoder fits on the same time. Decoders reading the same bins share one feature
    array. Scores are on the standardised targets (r and each target's R^2 are the same as in
    physical units; the weighted R^2 weighs targets by their variance in training stds).
    """
    decoders = default_decoders() if decoders is None else list(decoders)
    kinds = [decoder.kind for decoder in decoders]
    if len(set(kinds)) != len(kinds):
        raise RtnfError(f"fit_baselines takes at most one decoder of each kind, got {kinds}")
    normalization = Normalization.fit(behavior_before(session, targets, train_ends, dt_resolution))
    train_y, validation_y = (standardized_targets(session, targets, ends, normalization,
                                                  dt_resolution)
                             for ends in (train_ends, validation_ends))
    features: dict[tuple[float, int], tuple[np.ndarray, np.ndarray]] = {}
    scores = {}
    for decoder in decoders:
        key = (decoder.bin_s, decoder.n_bins)
        if key not in features:
            features[key] = (decoder.features(session, train_ends),
                             decoder.features(session, validation_ends))
        train_x, validation_x = features[key]
        decoder.fit(train_x, train_y, validation_x, validation_y)
        scores[decoder.kind] = evaluate(decoder, validation_x, validation_y, targets)
    return BaselineFit({decoder.kind: decoder for decoder in decoders}, normalization, scores)
