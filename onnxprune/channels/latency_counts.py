"""Kept channel counts that this machine's kernels run fast (`--round-to auto`).

For each group to be cut, the candidates run from the count the pruning asks for up to the
next multiple of 16 (at most the group's size; never fewer channels than asked). Each
candidate is costed by the latency table (channels/latency.py) over the group's producers
(their output channels) and consumers (their input channels), each op timed at the other
side's current count; the fastest wins, and of candidates within 2 % of it the one with the
most channels (as fast, and closer to the dense model). Groups are visited in graph order,
so a group sees the counts already chosen for the groups before it.

`op_costs` also serves allocation: the predicted ms of every timed op at given counts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxprune.channels.latency import LatencyTable, OpShape
from onnxprune.channels.model import ChannelGroup
from onnxprune.core.accounting import value_shapes
from onnxprune.core.weights import const_array

__all__ = ["fastest_counts", "candidate_counts", "GroupCosts", "default_input_shapes",
           "ms_per_channel"]

logger = logging.getLogger(__name__)

BLOCK = 16  # onnxruntime's NCHWc block with AVX-512 (8 with AVX2: a multiple of 16 is both)
TIE = 0.02


def candidate_counts(target: int, size: int, block: int = BLOCK) -> list[int]:
    """From `target` up to the next multiple of `block` (at most `size`): the target, the
    multiples of 4 above it, and the size itself when it is within reach."""
    top = min(size, -(-target // block) * block)
    out = {target, top}
    out.update(c for c in range(target + 1, top + 1) if c % 4 == 0)
    return sorted(out)


def default_input_shapes(model: ir.Model) -> dict[str, list[int]]:
    """Concrete input shapes from the graph: a symbolic batch is 1, other symbolic dims 64."""
    out = {}
    for v in model.graph.inputs:
        if v.shape is None or v in model.graph.initializers.values():
            continue
        out[v.name or ""] = [d if isinstance(d, int) else (1 if i == 0 else 64)
                             for i, d in enumerate(v.shape)]
    return out


def _ints(node: ir.Node, name: str, default: list[int]) -> tuple[int, ...]:
    attr = node.attributes.get(name)
    return tuple(int(v) for v in attr.as_ints()) if attr is not None else tuple(default)


def op_shape(node: ir.Node, shapes: Mapping[str, list[int]]) -> OpShape | None:
    """The node as the latency table times it, at its current channel counts (None: an op
    the table does not time, or shapes unknown)."""
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None
    w = const_array(node.inputs[1])
    x = shapes.get(node.inputs[0].name or "")
    if w is None or not x or not all(x):
        return None
    if node.op_type == "Conv" and w.ndim >= 3 and len(x) == w.ndim:
        k = len(w.shape) - 2
        group = int(node.attributes["group"].as_int()) if "group" in node.attributes else 1
        return OpShape("Conv", int(w.shape[1]) * group, int(w.shape[0]), tuple(x[2:]),
                       tuple(int(d) for d in w.shape[2:]), _ints(node, "strides", [1] * k),
                       _ints(node, "pads", [0] * 2 * k), _ints(node, "dilations", [1] * k),
                       group)
    if node.op_type in ("Gemm", "MatMul") and w.ndim == 2:
        trans = node.op_type == "Gemm" and "transB" in node.attributes and \
            node.attributes["transB"].as_int() == 1
        if node.op_type == "Gemm" and "transA" in node.attributes and \
                node.attributes["transA"].as_int():
            return None
        k, n = (w.shape[1], w.shape[0]) if trans else (w.shape[0], w.shape[1])
        return OpShape(node.op_type, int(k), int(n), (int(np.prod(x[:-1])),))
    return None


class GroupCosts:
    """Predicted ms of the timed ops around channel groups, at any kept counts."""

    def __init__(self, model: ir.Model, groups: Sequence[ChannelGroup], table: LatencyTable,
                 input_shapes: Mapping[str, list[int]] | None = None) -> None:
        shapes = value_shapes(model, dict(input_shapes or default_input_shapes(model)))
        self.groups = list(groups)
        self.table = table
        self.ops: dict[ir.Node, OpShape] = {}
        # node -> [(group index, "in" | "out", positions of the group per channel)]
        self.sides: dict[ir.Node, list[tuple[int, str, float]]] = {}
        for gi, g in enumerate(self.groups):
            for role, uses in (("out", g.producers), ("in", g.consumers)):
                for u in uses:
                    op = self.ops.get(u.node) or op_shape(u.node, shapes)
                    if op is None:
                        continue
                    self.ops[u.node] = op
                    m = g.channel_map(u, role)
                    per = float(np.count_nonzero(m >= 0)) / max(g.size, 1)
                    self.sides.setdefault(u.node, []).append((gi, role, per))

    def node_ms(self, node: ir.Node, counts: Sequence[int]) -> float:
        op = self.ops[node]
        cin, cout = op.cin, op.cout
        for gi, role, per in self.sides[node]:
            gone = round((self.groups[gi].size - counts[gi]) * per)
            if role == "in":
                cin -= gone
            else:
                cout -= gone
        if op.depthwise:
            return self.table.ms(op.with_channels(min(cin, cout), min(cin, cout)))
        if op.group > 1:  # a grouped Conv keeps whole groups on both sides
            cin = max(op.group, cin // op.group * op.group)
            cout = max(op.group, cout // op.group * op.group)
        return self.table.ms(op.with_channels(max(cin, 1), max(cout, 1)))

    def group_ms(self, gi: int, counts: Sequence[int]) -> float:
        """ms of the ops whose channels group `gi` sets."""
        g = self.groups[gi]
        nodes = dict.fromkeys(u.node for u in [*g.producers, *g.consumers] if u.node in self.ops)
        return sum(self.node_ms(n, counts) for n in nodes)

    def total_ms(self, counts: Sequence[int]) -> float:
        return sum(self.node_ms(n, counts) for n in self.ops)


def fastest_counts(model: ir.Model, groups: Sequence[ChannelGroup], counts: Sequence[int],
                   table: LatencyTable, input_shapes: Mapping[str, list[int]] | None = None,
                   ) -> list[int]:
    """Each group's kept count, from its target up: the count whose ops run fastest here."""
    costs = GroupCosts(model, groups, table, input_shapes)
    out = list(counts)
    for gi, g in enumerate(costs.groups):
        if out[gi] >= g.size or not any(u.node in costs.ops
                                         for u in [*g.producers, *g.consumers]):
            continue
        ms = {}
        for c in candidate_counts(out[gi], g.size):
            trial = list(out)
            trial[gi] = c
            ms[c] = costs.group_ms(gi, trial)
        best = min(ms.values())
        pick = max(c for c, t in ms.items() if t <= best * (1 + TIE))
        if pick != out[gi]:
            logger.info("group %s: %d -> %d channels kept (%.3f -> %.3f ms by the table)",
                        g.name, out[gi], pick, ms[out[gi]], ms[pick])
        out[gi] = pick
    table.save()
    return out


def ms_per_channel(model: ir.Model, groups: Sequence[ChannelGroup], table: LatencyTable,
                   input_shapes: Mapping[str, list[int]] | None = None) -> dict[str, float]:
    """What one channel of each group costs by the table: the ms its ops save when the
    group alone keeps half its channels (rounded to the block), per channel removed."""
    costs = GroupCosts(model, groups, table, input_shapes)
    dense = [g.size for g in costs.groups]
    out = {}
    for gi, g in enumerate(costs.groups):
        half = list(dense)
        half[gi] = max(1, -(-(g.size // 2) // BLOCK) * BLOCK if g.size >= 2 * BLOCK
                       else g.size // 2)
        gone = g.size - half[gi]
        saved = costs.group_ms(gi, dense) - costs.group_ms(gi, half)
        out[g.name] = max(saved, 0.0) / gone if gone else 0.0
    table.save()
    return out
