"""Attention blocks: which weights, shape literals and recorded shapes one head spans.

Head removal must shrink the Q, K and V projections, the output projection, and every
place that spells the head count, together; miss one and the model either fails to load or,
worse, silently regroups channels into different heads. So recognition is strict: it
follows the data from the Softmax (or a fused attention op) back to the projections and
forward to the output projection, tracking on every tensor which axis carries the heads,
and declines, with the reason, whatever it does not fully understand (run-time head
counts, grouped K/V, per-head masks, rotary embeddings, unknown ops).

Recognised forms:
- unfused, as both torch exporters write it: Q/K/V MatMul (+ bias Add) -> Reshape
  [.., H, D] -> Transpose -> MatMul(Q, Kᵀ) -> scale -> + mask -> Softmax -> MatMul(., V)
  -> Transpose -> Reshape [.., H*D] -> output MatMul;
- com.microsoft Attention (packed QKV weight) and MultiHeadAttention (separate 3-D Q/K/V);
- ONNX Attention (opset 23+), with 3-D inputs (q_num_heads) or 4-D inputs fed as above.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxprune.graph.channels import ConstSlice
from onnxprune.graph.shape_literals import target_entries
from onnxprune.graph.weights import WeightUse, const_array, is_constant

__all__ = ["AttentionBlock", "HeadCountSite", "Projection", "find_attention_blocks"]

_STD = ("", "ai.onnx")
_PASS = frozenset({"Cast", "Identity", "Dropout"})
_ROTARY = frozenset({"Slice", "Neg", "Concat", "Split", "RotaryEmbedding", "Sin", "Cos"})
_REPEAT = frozenset({"Expand", "Tile", "Unsqueeze", "RepeatInterleave"})


@dataclass(frozen=True)
class Projection:
    """Q, K or V: columns [offset, offset + heads * head_size) of a constant weight."""

    role: str
    use: WeightUse
    bias: ConstSlice | None
    offset: int
    head_size: int


@dataclass(frozen=True)
class HeadCountSite:
    """A literal equal to heads * per_head that must be rewritten when heads go.

    Either entry `position` (negative) of a Reshape target, or attribute `attribute` of a
    fused node (entry `position` of it when the attribute is a list).
    """

    node: ir.Node
    per_head: int
    position: int = -1
    attribute: str | None = None


@dataclass
class AttentionBlock:
    """One multi-head attention: everything removing a head touches, or why it cannot."""

    name: str
    kind: str
    num_heads: int = 0
    projections: list[Projection] = field(default_factory=list)
    output: WeightUse | None = None
    sites: list[HeadCountSite] = field(default_factory=list)
    head_constants: list[ConstSlice] = field(default_factory=list)
    members: dict[ir.Value, tuple[int, int]] = field(default_factory=dict)
    nodes: set[ir.Node] = field(default_factory=set)
    unresolved_masks: list[str] = field(default_factory=list)
    skip_reason: str | None = None

    @property
    def prunable(self) -> bool:
        return self.skip_reason is None

    @property
    def v_head_size(self) -> int:
        return next(p.head_size for p in self.projections if p.role == "v")

    def projection(self, role: str) -> Projection:
        return next(p for p in self.projections if p.role == role)

    def node_names(self) -> list[str]:
        names = [p.use.node.name or "" for p in self.projections]
        if self.output is not None:
            names.append(self.output.node.name or "")
        return [self.name, *names]

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "heads": self.num_heads,
            "head_size": self.projections[0].head_size if self.projections else None,
            "projections": {p.role: p.use.node.name for p in self.projections},
            "output": None if self.output is None else self.output.node.name,
            "prunable": self.prunable,
            "reason": self.skip_reason,
        }


class _Decline(Exception):
    pass


def _label(node: ir.Node) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else node.op_type


def _scalar(value: ir.Value | None) -> bool:
    arr = const_array(value)
    return arr is not None and arr.size == 1


def _int_attr(node: ir.Node, name: str, default: int) -> int:
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


class _Walk:
    """Collects one block; raises _Decline with the reason when something does not fit."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, kind: str,
                 shapes: Mapping[str, Sequence[int]]) -> None:
        self.graph = graph
        self.shapes = shapes
        self.block = AttentionBlock(name=anchor.name or anchor.op_type, kind=kind)
        self.block.nodes.add(anchor)
        self.masks: list[ir.Value] = []
        # role -> (split Reshape, its literal head count or None, literal head size or None)
        self.split: dict[str, tuple[ir.Node, int | None, int | None]] = {}
        self.widths: dict[str, int] = {}
        self.kinds: dict[ir.Value, tuple[int, str]] = {}
        self.pending: list[tuple[ir.Node, int, str, str | None]] = []

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
                raise _Decline(f"the {role.upper()} heads come from the graph input '{value.name}'")
            self.block.nodes.add(node)
            op = node.op_type if node.domain in _STD else f"{node.domain}.{node.op_type}"
            if op == "Transpose":
                perm = list(node.attributes["perm"].as_ints()) if "perm" in node.attributes else []
                r = len(perm)
                if r < max(-head, -dim):
                    raise _Decline(f"{_label(node)} has no usable perm")
                head, dim = perm[r + head] - r, perm[r + dim] - r
                value = node.inputs[0]  # type: ignore[assignment]
            elif op in ("Mul", "Div") and _scalar(node.inputs[1]):
                value = node.inputs[0]  # type: ignore[assignment]
            elif op == "Mul" and _scalar(node.inputs[0]):
                value = node.inputs[1]  # type: ignore[assignment]
            elif op in _PASS:
                value = node.inputs[0]  # type: ignore[assignment]
            elif op == "Reshape":
                self._split(node, head, dim, role)
                self.trace_flat(node.inputs[0], role)  # type: ignore[arg-type]
                return
            elif op in _REPEAT and role in ("k", "v"):
                raise _Decline(f"the {role.upper()} heads are repeated by {_label(node)} "
                               "(grouped-query or multi-query attention)")
            elif op in _ROTARY or op in ("Mul", "Add"):
                raise _Decline(f"{_label(node)} acts on the {role.upper()} heads (rotary "
                               "position embedding or another per-position op)")
            else:
                raise _Decline(f"{_label(node)} on the {role.upper()} path is not understood")

    def _split(self, node: ir.Node, head: int, dim: int, role: str) -> None:
        if (head, dim) != (-2, -1):
            raise _Decline(f"{_label(node)} does not split the last axis into [heads, size]")
        entries = target_entries(node.inputs[1])
        if entries is None or len(entries) < 2:
            raise _Decline(f"the target of {_label(node)} cannot be read")
        h, d = entries[-2], entries[-1]
        for e, what in ((h, "head count"), (d, "head size")):
            if e.kind == "dynamic":
                raise _Decline(f"{_label(node)} computes its {what} at run time")
            if e.kind == "copy":
                raise _Decline(f"{_label(node)} copies its {what} from the input (0)")
        if h.kind == "infer" and d.kind == "infer":
            raise _Decline(f"{_label(node)} infers both head count and head size")
        self.split[role] = (node, None if h.kind == "infer" else h.value,
                            None if d.kind == "infer" else d.value)

    # -- backwards from a flat [.., heads*size] tensor to its projection ---------------------
    def trace_flat(self, value: ir.Value, role: str, *, offset: int = 0) -> None:
        bias: ConstSlice | None = None
        while True:
            self.member(value, -1, role)
            node = value.producer()
            if node is None:
                raise _Decline(f"the {role.upper()} input '{value.name}' is not projected "
                               "in this graph")
            self.block.nodes.add(node)
            op = node.op_type if node.domain in _STD else f"{node.domain}.{node.op_type}"
            if op == "Add" and any(is_constant(i) for i in node.inputs):
                k = 0 if is_constant(node.inputs[0]) else 1
                arr = const_array(node.inputs[k])
                assert arr is not None
                if arr.size > 1:
                    if bias is not None or arr.size != arr.shape[-1]:
                        raise _Decline(f"{_label(node)} adds a constant that is not a bias")
                    bias = ConstSlice(node.inputs[k], arr.ndim - 1, node)  # type: ignore[arg-type]
                value = node.inputs[1 - k]  # type: ignore[assignment]
            elif op in ("Mul", "Div") and _scalar(node.inputs[1]) or op in _PASS:
                value = node.inputs[0]  # type: ignore[assignment]
            elif op in ("MatMul", "Gemm"):
                self._projection(node, value, role, bias, offset)
                return
            elif op in ("Split", "Slice"):
                raise _Decline(f"the {role.upper()} projection is packed and cut by "
                               f"{_label(node)}; packed QKV is not supported")
            else:
                raise _Decline(f"{_label(node)} feeds the {role.upper()} heads and is not "
                               "understood")

    def _projection(self, node: ir.Node, value: ir.Value, role: str, bias: ConstSlice | None,
                    offset: int) -> None:
        w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None or w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
            raise _Decline(f"{_label(node)} ({role.upper()}) has no constant 2-D weight")
        if node.op_type == "Gemm" and _int_attr(node, "transA", 0):
            raise _Decline(f"{_label(node)} uses transA")
        trans_b = node.op_type == "Gemm" and _int_attr(node, "transB", 0) == 1
        use = WeightUse(node, node.inputs[1], 1 if trans_b else 0, 0 if trans_b else 1)  # type: ignore[arg-type]
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            c = const_array(node.inputs[2])
            if c is None or bias is not None:
                raise _Decline(f"{_label(node)} has a bias that is not a plain constant")
            if c.size > 1:
                bias = ConstSlice(node.inputs[2], c.ndim - 1, node)
        self.block.projections.append(Projection(role, use, bias, offset, 0))
        self.widths[role] = int(w.shape[use.out_axis])

    # -- forwards from the 4-D context to the output projection ----------------------------
    def trace_output(self, value: ir.Value, head: int, dim: int) -> None:
        merged = False
        while True:
            self.member(value, -1 if merged else head, "v" if merged else "head")
            uses = list(value.uses())
            if value.is_graph_output() or len(uses) != 1:
                raise _Decline(f"the attention output '{value.name}' is used "
                               f"{'as a graph output' if value.is_graph_output() else 'twice'}")
            node = uses[0].node
            self.block.nodes.add(node)
            op = node.op_type if node.domain in _STD else f"{node.domain}.{node.op_type}"
            if op == "Transpose" and not merged:
                perm = list(node.attributes["perm"].as_ints()) if "perm" in node.attributes else []
                r = len(perm)
                if r < max(-head, -dim):
                    raise _Decline(f"{_label(node)} has no usable perm")
                head, dim = perm.index(r + head) - r, perm.index(r + dim) - r
            elif op == "Reshape" and not merged and uses[0].idx == 0:
                self._merge(node, head, dim)
                merged = True
            elif op in _PASS:
                pass
            elif op in ("MatMul", "Gemm") and merged and uses[0].idx == 0:
                self._output(node)
                return
            else:
                raise _Decline(f"the attention output reaches {_label(node)}, not an output "
                               "projection")
            value = node.outputs[0]

    def _merge(self, node: ir.Node, head: int, dim: int) -> None:
        if (head, dim) != (-2, -1):
            raise _Decline(f"{_label(node)} does not merge [heads, size] into the last axis")
        entries = target_entries(node.inputs[1])
        if not entries:
            raise _Decline(f"the target of {_label(node)} cannot be read")
        last = entries[-1]
        if last.kind in ("dynamic", "copy"):
            raise _Decline(f"{_label(node)} computes its width at run time")
        if last.kind == "literal":
            self.site(node, -1, "v")

    def _output(self, node: ir.Node) -> None:
        w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None or w.ndim != 2:
            raise _Decline(f"the output projection {_label(node)} has no constant 2-D weight")
        if node.op_type == "Gemm" and _int_attr(node, "transA", 0):
            raise _Decline(f"the output projection {_label(node)} uses transA")
        trans_b = node.op_type == "Gemm" and _int_attr(node, "transB", 0) == 1
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
        raise _Decline(f"the mask '{mask.name}' has {size} slices on the head axis (a mask "
                       "per head)")

    def finish(self, heads_attr: int | None = None) -> AttentionBlock:
        """Settles head count and sizes from widths and split literals, then checks."""
        b = self.block
        if b.output is None:
            raise _Decline("no output projection found")
        sizes: dict[str, int] = {}
        heads: set[int] = set() if heads_attr is None else {heads_attr}
        for role, width in self.widths.items():
            node, h, d = self.split.get(role, (None, heads_attr, None))
            if d is not None:
                if width % d:
                    raise _Decline(f"head size {d} does not divide the {role.upper()} width "
                                   f"{width}")
                if h is not None and h * d != width:
                    raise _Decline(f"{h} heads of size {d} do not make the {role.upper()} "
                                   f"width {width}")
                h = width // d
            elif h is None:
                raise _Decline(f"the {role.upper()} head count is not known")
            elif width % h:
                raise _Decline(f"{h} heads do not divide the {role.upper()} width {width}")
            heads.add(h)
            sizes[role] = width // h
            if node is not None and self.split[role][1] is not None:
                self.site(node, -2, "head")
        if len(heads) != 1:
            raise _Decline(f"Q, K and V have different head counts {sorted(heads)} "
                           "(grouped-query or multi-query attention)")
        b.num_heads = heads.pop()
        if set(sizes) != {"q", "k", "v"}:
            raise _Decline("Q, K and V projections were not all found")
        if sizes["q"] != sizes["k"]:
            raise _Decline(f"Q and K have different head sizes ({sizes['q']}, {sizes['k']})")
        per = {"head": 1, **sizes}
        b.projections = [Projection(p.role, p.use, p.bias, p.offset, sizes[p.role])
                         for p in b.projections]
        b.sites = [HeadCountSite(n, per[k], pos, attr) for n, pos, k, attr in self.pending]
        b.members = {v: (axis, per[k]) for v, (axis, k) in self.kinds.items()}
        w = const_array(b.output.weight)
        assert w is not None
        if w.shape[b.output.reduce_axis] != b.num_heads * sizes["v"]:
            raise _Decline(f"the output projection reads {w.shape[b.output.reduce_axis]} "
                           f"inputs, not {b.num_heads} x {sizes['v']}")
        for mask in self.masks:
            self.check_mask(mask, -3, b.num_heads)
        self._check_closed()
        if b.unresolved_masks:
            raise _Decline(f"cannot tell whether the mask '{b.unresolved_masks[0]}' differs "
                           "per head: its shape is not recorded (give data to probe it)")
        return b

    def _check_closed(self) -> None:
        """Everything inside the block is read only inside it, and its shapes agree."""
        b = self.block
        inside = b.nodes | {b.output.node} if b.output else b.nodes
        for value, (axis, per) in b.members.items():
            if value.is_graph_output():
                raise _Decline(f"'{value.name}' inside the attention is a graph output")
            for use in value.uses():
                if use.node not in inside:
                    if use.node.op_type in ("Shape", "Size"):
                        raise _Decline(f"the shape of '{value.name}' is read by "
                                       f"{_label(use.node)}")
                    raise _Decline(f"'{value.name}' inside the attention is also read by "
                                   f"{_label(use.node)}")
            if value.shape is not None and len(value.shape) >= -axis:
                dim = value.shape[axis]
                if isinstance(dim, int) and dim != b.num_heads * per:
                    raise _Decline(f"the recorded shape of '{value.name}' has {dim} where "
                                   f"{b.num_heads} x {per} was expected")
        users: dict[ir.Value, set[ir.Node]] = {}
        for p in b.projections:
            users.setdefault(p.use.weight, set()).add(p.use.node)
        users.setdefault(b.output.weight, set()).add(b.output.node)  # type: ignore[union-attr]
        for weight, nodes in users.items():
            other = [u.node for u in weight.uses() if u.node not in nodes]
            if other or weight.is_graph_output() or weight.is_graph_input():
                where = _label(other[0]) if other else "the graph interface"
                raise _Decline(f"weight '{weight.name}' is shared with {where}")


# -- entry points per form -------------------------------------------------------------------
def _softmax_block(graph: ir.Graph, softmax: ir.Node,
                   shapes: Mapping[str, Sequence[int]]) -> AttentionBlock | None:
    """Returns None when the Softmax is not fed by a product of two activations."""
    scores = _find_scores(softmax.inputs[0])  # type: ignore[arg-type]
    if scores is None:
        return None
    walk = _Walk(graph, softmax, "unfused", shapes)
    try:
        axis = _int_attr(softmax, "axis", -1)
        shape = softmax.inputs[0].shape  # type: ignore[union-attr]
        if axis not in (-1, 3 if shape is None else len(shape) - 1):
            raise _Decline(f"{_label(softmax)} normalises axis {axis}, not the key axis")
        walk.member(softmax.inputs[0], -3, "head")  # type: ignore[arg-type]
        for node, path in scores.chain:
            walk.block.nodes.add(node)
            walk.member(node.outputs[0], -3, "head")
            for i, other in enumerate(node.inputs):
                if other is None or other is path and not (node.op_type == "Where" and i == 0):
                    continue
                if node.op_type in ("Mul", "Div") and not _scalar(other):
                    raise _Decline(f"{_label(node)} scales the scores per element")
                if node.op_type in ("Add", "Sub", "Where"):
                    walk.masks.append(other)
        mm = scores.matmul
        walk.block.nodes.add(mm)
        walk.member(mm.outputs[0], -3, "head")
        walk.trace_heads(mm.inputs[0], -3, -1, "q")  # type: ignore[arg-type]
        walk.trace_heads(mm.inputs[1], -3, -2, "k")  # type: ignore[arg-type]
        ctx = _context_matmul(softmax, walk)
        walk.trace_heads(ctx.inputs[1], -3, -1, "v")  # type: ignore[arg-type]
        walk.trace_output(ctx.outputs[0], -3, -1)
        return walk.finish()
    except _Decline as e:
        walk.block.skip_reason = str(e)
        return walk.block


@dataclass
class _Scores:
    matmul: ir.Node
    chain: list[tuple[ir.Node, ir.Value]]  # (node, its input on the path), MatMul first


def _find_scores(value: ir.Value, depth: int = 8) -> _Scores | None:
    """The MatMul(Q, Kᵀ) behind a Softmax input, through scale, mask and cast ops."""
    node = value.producer()
    if node is None or depth == 0 or node.domain not in _STD:
        return None
    if node.op_type == "MatMul":
        if any(i is None or is_constant(i) for i in node.inputs):
            return None
        return _Scores(node, [])
    if node.op_type in ("Add", "Sub", "Mul", "Div", "Where", "Cast", "Identity"):
        start = 1 if node.op_type == "Where" else 0
        for inp in node.inputs[start:]:
            if inp is None or is_constant(inp):
                continue
            found = _find_scores(inp, depth - 1)
            if found is not None:
                found.chain.append((node, inp))
                return found
    return None


def _context_matmul(softmax: ir.Node, walk: _Walk) -> ir.Node:
    value = softmax.outputs[0]
    while True:
        walk.member(value, -3, "head")
        uses = list(value.uses())
        if value.is_graph_output() or len(uses) != 1:
            raise _Decline(f"the attention probabilities '{value.name}' are used elsewhere")
        node = uses[0].node
        walk.block.nodes.add(node)
        if node.op_type in _PASS:
            value = node.outputs[0]
            continue
        if node.op_type == "MatMul" and uses[0].idx == 0:
            return node
        raise _Decline(f"the attention probabilities reach {_label(node)}, not MatMul(., V)")


def _fused_block(graph: ir.Graph, node: ir.Node,
                 shapes: Mapping[str, Sequence[int]]) -> AttentionBlock:
    from onnxprune.graph.fused_attention import recognise_fused

    walk = _Walk(graph, node, f"{node.domain or 'ai.onnx'}.{node.op_type}", shapes)
    try:
        recognise_fused(walk, node)
        return walk.block
    except _Decline as e:
        walk.block.skip_reason = str(e)
        return walk.block


def find_attention_blocks(
    model: ir.Model,
    *,
    ignore: Sequence[str] = (),
    known_shapes: Mapping[str, Sequence[int]] | None = None,
) -> list[AttentionBlock]:
    """Every attention block of the main graph, prunable or not (with the reason).

    `known_shapes` (tensor name -> concrete shape, e.g. from one run) settles masks whose
    shape the file does not record.
    """
    shapes = known_shapes or {}
    blocks: list[AttentionBlock] = []
    for node in model.graph:
        block: AttentionBlock | None = None
        if node.op_type == "Softmax" and node.domain in _STD:
            block = _softmax_block(model.graph, node, shapes)
        elif (node.domain == "com.microsoft"
              and node.op_type in ("Attention", "MultiHeadAttention")) or (
                node.domain in _STD and node.op_type == "Attention"):
            block = _fused_block(model.graph, node, shapes)
        if block is None:
            continue
        hit = next(((n, p) for n in block.node_names() for p in ignore
                    if fnmatch.fnmatchcase(n, p)), None)
        if block.prunable and hit is not None:
            block.skip_reason = f"node '{hit[0]}' matches --ignore '{hit[1]}'"
        blocks.append(block)
    return blocks
