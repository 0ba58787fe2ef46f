"""Cutting an attention block down to the heads it keeps.

Each kept head keeps its Q, K and V columns (and biases), its rows of the output projection
and every per-head constant; literals that spell the head count are rewritten, and the
recorded shapes of the block's tensors follow. Head size and softmax scale do not change,
so every kept head computes exactly what it computed before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import onnx_ir as ir

from onnxprune.attention.blocks import AttentionBlock
from onnxprune.core.cache_slices import record
from onnxprune.core.shape_literals import fresh_constant, rewrite_targets
from onnxprune.core.weights import const_array, set_const_array

__all__ = ["keep_heads", "head_columns", "thin_query_heads"]


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
    """Keeps heads `keep` (indices into the block's units: heads, or K/V heads with the
    query heads that read them) and removes all the others."""
    keep = sorted(int(k) for k in keep)
    if not keep or keep[0] < 0 or keep[-1] >= block.num_heads or len(set(keep)) != len(keep):
        raise ValueError(f"invalid head indices for attention block '{block.name}'")
    _check(block)
    cols = {p.role: head_columns(keep, p.head_size, p.offset) for p in block.projections}
    cols.update({role: head_columns(keep, _unit(block, role), offset)
                 for _, role, offset in block.packed})
    _cut_block(graph, block, cols, head_columns(keep, block.group), len(keep), block.group,
               keep)
    block.num_heads = len(keep)


def thin_query_heads(graph: ir.Graph, block: AttentionBlock, keep: Sequence[int]) -> None:
    """Keeps query heads `keep` (of all num_heads x group) of a grouped-query block, the
    same number in every K/V group; K and V stay whole and the repeat factor shrinks.

    Query head h reads K/V head h // group before and h' // group' after, so keeping the
    same count per group keeps every query head on its own K/V head: outputs of kept heads
    do not change."""
    keep = sorted(int(k) for k in keep)
    g = block.group
    per = [sum(1 for k in keep if k // g == u) for u in range(block.num_heads)]
    if block.thin_reason is not None:
        raise ValueError(f"attention block '{block.name}': query heads cannot be thinned: "
                         f"{block.thin_reason}")
    if len(set(keep)) != len(keep) or not keep or keep[0] < 0 or keep[-1] >= g * \
            block.num_heads or len(set(per)) != 1 or per[0] == 0:
        raise ValueError(f"invalid query head indices for attention block '{block.name}': "
                         "every K/V group must keep the same number")
    _check(block)
    new_group = per[0]
    units = np.arange(block.num_heads)
    cols: dict[str, np.ndarray] = {}
    for p in block.projections:
        size = p.head_size // g if p.role == "q" else p.head_size
        cols[p.role] = head_columns(keep if p.role == "q" else units, size, p.offset)
    for _, role, offset in block.packed:
        size = _unit(block, role) // (g if role == "q" else 1)
        cols[role] = head_columns(keep if role == "q" else units, size, offset)
    _cut_block(graph, block, cols, np.asarray(keep, np.int64), block.num_heads, new_group,
               None)
    rewrite_targets(graph, [(r.node, r.index, new_group, r.input_index)
                            for r in block.repeats if r.target])
    for r in block.repeats:
        if not r.target:
            _set_entry(graph, r.node, r.input_index, r.index, new_group)
    d = new_group - g  # literals and sizes now count new_group query heads per unit
    block.sites = [replace(s, per_head=s.per_head + d * s.per_query) for s in block.sites]
    block.members = {v: (a, n + d * block.member_query.get(v, 0))
                     for v, (a, n) in block.members.items()}
    block.projections = [type(p)(p.role, p.use, p.bias, p.offset,
                                 p.head_size // g * new_group if p.role == "q" else p.head_size)
                         for p in block.projections]
    block.group = new_group


def _check(block: AttentionBlock) -> None:
    if not block.prunable or block.output is None:
        raise ValueError(f"attention block '{block.name}' is not prunable: {block.skip_reason}")


def _unit(block: AttentionBlock, role: str) -> int:
    return next(p.head_size for p in block.projections if p.role == role)


def _set_entry(graph: ir.Graph, node: ir.Node, index: int, position: int, new: int) -> None:
    """Sets entry `position` of constant input `index` of `node`; copied when others read it."""
    value = node.inputs[index]
    assert value is not None
    arr = np.asarray(const_array(value)).copy()
    arr.reshape(-1)[position] = new
    if arr.ndim == 0 or value.is_graph_output() or len(value.uses()) > 1:
        fresh = fresh_constant(graph, f"{value.name or 'c'}_rep", arr)
        if arr.ndim == 0:  # the core helpers store a 0-d array as 1-D (ascontiguousarray)
            fresh.const_value = ir.tensor(arr, name=fresh.name)
        node.replace_input_with(index, fresh)
    else:
        set_const_array(value, arr)


def _cut_block(graph: ir.Graph, block: AttentionBlock, cols: dict[str, np.ndarray],
               query_heads: np.ndarray, units: int, group: int, keep: Sequence[int] | None
               ) -> None:
    """Keeps columns `cols[role]` of each projection (and bias), query heads `query_heads`
    of every per-head constant and of the output projection's rows, and rewrites literals
    and recorded shapes for `units` units of `group` query heads. `keep`: the kept units,
    for the cache slices (None: K/V heads all kept)."""
    assert block.output is not None
    readers = set(block.nodes) | {block.output.node}
    # Projections that share one constant through one node (a packed QKV weight or bias)
    # are cut together; a constant that separate nodes read (the exporters de-duplicate
    # equal biases) gets one cut per node, copied where others still read it.
    weight_cols: dict[ir.Value, list[np.ndarray]] = {}
    bias_cols: dict[tuple[ir.Value, ir.Node], tuple[int, list[tuple[int, np.ndarray]]]] = {}
    for p in sorted(block.projections, key=lambda p: p.offset):
        weight_cols.setdefault(p.use.weight, []).append(cols[p.role])
        if p.bias is not None:
            bias_cols.setdefault((p.bias.value, p.bias.node), (p.bias.axis, []))[1].append(
                (p.offset, cols[p.role]))
    for c, role, offset in block.packed:
        bias_cols.setdefault((c.value, c.node), (c.axis, []))[1].append((offset, cols[role]))
    out_axes = {p.use.weight: p.use.out_axis for p in block.projections}
    for weight, parts in weight_cols.items():
        arr = const_array(weight)
        assert arr is not None
        set_const_array(weight, np.take(arr, np.concatenate(parts), axis=out_axes[weight]))
    for (bias, node), (axis, parts) in bias_cols.items():
        idx = np.concatenate([c for _, c in sorted(parts, key=lambda t: t[0])])
        _cut(graph, bias, axis, idx, {node}, node)
    for c in block.head_constants:
        _cut(graph, c.value, c.axis, query_heads, readers, c.node)
    for value, axis, reader in block.head_inputs:
        _gather(graph, value, axis, query_heads, reader)
    w = const_array(block.output.weight)
    assert w is not None
    rows = head_columns(query_heads, block.v_head_size // block.group)
    set_const_array(block.output.weight, np.take(w, rows, axis=block.output.reduce_axis))
    edits = []
    for site in block.sites:
        new = units * (site.per_head + (group - block.group) * site.per_query)
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
        per_query = block.member_query.get(value, 0)
        if keep is not None and (value.is_graph_input() or value.is_graph_output()):
            record(graph, value, axis, head_columns(keep, per_head))  # a key/value cache
        if value.shape is None or len(value.shape) < -axis:
            continue
        if isinstance(value.shape[axis], int):
            dims = list(value.shape)
            dims[axis] = units * (per_head + (group - block.group) * per_query)
            value.shape = ir.Shape(dims)
