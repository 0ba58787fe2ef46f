"""Channel-fill rules for tensors whose channel count is read at run time (see shape_exprs).

A Shape op on a tensor in a channel group is harmless when what it reads either does not
depend on the channel count (the batch and sequence sizes), or feeds only uses that stay right
after the cut:
- a Reshape of that same tensor whose last target entry is its own channel count, unchanged
  (`Reshape(x, Concat([-1], Shape(x)[-1:]))`, GPT-2's Conv1D on the legacy exporter): the
  count read at run time is the pruned one;
- the bounds of a Slice of that same tensor along the channels (Phi-3's `chunk(2, dim=-1)` of
  its packed `gate_up_proj`): folded from the static shapes, and the slicing writes the new
  bounds as constants of that Slice's own.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxprune.channels.shapes import Coupler, Decline, Shapes, label
from onnxprune.core.shape_exprs import channel_uses, elements, fold
from onnxprune.core.weights import const_array

__all__ = ["shape_read", "own_count_reshape", "folded_slice_params"]


def _slice_axis(node: ir.Node, rank: int) -> int | None:
    """The one axis (negative) a Slice cuts, when its axes are constant."""
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        axes = const_array(node.inputs[3])
        if axes is None or axes.size != 1:
            return None
        return int(axes.reshape(-1)[0]) % rank - rank
    return -rank if rank else None


def shape_read(fill: Coupler, node: ir.Node, value: ir.Value, axis: int) -> None:
    """A Shape op reading a tensor of the group: accepted when its channel count is only used
    where it stays right (module docstring); otherwise the group is declined."""
    shapes = fill.shapes
    rank = shapes.rank(value)
    if node.op_type != "Shape" or rank is None:
        raise Decline(f"its channels are read by the shape op {label(node)}")
    dim = (value, rank + axis)
    uses = channel_uses(node, dim, shapes.dims)
    if isinstance(uses, str):
        raise Decline(f"its channel count is read by {label(node)} and {uses}")
    for sink, idx, _expr in uses:
        data = sink.inputs[0] if sink.inputs else None
        if data is value and sink.op_type == "Reshape" and idx == 1 \
                and own_count_reshape(shapes, sink, value, axis):
            continue
        if data is value and sink.op_type == "Slice" and idx in (1, 2) \
                and _slice_axis(sink, rank) == axis \
                and fold(sink.inputs[idx], shapes.dims) is not None:
            continue
        raise Decline(f"its channel count is read by {label(node)} and used by {label(sink)}")


def own_count_reshape(shapes: Shapes, node: ir.Node, value: ir.Value, axis: int) -> bool:
    """True when Reshape `node` keeps `value`'s channel axis last with a target whose last entry
    is `value`'s own channel count read at run time, and no other entry depends on it."""
    inp = node.inputs[0]
    rank = shapes.rank(value)
    if inp is None or inp is not value or axis != -1 or rank is None:
        return False
    expr = elements(node.inputs[1], shapes.dims)
    if expr is None or expr.ndim != 1 or not expr.elems:
        return False
    dim = (value, rank - 1)
    return expr.elems[-1].exact == dim and not any(dim in e.deps for e in expr.elems[:-1])


def folded_slice_params(shapes: Shapes, node: ir.Node) -> list[np.ndarray | None] | None:
    """Slice starts/ends/axes/steps as arrays, folding bounds computed at run time from static
    shapes; None when one of them cannot be told."""
    params: list[np.ndarray | None] = []
    for v in node.inputs[1:5]:
        if v is None:
            params.append(None)
            continue
        arr = const_array(v)
        if arr is None:
            arr = fold(v, shapes.dims)
        if arr is None:
            return None
        params.append(arr)
    return params
