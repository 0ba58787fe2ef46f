"""How each op relates channel positions of its inputs and outputs (see channels/fill.py).

A rule gets the fill, the node, the tensor it was reached through and that tensor's
(negative) channel axis, and calls `fill.couple` for every pair of ports whose positions
correspond; it raises Decline, naming the node, for anything it does not understand.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxprune.channels.model import DATA_INPUTS, NORM_PARAMS, ShapeEdit
from onnxprune.channels.shape_reads import folded_slice_params, own_count_reshape
from onnxprune.channels.shapes import Coupler, Decline, int_attr, ints_attr, label, prod
from onnxprune.core.weights import const_array, is_constant

__all__ = ["elementwise", "per_channel", "reduce", "LAYOUT_RULES"]

_BIG = 2**62


def _unused_outputs(node: ir.Node, first: int = 1) -> None:
    for out in node.outputs[first:]:
        if out.uses() or out.is_graph_output():
            raise Decline(f"the extra output '{out.name}' of {label(node)} is used")


def _rank_of(fill: Coupler, node: ir.Node, value: ir.Value) -> int:
    r = fill.shapes.rank(value)
    if r is None:
        for v in (*node.inputs[:1], *node.outputs[:1]):
            if v is not None and (r := fill.shapes.rank(v)) is not None:
                return r
        raise Decline(f"the rank of '{value.name}' at {label(node)} is unknown")
    return r


def elementwise(fill: Coupler, node: ir.Node, value: ir.Value, axis: int) -> None:
    data = DATA_INPUTS.get(node.op_type)
    ports: list[ir.Value] = []
    for i, inp in enumerate(node.inputs):
        if inp is None:
            continue
        if data is not None and i not in data:
            arr = const_array(inp)
            if arr is None or arr.size != 1:
                raise Decline(f"{label(node)} has a non-scalar parameter '{inp.name}'")
            continue
        if is_constant(inp):
            fill.const_operand(node, i, inp, value, axis)
            continue
        if inp is not value and fill.shapes.dim(inp, axis) == 1 and fill.length(value, axis) != 1:
            continue  # broadcast over the channels: not coupled
        ports.append(inp)
    for k, out in enumerate(node.outputs):
        if node.op_type == "Dropout" and k == 1:
            if out.uses() or out.is_graph_output():
                raise Decline(f"the mask output of {label(node)} is used")
            continue
        ports.append(out)
    for p in ports:
        if p is not value:
            fill.couple(value, axis, p, axis)


def per_channel(fill: Coupler, node: ir.Node, value: ir.Value, axis: int) -> None:
    """Pooling and BatchNorm/InstanceNorm: channel axis 1, each channel on its own."""
    if axis != 1 - _rank_of(fill, node, value):
        raise Decline(f"its channels reach {label(node)} on a non-channel axis")
    _unused_outputs(node)
    inp, out = node.inputs[0], node.outputs[0]
    assert inp is not None
    fill.couple(inp, axis, out, axis)
    for idx in NORM_PARAMS.get(node.op_type, ()):
        if idx < len(node.inputs) and node.inputs[idx] is not None:
            fill.const_operand(node, idx, node.inputs[idx], out, 0, absolute=True)  # type: ignore[arg-type]


def _axes_input(node: ir.Node, index: int, attr: str) -> list[int] | None:
    if len(node.inputs) > index and node.inputs[index] is not None:
        arr = const_array(node.inputs[index])
        if arr is None:
            raise Decline(f"{label(node)} has axes computed at run time")
        return [int(a) for a in arr.reshape(-1)]
    return ints_attr(node, attr)


def reduce(fill: Coupler, node: ir.Node, value: ir.Value, axis: int) -> None:
    """A reduction over other axes (the squeeze of squeeze-and-excitation) keeps channels."""
    inp, out = node.inputs[0], node.outputs[0]
    assert inp is not None
    axes = _axes_input(node, 1, "axes")
    if not axes:
        raise Decline(f"its channels reach {label(node)}, which mixes channels")
    r = fill.shapes.rank(inp) or fill.shapes.rank(out)
    if r is None and any(a >= 0 for a in axes):
        raise Decline(f"the rank of '{value.name}' at {label(node)} is unknown")
    neg = sorted(a % r - r if r is not None else a for a in axes)
    keep = int_attr(node, "keepdims", 1) == 1
    if value is inp:
        if axis in neg:
            raise Decline(f"its channels reach {label(node)}, which mixes channels")
        out_axis = axis if keep else axis + sum(1 for a in neg if a > axis)
        fill.couple(inp, axis, out, out_axis)
        return
    if keep:
        in_axis = axis
    elif r is None:
        raise Decline(f"the rank of '{value.name}' at {label(node)} is unknown")
    else:
        kept = [a for a in range(-r, 0) if a not in neg]
        in_axis = kept[len(kept) + axis]
    fill.couple(inp, in_axis, out, axis)


def transpose(fill: Coupler, node: ir.Node, value: ir.Value, axis: int) -> None:
    perm = ints_attr(node, "perm")
    if perm is None:
        raise Decline(f"{label(node)} has no explicit perm")
    rank = len(perm)
    if -axis > rank:
        raise Decline(f"{label(node)} has a perm of the wrong rank")
    inp, out = node.inputs[0], node.outputs[0]
    assert inp is not None
    if value is inp:
        fill.couple(inp, axis, out, perm.index(rank + axis) - rank)
    else:
        fill.couple(inp, perm[rank + axis] - rank, out, axis)


def reshape(fill: Coupler, node: ir.Node, value: ir.Value, axis: int) -> None:
    inp, out = node.inputs[0], node.outputs[0]
    assert inp is not None
    target = const_array(node.inputs[1])
    if target is None:
        _run_time_reshape(fill, node, value, axis)
        return
    target = [int(t) for t in target.reshape(-1)]
    if value is out and inp in fill.axes:  # seen from the input side already
        value, axis = inp, fill.axes[inp]
    n = fill.length(value, axis)
    if axis == -1 and target and (target[-1] == 0 or target[-1] == n and n is not None):
        if target[-1] > 0:
            fill.edit(ShapeEdit("reshape", node, out, -1, len(target) - 1))
        fill.couple(inp, -1, out, -1)
        return
    dims = fill.shapes.dims(inp)
    if value is inp and dims is not None and n is not None:
        pos = len(dims) + axis
        inner = prod(dims[pos + 1:])
        prefix_ok = len(target) == pos + 1 and all(
            t in (0, dims[i]) or (t == -1 and target[-1] != -1) for i, t in enumerate(target[:-1]))
        if inner is not None and prefix_ok and target[-1] in (-1, n * inner):
            if target[-1] > 0:
                fill.edit(ShapeEdit("reshape", node, out, -1, len(target) - 1))
            fill.couple(inp, axis, out, -1, np.arange(n * inner) // inner)
            return
    raise Decline(f"{label(node)} does not keep the channel axis last")


def _run_time_reshape(fill: Coupler, node: ir.Node, value: ir.Value, axis: int) -> None:
    """Reshape(x, Concat(<run-time leading dims>, [C])): a Gemm on a flattened input shaped
    back at run time (GPT-2's Conv1D as the dynamo exporter writes it). Only the constant
    last entry spells the channels; the leading dims must not come from the channels."""
    inp, out = node.inputs[0], node.outputs[0]
    assert inp is not None
    # Reshape(x, [..., Shape(x)[-1]]) stays right
    if own_count_reshape(fill.shapes, node, inp, axis):
        fill.couple(inp, -1, out, -1)
        return
    cat = node.inputs[1].producer() if node.inputs[1] is not None else None
    n = fill.length(value, axis)
    last = const_array(cat.inputs[-1]) if cat is not None and cat.op_type == "Concat" \
        and cat.inputs and cat.inputs[-1] is not None else None
    if axis != -1 or last is None or last.size != 1 or n is None or int(last.reshape(-1)[0]) \
            not in (n, 0):
        raise Decline(f"its channels reach {label(node)}, whose shape is computed at run time")
    shape = cat.outputs[0]  # type: ignore[union-attr]
    if shape.is_graph_output() or any(u.node.op_type != "Reshape" or u.idx != 1
                                      for u in shape.uses()):
        raise Decline(f"the run-time shape of {label(node)} is also used elsewhere")
    # Read by other Reshapes too (the dynamo exporter shares one shape between layers):
    # slicing gives this Reshape its own copy of the Concat (see slicing._own_concat).
    if int(last.reshape(-1)[0]) == n:
        fill.edit(ShapeEdit("concat_last", cat, out, -1, len(cat.inputs) - 1))  # type: ignore[arg-type]
    fill.couple(inp, -1, out, -1)


def flatten(fill: Coupler, node: ir.Node, value: ir.Value, axis: int) -> None:
    inp, out = node.inputs[0], node.outputs[0]
    assert inp is not None
    dims = fill.shapes.dims(inp)
    if value is out and inp in fill.axes:  # seen from the input side already
        value, axis = inp, fill.axes[inp]
    if value is not inp or dims is None:
        raise Decline(f"its channels reach {label(node)} from its output or with unknown shape")
    r = len(dims)
    k = int_attr(node, "axis", 1) % r if r else 0
    pos = r + axis
    n = fill.length(inp, axis)
    inner, outer = prod(dims[pos + 1:]), prod(dims[k:pos])
    if pos < k or inner is None or outer is None or n is None:
        raise Decline(f"{label(node)} does not flatten the channels into features")
    fill.couple(inp, axis, out, -1, (np.arange(outer * n * inner) // inner) % n)


def concat(fill: Coupler, node: ir.Node, value: ir.Value, axis: int) -> None:
    out = node.outputs[0]
    r = _rank_of(fill, node, value)
    cat = int_attr(node, "axis") % r - r
    inputs = [v for v in node.inputs if v is not None]
    if cat != axis:
        for v in inputs:
            fill.couple(v, axis, out, axis)
        return
    sizes = [fill.length(v, axis) for v in inputs]
    if any(s is None for s in sizes):
        raise Decline(f"{label(node)} joins inputs of unknown size along the channels")
    total = sum(sizes)  # type: ignore[arg-type]
    start = 0
    for v, s in zip(inputs, sizes, strict=True):
        src = np.full(total, -1, dtype=np.int64)
        src[start:start + s] = np.arange(s)  # type: ignore[operator]
        fill.couple(v, axis, out, axis, src)
        start += s  # type: ignore[operator]


def split(fill: Coupler, node: ir.Node, value: ir.Value, axis: int) -> None:
    inp = node.inputs[0]
    assert inp is not None
    r = _rank_of(fill, node, value)
    ax = int_attr(node, "axis") % r - r
    if ax != axis:
        for out in node.outputs:
            fill.couple(inp, axis, out, axis)
        return
    n = fill.length(inp, axis)
    sizes = _axes_input(node, 1, "split")
    if sizes is None:
        if n is None or n % len(node.outputs):
            raise Decline(f"{label(node)} splits an unknown number of channels")
        sizes = [n // len(node.outputs)] * len(node.outputs)
    start = 0
    for out, s in zip(node.outputs, sizes, strict=True):
        fill.couple(inp, axis, out, axis, np.arange(start, start + s))
        start += s
    fill.edit(ShapeEdit("split", node, inp, axis))


def slice_(fill: Coupler, node: ir.Node, value: ir.Value, axis: int) -> None:
    inp, out = node.inputs[0], node.outputs[0]
    assert inp is not None
    params = folded_slice_params(fill.shapes, node)
    if params is None:
        raise Decline(f"its channels reach {label(node)}, whose bounds are computed at run time")
    run_time = any(const_array(v) is None for v in node.inputs[1:3] if v is not None)
    if len(node.inputs) < 3:
        raise Decline(f"{label(node)} (opset < 10 Slice) is not supported")
    r = _rank_of(fill, node, value)
    starts, ends = (p.reshape(-1).tolist() for p in params[:2])  # type: ignore[union-attr]
    axes = params[2].reshape(-1).tolist() if len(params) > 2 and params[2] is not None \
        else list(range(len(starts)))
    steps = params[3].reshape(-1).tolist() if len(params) > 3 and params[3] is not None \
        else [1] * len(starts)
    hit = [i for i, a in enumerate(axes) if a % r - r == axis]
    if not hit:
        fill.couple(inp, axis, out, axis)
        return
    i = hit[0]
    n = fill.length(inp, axis)
    if steps[i] != 1 or n is None:
        raise Decline(f"{label(node)} slices the channels with a step or unknown size")
    lo, hi = (int(np.clip(v + n if v < 0 else v, 0, n)) for v in (starts[i], ends[i]))
    fill.couple(inp, axis, out, axis, np.arange(lo, max(lo, hi)))
    folded = None
    if run_time:  # bounds read from shapes: the slicing writes constants of this Slice's own
        folded = tuple(tuple(int(x) for x in np.asarray(p).reshape(-1)) for p in params[:2])
    fill.edit(ShapeEdit("slice", node, inp, axis, i, folded))


def resize(fill: Coupler, node: ir.Node, value: ir.Value, axis: int) -> None:
    inp, out = node.inputs[0], node.outputs[0]
    assert inp is not None
    r = _rank_of(fill, node, value)
    idx = 1 if node.op_type == "Upsample" else 2
    scales = const_array(node.inputs[idx]) if len(node.inputs) > idx and node.inputs[idx] \
        is not None else None
    if scales is None and node.op_type == "Upsample" and "scales" in node.attributes:
        scales = np.asarray(node.attributes["scales"].as_floats())
    sizes = node.inputs[3] if node.op_type == "Resize" and len(node.inputs) > 3 else None
    if sizes is not None:
        s = const_array(sizes)
        dims = fill.shapes.dims(inp)
        if s is None or s.size != r or dims is None or s[r + axis] != dims[axis]:
            raise Decline(f"{label(node)} resizes to sizes it does not keep per channel")
        fill.edit(ShapeEdit("resize", node, out, axis, r + axis))
    elif scales is None or scales.size != r or scales[r + axis] != 1:
        raise Decline(f"{label(node)} scales the channel axis")
    fill.couple(inp, axis, out, axis)


def pad(fill: Coupler, node: ir.Node, value: ir.Value, axis: int) -> None:
    inp, out = node.inputs[0], node.outputs[0]
    assert inp is not None
    r = _rank_of(fill, node, value)
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        raise Decline(f"{label(node)} pads selected axes")
    pads = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None \
        else np.asarray(ints_attr(node, "pads") or [0] * (2 * r))
    if pads is None or pads.size != 2 * r:
        raise Decline(f"{label(node)} has pads computed at run time")
    if pads[r + axis] != 0 or pads[2 * r + axis] != 0:
        raise Decline(f"{label(node)} pads the channel axis")
    fill.couple(inp, axis, out, axis)


def squeeze(fill: Coupler, node: ir.Node, value: ir.Value, axis: int) -> None:
    inp, out = node.inputs[0], node.outputs[0]
    assert inp is not None
    r_in = fill.shapes.rank(inp)
    axes = _axes_input(node, 1, "axes")
    if r_in is None or axes is None:
        raise Decline(f"{label(node)} has unknown axes or rank")
    if node.op_type == "Squeeze":
        gone = {a % r_in for a in axes}
        kept = [a for a in range(r_in) if a not in gone]
        in_axes = dict(enumerate(kept))  # out position -> in position
    else:
        r_out = r_in + len(axes)
        new = {a % r_out for a in axes}
        kept = [a for a in range(r_out) if a not in new]
        in_axes = {o: i for i, o in enumerate(kept)}
    r_out = len(in_axes) if node.op_type == "Squeeze" else r_in + len(axes)
    inv = {i: o for o, i in in_axes.items()}
    if value is inp:
        pos = r_in + axis
        if pos not in inv:
            raise Decline(f"{label(node)} removes the channel axis")
        fill.couple(inp, axis, out, inv[pos] - r_out)
    else:
        pos = r_out + axis
        if pos not in in_axes:
            raise Decline(f"{label(node)} creates the channel axis")
        fill.couple(inp, in_axes[pos] - r_in, out, axis)


LAYOUT_RULES: dict[str, Callable[[Coupler, ir.Node, ir.Value, int], None]] = {
    "Transpose": transpose,
    "Reshape": reshape,
    "Flatten": flatten,
    "Concat": concat,
    "Split": split,
    "Slice": slice_,
    "Resize": resize,
    "Upsample": resize,
    "Pad": pad,
    "Squeeze": squeeze,
    "Unsqueeze": squeeze,
}
