"""Cutting channel groups down to the channels they keep.

Every position the analysis mapped to a removed channel goes at once: producer weight
slices (and biases), per-channel constants on the way, consumer weight slices, and the
recorded shapes of every activation; Reshape targets, Split sizes, Slice bounds and a
depthwise Conv's `group` follow. Several groups can be cut in one go (their positions are
relative to the same original tensors, e.g. two groups concatenated into one consumer). A
constant also read outside the group, or read at another width, gets a sliced copy instead
of being cut in place, so no other reader ever sees a changed tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxprune.channels.model import ChannelGroup
from onnxprune.core.pages import release_tensor
from onnxprune.core.weights import const_array, set_const_array

__all__ = ["keep_channels", "keep_many"]


def _unique_name(graph: ir.Graph, base: str) -> str:
    name, i = base, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    return name


def _fresh(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    name = _unique_name(graph, f"{base or 'const'}_pruned")
    value = ir.Value(name=name, shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    return value


def _write(graph: ir.Graph, value: ir.Value, readers: dict[tuple[ir.Node, int], np.ndarray]
           ) -> None:
    """Gives each reader (node, input index) its array: in place when nobody else reads it."""
    arrays = list(readers.values())
    uses = {(u.node, u.idx) for u in value.uses()}
    same = all(a.shape == arrays[0].shape and np.array_equal(a, arrays[0]) for a in arrays)
    if same and uses <= set(readers) and not value.is_graph_output():
        set_const_array(value, arrays[0])
        return
    made: list[tuple[np.ndarray, ir.Value]] = []
    for (node, idx), arr in readers.items():
        fresh = next((v for a, v in made if a.shape == arr.shape and np.array_equal(a, arr)),
                     None)
        if fresh is None:
            fresh = _fresh(graph, value.name or "const", arr)
            made.append((arr, fresh))
        node.replace_input_with(idx, fresh)


def _positions(cls: np.ndarray | None, n: int, drop: np.ndarray) -> np.ndarray:
    if cls is None:
        return drop[drop < n]
    return np.nonzero(np.isin(cls, drop))[0]


class _Cuts:
    """Positions to remove, per (tensor, axis), gathered from every group first."""

    def __init__(self) -> None:
        self.weights: dict[ir.Value, dict[int, set[int]]] = {}
        self.consts: dict[ir.Value, dict[tuple[ir.Node, int], tuple[int, set[int]]]] = {}
        self.values: dict[ir.Value, tuple[int, set[int]]] = {}
        self.edits: list = []

    def weight(self, value: ir.Value, axis: int, pos: np.ndarray) -> None:
        self.weights.setdefault(value, {}).setdefault(axis, set()).update(pos.tolist())

    def const(self, value: ir.Value, node: ir.Node, axis: int, pos: np.ndarray) -> None:
        for i, inp in enumerate(node.inputs):
            if inp is value:
                ax, s = self.consts.setdefault(value, {}).setdefault((node, i), (axis, set()))
                s.update(pos.tolist())

    def value(self, value: ir.Value, axis: int, pos: np.ndarray) -> None:
        _, s = self.values.setdefault(value, (axis, set()))
        s.update(pos.tolist())

    def dropped(self, value: ir.Value) -> int:
        return len(self.values.get(value, (0, set()))[1])


def _take(arr: np.ndarray, axis: int, drop: set[int]) -> np.ndarray:
    keep = np.setdiff1d(np.arange(arr.shape[axis]), np.fromiter(drop, dtype=np.int64))
    return np.take(arr, keep, axis=axis)


def _collect(cuts: _Cuts, group: ChannelGroup, keep: np.ndarray) -> None:
    drop = np.setdiff1d(np.arange(group.size), keep)
    for use in group.producers + group.consumers:
        w = const_array(use.weight)
        assert w is not None
        axis = use.out_axis if use in group.producers else use.reduce_axis
        m = group.use_maps.get(use)
        cuts.weight(use.weight, axis, _positions(m, w.shape[axis], drop))
    for c in group.constants:
        arr = const_array(c.value)
        assert arr is not None
        cuts.const(c.value, c.node, c.axis, _positions(c.cls, arr.shape[c.axis], drop))
    for value, axis in group.members.items():
        m = group.maps.get(value)
        n = m.size if m is not None else group.size
        cuts.value(value, axis, _positions(m, n, drop))
    cuts.edits.extend(group.edits)


def keep_many(graph: ir.Graph, plan: Sequence[tuple[ChannelGroup, np.ndarray]], *,
              hints: dict[str, list[int | None]] | None = None) -> None:
    """Keeps, for every (group, kept channel indices), only those channels; all at once.

    `hints`: the shape_hints a later analysis of the same model reads (group_of); the
    entries of unannotated values that lose channels are updated in place, so a group that
    shares a tensor with this one (a Concat both feed) is found again at its new width."""
    cuts = _Cuts()
    for group, keep in plan:
        keep = np.asarray(sorted(int(k) for k in keep), dtype=np.int64)
        if keep.size == 0 or keep[0] < 0 or keep[-1] >= group.size or len(set(keep)) != keep.size:
            raise ValueError(f"invalid channel indices for group '{group.name}'")
        _collect(cuts, group, keep)
    for value, by_axis in cuts.weights.items():
        arr = const_array(value)
        assert arr is not None
        for axis, drop in by_axis.items():
            if drop:
                arr = _take(arr, axis, drop)
        old = value.const_value
        set_const_array(value, arr)
        release_tensor(old)  # a big model's weights are read one at a time
    for value, readers in cuts.consts.items():
        if value in cuts.weights:
            continue
        arr = const_array(value)
        assert arr is not None
        _write(graph, value, {k: _take(arr, ax, d) for k, (ax, d) in readers.items()})
    _apply_edits(graph, cuts)
    for value, (axis, drop) in cuts.values.items():
        hint = hints.get(value.name or "") if hints is not None and value.shape is None \
            else None
        if drop and hint is not None and len(hint) >= -axis and isinstance(hint[axis], int):
            hint[axis] = hint[axis] - len(drop)  # type: ignore[operator]
        if not drop or value.shape is None or len(value.shape) < -axis:
            continue
        dims = list(value.shape)
        if isinstance(dims[axis], int):
            dims[axis] = dims[axis] - len(drop)
        value.shape = ir.Shape(dims)
    for group, keep in plan:
        group.size = len(keep)


def keep_channels(graph: ir.Graph, group: ChannelGroup, keep: np.ndarray, *,
                  hints: dict[str, list[int | None]] | None = None) -> None:
    """Keeps channels `keep` (sorted indices) of `group`; all others are removed."""
    keep_many(graph, [(group, keep)], hints=hints)


def _apply_edits(graph: ir.Graph, cuts: _Cuts) -> None:
    seen: set[tuple[str, int, int]] = set()
    for e in cuts.edits:
        key = (e.kind, id(e.value) if e.kind == "concat_last" else id(e.node), e.index)
        if key in seen:
            continue
        seen.add(key)
        node = e.node
        if e.kind in ("reshape", "resize"):
            idx = 1 if e.kind == "reshape" else 3
            target = const_array(node.inputs[idx]).copy()  # type: ignore[union-attr]
            target.reshape(-1)[e.index] -= cuts.dropped(e.value)
            _write(graph, node.inputs[idx], {(node, idx): target})  # type: ignore[arg-type]
        elif e.kind == "concat_last":
            idx = e.index
            node = _own_concat(graph, node, e.value)
            last = const_array(node.inputs[idx]).copy()  # type: ignore[union-attr]
            last.reshape(-1)[-1] -= cuts.dropped(e.value)
            _write(graph, node.inputs[idx], {(node, idx): last})  # type: ignore[arg-type]
        elif e.kind == "group":
            old = int(node.attributes["group"].as_int())
            node.attributes["group"] = ir.AttrInt64("group", old - cuts.dropped(e.value))
        elif e.kind == "split":
            _edit_split(graph, node, cuts)
        elif e.kind == "slice":
            _edit_slice(graph, node, e, cuts)


def _edit_split(graph: ir.Graph, node: ir.Node, cuts: _Cuts) -> None:
    inp = node.inputs[0]
    assert inp is not None
    axis, drop = cuts.values.get(inp, (0, set()))
    sizes = None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        sizes = const_array(node.inputs[1])
    elif "split" in node.attributes:
        sizes = np.asarray(node.attributes["split"].as_ints(), dtype=np.int64)
    n = len(node.outputs)
    if sizes is None:
        total = inp.shape[axis] if inp.shape is not None else None
        if not isinstance(total, int):
            total = None
        sizes = np.full(n, -1 if total is None else total // n, dtype=np.int64)
    start, new = 0, []
    for s in sizes.tolist():
        new.append(s - sum(1 for p in drop if start <= p < start + s))
        start += s
    arr = np.asarray(new, dtype=np.int64)
    if "split" in node.attributes:
        node.attributes["split"] = ir.AttrInt64s("split", new)
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        _write(graph, node.inputs[1], {(node, 1): arr})
    else:
        opset = graph.opset_imports.get("", 13)
        node.attributes.pop("num_outputs", None)
        if opset >= 13:
            node.resize_inputs(2)
            node.replace_input_with(1, _fresh(graph, f"{node.name}_split", arr))
        else:
            node.attributes["split"] = ir.AttrInt64s("split", new)


def _edit_slice(graph: ir.Graph, node: ir.Node, e: object, cuts: _Cuts) -> None:
    inp = node.inputs[0]
    assert inp is not None
    _, drop = cuts.values.get(inp, (0, set()))
    n = None  # shapes are still the original ones here
    if inp.shape is not None and isinstance(inp.shape[e.axis], int):  # type: ignore[attr-defined]
        n = int(inp.shape[e.axis])  # type: ignore[attr-defined]
    folded = getattr(e, "folded", None)
    for idx in (1, 2):
        arr = const_array(node.inputs[idx])
        run_time = arr is None
        if run_time:  # computed from shapes at run time: this Slice gets constants of its own
            assert folded is not None
            dtype = node.inputs[idx].dtype  # type: ignore[union-attr]
            arr = np.asarray(folded[idx - 1], dtype=dtype.numpy() if dtype else np.int64)
        bounds = arr.copy()  # type: ignore[union-attr]
        flat = bounds.reshape(-1)
        v = int(flat[e.index])  # type: ignore[attr-defined]
        if n is not None:
            v = min(v + n if v < 0 else v, n)
        flat[e.index] = v - sum(1 for p in drop if p < v)  # type: ignore[attr-defined]
        if run_time:
            node.replace_input_with(idx, _fresh(graph, f"{node.name or 'slice'}_bound", bounds))
        else:
            _write(graph, node.inputs[idx], {(node, idx): bounds})  # type: ignore[arg-type]


def _own_concat(graph: ir.Graph, cat: ir.Node, reshaped: ir.Value) -> ir.Node:
    """The Concat that builds the shape of the Reshape producing `reshaped`, copied for that
    Reshape alone when other Reshapes read it too (their channel count does not change)."""
    shape = cat.outputs[0]
    reshape = reshaped.producer()
    if reshape is None or len(shape.uses()) == 1:
        return cat
    copy = ir.Node(cat.domain, "Concat", list(cat.inputs), attributes=list(cat.attributes.values()),
                   outputs=[ir.Value(name=f"{shape.name}_{reshape.name or 'own'}",
                                     shape=shape.shape, type=shape.type)],
                   name=f"{cat.name}_{reshape.name or 'own'}")
    graph.insert_after(cat, copy)
    reshape.replace_input_with(1, copy.outputs[0])
    return copy
