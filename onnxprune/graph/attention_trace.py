"""Following one attention block through the graph, axis by axis, or saying why not.

`Trace` walks from the attention core (Q·Kᵀ, Softmax, ·V, or a fused op) back to the Q, K
and V projections and forward to the output projection, keeping on every tensor the axis
that carries the heads. Anything it does not fully understand raises `Decline` with a
message naming the node, which becomes the block's skip reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxprune.graph.attention_block import AttentionBlock, HeadCountSite, Projection
from onnxprune.graph.channels import ConstSlice
from onnxprune.graph.shape_literals import target_entries
from onnxprune.graph.weights import WeightUse, const_array, is_constant

__all__ = ["Decline", "Trace", "STD", "PASS", "int_attr", "label", "is_scalar"]

STD = ("", "ai.onnx")
PASS = frozenset({"Cast", "Identity", "Dropout"})
_ROTARY = frozenset({"Slice", "Neg", "Concat", "Split", "RotaryEmbedding", "Sin", "Cos"})
_REPEAT = frozenset({"Expand", "Tile", "Unsqueeze", "RepeatInterleave"})


class Decline(Exception):
    """The block cannot be pruned safely; the message, naming the node, is the reason."""


def label(node: ir.Node) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else node.op_type


def is_scalar(value: ir.Value | None) -> bool:
    arr = const_array(value)
    return arr is not None and arr.size == 1


def int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def _head_dim(value: ir.Value, axis: int, shapes: Mapping[str, Sequence[int]]) -> int | None:
    """Size of `value` at negative `axis` (1 when its rank is lower), None when unknown."""
    arr = const_array(value)
    dims: Sequence[object] | None = None
    if arr is not None:
        dims = arr.shape
    elif value.shape is not None:
        dims = list(value.shape)
    if dims is not None and len(dims) < -axis:
        return 1
    if dims is not None and isinstance(dims[axis], int):
        return int(dims[axis])  # type: ignore[arg-type]
    known = shapes.get(value.name or "")
    if known is not None:
        return 1 if len(known) < -axis else int(known[axis])
    return None


class Trace:
    """Collects one block; raises Decline with the reason when something does not fit."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, kind: str,
                 shapes: Mapping[str, Sequence[int]]) -> None:
        self.graph = graph
        self.shapes = shapes
        self.block = AttentionBlock(name=anchor.name or anchor.op_type, kind=kind,
                                    anchor=anchor.name or "")
        self.block.nodes.add(anchor)
        self.masks: list[ir.Value] = []
        # role -> (split Reshape, its literal head count or None, literal head size or None)
        self.split: dict[str, tuple[ir.Node, int | None, int | None]] = {}
        self.widths: dict[str, int] = {}
        self.kinds: dict[ir.Value, tuple[int, str]] = {}
        self.pending: list[tuple[ir.Node, int, str, str | None]] = []
        self.merged_width: int | None = None

    def member(self, value: ir.Value, axis: int, kind: str) -> None:
        """`kind`: 'head' (the axis holds the heads) or the role whose head size times the
        head count is the size of the axis ('q', 'k', 'v')."""
        self.kinds[value] = (axis, kind)

    def site(self, node: ir.Node, position: int, kind: str, attribute: str | None = None) -> None:
        self.pending.append((node, position, kind, attribute))

    # -- backwards from a 4-D Q/K/V operand to its projection ------------------------------
    def trace_heads(self, value: ir.Value, head: int, dim: int, role: str) -> None:
        while True:
            self.member(value, head, "head")
            node = value.producer()
            if node is None:
                raise Decline(f"the {role.upper()} heads come from the graph input '{value.name}'")
            self.block.nodes.add(node)
            op = node.op_type if node.domain in STD else f"{node.domain}.{node.op_type}"
            if op == "Transpose":
                perm = list(node.attributes["perm"].as_ints()) if "perm" in node.attributes else []
                r = len(perm)
                if r < max(-head, -dim):
                    raise Decline(f"{label(node)} has no usable perm")
                head, dim = perm[r + head] - r, perm[r + dim] - r
                value = node.inputs[0]  # type: ignore[assignment]
            elif op in ("Mul", "Div") and is_scalar(node.inputs[1]):
                value = node.inputs[0]  # type: ignore[assignment]
            elif op == "Mul" and is_scalar(node.inputs[0]):
                value = node.inputs[1]  # type: ignore[assignment]
            elif op in PASS:
                value = node.inputs[0]  # type: ignore[assignment]
            elif op == "Reshape":
                self._split(node, head, dim, role)
                self.trace_flat(node.inputs[0], role)  # type: ignore[arg-type]
                return
            elif op in _REPEAT and role in ("k", "v"):
                raise Decline(f"the {role.upper()} heads are repeated by {label(node)} "
                               "(grouped-query or multi-query attention)")
            elif op in _ROTARY or op in ("Mul", "Add"):
                raise Decline(f"{label(node)} acts on the {role.upper()} heads (rotary "
                               "position embedding or another per-position op)")
            else:
                raise Decline(f"{label(node)} on the {role.upper()} path is not understood")

    def _split(self, node: ir.Node, head: int, dim: int, role: str) -> None:
        if (head, dim) != (-2, -1):
            hint = " (K/V heads repeated: grouped-query attention?)" if role != "q" else ""
            raise Decline(f"{label(node)} does not split the last axis into [heads, size] "
                          f"on the {role.upper()} path{hint}")
        entries = target_entries(node.inputs[1])
        if entries is None or len(entries) < 2:
            raise Decline(f"the target of {label(node)} cannot be read")
        h, d = entries[-2], entries[-1]
        for e, what in ((h, "head count"), (d, "head size")):
            if e.kind == "dynamic":
                raise Decline(f"{label(node)} computes its {what} at run time")
            if e.kind == "copy":
                raise Decline(f"{label(node)} copies its {what} from the input (0)")
        if h.kind == "infer" and d.kind == "infer":
            raise Decline(f"{label(node)} infers both head count and head size")
        self.split[role] = (node, None if h.kind == "infer" else h.value,
                            None if d.kind == "infer" else d.value)

    # -- backwards from a flat [.., heads*size] tensor to its projection ---------------------
    def trace_flat(self, value: ir.Value, role: str, *, offset: int = 0) -> None:
        bias: ConstSlice | None = None
        while True:
            self.member(value, -1, role)
            node = value.producer()
            if node is None:
                raise Decline(f"the {role.upper()} input '{value.name}' is not projected "
                               "in this graph")
            self.block.nodes.add(node)
            op = node.op_type if node.domain in STD else f"{node.domain}.{node.op_type}"
            if op == "Add" and any(is_constant(i) for i in node.inputs):
                k = 0 if is_constant(node.inputs[0]) else 1
                arr = const_array(node.inputs[k])
                assert arr is not None
                if arr.size > 1:
                    if bias is not None or arr.size != arr.shape[-1]:
                        raise Decline(f"{label(node)} adds a constant that is not a bias")
                    bias = ConstSlice(node.inputs[k], arr.ndim - 1, node)  # type: ignore[arg-type]
                value = node.inputs[1 - k]  # type: ignore[assignment]
            elif op in ("Mul", "Div") and is_scalar(node.inputs[1]) or op in PASS:
                value = node.inputs[0]  # type: ignore[assignment]
            elif op in ("MatMul", "Gemm"):
                self._projection(node, value, role, bias, offset)
                return
            elif op in ("Split", "Slice"):
                raise Decline(f"the {role.upper()} projection is packed and cut by "
                               f"{label(node)}; packed QKV is not supported")
            else:
                raise Decline(f"{label(node)} feeds the {role.upper()} heads and is not "
                               "understood")

    def _projection(self, node: ir.Node, value: ir.Value, role: str, bias: ConstSlice | None,
                    offset: int) -> None:
        w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None or w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
            raise Decline(f"{label(node)} ({role.upper()}) has no constant 2-D weight")
        if node.op_type == "Gemm" and int_attr(node, "transA", 0):
            raise Decline(f"{label(node)} uses transA")
        trans_b = node.op_type == "Gemm" and int_attr(node, "transB", 0) == 1
        use = WeightUse(node, node.inputs[1], 1 if trans_b else 0, 0 if trans_b else 1)  # type: ignore[arg-type]
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            c = const_array(node.inputs[2])
            if c is None or bias is not None:
                raise Decline(f"{label(node)} has a bias that is not a plain constant")
            if c.size > 1:
                bias = ConstSlice(node.inputs[2], c.ndim - 1, node)
        self.block.projections.append(Projection(role, use, bias, offset, 0))
        self.widths[role] = int(w.shape[use.out_axis])

    # -- forwards from the 4-D context to the output projection ----------------------------
    def trace_output(self, value: ir.Value, head: int = -1, dim: int = -1, *,
                     merged: bool = False) -> None:
        while True:
            self.member(value, -1 if merged else head, "v" if merged else "head")
            uses = list(value.uses())
            if value.is_graph_output() or len(uses) != 1:
                raise Decline(f"the attention output '{value.name}' is used "
                               f"{'as a graph output' if value.is_graph_output() else 'twice'}")
            node = uses[0].node
            self.block.nodes.add(node)
            op = node.op_type if node.domain in STD else f"{node.domain}.{node.op_type}"
            if op == "Transpose" and not merged:
                perm = list(node.attributes["perm"].as_ints()) if "perm" in node.attributes else []
                r = len(perm)
                if r < max(-head, -dim):
                    raise Decline(f"{label(node)} has no usable perm")
                head, dim = perm.index(r + head) - r, perm.index(r + dim) - r
            elif op == "Reshape" and not merged and uses[0].idx == 0:
                self._merge(node, head, dim)
                merged = True
            elif op in PASS:
                pass
            elif op in ("MatMul", "Gemm") and merged and uses[0].idx == 0:
                self._output(node)
                return
            else:
                raise Decline(f"the attention output reaches {label(node)}, not an output "
                               "projection")
            value = node.outputs[0]

    def _merge(self, node: ir.Node, head: int, dim: int) -> None:
        if (head, dim) != (-2, -1):
            raise Decline(f"{label(node)} does not merge [heads, size] into the last axis")
        entries = target_entries(node.inputs[1])
        if not entries:
            raise Decline(f"the target of {label(node)} cannot be read")
        last = entries[-1]
        if last.kind in ("dynamic", "copy"):
            raise Decline(f"{label(node)} computes its width at run time")
        if last.kind == "literal":
            self.site(node, -1, "v")
            self.merged_width = last.value

    def _output(self, node: ir.Node) -> None:
        w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None or w.ndim != 2:
            raise Decline(f"the output projection {label(node)} has no constant 2-D weight")
        if node.op_type == "Gemm" and int_attr(node, "transA", 0):
            raise Decline(f"the output projection {label(node)} uses transA")
        trans_b = node.op_type == "Gemm" and int_attr(node, "transB", 0) == 1
        self.block.output = WeightUse(node, node.inputs[1], 1 if trans_b else 0,  # type: ignore[arg-type]
                                      0 if trans_b else 1)

    # -- checks and head counts ------------------------------------------------------------
    def check_mask(self, mask: ir.Value, head_axis: int, heads: int | None = None) -> None:
        """A mask or bias added to the scores must broadcast over the heads."""
        size = _head_dim(mask, head_axis, self.shapes)
        if size == 1:
            return
        if size is None:
            self.block.unresolved_masks.append(mask.name or "")
            return
        arr = const_array(mask)
        if arr is not None and (heads is None or size == heads):
            self.block.head_constants.append(ConstSlice(mask, arr.ndim + head_axis,
                                                        next(iter(u.node for u in mask.uses()))))
            return
        raise Decline(f"the mask '{mask.name}' has {size} slices on the head axis (a mask "
                       "per head)")

    def finish(self, heads_attr: int | None = None) -> AttentionBlock:
        """Settles head count and sizes from widths and split literals, then checks."""
        b = self.block
        if b.output is None:
            raise Decline("no output projection found")
        sizes: dict[str, int] = {}
        heads: set[int] = set() if heads_attr is None else {heads_attr}
        for role, width in self.widths.items():
            node, h, d = self.split.get(role, (None, heads_attr, None))
            if d is not None:
                if width % d:
                    raise Decline(f"head size {d} does not divide the {role.upper()} width "
                                   f"{width}")
                if h is not None and h * d != width:
                    raise Decline(f"{h} heads of size {d} do not make the {role.upper()} "
                                   f"width {width}")
                h = width // d
            elif h is None:
                raise Decline(f"the {role.upper()} head count is not known")
            elif width % h:
                raise Decline(f"{h} heads do not divide the {role.upper()} width {width}")
            heads.add(h)
            sizes[role] = width // h
            if node is not None and self.split[role][1] is not None:
                self.site(node, -2, "head")
        if len(heads) != 1:
            raise Decline(f"Q, K and V have different head counts {sorted(heads)} "
                           "(grouped-query or multi-query attention)")
        b.num_heads = heads.pop()
        if set(sizes) != {"q", "k", "v"}:
            raise Decline("Q, K and V projections were not all found")
        if sizes["q"] != sizes["k"]:
            raise Decline(f"Q and K have different head sizes ({sizes['q']}, {sizes['k']})")
        per = {"head": 1, **sizes}
        b.projections = [Projection(p.role, p.use, p.bias, p.offset, sizes[p.role])
                         for p in b.projections]
        b.sites = [HeadCountSite(n, per[k], pos, attr) for n, pos, k, attr in self.pending]
        b.members = {v: (axis, per[k]) for v, (axis, k) in self.kinds.items()}
        w = const_array(b.output.weight)
        assert w is not None
        if w.shape[b.output.reduce_axis] != b.num_heads * sizes["v"]:
            raise Decline(f"the output projection reads {w.shape[b.output.reduce_axis]} "
                           f"inputs, not {b.num_heads} x {sizes['v']}")
        if self.merged_width not in (None, b.num_heads * sizes["v"]):
            raise Decline(f"the merge Reshape spells width {self.merged_width}, not "
                          f"{b.num_heads} x {sizes['v']}")
        for p in b.projections:
            bias = None if p.bias is None else const_array(p.bias.value)
            if bias is not None and p.bias is not None and not p.bias.node.op_type.endswith(
                    "Attention") and bias.shape[p.bias.axis] != b.num_heads * p.head_size:
                raise Decline(f"the {p.role.upper()} bias '{p.bias.value.name}' has "
                              f"{bias.shape[p.bias.axis]} entries")
        for mask in self.masks:
            self.check_mask(mask, -3, b.num_heads)
        self._check_closed()
        if b.unresolved_masks:
            raise Decline(f"cannot tell whether the mask '{b.unresolved_masks[0]}' differs "
                           "per head: its shape is not recorded (give data to probe it)")
        return b

    def _check_closed(self) -> None:
        """Everything inside the block is read only inside it, and its shapes agree."""
        b = self.block
        inside = b.nodes | {b.output.node} if b.output else b.nodes
        for value, (axis, per) in b.members.items():
            if value.is_graph_output():
                raise Decline(f"'{value.name}' inside the attention is a graph output")
            for use in value.uses():
                if use.node not in inside:
                    if use.node.op_type in ("Shape", "Size"):
                        raise Decline(f"the shape of '{value.name}' is read by "
                                       f"{label(use.node)}")
                    raise Decline(f"'{value.name}' inside the attention is also read by "
                                   f"{label(use.node)}")
            if value.shape is not None and len(value.shape) >= -axis:
                dim = value.shape[axis]
                if isinstance(dim, int) and dim != b.num_heads * per:
                    raise Decline(f"the recorded shape of '{value.name}' has {dim} where "
                                   f"{b.num_heads} x {per} was expected")
        users: dict[ir.Value, set[ir.Node]] = {}
        for p in b.projections:
            users.setdefault(p.use.weight, set()).add(p.use.node)
        users.setdefault(b.output.weight, set()).add(b.output.node)  # type: ignore[union-attr]
        for weight, nodes in users.items():
            other = [u.node for u in weight.uses() if u.node not in nodes]
            if other or weight.is_graph_output() or weight.is_graph_input():
                where = label(other[0]) if other else "the graph interface"
                raise Decline(f"weight '{weight.name}' is shared with {where}")
