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

from onnxprune.attention.block import AttentionBlock, RepeatSite
from onnxprune.attention.layout import (
    chain_permutation,
    is_self_reshape,
    reads_own_last_dim,
)
from onnxprune.attention.projection import (
    PASS,
    STD,
    Decline,
    ProjectionTrace,
    int_attr,
    is_scalar,
    label,
)
from onnxprune.attention.repeat import repeat_literal, repeat_product
from onnxprune.channels.model import ConstSlice
from onnxprune.core.shape_literals import target_entries
from onnxprune.core.weights import (
    WeightUse,
    const_array,
    is_constant,
)

__all__ = ["Decline", "Trace", "STD", "PASS", "int_attr", "label", "is_scalar", "only_shape_read"]

_REPEAT = frozenset({"Expand", "Tile", "Unsqueeze", "RepeatInterleave"})


def _repeat(node: ir.Node) -> bool:
    """Reshape(Expand(Unsqueeze(x))): transformers' repeat_kv."""
    expand = node.inputs[0].producer() if node.inputs[0] is not None else None
    if expand is None or expand.op_type != "Expand":
        return False
    unsq = expand.inputs[0].producer() if expand.inputs[0] is not None else None
    return unsq is not None and unsq.op_type == "Unsqueeze"


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


def only_shape_read(node: ir.Node, depth: int = 3) -> bool:
    """A Shape, or a layout op whose result only Shape ops read (the legacy T5 export
    transposes K once more just to read its length)."""
    if node.op_type == "Shape":
        return True
    if depth == 0 or node.op_type not in ("Transpose", "Identity", "Reshape") or any(
            o.is_graph_output() for o in node.outputs):
        return False
    return all(only_shape_read(u.node, depth - 1) for o in node.outputs for u in o.uses())


class Trace(ProjectionTrace):
    """Collects one block; raises Decline with the reason when something does not fit."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, kind: str,
                 shapes: Mapping[str, Sequence[int]]) -> None:
        self.graph = graph
        self.shapes = shapes
        self.block = AttentionBlock(name=anchor.name or anchor.op_type, kind=kind,
                                    anchor=anchor.name or "")
        self.block.nodes.add(anchor)
        # values added to the scores or applied to the heads, (value, head axis, kind): they
        # must not differ per head
        self.masks: list[tuple[ir.Value, int, str]] = []
        # role -> (split Reshape, its literal head count or None, literal head size or None)
        self.split: dict[str, tuple[ir.Node, int | None, int | None]] = {}
        self.widths: dict[str, int] = {}
        self.kinds: dict[ir.Value, tuple[int, str]] = {}
        self.pending: list[tuple[ir.Node, int, str, str | None]] = []
        self.merged_width: int | None = None
        self._visited: set[tuple[ir.Value, int, int, str]] = set()
        self._depends: dict[ir.Value, bool] = {}
        self.repeated: set[str] = set()
        self.rep_literal: int | None = None
        self.repeat_sites: list[RepeatSite] = []  # literals spelling the repeat factor
        self.repeat_unknown: str | None = None  # why thinning query heads is not possible
        self.split_kind: dict[str, str] = {}
        self.packed_parts: dict[ir.Node, dict[int, str]] = {}  # Split/Slice -> index: role
        self.slices: list[tuple[ir.Node, str, int, int]] = []
        self.flat_rank: int | None = None
        self.caches: set[ir.Value] = set()  # past inputs and present outputs of a KV cache

    def member(self, value: ir.Value, axis: int, kind: str) -> None:
        """`kind`: 'head' (the axis holds the heads) or the role whose head size times the
        head count is the size of the axis ('q', 'k', 'v')."""
        self.kinds[value] = (axis, kind)

    def site(self, node: ir.Node, position: int, kind: str, attribute: str | None = None) -> None:
        self.pending.append((node, position, kind, attribute))

    # -- backwards from a 4-D Q/K/V operand to its projection ------------------------------
    def trace_heads(self, value: ir.Value, head: int, dim: int, role: str,
                    kind: str = "head") -> None:
        """Follows the head axis `head` (and head-size axis `dim`) back to the projection.

        Ops are accepted for what they do to the heads: layout ops move the axes, elementwise
        ops with an operand that is the same for every head (a scale, rotary cos/sin) and
        Slice/Concat/Neg along another axis (rotary's rotate_half) keep each head apart. A
        path that forks (rotary reads Q twice) is followed along every branch.
        """
        while True:
            key = (value, head, dim, kind)
            if key in self._visited:
                return
            self._visited.add(key)
            self.member(value, head, kind)
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
            elif op in PASS or op == "Neg":
                value = node.inputs[0]  # type: ignore[assignment]
            elif op in ("Mul", "Div", "Add", "Sub"):
                value = self._elementwise(node, head, dim, role, kind)
            elif op == "Slice":
                self._check_axes(node, value, head, role)
                value = node.inputs[0]  # type: ignore[assignment]
            elif op == "Concat":
                paths = self._concat(node, value, head, role, dim, kind)
                for extra in paths[1:]:
                    self.trace_heads(extra, head, dim, role, kind)
                value = paths[0]
            elif op == "Reshape" and role in ("k", "v") and kind == "head" and _repeat(node):
                value = self._repeat(node, head, role)
                kind = "kvhead"
            elif op == "Reshape" and (head, dim) != (-2, -1):
                value, head, dim = self._relayout(node, head, dim, role)
            elif op == "Reshape":
                self._split(node, head, dim, role, kind)
                self.trace_flat(node.inputs[0], role)  # type: ignore[arg-type]
                return
            elif op in _REPEAT and role in ("k", "v"):
                raise Decline(f"the {role.upper()} heads are repeated by {label(node)} in a "
                               "way that is not understood")
            else:
                raise Decline(f"{label(node)} on the {role.upper()} path is not understood")

    def on_path(self, value: ir.Value) -> bool:
        """Whether `value` depends on a projection (a MatMul/Gemm with a constant weight).

        Rotary cos/sin tables, masks and scales do not; the heads do."""
        memo = self._depends
        stack = [value]
        order: list[ir.Value] = []
        while stack:
            v = stack.pop()
            if v in memo:
                continue
            node = v.producer()
            if node is None or is_constant(v):
                memo[v] = False
                continue
            if node.op_type in ("MatMul", "Gemm") and is_constant(
                    node.inputs[1] if len(node.inputs) > 1 else None):
                memo[v] = True
                continue
            if node.op_type in ("Shape", "Size"):
                memo[v] = False
                continue
            order.append(v)
            stack.extend(i for i in node.inputs if i is not None and i not in memo)
        for v in reversed(order):
            if v not in memo:
                node = v.producer()
                assert node is not None
                memo[v] = any(memo.get(i, False) for i in node.inputs if i is not None)
        return memo[value]

    def _elementwise(self, node: ir.Node, head: int, dim: int, role: str, kind: str
                     ) -> ir.Value:
        ins = [i for i in node.inputs if i is not None]
        paths = [i for i in ins if self.on_path(i)]
        if not paths:
            raise Decline(f"{label(node)} on the {role.upper()} path is not understood")
        if node.op_type in ("Div", "Sub") and node.inputs[0] not in paths:
            raise Decline(f"{label(node)} takes the {role.upper()} heads as its second operand")
        for side in ins:
            if side in paths:
                continue
            if is_constant(side) and not is_scalar(side) and _head_dim(
                    side, head, self.shapes) not in (1,):
                raise Decline(f"{label(node)} applies a constant with a head axis to the "
                               f"{role.upper()} heads")
            if not is_constant(side):
                self.masks.append((side, head, kind))
        for extra in paths[1:]:
            self.trace_heads(extra, head, dim, role, kind)
        return paths[0]

    def _rank(self, value: ir.Value) -> int:
        if value.shape is not None:
            return len(value.shape)
        known = self.shapes.get(value.name or "")
        return len(known) if known is not None else 4

    def _check_axes(self, node: ir.Node, value: ir.Value, head: int, role: str) -> None:
        axes = const_array(node.inputs[3]) if len(node.inputs) > 3 else None
        if len(node.inputs) > 3 and node.inputs[3] is not None and axes is None:
            raise Decline(f"{label(node)} slices axes chosen at run time on the "
                           f"{role.upper()} path")
        rank = self._rank(value)
        cut = [int(a) for a in np.asarray(axes).reshape(-1)] if axes is not None else list(
            range(len(np.asarray(const_array(node.inputs[1])).reshape(-1))))
        if any((a if a < 0 else a - rank) == head for a in cut):
            raise Decline(f"{label(node)} slices the {role.upper()} head axis")

    def _concat(self, node: ir.Node, value: ir.Value, head: int, role: str, dim: int = 0,
                kind: str = "head") -> list[ir.Value]:
        axis = int_attr(node, "axis", 0)
        rank = self._rank(value)
        axis = axis if axis < 0 else axis - rank
        if axis == head:
            raise Decline(f"{label(node)} concatenates along the {role.upper()} head axis")
        paths = [i for i in node.inputs if i is not None]
        others = [i for i in paths if not self.on_path(i)]
        if others:
            self._cache(node, value, others, paths, axis, head, dim, role, kind)
        return [i for i in paths if i not in others]

    def _cache(self, node: ir.Node, value: ir.Value, others: list[ir.Value],
               paths: list[ir.Value], axis: int, head: int, dim: int, role: str, kind: str
               ) -> None:
        """Concat(past, new) along the sequence: a key/value cache fed as a graph input.

        The past tensor holds the same heads on the same axis, so it becomes a member of the
        block (its recorded input shape follows the kept heads; the user feeds the cache of
        the pruned model), and the joined tensor may be a graph output (the present cache)."""
        if role not in ("k", "v") or len(paths) - len(others) != 1 or axis == dim:
            raise Decline(f"{label(node)} joins the {role.upper()} heads with other values")
        for past in others:
            while not past.is_graph_input():  # Identity, or a Concat of the cache alone
                src = past.producer()
                if src is None or src.op_type not in ("Identity", "Concat") or len(
                        [i for i in src.inputs if i is not None]) != 1 or src.domain not in STD:
                    raise Decline(f"{label(node)} joins the {role.upper()} heads with other "
                                   "values")
                self.member(past, head, kind)
                self.block.nodes.add(src)
                past = src.inputs[0]  # type: ignore[assignment]
            if past.shape is not None and len(past.shape) != self._rank(value):
                raise Decline(f"the cache '{past.name}' at {label(node)} has another rank")
            self.member(past, head, kind)
            self.caches.add(past)
        self.caches.add(value)

    def _repeat(self, node: ir.Node, head: int, role: str) -> ir.Value:
        """K/V heads repeated for grouped-query attention: Unsqueeze -> Expand -> Reshape
        (transformers' repeat_kv). Returns the K/V tensor before the repeat."""
        expand = node.inputs[0].producer()  # type: ignore[union-attr]
        assert expand is not None
        unsq = expand.inputs[0].producer()  # type: ignore[union-attr]
        assert unsq is not None
        rank = self._rank(node.outputs[0])
        axes = const_array(unsq.inputs[1]) if len(unsq.inputs) > 1 else None
        if axes is None or axes.size != 1:
            raise Decline(f"{label(unsq)} repeats the {role.upper()} heads on an unknown axis")
        ax = int(axes.reshape(-1)[0])
        if (ax if ax < 0 else ax - (rank + 1)) != head:
            raise Decline(f"{label(expand)} does not repeat the {role.upper()} heads next to "
                           "their axis")
        self.block.nodes.update({node, expand, unsq})
        self.repeated.add(role)
        merged = target_entries(node.inputs[1])
        if merged is None or len(merged) < -head:
            raise Decline(f"the target of {label(node)} cannot be read")
        e = merged[head]
        if e.kind == "literal":
            self.site(node, head, "head")
        elif e.kind == "copy":
            raise Decline(f"{label(node)} copies its head count from the input (0)")
        elif e.kind == "dynamic" and not repeat_product(node, e, self.repeat_sites):
            self.repeat_unknown = f"{label(node)} spells its head count in a way not understood"
        reps = target_entries(expand.inputs[1])
        if reps is not None and len(reps) >= 1 - head:  # else computed at run time
            g, n = reps[head - 1], reps[head]
            if g.kind == "literal" and g.value != 1:
                self.site(expand, head - 1, "kvhead")
            if n.kind == "literal":
                self.rep_literal = n.value
        if not repeat_literal(expand, head, self.repeat_sites):
            self.repeat_unknown = f"{label(expand)} computes the repeat factor at run time"
        self.member(expand.outputs[0], head - 1, "kvhead")
        self.member(unsq.outputs[0], head - 1, "kvhead")
        return unsq.inputs[0]  # type: ignore[return-value]

    def _relayout(self, node: ir.Node, head: int, dim: int, role: str
                  ) -> tuple[ir.Value, int, int]:
        """A Reshape chain that only transposes (its targets read the shape at run time):
        carries the axes back through it to the chain's start."""
        found = chain_permutation(node)
        if found is None:
            raise Decline(f"{label(node)} on the {role.upper()} path neither splits the last "
                          "axis into [heads, size] nor only moves axes")
        start, perm, nodes = found
        r = len(perm)
        if r < max(-head, -dim):
            raise Decline(f"{label(node)} moves axes of a rank-{r} tensor")
        self.block.nodes.update(nodes)
        return start, perm[r + head] - r, perm[r + dim] - r

    def _split(self, node: ir.Node, head: int, dim: int, role: str, kind: str = "head"
               ) -> None:
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
        self.split_kind[role] = kind
        if self.flat_rank is None and len(entries) >= 3:  # the flat tensor is one axis less
            self.flat_rank = len(entries) - 1

    # -- backwards from a flat [.., heads*size] tensor to its projection ---------------------
    def trace_output(self, value: ir.Value, head: int = -1, dim: int = -1, *,
                     merged: bool = False) -> None:
        while True:
            self.member(value, -1 if merged else head, "out" if merged else "head")
            uses = [u for u in value.uses() if u.node.op_type != "Shape"]  # see _check_closed
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
            elif op == "Reshape" and not merged and uses[0].idx == 0 and is_self_reshape(
                    node, len(value.shape) if value.shape is not None else 4, head):
                entries = target_entries(node.inputs[1])  # reshapes to itself
                if entries and entries[head].kind == "literal":
                    self.site(node, head, "head")
            elif op == "Reshape" and not merged and uses[0].idx == 0:
                self._merge(node, head, dim)
                merged = True
            elif op in PASS:
                pass
            elif op == "Reshape" and merged and uses[0].idx == 0:
                entries = target_entries(node.inputs[1])  # e.g. flattened to 2-D for a Gemm
                last = entries[-1] if entries else None
                if reads_own_last_dim(node):
                    pass
                elif last is None or last.kind not in ("literal", "infer"):
                    raise Decline(f"{label(node)} reshapes the merged heads at run time")
                elif last.kind == "literal":
                    self.site(node, -1, "out")
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
            self.site(node, -1, "out")
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
        reader = next((u.node for u in mask.uses() if u.node in self.block.nodes), None)
        rank = len(mask.shape) if mask.shape is not None else len(
            self.shapes.get(mask.name or "", ()))
        if arr is None and heads is not None and size == heads and reader is not None \
                and rank >= -head_axis:
            self.block.head_inputs.append((mask, rank + head_axis, reader))  # bias per head
            return
        raise Decline(f"the mask '{mask.name}' has {size} slices on the head axis (a mask "
                       "per head)")
