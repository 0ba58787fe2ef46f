"""Cutting an attention block down to the heads it keeps.

Each kept head keeps its Q, K and V columns (and biases), its rows of the output projection
and every per-head constant; literals that spell the head count are rewritten, and the
recorded shapes of the block's tensors follow. Head size and softmax scale do not change,
so every kept head computes exactly what it computed before.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxprune.attention.blocks import AttentionBlock
from onnxprune.core.cache_slices import record
from onnxprune.core.shape_literals import fresh_constant, rewrite_targets
from onnxprune.core.weights import const_array, set_const_array

__all__ = ["keep_heads", "head_columns"]


def head_columns(keep: Sequence[int], head_size: int, offset: int = 0) -> np.ndarray:
    """Indices of the channels of heads `keep` in a [heads * head_size] axis."""
    return np.concatenate(
        [offset + h * head_size + np.arange(head_size) for h in keep]
    ).astype(np.int64) if len(keep) else np.zeros(0, dtype=np.int64)


def _cut(graph: ir.Graph, value: ir.Value, axis: int, idx: np.ndarray, readers: set[ir.Node],
         node: ir.Node) -> None:
    """Keeps `idx` along `axis` of a constant; copies it first when others read it too."""
    arr = const_array(value)
    assert arr is not None
    new = np.take(arr, idx, axis=axis)
    if value.is_graph_output() or any(u.node not in readers for u in value.uses()):
        fresh = fresh_constant(graph, f"{value.name or 'const'}_heads", new)
        for i, inp in enumerate(node.inputs):
            if inp is value:
                node.replace_input_with(i, fresh)
    else:
        set_const_array(value, new)


def _gather(graph: ir.Graph, value: ir.Value, axis: int, idx: np.ndarray, reader: ir.Node
            ) -> None:
    """`reader` reads only heads `idx` of a per-head value computed at run time, through a
    Gather of its own; other readers (the same bias in other layers) keep every head."""
    out = ir.Value(name=f"{value.name}_{reader.name or 'heads'}_heads", type=value.type)
    if value.shape is not None and len(value.shape) > axis:
        dims = list(value.shape)
        dims[axis] = int(idx.size)
        out.shape = ir.Shape(dims)
    indices = fresh_constant(graph, f"{value.name or 'bias'}_kept_heads", idx)
    gather = ir.Node("", "Gather", [value, indices], attributes=[ir.AttrInt64("axis", axis)],
                     outputs=[out], name=f"{reader.name or 'attention'}_kept_heads")
    graph.insert_before(reader, gather)
    for i, inp in enumerate(reader.inputs):
        if inp is value:
            reader.replace_input_with(i, out)


def keep_heads(graph: ir.Graph, block: AttentionBlock, keep: Sequence[int]) -> None:
    """Keeps heads `keep` (indices into the block's heads) and removes all the others."""
    keep = sorted(int(k) for k in keep)
    if not keep or keep[0] < 0 or keep[-1] >= block.num_heads or len(set(keep)) != len(keep):
        raise ValueError(f"invalid head indices for attention block '{block.name}'")
    if not block.prunable or block.output is None:
        raise ValueError(f"attention block '{block.name}' is not prunable: {block.skip_reason}")
    new_heads = len(keep)
    readers = set(block.nodes) | {block.output.node}
    # Projections that share one constant through one node (a packed QKV weight or bias)
    # are cut together; a constant that separate nodes read (the exporters de-duplicate
    # equal biases) gets one cut per node, copied where others still read it.
    weight_cols: dict[ir.Value, list[np.ndarray]] = {}
    bias_cols: dict[tuple[ir.Value, ir.Node], tuple[int, list[tuple[int, np.ndarray]]]] = {}
    sizes = {p.role: p.head_size for p in block.projections}
    for p in sorted(block.projections, key=lambda p: p.offset):
        cols = head_columns(keep, p.head_size, p.offset)
        weight_cols.setdefault(p.use.weight, []).append(cols)
        if p.bias is not None:
            bias_cols.setdefault((p.bias.value, p.bias.node), (p.bias.axis, []))[1].append(
                (p.offset, cols))
    for c, role, offset in block.packed:
        cols = head_columns(keep, sizes[role], offset)
        bias_cols.setdefault((c.value, c.node), (c.axis, []))[1].append((offset, cols))
    out_axes = {p.use.weight: p.use.out_axis for p in block.projections}
    for weight, parts in weight_cols.items():
        arr = const_array(weight)
        assert arr is not None
        set_const_array(weight, np.take(arr, np.concatenate(parts), axis=out_axes[weight]))
    for (bias, node), (axis, parts) in bias_cols.items():
        idx = np.concatenate([cols for _, cols in sorted(parts, key=lambda t: t[0])])
        _cut(graph, bias, axis, idx, {node}, node)
    query_heads = head_columns(keep, block.group)  # a unit is a K/V head's query heads
    for c in block.head_constants:
        _cut(graph, c.value, c.axis, query_heads, readers, c.node)
    for value, axis, reader in block.head_inputs:
        _gather(graph, value, axis, query_heads, reader)
    w = const_array(block.output.weight)
    assert w is not None
    rows = head_columns(keep, block.v_head_size)
    set_const_array(block.output.weight, np.take(w, rows, axis=block.output.reduce_axis))
    edits = []
    for site in block.sites:
        new = new_heads * site.per_head
        if site.attribute is None:
            edits.append((site.node, site.position, new, site.input_index))
            continue
        attr = site.node.attributes[site.attribute]
        if attr.type == ir.AttributeType.INTS:
            ints = list(attr.as_ints())
            ints[site.position] = new
            site.node.attributes[site.attribute] = ir.AttrInt64s(site.attribute, ints)
        else:
            site.node.attributes[site.attribute] = ir.AttrInt64(site.attribute, new)
    rewrite_targets(graph, edits)
    for value, (axis, per_head) in block.members.items():
        if value.is_graph_input() or value.is_graph_output():  # a key/value cache
            record(graph, value, axis, head_columns(keep, per_head))
        if value.shape is None or len(value.shape) < -axis:
            continue
        if isinstance(value.shape[axis], int):
            dims = list(value.shape)
            dims[axis] = new_heads * per_head
            value.shape = ir.Shape(dims)
    block.num_heads = new_heads
