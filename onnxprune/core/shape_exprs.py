"""What a run-time shape computation reads: Shape -> Gather/Slice -> arithmetic -> Concat.

The legacy torch exporter spells every size it needs at run time: GPT-2's Conv1D flattens its
input with `Reshape(x, Concat([-1], Shape(x)[-1:]))`, Phi-3's `chunk(2, dim=-1)` slices its
packed `gate_up_proj` at `Shape(x)[-1] // 2`. Removing channels of `x` changes what such a
Shape reads, so the channel analysis must know, element by element, which dimension of which
tensor each shape entry comes from and whether it stays right after the cut.

`elements(value)` evaluates a small integer tensor (0-D or 1-D) symbolically: each entry knows
its value where the static shapes give it, the run-time dimensions it depends on, and whether
it *is* one dimension unchanged. `check_shape_read` walks forward from one Shape node and
accepts it only when every use of the channel count is one the analysis understands.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.core.weights import const_array

__all__ = ["Elem", "Expr", "elements", "fold", "channel_uses"]

Dim = tuple[ir.Value, int]  # (tensor, absolute axis) read by a Shape op


@dataclass(frozen=True)
class Elem:
    """One entry: its value when static shapes give it, the run-time dims it depends on, and
    the one dim it equals unchanged (None once arithmetic touched it)."""

    value: int | None
    deps: frozenset[Dim] = frozenset()
    exact: Dim | None = None


@dataclass(frozen=True)
class Expr:
    elems: tuple[Elem, ...]
    ndim: int  # 0 (a scalar) or 1


# Ops on shape tensors that `elements` evaluates; any other reader of a channel count is a
# use to be judged (a Reshape target, Slice bounds) or a decline.
ARITH = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}
SHAPE_OPS = frozenset({"Shape", "Gather", "Slice", "Squeeze", "Unsqueeze", "Concat", "Cast",
                       "Identity", "Div", *ARITH})
_INT_TYPES = {ir.DataType.INT64, ir.DataType.INT32}

DimsOf = Callable[[ir.Value], "list[int | None] | None"]


def _static(dims_of: DimsOf, value: ir.Value, axis: int) -> int | None:
    dims = dims_of(value)
    return None if dims is None or axis >= len(dims) else dims[axis]


def _axes(node: ir.Node, index: int) -> list[int] | None:
    if len(node.inputs) > index and node.inputs[index] is not None:
        arr = const_array(node.inputs[index])
        return None if arr is None else [int(a) for a in arr.reshape(-1)]
    attr = node.attributes.get("axes")
    return None if attr is None else [int(a) for a in attr.as_ints()]


def _int_const(value: ir.Value) -> Expr | None:
    arr = const_array(value)
    if arr is None or arr.ndim > 1 or arr.dtype.kind not in "iu":
        return None
    return Expr(tuple(Elem(int(v)) for v in arr.reshape(-1)), arr.ndim)


def elements(value: ir.Value | None, dims_of: DimsOf,
             memo: dict[ir.Value, Expr | None] | None = None) -> Expr | None:
    """The entries of an integer shape tensor, or None where it cannot be told."""
    if value is None:
        return None
    memo = {} if memo is None else memo
    if value in memo:
        return memo[value]
    memo[value] = None  # cycles cannot occur in a DAG, but a bad graph must not recurse
    result = _int_const(value)
    if result is None:
        node = value.producer()
        if node is not None and node.domain in ("", "ai.onnx") and node.op_type in SHAPE_OPS:
            result = _evaluate(node, dims_of, memo)
    memo[value] = result
    return result


def _evaluate(node: ir.Node, dims_of: DimsOf, memo: dict[ir.Value, Expr | None]
              ) -> Expr | None:
    op = node.op_type
    if op == "Shape":
        src = node.inputs[0]
        dims = None if src is None else dims_of(src)
        if dims is None:
            return None
        r = len(dims)
        start = node.attributes.get("start")
        end = node.attributes.get("end")
        lo = 0 if start is None else start.as_int()
        hi = r if end is None else end.as_int()
        lo, hi = (min(max(v + r if v < 0 else v, 0), r) for v in (lo, hi))
        return Expr(tuple(Elem(dims[i], frozenset({(src, i)}), (src, i))  # type: ignore[arg-type]
                          for i in range(lo, hi)), 1)
    args = [elements(v, dims_of, memo) for v in node.inputs]
    if op == "Concat":
        if any(a is None or a.ndim != 1 for a in args):
            return None
        return Expr(tuple(e for a in args for e in a.elems), 1)  # type: ignore[union-attr]
    data = args[0] if args else None
    if data is None:
        return None
    if op in ("Identity",):
        return data
    if op == "Cast":
        to = node.attributes.get("to")
        ok = to is not None and ir.DataType(to.as_int()) in _INT_TYPES
        return data if ok else None
    if op == "Gather":
        idx = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if data.ndim != 1 or idx is None or idx.ndim > 1:
            return None
        n = len(data.elems)
        picks = [int(i) + n if int(i) < 0 else int(i) for i in idx.reshape(-1)]
        if any(not 0 <= p < n for p in picks):
            return None
        return Expr(tuple(data.elems[p] for p in picks), idx.ndim)
    if op == "Slice":
        return _slice(node, data)
    if op in ("Squeeze", "Unsqueeze"):
        axes = _axes(node, 1)
        if op == "Squeeze" and data.ndim == 1 and len(data.elems) == 1 and axes in (None, [0],
                                                                                  [-1]):
            return Expr(data.elems, 0)
        if op == "Unsqueeze" and data.ndim == 0 and axes in ([0], [-1]):
            return Expr(data.elems, 1)
        return None
    return _arith(op, args)


def _slice(node: ir.Node, data: Expr) -> Expr | None:
    params = [const_array(v) if v is not None else None for v in node.inputs[1:5]]
    if data.ndim != 1 or len(params) < 2 or params[0] is None or params[1] is None:
        return None
    if any(p is None for p, v in zip(params, node.inputs[1:5], strict=False) if v is not None):
        return None
    if len(params) > 2 and params[2] is not None and int(params[2].reshape(-1)[0]) not in (0, -1):
        return None
    if len(params) > 3 and params[3] is not None and int(params[3].reshape(-1)[0]) != 1:
        return None
    n = len(data.elems)
    lo, hi = (int(p.reshape(-1)[0]) for p in params[:2])  # type: ignore[union-attr]
    lo, hi = (min(max(v + n if v < 0 else v, 0), n) for v in (lo, hi))
    return Expr(data.elems[lo:hi], 1)


def _arith(op: str, args: list[Expr | None]) -> Expr | None:
    if len(args) != 2 or args[0] is None or args[1] is None:
        return None
    a, b = args
    n = max(len(a.elems), len(b.elems))
    if {len(a.elems), len(b.elems)} - {1, n}:
        return None
    out = []
    for i in range(n):
        x = a.elems[i if len(a.elems) > 1 else 0]
        y = b.elems[i if len(b.elems) > 1 else 0]
        value = None
        if x.value is not None and y.value is not None:
            if op == "Div":
                if y.value == 0:
                    return None
                value = int(np.trunc(x.value / y.value))  # ONNX integer Div truncates
            else:
                value = int(ARITH[op](x.value, y.value))
        unit = 1 if op in ("Mul", "Div") else 0
        exact = x.exact if not y.deps and y.value == unit else None
        if exact is None and op in ("Add", "Mul") and not x.deps and x.value == unit:
            exact = y.exact
        out.append(Elem(value, x.deps | y.deps, exact))
    return Expr(tuple(out), max(a.ndim, b.ndim))


def fold(value: ir.Value | None, dims_of: DimsOf) -> np.ndarray | None:
    """The value of a shape tensor computed at run time, when static shapes determine it."""
    expr = elements(value, dims_of)
    if expr is None or any(e.value is None for e in expr.elems):
        return None
    arr = np.asarray([e.value for e in expr.elems], dtype=np.int64)
    return arr.reshape(()) if expr.ndim == 0 else arr


def channel_uses(shape: ir.Node, dim: Dim, dims_of: DimsOf
                 ) -> list[tuple[ir.Node, int, Expr]] | str:
    """Where the channel count `dim` read by `shape` ends up: every (node, input index, entries)
    outside the shape arithmetic whose entries depend on it. A string says why it cannot be
    told (a graph output, a computation not understood)."""
    memo: dict[ir.Value, Expr | None] = {}
    todo = [shape.outputs[0]]
    seen: set[ir.Value] = set()
    sinks: list[tuple[ir.Node, int, Expr]] = []
    while todo:
        value = todo.pop()
        if value in seen:
            continue
        seen.add(value)
        expr = elements(value, dims_of, memo)
        if expr is None:
            node = value.producer()
            where = f"{node.op_type} '{node.name}'" if node is not None else f"'{value.name}'"
            return f"it is used by {where}, a shape computation that is not understood"
        if not any(dim in e.deps for e in expr.elems):
            continue
        if value.is_graph_output():
            return f"it reaches the graph output '{value.name}'"
        for use in value.uses():
            node = use.node
            arith = node.domain in ("", "ai.onnx") and node.op_type in SHAPE_OPS and (
                node.op_type not in ("Gather", "Slice", "Squeeze", "Unsqueeze") or use.idx == 0)
            if arith and node.graph is shape.graph:
                todo.extend(node.outputs)
            else:
                sinks.append((node, use.idx, expr))
    return sinks
