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

from onnxprune.quant.ranges import RangeCollector

__all__ = [
    "ActDtype",
    "Method",
    "QRANGE",
    "activation_qparams",
    "quantize_weight",
    "dequantize_weight",
    "fake_quant",
    "sqnr_db",
    "ActivationChoice",
    "choose_activation",
    "method_range",
    "SMOOTH_GAIN",
]

ActDtype = Literal["uint8", "int8"]
Method = Literal["minmax", "percentile", "entropy"]
QRANGE: dict[str, tuple[int, int]] = {"uint8": (0, 255), "int8": (-128, 127)}
_CLIP_GRID = (1.0, 0.8, 0.64, 0.5, 0.4, 0.32, 0.25, 0.2, 0.16, 0.125)
SMOOTH_GAIN = 0.5  # smoothing may cost a Mul at run time: take it only if it halves the error


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
    r = np.asarray(ref, dtype=np.float32).ravel()
    d = r - np.asarray(test, dtype=np.float32).ravel()
    noise = float(np.vdot(d, d))
    if noise == 0.0:
        return float("inf")
    return float(10.0 * np.log10(max(float(np.vdot(r, r)), 1e-30) / noise))


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
    smooth_alphas: Sequence[float] = (),
    smooth_gain: float = SMOOTH_GAIN,
    search: bool = True,
    weight_quantized: bool = True,
) -> ActivationChoice:
    """Picks the range (and optional smoothing) minimising the consumers' output error.

    `weights` are the consumers' effective [in, out] matrices (y = x @ w). The candidates are
    the `method` range and, when `search` is on, the min/max range shrunk step by step
    along a geometric grid while the error keeps falling (it is unimodal in the clip: less
    rounding noise against more clipping noise). With `smooth_alphas`, x is also tried
    divided per channel by s = max|x|^a / max|w|^(1-a) (SmoothQuant): the best alpha at full
    range, then its clipping. Smoothing is kept only when it multiplies the error by less
    than `smooth_gain`: it may cost a Mul at run time, and on MiniLM the layers whose
    error it merely shaves (attention output projections) gain nothing end to end.
    """
    ev = _Evaluator(collector.sample, weights, dtype)
    base = method_range(collector, method, percentile, dtype)
    best = ev.trial(method, ev.x, ev.quant(None, weight_quantized), base, None)
    lo, hi = collector.minmax()
    if search and ev.active:
        qw = ev.quant(None, weight_quantized)
        best = min(best, ev.descend("minmax", ev.x, qw, (lo, hi), None, _CLIP_GRID),
                   key=lambda t: t[0])
    if smooth_alphas and ev.active:
        assert collector.channel_min is not None and collector.channel_max is not None
        smoothed: _Trial | None = None
        picked: tuple[np.ndarray, tuple[float, float], str] | None = None
        for alpha in smooth_alphas:
            s = _smooth_vector(collector, weights, alpha)
            # The full-data range of x / s follows exactly from the per-channel extremes.
            srange = (float(np.min(collector.channel_min / s)),
                      float(np.max(collector.channel_max / s)))
            name = f"smooth a={alpha:g}"
            trial = ev.trial(f"{name} x1", ev.x / s, ev.quant(s, weight_quantized), srange, s)
            if smoothed is None or trial[0] < smoothed[0]:
                smoothed, picked = trial, (s, srange, name)
        if search and picked is not None and smoothed is not None:
            s, srange, name = picked
            smoothed = ev.descend(name, ev.x / s, ev.quant(s, weight_quantized), srange, s,
                                  _CLIP_GRID[1:], start=smoothed)
        assert smoothed is not None
        if smoothed[0] < smooth_gain * best[0]:
            best = smoothed
    return ev.finish(best)


_Trial = tuple[float, str, tuple[float, float], "np.ndarray | None", tuple[float, ...]]


class _Evaluator:
    """Output error of candidate quantizations on the sampled rows, for all consumers."""

    def __init__(self, x: np.ndarray, weights: Sequence[np.ndarray], dtype: ActDtype) -> None:
        self.x = x
        self.weights = list(weights)
        self.dtype = dtype
        self.refs = [x @ w for w in self.weights]
        self.power = [float(np.vdot(r.ravel(), r.ravel())) for r in self.refs]
        self.active = x.shape[0] > 0 and bool(self.weights)

    def quant(self, smooth: np.ndarray | None, quantized: bool) -> list[np.ndarray]:
        if not quantized:
            return [w if smooth is None else w * smooth[:, None] for w in self.weights]
        return [_quant_weight_rows(w, smooth) for w in self.weights]

    def trial(self, how: str, xs: np.ndarray, qw: list[np.ndarray], rng: tuple[float, float],
              smooth: np.ndarray | None) -> _Trial:
        scale, zp = activation_qparams(rng[0], rng[1], self.dtype)
        xq = fake_quant(xs, scale, zp, self.dtype)
        sqnrs = []
        for ref, power, w in zip(self.refs, self.power, qw, strict=True):
            d = (ref - xq @ w).ravel()
            noise = float(np.vdot(d, d))
            sqnrs.append(float("inf") if noise == 0 else 10 * np.log10(max(power, 1e-30) / noise))
        error = sum(10.0 ** (-v / 10.0) for v in sqnrs if np.isfinite(v))
        return error, how, (min(rng[0], 0.0), max(rng[1], 0.0)), smooth, tuple(sqnrs)

    def descend(self, how: str, xs: np.ndarray, qw: list[np.ndarray],
                rng: tuple[float, float], smooth: np.ndarray | None,
                grid: Sequence[float], start: _Trial | None = None) -> _Trial:
        """Shrinks the range along `grid` while the error keeps falling."""
        best = start
        for f in grid:
            t = self.trial(f"{how} x{f:g}", xs, qw, (rng[0] * f, rng[1] * f), smooth)
            if best is not None and t[0] >= best[0]:
                break
            best = t
        assert best is not None
        return best

    def finish(self, t: _Trial) -> ActivationChoice:
        _, how, (lo, hi), smooth, sqnrs = t
        scale, zp = activation_qparams(lo, hi, self.dtype)
        xs = self.x if smooth is None else self.x / smooth
        act = sqnr_db(xs, fake_quant(xs, scale, zp, self.dtype)) if xs.size else float("nan")
        return ActivationChoice(lo, hi, scale, zp, how, smooth, sqnrs, act)


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
