"""Streaming statistics of a layer input X and of the original layer output Y.

For a consumer y = x W + b, everything the repair needs is in the Gram matrix of the
augmented input [x, 1] and its cross term with the target y:  H = Σ [x,1]ᵀ[x,1] and
B = Σ [x,1]ᵀ y. Both are summed batch by batch in float64; per-channel means, second moments
and a histogram (for entropy) come along for the data-aware criteria.

With `folds` > 1, H and B are also kept per fold (batch i goes to fold i mod folds), so the
repair can choose its ridge by cross-validation from statistics alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["LayerStats"]

_BINS = 64


@dataclass
class LayerStats:
    channels: int
    targets: int = 0
    folds: int = 1
    rows: int = 0
    histogram: bool = True  # per-channel histograms, for the entropy criterion only
    gram: np.ndarray = field(init=False)
    cross: np.ndarray | None = field(init=False, default=None)
    _hist: np.ndarray | None = field(init=False, default=None)
    _edges_lo: np.ndarray | None = field(init=False, default=None)
    _width: np.ndarray | float = field(init=False, default=1.0)

    def __post_init__(self) -> None:
        self._sum = np.zeros(self.channels)
        self._sumsq = np.zeros(self.channels)
        c = self.channels + 1
        self.gram = np.zeros((c, c), dtype=np.float64)
        if self.targets:
            self.cross = np.zeros((c, self.targets), dtype=np.float64)
        per_fold = self.folds > 1 and self.targets > 0
        self.fold_gram = [np.zeros((c, c)) for _ in range(self.folds)] if per_fold else []
        self.fold_cross = (
            [np.zeros((c, self.targets)) for _ in range(self.folds)] if per_fold else []
        )
        self._batches = 0

    def add(
        self,
        x: np.ndarray,
        y: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        weights: np.ndarray | None = None,
    ) -> None:
        """Folds in rows of x ([..., C]) and, when targets are tracked, y ([..., D]).

        `weights` (one per row) weight the rows of the least-squares problem (H and B);
        the per-channel statistics stay unweighted.
        """
        x2 = x.reshape(-1, self.channels)
        y2 = None if y is None else y.reshape(-1, y.shape[-1])
        if mask is not None:
            x2 = x2[mask]
            y2 = None if y2 is None else y2[mask]
            weights = None if weights is None else weights[mask]
        if x2.shape[0] == 0:
            return
        # One batch's products in float32 (half the time of float64; a batch's sums of a
        # few thousand products lose ~1e-6 relative, far below the ridge), summed in float64.
        xa = np.empty((x2.shape[0], self.channels + 1), dtype=np.float32)
        xa[:, :-1] = x2
        xa[:, -1] = 1.0
        self._sum += xa[:, :-1].sum(axis=0, dtype=np.float64)
        self._sumsq += np.square(xa[:, :-1], dtype=np.float64).sum(axis=0)
        xw = xa if weights is None else xa * weights[:, None].astype(np.float32)
        gram = (xw.T @ xa).astype(np.float64)
        self.gram += gram
        fold = self._batches % self.folds
        self._batches += 1
        if self.fold_gram:
            self.fold_gram[fold] += gram
        if self.cross is not None:
            if y2 is None or y2.shape[0] != x2.shape[0]:
                raise ValueError("target rows do not match input rows")
            cross = (xw.T @ y2.astype(np.float32)).astype(np.float64)
            self.cross += cross
            if self.fold_cross:
                self.fold_cross[fold] += cross
        if self.histogram:
            self._histogram(x2)
        self.rows += x2.shape[0]

    def _histogram(self, x: np.ndarray) -> None:
        if self._hist is None:
            # Per-channel bins a quarter of the channel's first-batch spread wide, centred on
            # its mean. Discrete entropy + log(bin width) estimates the differential entropy,
            # which grows with spread and is comparable across channels (a common bin width
            # would pile a wide channel into the edge bins and call it uninformative).
            std = x.std(axis=0)
            floor = max(float(np.median(std)) * 1e-3, 1e-12)
            self._width = np.maximum(std / 4, floor)
            self._edges_lo = x.mean(axis=0) - self._width * _BINS / 2
            self._hist = np.zeros((self.channels, _BINS), dtype=np.int64)
        assert self._edges_lo is not None
        idx = np.clip(((x - self._edges_lo) / self._width).astype(np.int64), 0, _BINS - 1)
        offsets = (np.arange(self.channels) * _BINS)[None, :]
        self._hist += np.bincount((idx + offsets).ravel(), minlength=self.channels * _BINS).reshape(
            self.channels, _BINS
        )

    @property
    def mean(self) -> np.ndarray:
        return self._sum / max(self.rows, 1)

    @property
    def sq_mean(self) -> np.ndarray:
        return self._sumsq / max(self.rows, 1)

    @property
    def var(self) -> np.ndarray:
        return np.maximum(self.sq_mean - self.mean**2, 0.0)

    @property
    def entropy(self) -> np.ndarray:
        if not self.histogram:
            raise RuntimeError("entropy needs LayerStats(histogram=True)")
        if self._hist is None:
            return np.zeros(self.channels)
        p = self._hist / np.maximum(self._hist.sum(axis=1, keepdims=True), 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            discrete = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
        return discrete + np.log(self._width)

    def as_dict(self) -> dict[str, np.ndarray]:
        out = {"mean": self.mean, "sq_mean": self.sq_mean, "var": self.var}
        return {**out, "entropy": self.entropy} if self.histogram else out
