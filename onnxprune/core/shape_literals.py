"""Reading and rewriting the entries of a shape tensor (a Reshape target).

Exporters spell a target as one constant (initializer or Constant node) or as a Concat of
pieces, some computed at run time from Shape/Gather/Unsqueeze, some constant. Head removal
must change one literal inside, without touching a copy that other layers also read: the
dynamo exporter reuses one Concat and one [-1] initializer for every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxprune.core.weights import const_array, set_const_array

__all__ = ["Entry", "target_entries", "rewrite_targets", "fresh_constant"]

EntryKind = Literal["literal", "infer", "copy", "dynamic"]


@dataclass(frozen=True)
class Entry:
    """One element of a shape tensor and where its literal lives (when it is one)."""

    kind: EntryKind
    value: int | None = None
    concat_input: int | None = None  # which Concat input holds it (None: the target itself)
    index: int = 0  # position inside that constant


def _length(value: ir.Value) -> int | None:
    """Number of elements of a 1-D run-time shape piece, when it can be told."""
    if value.shape is not None and len(value.shape) == 1 and isinstance(value.shape[0], int):
        return int(value.shape[0])
    node = value.producer()
    if node is None:
        return None
    if node.op_type in ("Cast", "Identity"):
        return _length(node.inputs[0])  # type: ignore[arg-type]
    if node.op_type == "Unsqueeze":
        axes = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if axes is None and "axes" in node.attributes:
            axes = np.asarray(node.attributes["axes"].as_ints())
        if axes is not None and axes.size == 1 and _is_scalar(node.inputs[0]):  # type: ignore[arg-type]
            return 1
    if node.op_type == "Shape":
        src = node.inputs[0]
        rank = None if src is None or src.shape is None else len(src.shape)
        start = node.attributes.get("start")
        end = node.attributes.get("end")
        if start is not None and end is not None:
            s, e = start.as_int(), end.as_int()
            if s >= 0 and e >= 0:
                return max(e - s, 0)
        if rank is not None:
            s = 0 if start is None else start.as_int()
            e = rank if end is None else end.as_int()
            s, e = (s + rank if s < 0 else s), (e + rank if e < 0 else e)
            return max(min(e, rank) - max(s, 0), 0)
    return None


def _is_scalar(value: ir.Value) -> bool:
    if value.shape is not None:
        return len(value.shape) == 0
    node = value.producer()
    if node is None:
        return False
    if node.op_type == "Gather":
        idx = const_array(node.inputs[1])
        return idx is not None and idx.ndim == 0
    if node.op_type in ("Mul", "Add", "Sub", "Div", "Cast"):  # arithmetic on scalars
        return all(i is not None and (_is_scalar(i) or _const_scalar(i)) for i in node.inputs)
    if node.op_type in ("Squeeze", "ReduceProd", "ReduceSum"):
        return False  # could be scalar, but not provably from here
    return False


def _const_scalar(value: ir.Value) -> bool:
    arr = const_array(value)
    return arr is not None and arr.ndim == 0


def _kind(v: int) -> EntryKind:
    return "infer" if v == -1 else "copy" if v == 0 else "literal"


def target_entries(target: ir.Value | None) -> list[Entry] | None:
    """The entries of a shape tensor, aligned at the end; leading ones may be missing.

    Only the entries after the last piece of unknown length are returned (index them from
    the end). None when the tensor is neither a constant nor a Concat.
    """
    if target is None:
        return None
    arr = const_array(target)
    if arr is not None:
        flat = np.asarray(arr).reshape(-1)
        return [Entry(_kind(int(v)), int(v), None, i) for i, v in enumerate(flat)]
    node = target.producer()
    if node is None or node.op_type != "Concat" or node.domain not in ("", "ai.onnx"):
        return None
    entries: list[Entry] = []
    for k in range(len(node.inputs) - 1, -1, -1):
        piece = node.inputs[k]
        if piece is None:
            continue
        parr = const_array(piece)
        if parr is not None:
            flat = np.asarray(parr).reshape(-1)
            entries[:0] = [Entry(_kind(int(v)), int(v), k, i) for i, v in enumerate(flat)]
            continue
        n = _length(piece)
        if n is None:
            break
        entries[:0] = [Entry("dynamic", None, k, i) for i in range(n)]
    return entries


def fresh_constant(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """A new initializer holding `array`, under an unused name."""
    names = set(graph.initializers) | {v.name for n in graph for v in n.outputs}
    name, i = base, 0
    while name in names:
        i += 1
        name = f"{base}_{i}"
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(np.ascontiguousarray(array), name=name),
    )
    graph.register_initializer(value)
    return value


def _exclusive(value: ir.Value, readers: set[ir.Node]) -> bool:
    return not value.is_graph_output() and all(u.node in readers for u in value.uses())


def rewrite_targets(graph: ir.Graph, edits: Sequence[tuple[ir.Node, int, int] | tuple[
        ir.Node, int, int, int]]) -> None:
    """Sets entry `position` of a node's shape-like input to `new`: (node, position, new[,
    input index, default 1: a Reshape or Expand target, Split sizes, Slice starts]).

    A target (or Concat piece) that only these nodes read is edited in place; one that
    others read too is copied first, so no other layer changes.
    """
    by_target: dict[tuple[ir.Value, int], list[tuple[ir.Node, int, int]]] = {}
    for edit in edits:
        reshape, position, new = edit[:3]
        index = edit[3] if len(edit) > 3 else 1  # type: ignore[misc]
        by_target.setdefault((reshape.inputs[index], index), []).append(  # type: ignore[index]
            (reshape, position, new))
    for (target, index), items in by_target.items():
        reshapes = {n for n, _, _ in items}
        changes: dict[int, int] = {}
        for _, position, new in items:
            if changes.setdefault(position, new) != new:
                raise ValueError(f"conflicting edits of shape tensor '{target.name}'")
        exclusive = _exclusive(target, reshapes)
        arr = const_array(target)
        if arr is not None:
            new_arr = np.asarray(arr).copy()
            for position, new in changes.items():
                new_arr[position] = new
            if exclusive:
                set_const_array(target, new_arr)
            else:
                fresh = fresh_constant(graph, f"{target.name or 'shape'}_heads", new_arr)
                for n in reshapes:
                    n.replace_input_with(index, fresh)
            continue
        cat = target.producer()
        assert cat is not None
        if not exclusive:
            out = ir.Value(name=f"{target.name}_heads", shape=target.shape, type=target.type)
            clone = ir.Node("", "Concat", list(cat.inputs), attributes=[ir.AttrInt64("axis", 0)],
                            outputs=[out], name=f"{cat.name or 'concat'}_heads")
            graph.insert_after(cat, clone)
            for n in reshapes:
                n.replace_input_with(index, out)
            cat = clone
        entries = target_entries(cat.outputs[0])
        assert entries is not None
        for position, new in changes.items():
            e = entries[position]
            assert e.concat_input is not None and e.kind != "dynamic"
            piece = cat.inputs[e.concat_input]
            parr = np.asarray(const_array(piece)).copy()
            flat = parr.reshape(-1)
            flat[e.index] = new
            parr = flat.reshape(parr.shape)
            holders = [u for u in piece.uses()]  # type: ignore[union-attr]
            if all(u.node is cat for u in holders) and len(holders) == 1 \
                    and not piece.is_graph_output():  # type: ignore[union-attr]
                set_const_array(piece, parr)  # type: ignore[arg-type]
            else:
                fresh = fresh_constant(graph, f"{piece.name or 'shape'}_heads", parr)  # type: ignore[union-attr]
                cat.replace_input_with(e.concat_input, fresh)
