"""Forward and backward (vector-Jacobian products) of the ONNX ops a pruned block is made of.

Everything is plain numpy so the repair runs wherever onnxruntime runs, without torch.
Activations are handled as 2-D arrays of rows [tokens, channels]: the blocks repaired here
(an FFN between two norms, an MLP layer) act on each row on its own, so flattening the leading
axes loses nothing. Constants keep their own shapes and broadcast against the rows.

Each op is a pair of functions:

* ``forward(inputs, attrs) -> output``
* ``backward(inputs, output, grad, needs, attrs) -> [grad or None per input]``: the gradient
  of the loss with respect to each input for which ``needs[i]`` is true.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["OP", "OPS", "erf", "unbroadcast"]

Attrs = dict[str, Any]
Forward = Callable[[Sequence[np.ndarray], Attrs], np.ndarray]
Backward = Callable[
    [Sequence[np.ndarray], np.ndarray, np.ndarray, Sequence[bool], Attrs],
    list["np.ndarray | None"],
]

def erf(x: np.ndarray) -> np.ndarray:
    """The error function, elementwise, in the input's precision (Abramowitz-Stegun 7.1.26,
    absolute error below 1.5e-7; in float32 about 3x faster here than scipy.special.erf,
    which computes in double)."""
    dt = x.dtype.type
    a = np.abs(x)
    t = a * dt(0.3275911)
    t += dt(1.0)
    np.reciprocal(t, out=t)
    poly = t * dt(1.061405429)
    for c in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        poly += dt(c)
        poly *= t
    np.square(a, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    poly *= a
    np.subtract(dt(1.0), poly, out=poly)
    return np.copysign(poly, x, out=poly)


def unbroadcast(grad: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Sums `grad` down to `shape`, undoing numpy broadcasting."""
    shape = tuple(shape)
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    g = grad.sum(axis=tuple(range(extra))) if extra > 0 else grad
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


@dataclass(frozen=True)
class OP:
    forward: Forward
    backward: Backward


def _unary(f: Callable[[np.ndarray, Attrs], np.ndarray],
           df: Callable[[np.ndarray, np.ndarray, Attrs], np.ndarray]) -> OP:
    """An elementwise op from its function and its derivative df(x, y)."""
    return OP(
        lambda i, a: f(i[0], a),
        lambda i, y, g, n, a: [g * df(i[0], y, a) if n[0] else None] + [None] * (len(i) - 1),
    )


def _binary(f: Callable[[np.ndarray, np.ndarray], np.ndarray],
            da: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray],
            db: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]) -> OP:
    """A broadcasting binary op; da/db(a, b, y, g) give the unreduced input gradients."""
    def backward(i: Sequence[np.ndarray], y: np.ndarray, g: np.ndarray, n: Sequence[bool],
                 a: Attrs) -> list[np.ndarray | None]:
        x0, x1 = i
        return [unbroadcast(da(x0, x1, y, g), np.shape(x0)) if n[0] else None,
                unbroadcast(db(x0, x1, y, g), np.shape(x1)) if n[1] else None]
    return OP(lambda i, a: f(i[0], i[1]), backward)


_SQRT_2 = math.sqrt(2.0)
_SQRT_2_PI = math.sqrt(2.0 / math.pi)


def _gelu(x: np.ndarray, a: Attrs) -> np.ndarray:
    if a.get("approximate", "none") == "tanh":
        return 0.5 * x * (1 + np.tanh(_SQRT_2_PI * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + erf(x / _SQRT_2))


def _gelu_grad(x: np.ndarray, y: np.ndarray, a: Attrs) -> np.ndarray:
    if a.get("approximate", "none") == "tanh":
        t = np.tanh(_SQRT_2_PI * (x + 0.044715 * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_PI * (1 + 3 * 0.044715 * x * x)
    return 0.5 * (1 + erf(x / _SQRT_2)) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * x))  # stable for large |x|


def _matmul_fwd(i: Sequence[np.ndarray], a: Attrs) -> np.ndarray:
    return i[0] @ i[1]


def _matmul_bwd(i: Sequence[np.ndarray], y: np.ndarray, g: np.ndarray, n: Sequence[bool],
                a: Attrs) -> list[np.ndarray | None]:
    x, w = i
    return [g @ w.T if n[0] else None, x.T @ g if n[1] else None]


def _gemm_fwd(i: Sequence[np.ndarray], a: Attrs) -> np.ndarray:
    w = i[1].T if a.get("transB", 0) else i[1]
    y = a.get("alpha", 1.0) * (i[0] @ w)
    if len(i) > 2:
        y = y + a.get("beta", 1.0) * i[2]
    return y


def _gemm_bwd(i: Sequence[np.ndarray], y: np.ndarray, g: np.ndarray, n: Sequence[bool],
              a: Attrs) -> list[np.ndarray | None]:
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    w = i[1].T if a.get("transB", 0) else i[1]
    out: list[np.ndarray | None] = [alpha * (g @ w.T) if n[0] else None, None]
    if n[1]:
        gw = alpha * (i[0].T @ g)
        out[1] = gw.T if a.get("transB", 0) else gw
    if len(i) > 2:
        out.append(unbroadcast(beta * g, np.shape(i[2])) if n[2] else None)
    return out


def _layer_norm_fwd(i: Sequence[np.ndarray], a: Attrs) -> np.ndarray:
    x = i[0]
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    inv = 1.0 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + a.get("epsilon", 1e-5))
    y = xc * inv
    if len(i) > 1:
        y = y * i[1]
    if len(i) > 2:
        y = y + i[2]
    return y


def _layer_norm_bwd(i: Sequence[np.ndarray], y: np.ndarray, g: np.ndarray, n: Sequence[bool],
                    a: Attrs) -> list[np.ndarray | None]:
    x = i[0]
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    inv = 1.0 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + a.get("epsilon", 1e-5))
    xhat = xc * inv
    gx = g * i[1] if len(i) > 1 else g
    out: list[np.ndarray | None] = [None] * len(i)
    if n[0]:
        out[0] = inv * (gx - gx.mean(axis=-1, keepdims=True)
                        - xhat * (gx * xhat).mean(axis=-1, keepdims=True))
    if len(i) > 1 and n[1]:
        out[1] = unbroadcast(g * xhat, np.shape(i[1]))
    if len(i) > 2 and n[2]:
        out[2] = unbroadcast(g, np.shape(i[2]))
    return out


def _rms_norm_fwd(i: Sequence[np.ndarray], a: Attrs) -> np.ndarray:
    x = i[0]
    inv = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + a.get("epsilon", 1e-5))
    y = x * inv
    return y * i[1] if len(i) > 1 else y


def _rms_norm_bwd(i: Sequence[np.ndarray], y: np.ndarray, g: np.ndarray, n: Sequence[bool],
                  a: Attrs) -> list[np.ndarray | None]:
    x = i[0]
    inv = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + a.get("epsilon", 1e-5))
    xhat = x * inv
    gx = g * i[1] if len(i) > 1 else g
    out: list[np.ndarray | None] = [None] * len(i)
    if n[0]:
        out[0] = inv * (gx - xhat * (gx * xhat).mean(axis=-1, keepdims=True))
    if len(i) > 1 and n[1]:
        out[1] = unbroadcast(g * xhat, np.shape(i[1]))
    return out


def _reduce_mean_fwd(i: Sequence[np.ndarray], a: Attrs) -> np.ndarray:
    return i[0].mean(axis=-1, keepdims=True)


def _reduce_mean_bwd(i: Sequence[np.ndarray], y: np.ndarray, g: np.ndarray, n: Sequence[bool],
                     a: Attrs) -> list[np.ndarray | None]:
    x = i[0]
    return [np.broadcast_to(g / x.shape[-1], x.shape) if n[0] else None] + [None] * (len(i) - 1)


def _pow_bwd(i: Sequence[np.ndarray], y: np.ndarray, g: np.ndarray, n: Sequence[bool],
             a: Attrs) -> list[np.ndarray | None]:
    x, p = i
    return [g * p * np.power(x, p - 1) if n[0] else None, None]


_IDENTITY = _unary(lambda x, a: x, lambda x, y, a: np.ones_like(x))

OPS: dict[str, OP] = {
    "MatMul": OP(_matmul_fwd, _matmul_bwd),
    "Gemm": OP(_gemm_fwd, _gemm_bwd),
    "Add": _binary(np.add, lambda a, b, y, g: g, lambda a, b, y, g: g),
    "Sub": _binary(np.subtract, lambda a, b, y, g: g, lambda a, b, y, g: -g),
    "Mul": _binary(np.multiply, lambda a, b, y, g: g * b, lambda a, b, y, g: g * a),
    "Div": _binary(np.divide, lambda a, b, y, g: g / b, lambda a, b, y, g: -g * y / b),
    "Pow": OP(lambda i, a: np.power(i[0], i[1]), _pow_bwd),
    "Identity": _IDENTITY,
    "Cast": _IDENTITY,  # only float -> float casts are accepted (see block.py)
    "Dropout": _IDENTITY,  # inference mode
    "Neg": _unary(lambda x, a: -x, lambda x, y, a: -np.ones_like(x)),
    "Relu": _unary(lambda x, a: np.maximum(x, 0), lambda x, y, a: (x > 0).astype(x.dtype)),
    "Erf": _unary(lambda x, a: erf(x),
                  lambda x, y, a: (2 / math.sqrt(math.pi)) * np.exp(-x * x)),
    "Tanh": _unary(lambda x, a: np.tanh(x), lambda x, y, a: 1 - y * y),
    "Sigmoid": _unary(lambda x, a: _sigmoid(x), lambda x, y, a: y * (1 - y)),
    "Gelu": _unary(_gelu, _gelu_grad),
    "Sqrt": _unary(lambda x, a: np.sqrt(x), lambda x, y, a: 0.5 / y),
    "Reciprocal": _unary(lambda x, a: 1 / x, lambda x, y, a: -y * y),
    "Exp": _unary(lambda x, a: np.exp(x), lambda x, y, a: y),
    "LayerNormalization": OP(_layer_norm_fwd, _layer_norm_bwd),
    "RMSNormalization": OP(_rms_norm_fwd, _rms_norm_bwd),
    "ReduceMean": OP(_reduce_mean_fwd, _reduce_mean_bwd),
}
