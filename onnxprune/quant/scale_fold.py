"""Folding a per-channel scale into the constants that produce a tensor.

SmoothQuant divides an activation by a per-channel vector before quantizing it. An
explicit Mul costs a pass over the tensor on every run, and onnxruntime will not fuse a
MatMul whose output runs through Relu into anything but a Quantize, so a Mul there also
costs the previous layer its integer kernel. When the tensor comes out of constants that
act per channel, the division folds into them, exactly and for free:

* a product or quotient with a per-channel constant (not one inside a decomposed GELU,
  which onnxruntime would then no longer fuse);
* LayerNormalization's gamma and beta;
* MatMul/Gemm output columns (and a bias added to them): per-output-channel int8 weights
  quantize a rescaled column exactly as well as the original one; not a weight other
  nodes read too (directly or through Identity): its rescaled copy would be stored beside
  the original, a second int8 copy of it in the file;
* through Relu, which commutes with a positive factor.

Every value folded through, except the starting one, must have no other consumer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxprune.core.weights import const_array, constant_readers, constant_source

__all__ = ["fold_channel_scale"]

MakeConst = Callable[[str, np.ndarray], ir.Value]
_ACTIVATION_OPS = frozenset({"Erf", "Tanh", "Sigmoid", "Pow"})


def fold_channel_scale(value: ir.Value, factor: np.ndarray, make_const: MakeConst) -> bool:
    """Rewrites the producers of `value` so that it comes out multiplied by `factor` per channel.

    `factor` (positive, one per channel of the last axis) must be applicable to all of
    `value`'s consumers; the caller checks that. Returns False, having changed nothing, when
    no constant can take the factor.
    """
    node = value.producer()
    channels = factor.size
    if node is None or value.is_graph_output() or not _last_dim_ok(value, channels):
        return False
    if node.domain not in ("", "ai.onnx") or node.outputs[0] is not value:
        return False
    fold = _FOLDERS.get(node.op_type)
    return fold is not None and fold(node, value, factor, make_const)


def _fold_mul(node: ir.Node, value: ir.Value, factor: np.ndarray, make: MakeConst) -> bool:
    if _inside_activation(node):
        # Changing GELU's constants would stop onnxruntime fusing it (Gelu/BiasGelu),
        # which costs more than the Mul that folding saves.
        return False
    for i in (0, 1):
        c = _per_channel_const(node.inputs[i], factor.size)
        if c is not None:
            node.replace_input_with(i, make(f"{value.name}_scale_folded", c * factor))
            return True
    return any(_fold_inner(node.inputs[i], factor, make) for i in (0, 1))


def _fold_div(node: ir.Node, value: ir.Value, factor: np.ndarray, make: MakeConst) -> bool:
    if _inside_activation(node):
        return False
    c = _per_channel_const(node.inputs[1], factor.size)
    if c is not None:
        node.replace_input_with(1, make(f"{value.name}_scale_folded", c / factor))
        return True
    return _fold_inner(node.inputs[0], factor, make)


def _fold_add(node: ir.Node, value: ir.Value, factor: np.ndarray, make: MakeConst) -> bool:
    """(a + c) * f = a * f + c * f: fold into a, then scale the constant c."""
    for i in (0, 1):
        c = _per_channel_const(node.inputs[i], factor.size)
        if c is not None and _fold_inner(node.inputs[1 - i], factor, make):
            node.replace_input_with(i, make(f"{value.name}_bias_scale_folded", c * factor))
            return True
    return False


def _fold_relu(node: ir.Node, value: ir.Value, factor: np.ndarray, make: MakeConst) -> bool:
    return _fold_inner(node.inputs[0], factor, make)


def _fold_layernorm(node: ir.Node, value: ir.Value, factor: np.ndarray, make: MakeConst) -> bool:
    """Y = norm(x) * gamma + beta: scaling gamma and beta scales Y, per channel."""
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return False
    params = [(i, const_array(node.inputs[i])) for i in (1, 2)
              if len(node.inputs) > i and node.inputs[i] is not None]
    if any(p is None or p.shape != (factor.size,) or p.dtype != np.float32 for _, p in params):
        return False
    for i, p in params:
        assert p is not None
        node.replace_input_with(i, make(f"{value.name}_scale_folded", p * factor))
    return True


def _own_weight(node: ir.Node) -> bool:
    """Whether `node` is the only reader of its weight (input 1)."""
    source = constant_source(node.inputs[1])
    return source is not None and not source.is_graph_output() and all(
        reader is node for reader in constant_readers(source))


def _fold_matmul(node: ir.Node, value: ir.Value, factor: np.ndarray, make: MakeConst) -> bool:
    w = const_array(node.inputs[1])
    if not _own_weight(node):
        return False
    if w is None or w.dtype != np.float32 or w.ndim != 2 or w.shape[1] != factor.size:
        return False
    node.replace_input_with(1, make(f"{node.inputs[1].name}_scale_folded",  # type: ignore[union-attr]
                                    w * factor[None, :]))
    return True


def _fold_gemm(node: ir.Node, value: ir.Value, factor: np.ndarray, make: MakeConst) -> bool:
    w = const_array(node.inputs[1])
    attrs = node.attributes
    trans_b = attrs.get("transB") is not None and attrs["transB"].as_int() == 1
    if not _own_weight(node):
        return False
    if w is None or w.dtype != np.float32 or w.ndim != 2:
        return False
    if (w.shape[0] if trans_b else w.shape[1]) != factor.size:
        return False
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    c = None
    if bias is not None:
        c = _per_channel_const(bias, factor.size)
        if c is None:
            return False
    scaled = w * (factor[:, None] if trans_b else factor[None, :])
    node.replace_input_with(1, make(f"{node.inputs[1].name}_scale_folded",  # type: ignore[union-attr]
                                    scaled))
    if c is not None:
        node.replace_input_with(2, make(f"{bias.name}_scale_folded", c * factor))  # type: ignore[union-attr]
    return True


_FOLDERS = {
    "Mul": _fold_mul, "Div": _fold_div, "Add": _fold_add, "Relu": _fold_relu,
    "LayerNormalization": _fold_layernorm, "MatMul": _fold_matmul, "Gemm": _fold_gemm,
}


def _fold_inner(value: ir.Value | None, factor: np.ndarray, make: MakeConst) -> bool:
    if value is None or len(value.uses()) != 1:
        return False
    return fold_channel_scale(value, factor, make)


def _last_dim_ok(value: ir.Value, channels: int) -> bool:
    """The tensor's channels (last axis) are `channels` wide, or its shape is unknown."""
    if value.shape is None:
        return True
    if len(value.shape) == 0:
        return False
    last = value.shape[-1]
    return not isinstance(last, int) or last == channels


def _per_channel_const(value: ir.Value | None, channels: int) -> np.ndarray | None:
    """A float32 constant acting per channel of the last axis (scalar, [C], [1, ..., C])."""
    c = const_array(value)
    if c is None or c.dtype != np.float32:
        return None
    if c.ndim == 0:
        return c
    if all(d == 1 for d in c.shape[:-1]) and c.shape[-1] in (1, channels):
        return c
    return None


def _inside_activation(node: ir.Node, depth: int = 4) -> bool:
    """Whether `node` closes a decomposed activation (an Erf/Tanh/Sigmoid a few ops up)."""
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for v in n.inputs:
                p = v.producer() if v is not None else None
                if p is None:
                    continue
                if p.op_type in _ACTIVATION_OPS:
                    return True
                nxt.append(p)
        frontier = nxt
    return False
