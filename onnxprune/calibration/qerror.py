"""8-bit quantization arithmetic and the error-driven choices made from calibration samples.

Everything here is numpy on the rows sampled during calibration (`RangeCollector.sample`),
so choosing an activation's clipping range, deciding whether SmoothQuant-style migration
helps and measuring each layer's SQNR cost no extra onnxruntime pass.

The choice for one activation tensor is made jointly for all the layers that read it
(Q, K and V share one quantizer): the error minimised is the sum, over those layers, of
the output noise relative to the output signal, |x W - Q(x) Q(W)|^2 / |x W|^2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from onnxprune.calibration.ranges import RangeCollector

__all__ = [
    "ActDtype",
    "Method",
    "QRANGE",
    "activation_qparams",
    "quantize_weight",
    "dequantize_weight",
    "fake_quant",
    "sqnr_db",
    "combine_sqnr",
    "ActivationChoice",
    "choose_activation",
    "method_range",
]

ActDtype = Literal["uint8", "int8"]
Method = Literal["minmax", "percentile", "entropy"]
QRANGE: dict[str, tuple[int, int]] = {"uint8": (0, 255), "int8": (-128, 127)}
_CLIP_GRID = (1.0, 0.8, 0.64, 0.5, 0.4, 0.32, 0.25, 0.2, 0.16, 0.125)
_SMOOTH_GAIN = 0.85  # smoothing costs a Mul at run time: take it only if error drops 15 %+


def activation_qparams(lo: float, hi: float, dtype: ActDtype) -> tuple[float, int]:
    """Asymmetric per-tensor scale and zero point; the range always holds 0 exactly."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax = QRANGE[dtype]
    if hi - lo <= 0.0:
        return 1.0, 0 if dtype == "int8" else 0
    scale = (hi - lo) / (qmax - qmin)
    zero_point = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return float(np.float32(scale)), zero_point


def quantize_weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per channel on `axis`: (int8 values, float32 scales).

    Symmetric with zero point 0 is what integer GEMM kernels want for weights; the range
    is [-127, 127] so that negation never overflows.
    """
    w = np.asarray(w, dtype=np.float32)
    other = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    amax = np.abs(w).max(axis=other) if other else np.abs(w)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.round(w / _expand(scale, axis, w.ndim)), -127, 127).astype(np.int8)
    return q, scale


def dequantize_weight(q: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    return q.astype(np.float32) * _expand(scale, axis, q.ndim)


def _expand(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return v.reshape(shape)


def fake_quant(x: np.ndarray, scale: float, zero_point: int, dtype: ActDtype) -> np.ndarray:
    """x after a QuantizeLinear/DequantizeLinear round trip (round half to even, like ONNX)."""
    qmin, qmax = QRANGE[dtype]
    q = np.clip(np.round(x / np.float32(scale)) + zero_point, qmin, qmax)
    return ((q - zero_point) * np.float32(scale)).astype(np.float32)


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    ref64 = np.asarray(ref, dtype=np.float64)
    noise = float(np.sum((ref64 - np.asarray(test, dtype=np.float64)) ** 2))
    signal = float(np.sum(ref64**2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(max(signal, 1e-30) / noise)


def combine_sqnr(*values: float) -> float:
    """SQNR of a result whose independent noise sources have these SQNRs."""
    total = sum(10.0 ** (-v / 10.0) for v in values if np.isfinite(v))
    return float("inf") if total == 0 else float(-10.0 * np.log10(total))


def method_range(
    collector: RangeCollector, method: Method, percentile: float, dtype: ActDtype
) -> tuple[float, float]:
    if method == "percentile":
        return collector.percentile(percentile)
    if method == "entropy":
        return collector.entropy(128 if dtype == "int8" or collector.lo < 0 else 256)
    return collector.minmax()


@dataclass(frozen=True)
class ActivationChoice:
    """How one activation tensor is quantized, and what it costs its consumer layers."""

    lo: float
    hi: float
    scale: float
    zero_point: int
    how: str  # "percentile", "minmax x0.5" ...: which candidate won
    smooth: np.ndarray | None  # divide x by this per channel (and multiply the weights)
    layer_sqnr: tuple[float, ...]  # output SQNR per consumer, dB, on the sampled rows
    activation_sqnr: float


def choose_activation(
    collector: RangeCollector,
    weights: Sequence[np.ndarray],
    *,
    method: Method,
    percentile: float,
    dtype: ActDtype,
    smooth_alpha: float | None,
    search: bool,
    weight_quantized: bool = True,
) -> ActivationChoice:
    """Picks the range (and optional smoothing) minimising the consumers' output error.

    `weights` are the consumers' effective [in, out] matrices (y = x @ w). The candidates are
    the `method` range and, when `search` is on, the min/max range shrunk by a geometric
    grid; with `smooth_alpha`, the same again after dividing x per channel by
    s = max|x|^a / max|w|^(1-a) (SmoothQuant), kept only when it clearly lowers the error.
    """
    x = collector.sample
    base = method_range(collector, method, percentile, dtype)
    candidates: list[tuple[str, tuple[float, float]]] = [(method, base)]
    lo, hi = collector.minmax()
    if search:
        candidates += [(f"minmax x{f:g}", (lo * f, hi * f)) for f in _CLIP_GRID]
    refs = [x @ w for w in weights]
    qw = [_quant_weight_rows(w, None) if weight_quantized else w for w in weights]
    best = _best(x, refs, qw, candidates, dtype, None)
    if smooth_alpha is not None and x.shape[0] > 0:
        assert collector.channel_min is not None and collector.channel_max is not None
        s = _smooth_vector(collector, weights, smooth_alpha)
        slo = float(min(np.min(collector.channel_min / s), 0.0))
        shi = float(max(np.max(collector.channel_max / s), 0.0))
        grid = _CLIP_GRID if search else (1.0,)
        scands = [(f"smooth a={smooth_alpha:g} x{f:g}", (slo * f, shi * f)) for f in grid]
        sqw = [_quant_weight_rows(w, s) if weight_quantized else w * s[:, None] for w in weights]
        smoothed = _best(x / s, refs, sqw, scands, dtype, s)
        if smoothed[0] < _SMOOTH_GAIN * best[0]:
            best = smoothed
    _, choice = best
    return choice


def _best(
    x: np.ndarray,
    refs: list[np.ndarray],
    qweights: list[np.ndarray],
    candidates: list[tuple[str, tuple[float, float]]],
    dtype: ActDtype,
    smooth: np.ndarray | None,
) -> tuple[float, ActivationChoice]:
    best: tuple[float, ActivationChoice] | None = None
    for how, (lo, hi) in candidates:
        scale, zp = activation_qparams(lo, hi, dtype)
        xq = fake_quant(x, scale, zp, dtype)
        sqnrs = tuple(sqnr_db(r, xq @ w) for r, w in zip(refs, qweights, strict=True))
        error = sum(10.0 ** (-v / 10.0) for v in sqnrs if np.isfinite(v))
        if best is None or error < best[0]:
            choice = ActivationChoice(
                float(lo), float(hi), scale, zp, how, smooth, sqnrs, sqnr_db(x, xq)
            )
            best = (error, choice)
    assert best is not None
    return best


def _smooth_vector(collector: RangeCollector, weights: Sequence[np.ndarray], alpha: float) -> (
    np.ndarray
):
    assert collector.channel_min is not None and collector.channel_max is not None
    act = np.maximum(np.abs(collector.channel_min), np.abs(collector.channel_max))
    wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    s = np.power(np.maximum(act, 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1.0 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def _quant_weight_rows(w: np.ndarray, smooth: np.ndarray | None) -> np.ndarray:
    """The dequantized int8 per-output-channel copy of an [in, out] weight (after smoothing)."""
    ws = w if smooth is None else w * smooth[:, None]
    q, scale = quantize_weight(ws, axis=1)
    return dequantize_weight(q, scale, axis=1)
