"""Cutting a channel group down to the channels it keeps.

Everything the analysis collected shrinks at once: producer weight columns (and Gemm bias),
per-channel constants on the way, Reshape targets that spell the channel count, consumer
weight rows, and the recorded shapes of every activation in the group. A constant that is
also read outside the group gets a sliced copy instead of being cut in place.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxprune.graph.channels import ChannelGroup
from onnxprune.graph.weights import const_array, set_const_array

__all__ = ["keep_channels"]


def _unique_name(graph: ir.Graph, base: str) -> str:
    name, i = base, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    return name


def _replace_const(graph: ir.Graph, node: ir.Node, value: ir.Value, array: np.ndarray,
                   group_nodes: set[ir.Node]) -> None:
    """Writes `array` into `value`, or into a fresh initializer when others read `value`."""
    shared = value.is_graph_output() or any(u.node not in group_nodes for u in value.uses())
    if not shared:
        set_const_array(value, array)
        return
    fresh = ir.Value(
        name=_unique_name(graph, f"{value.name or 'const'}_pruned"),
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(np.ascontiguousarray(array)),
    )
    fresh.const_value.name = fresh.name  # type: ignore[union-attr]
    graph.register_initializer(fresh)
    for i, inp in enumerate(node.inputs):
        if inp is value:
            node.replace_input_with(i, fresh)


def keep_channels(graph: ir.Graph, group: ChannelGroup, keep: np.ndarray) -> None:
    """Keeps channels `keep` (sorted indices) of `group`; all others are removed."""
    keep = np.asarray(sorted(int(k) for k in keep), dtype=np.int64)
    if keep.size == 0 or keep[0] < 0 or keep[-1] >= group.size or len(set(keep)) != keep.size:
        raise ValueError(f"invalid channel indices for group '{group.name}'")
    new_size = int(keep.size)
    nodes = {u.node for u in group.producers + group.consumers}
    nodes.update(c.node for c in group.constants)
    nodes.update(group.reshapes)
    done: set[ir.Value] = set()
    for use in group.producers:
        if use.weight not in done:
            w = const_array(use.weight)
            assert w is not None
            set_const_array(use.weight, np.take(w, keep, axis=use.out_axis))
            done.add(use.weight)
    for use in group.consumers:
        if use.weight not in done:
            w = const_array(use.weight)
            assert w is not None
            set_const_array(use.weight, np.take(w, keep, axis=use.reduce_axis))
            done.add(use.weight)
    for c in group.constants:
        if c.value in done:
            continue
        arr = const_array(c.value)
        assert arr is not None
        _replace_const(graph, c.node, c.value, np.take(arr, keep, axis=c.axis), nodes)
        done.add(c.value)
    for node in group.reshapes:
        target = const_array(node.inputs[1])
        assert target is not None
        new_target = target.copy()
        new_target[-1] = new_size
        _replace_const(graph, node, node.inputs[1], new_target, nodes)  # type: ignore[arg-type]
    for value, axis in group.members.items():
        if value.shape is None or len(value.shape) < -axis:
            continue
        dims = list(value.shape)
        dims[axis] = new_size
        value.shape = ir.Shape(dims)
    group.size = new_size
