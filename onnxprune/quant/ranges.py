"""Streaming activation ranges for 8-bit quantization: min/max, percentile and entropy.

Each tensor gets a `RangeCollector` that folds batches in one at a time (ragged shapes are
fine: only the channel axis must keep its size), so calibration memory does not grow with
the data. It keeps

* the running min/max and per-channel min/max (SmoothQuant needs the channel maxima);
* a signed histogram over [-R, R] whose range doubles, merging bin pairs, when a batch
  exceeds it, so one pass suffices and no batch has to be kept;
* a uniform sample of rows (bottom-k of random keys), so a layer's output error can be
  measured later for any candidate range without running the model again;
* a flag for values that must never define a range: NaN/Inf, float-min style mask
  constants (|x| >= 1e30) and repeated large mask constants such as -10000.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxprune.calibration.data import Batch
from onnxprune.calibration.propagate import SECTION_ABOVE_BYTES, Propagator, weight_bytes
from onnxprune.calibration.runner import capture, row_mask
from onnxprune.errors import DataError
from onnxprune.io.runtime import Provider

__all__ = ["RangeCollector", "collect_ranges", "kl_threshold", "HUGE", "MASK_LIKE"]

logger = logging.getLogger(__name__)

HUGE = 1e30  # float-min masks (-3.4e38) and friends
MASK_LIKE = 1e4  # -10000 is the classic BERT additive mask
_BINS = 4096  # over [-R, R]; divisible by 4 so that doubling the range merges bin pairs


@dataclass
class RangeCollector:
    """Running statistics of one tensor, with channels on `channel_axis`."""

    name: str
    channel_axis: int = -1
    sample_rows: int = 1024
    seed: int = 0
    count: int = 0
    lo: float = np.inf
    hi: float = -np.inf
    bad: str | None = None
    channel_min: np.ndarray | None = None
    channel_max: np.ndarray | None = None
    hist: np.ndarray = field(default_factory=lambda: np.zeros(_BINS, dtype=np.int64))
    half_width: float = 0.0
    _sample: np.ndarray | None = None
    _keys: np.ndarray | None = None
    _rng: np.random.Generator | None = None

    def add(self, x: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Folds in one batch; `mask` (one bool per row) drops padding rows."""
        if self.bad is not None:
            return
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 0:
            x = x.reshape(1, 1)
        rows = np.moveaxis(x, self.channel_axis, -1).reshape(-1, x.shape[self.channel_axis])
        if mask is not None and mask.shape[0] == rows.shape[0]:
            rows = rows[mask]
        if rows.size == 0:
            return
        self.bad = _why_unusable(rows)
        if self.bad is not None:
            logger.info("tensor %s: %s; it stays float", self.name, self.bad)
            return
        cmin, cmax = rows.min(axis=0), rows.max(axis=0)
        if self.channel_min is None or self.channel_max is None:
            self.channel_min, self.channel_max = cmin, cmax
        elif self.channel_min.shape != cmin.shape:
            raise DataError(
                f"tensor '{self.name}' changed its channel count between batches "
                f"({self.channel_min.shape[0]} -> {cmin.shape[0]}); it cannot be calibrated"
            )
        else:
            self.channel_min = np.minimum(self.channel_min, cmin)
            self.channel_max = np.maximum(self.channel_max, cmax)
        self.lo = min(self.lo, float(cmin.min()))
        self.hi = max(self.hi, float(cmax.max()))
        self.count += rows.shape[0]
        self._histogram(rows.ravel())
        self._reservoir(rows)

    def _histogram(self, flat: np.ndarray) -> None:
        top = float(np.abs(flat).max())
        if top == 0.0 and self.half_width == 0.0:
            self.hist[_BINS // 2] += flat.size
            return
        if self.half_width == 0.0:
            # Everything so far was exactly zero: those counts stay in the bin holding 0.
            self.half_width = top
        while top > self.half_width:
            merged = self.hist.reshape(_BINS // 2, 2).sum(axis=1)
            self.hist = np.zeros(_BINS, dtype=np.int64)
            self.hist[_BINS // 4 : 3 * _BINS // 4] = merged
            self.half_width *= 2.0
        width = 2.0 * self.half_width / _BINS
        idx = np.clip(((flat + self.half_width) / width).astype(np.int64), 0, _BINS - 1)
        self.hist += np.bincount(idx, minlength=_BINS)

    def _reservoir(self, rows: np.ndarray) -> None:
        """Bottom-k of uniform keys: a uniform sample without replacement over all rows."""
        if self.sample_rows <= 0:
            return
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        keys = self._rng.random(rows.shape[0])
        if self._sample is None or self._keys is None:
            pool, pool_keys = rows, keys
        else:
            pool = np.concatenate([self._sample, rows])
            pool_keys = np.concatenate([self._keys, keys])
        if pool.shape[0] > self.sample_rows:
            keep = np.argpartition(pool_keys, self.sample_rows)[: self.sample_rows]
            pool, pool_keys = pool[keep], pool_keys[keep]
        self._sample, self._keys = np.array(pool, copy=True), pool_keys

    @property
    def sample(self) -> np.ndarray:
        """The sampled rows [n, channels] (empty when nothing was seen)."""
        if self._sample is None:
            return np.zeros((0, 0), dtype=np.float32)
        return self._sample

    @property
    def seen(self) -> bool:
        return self.count > 0

    def minmax(self) -> tuple[float, float]:
        return (min(self.lo, 0.0), max(self.hi, 0.0)) if self.seen else (0.0, 0.0)

    def _edges(self) -> np.ndarray:
        return np.linspace(-self.half_width, self.half_width, _BINS + 1)

    def percentile(self, pct: float) -> tuple[float, float]:
        """The [100-pct, pct] percentile range of the values (bin edges, outward)."""
        if not self.seen or self.half_width == 0.0:
            return self.minmax()
        cdf = np.cumsum(self.hist) / max(int(self.hist.sum()), 1)
        tail = 1.0 - pct / 100.0
        edges = self._edges()
        lo_bin = int(np.searchsorted(cdf, tail, side="left"))
        hi_bin = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
        lo = max(float(edges[lo_bin]), self.lo)
        hi = min(float(edges[min(hi_bin + 1, _BINS)]), self.hi)
        return min(lo, 0.0), max(hi, 0.0)

    def entropy(self, levels: int = 128) -> tuple[float, float]:
        """TensorRT's KL-divergence threshold on |x|, applied to both sides of the range."""
        if not self.seen or self.half_width == 0.0:
            return self.minmax()
        half = _BINS // 2
        absolute = self.hist[half:] + self.hist[:half][::-1]
        threshold = kl_threshold(absolute, self.half_width, levels)
        lo, hi = self.minmax()
        return max(lo, -threshold), min(hi, threshold)


def kl_threshold(hist: np.ndarray, top: float, levels: int = 128, stride: int = 8) -> float:
    """The |x| clipping threshold whose `levels`-level quantization loses the least information.

    `hist` counts |x| in equal bins over [0, top]. For every candidate threshold the clipped
    reference distribution (outliers folded into the last bin) is compared, by KL divergence,
    with its `levels`-bin quantized-and-expanded version, as in TensorRT's entropy calibrator.
    """
    n = hist.size
    hist = hist.astype(np.float64)
    if hist.sum() == 0 or n <= levels:
        return top
    best, best_kl = n, np.inf
    for i in range(levels, n + 1, stride):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nonzero = hist[:i] != 0
        # Merge the i reference bins into `levels` quantized bins, then spread each merged
        # count evenly over the non-empty reference bins it came from.
        groups = np.minimum((np.arange(i) * levels) // i, levels - 1)
        q_sum = np.bincount(groups, weights=hist[:i], minlength=levels)
        q_cnt = np.bincount(groups, weights=nonzero.astype(np.float64), minlength=levels)
        q = np.where(nonzero, q_sum[groups] / np.maximum(q_cnt[groups], 1), 0.0)
        ps, qs = p.sum(), q.sum()
        if ps == 0 or qs == 0:
            continue
        p, q = p / ps, q / qs
        ok = p > 0
        kl = float(np.sum(p[ok] * np.log(p[ok] / np.maximum(q[ok], 1e-12))))
        if kl < best_kl:
            best, best_kl = i, kl
    return top * best / n


def _why_unusable(rows: np.ndarray) -> str | None:
    """Why a tensor's values cannot define a quantization range (None: they can)."""
    if not np.all(np.isfinite(rows)):
        return "holds NaN or infinite values (an attention mask?)"
    lo, hi = float(rows.min()), float(rows.max())
    extreme = lo if abs(lo) >= abs(hi) else hi
    if abs(extreme) >= HUGE:
        return f"holds mask constants ({extreme:.3g})"
    # Additive masks are large negative constants, repeated (-10000, -1e9); a real
    # activation's extreme is a single value.
    if lo <= -MASK_LIKE and int(np.count_nonzero(rows == lo)) > 1:
        return f"holds a repeated large negative constant ({lo:.6g}), typical of an additive mask"
    return None


def collect_ranges(
    model: ir.Model,
    tensors: Mapping[str, int],
    batches: Iterable[Batch],
    *,
    token_mask: str | None = None,
    sample_rows: int = 1024,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
    provider: Provider = "cpu",
) -> tuple[dict[str, RangeCollector], int]:
    """Runs the batches once: a collector per tensor (name -> channel axis), and the batch count.

    Infinite values do not abort (captures run with finite=False): the tensor is flagged and
    left out of quantization, which is the point of calibrating a model with additive masks.
    """
    collectors = {
        name: RangeCollector(name, axis, sample_rows=sample_rows, seed=seed + i)
        for i, (name, axis) in enumerate(tensors.items())
    }
    graph_inputs = {v.name for v in model.graph.inputs}
    # Graph inputs come straight from the batch; everything else is captured.
    names: Sequence[str] = [n for n in collectors if n not in graph_inputs]

    def add(captured: dict[str, np.ndarray], batch: Batch) -> None:
        for name, arr in captured.items():
            collector = collectors[name]
            collector.add(arr, _mask_for(batch, token_mask, arr, collector.channel_axis))

    def from_batch(batch: Batch) -> dict[str, np.ndarray]:
        return {n: batch[n] for n in collectors if n in graph_inputs and n in batch}

    producers = _producers(model, names)
    if producers is not None and (not names or weight_bytes(model) >= SECTION_ABOVE_BYTES):
        # A big model runs section by section, so its weights are read one section at a
        # time (see Propagator): the range of each tensor is the same, computed by the
        # nodes before it. (With graph inputs only, nothing runs at all.)
        batches = list(batches)
        prop = Propagator(model, batches, provider, finite=False)
        for name in sorted(names, key=lambda n: producers[n][0]):
            prop.advance([producers[name][1]])
            prop.capture([name], add)
        for count, batch in enumerate(batches, start=1):
            add(from_batch(batch), batch)
            if on_batch is not None:
                on_batch(count)
        if not batches:
            raise DataError("the calibration data holds no batches")
        return collectors, len(batches)
    done = 0

    def add_all(captured: dict[str, np.ndarray], batch: Batch) -> None:
        nonlocal done
        add({**captured, **from_batch(batch)}, batch)
        done += 1
        if on_batch is not None:
            on_batch(done)

    return collectors, capture(model, names, batches, add_all, provider=provider, finite=False)


def _producers(model: ir.Model, names: Sequence[str]) -> dict[str, tuple[int, ir.Node]] | None:
    """Each name's producer in the main graph and its position; None if one has none."""
    found: dict[str, tuple[int, ir.Node]] = {}
    wanted = set(names)
    for i, node in enumerate(model.graph):
        for out in node.outputs:
            if out.name in wanted:
                found[out.name] = (i, node)
    return found if len(found) == len(wanted) else None


def _mask_for(
    batch: Batch, token_mask: str | None, arr: np.ndarray, channel_axis: int
) -> np.ndarray | None:
    """Padding rows of a [batch, seq, ..., channels] activation, when the shapes line up."""
    if token_mask is None or arr.ndim < 2 or channel_axis not in (-1, arr.ndim - 1):
        return None
    lead = tuple(arr.shape[:-1])
    rows = int(np.prod(lead))
    try:
        return row_mask(batch, token_mask, rows, lead)
    except DataError:
        if token_mask not in batch:
            raise
        return None  # e.g. a [batch*seq, C] tensor after a Reshape: keep every row
