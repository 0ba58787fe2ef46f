"""Data-free importance scores for the channels of a group; higher means keep.

Each criterion sees the group's weights laid out channel-first: `incoming` holds one
[channels, fan_in] matrix per producer, `outgoing` one [channels, fan_out] matrix per
consumer. Activation statistics, when calibration data was given, ride along in `stats`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from onnxprune.errors import InputError

__all__ = [
    "ChannelWeights",
    "Criterion",
    "CRITERIA",
    "DATA_AWARE",
    "register_criterion",
    "score_channels",
]


@dataclass(frozen=True)
class ChannelWeights:
    incoming: tuple[np.ndarray, ...]
    outgoing: tuple[np.ndarray, ...]
    stats: dict[str, np.ndarray] = field(default_factory=dict)
    seed: int = 0

    @property
    def size(self) -> int:
        return int(self.outgoing[0].shape[0])

    def all_weights(self) -> np.ndarray:
        """[channels, fan_in + fan_out] in float64: every weight that touches a channel."""
        return np.concatenate(
            [w.astype(np.float64) for w in self.incoming + self.outgoing], axis=1
        )


Criterion = Callable[[ChannelWeights], np.ndarray]
CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str) -> Callable[[Criterion], Criterion]:
    """Adds a criterion under `name`; users can register their own the same way."""

    def wrap(fn: Criterion) -> Criterion:
        CRITERIA[name] = fn
        return fn

    return wrap


_BLOCK_ROWS = 1024  # channels per block: bounds the float64 temporaries of big matrices


def _outgoing_sums(cw: ChannelWeights, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Per channel, the float64 sum of fn(w) over every outgoing weight, a block of rows at a
    time: a float64 copy of a whole matrix (memory-mapped, possibly GBs) is never made."""
    total = np.zeros(cw.size)
    for w in cw.outgoing:
        for start in range(0, w.shape[0], _BLOCK_ROWS):
            block = np.asarray(w[start:start + _BLOCK_ROWS], dtype=np.float64)
            total[start:start + _BLOCK_ROWS] += fn(block).sum(axis=1)
    return total


@register_criterion("l1")
def l1(cw: ChannelWeights) -> np.ndarray:
    """Sum of absolute outgoing weights: how much a channel can move the next layer."""
    return _outgoing_sums(cw, np.abs)


@register_criterion("l2")
def l2(cw: ChannelWeights) -> np.ndarray:
    return np.sqrt(_outgoing_sums(cw, np.square))


@register_criterion("variance")
def variance(cw: ChannelWeights) -> np.ndarray:
    """Variance of all weights touching the channel; a flat neuron adds little."""
    return cw.all_weights().var(axis=1)


@register_criterion("entropy")
def entropy(cw: ChannelWeights) -> np.ndarray:
    """Entropy of the channel's normalised weight magnitudes.

    Low entropy means the channel relies on a handful of weights; high entropy means it
    draws on many inputs and feeds many outputs, which we treat as more important.
    """
    a = np.abs(cw.all_weights())
    p = a / np.maximum(a.sum(axis=1, keepdims=True), 1e-30)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return h


@register_criterion("random")
def random(cw: ChannelWeights) -> np.ndarray:
    """A baseline: any criterion worth using must beat it."""
    return np.random.default_rng(cw.seed).random(cw.size)


def score_channels(name: str, cw: ChannelWeights) -> np.ndarray:
    try:
        fn = CRITERIA[name]
    except KeyError:
        raise InputError(
            f"unknown criterion '{name}'; choose from {', '.join(sorted(CRITERIA))}"
        ) from None
    scores = np.asarray(fn(cw), dtype=np.float64)
    if scores.shape != (cw.size,):
        raise InputError(f"criterion '{name}' returned shape {scores.shape}, not ({cw.size},)")
    if not np.all(np.isfinite(scores)):
        raise InputError(f"criterion '{name}' returned NaN or Inf scores")
    return scores


def _stat(cw: ChannelWeights, key: str, criterion: str) -> np.ndarray:
    if key not in cw.stats:
        raise InputError(f"criterion '{criterion}' needs calibration data; pass --calibration")
    return np.asarray(cw.stats[key], dtype=np.float64)


@register_criterion("activation")
def activation(cw: ChannelWeights) -> np.ndarray:
    """RMS of the channel's activation times the norm of its outgoing weights.

    This is the size of the channel's contribution to the next layer's output: a large
    weight on a channel that is always near zero does nothing, and neither does the reverse.
    """
    return np.sqrt(_stat(cw, "sq_mean", "activation")) * l2(cw)


@register_criterion("activation-variance")
def activation_variance(cw: ChannelWeights) -> np.ndarray:
    """Variance the channel adds to the next layer's output; its mean can go into the bias."""
    return _stat(cw, "var", "activation-variance") * np.square(l2(cw))


@register_criterion("activation-entropy")
def activation_entropy(cw: ChannelWeights) -> np.ndarray:
    """Differential entropy of the channel's activation (histogram estimate).

    A channel whose activation barely varies carries no information; its mean folds into
    the next bias. Unlike variance, a channel that is mostly constant with rare spikes scores
    low. Ties are broken by the outgoing weight norm.
    """
    h = _stat(cw, "entropy", "activation-entropy")
    return h + 1e-6 * l2(cw) / max(float(np.max(l2(cw))), 1e-30)


DATA_AWARE = frozenset({"activation", "activation-variance", "activation-entropy", "obs"})
