"""Least-squares repair and OBS-style channel selection, from streaming statistics.

Notation: the consumer layer computes y = x W + b. From calibration data we hold
H = Σ [x,1]ᵀ[x,1] ((C+1)×(C+1)) and B = Σ [x,1]ᵀ y_ref (C+1 × D), where x is the layer input
in the model being pruned and y_ref the pre-bias output of the *original* model. Fitting
against the original output, not the current one, repairs the error that earlier pruned
layers pushed into x as well as this layer's own.

All solves are in float64; the last row of every solution is a bias correction.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["regularize", "refit", "obs_select", "fold_bias"]


def regularize(gram: np.ndarray, ridge: float) -> np.ndarray:
    """Adds ridge * mean(diag) to the channel diagonal (the bias entry is left alone).

    The relative scale makes one ridge value work for layers of any activation size,
    and keeps singular systems (dead or duplicate channels) solvable.
    """
    h = gram.copy()
    c = h.shape[0] - 1
    scale = float(np.mean(np.diag(h)[:c])) if c else 1.0
    lam = ridge * (scale if scale > 0 else 1.0)
    h[np.arange(c), np.arange(c)] += lam
    if h[c, c] == 0:
        h[c, c] = 1.0
    return h


def _solve(h: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(h, b)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(h, b, rcond=None)[0]


def refit(gram: np.ndarray, cross: np.ndarray, keep: np.ndarray, ridge: float) -> np.ndarray:
    """Ridge least-squares weights for the kept channels; returns [len(keep)+1, D]."""
    c = gram.shape[0] - 1
    idx = np.append(np.asarray(keep, dtype=np.int64), c)
    h = regularize(gram, ridge)
    return _solve(h[np.ix_(idx, idx)], cross[idx])


def obs_select(
    gram: np.ndarray, cross: np.ndarray, n_keep: int, ridge: float, *, max_steps: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Chooses the channels to keep and their refit weights together (OBS / ZipLM style).

    Starting from the full least-squares solution W, repeatedly removes the channels whose
    removal raises the squared error least, ‖W_j‖² / [H⁻¹]_jj, and updates W and H⁻¹ exactly
    for each removal (a few channels per step, at most `max_steps` steps).
    Returns (sorted kept indices, weights [n_keep+1, D] with the bias row last).
    """
    c = gram.shape[0] - 1
    h = regularize(gram, ridge)
    hinv = np.linalg.inv(h)
    hinv = (hinv + hinv.T) / 2
    w = hinv @ cross
    alive = np.ones(c, dtype=bool)
    to_remove = c - n_keep
    block = max(1, math.ceil(to_remove / max_steps))
    while to_remove > 0:
        d = np.diag(hinv)[:c]
        cost = np.square(w[:c]).sum(axis=1) / np.maximum(d, 1e-300)
        cost[~alive] = np.inf
        k = min(block, to_remove)
        sel = np.argpartition(cost, k - 1)[:k]
        m = np.linalg.inv(hinv[np.ix_(sel, sel)])
        w -= hinv[:, sel] @ (m @ w[sel])
        hinv -= hinv[:, sel] @ m @ hinv[sel, :]
        w[sel] = 0.0
        alive[sel] = False
        to_remove -= k
    keep = np.flatnonzero(alive)
    # A final exact refit on the kept set removes the drift of the rank-k updates.
    return keep, refit(gram, cross, keep, ridge)


def fold_bias(mean: np.ndarray, weight: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Bias correction that replaces removed channels by their mean contribution."""
    removed = np.setdiff1d(np.arange(weight.shape[0]), keep)
    return mean[removed].astype(np.float64) @ weight[removed].astype(np.float64)
