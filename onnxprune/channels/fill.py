"""The flood fill behind find_channel_groups: index maps, union-find, and the op rules.

A fill starts at one layer's output channels (fresh channel ids) and follows every tensor
the ids reach. Each op rule only says how positions of its inputs and outputs correspond
(`couple`); the fill merges ids that must go together and re-visits a tensor whenever its
map learns something new, until nothing changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxprune.channels import rules
from onnxprune.channels.model import (
    BINARY,
    MS_ELEMENTWISE,
    NORM_PARAMS,
    POOLING,
    REDUCE,
    UNARY,
    ChannelGroup,
    ConstSlice,
    ShapeEdit,
)
from onnxprune.channels.shape_reads import shape_read
from onnxprune.channels.shapes import Decline, Shapes, int_attr, label
from onnxprune.core.weights import (
    WeightUse,
    const_array,
    einsum_matrix,
    is_constant,
    other_reader_through_identity,
)

__all__ = ["Fill", "is_carry_through"]

_LAYERS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum")


def is_carry_through(use: WeightUse) -> bool:
    """A depthwise Conv: each output channel reads one input channel (it carries channels)."""
    if use.node.op_type != "Conv":
        return False
    w = const_array(use.weight)
    return w is not None and int_attr(use.node, "group", 1) > 1 and w.shape[1] == 1


class Fill:
    def __init__(self, graph: ir.Graph, start: WeightUse, shapes: Shapes) -> None:
        self.graph = graph
        self.shapes = shapes
        self.parent: list[int] = []
        self.maps: dict[ir.Value, np.ndarray] = {}
        self.axes: dict[ir.Value, int] = {}
        self.todo: list[ir.Value] = []
        self.via: dict[ir.Value, str] = {}
        # node -> (use, output value) / (use, input value); registration order is kept.
        self.producers: dict[ir.Node, WeightUse] = {}
        self.consumers: dict[ir.Node, WeightUse] = {}
        self.carries: dict[ir.Node, WeightUse] = {}
        self.consts: dict[tuple[ir.Node, int], tuple[ir.Value, int, ir.Value]] = {}
        self.edits: dict[tuple[str, ir.Node, int], ShapeEdit] = {}
        self.start = start
        self.name = start.node.name or start.node.outputs[0].name or "group"
        self.pending: str | None = None  # a decline met while seeding, raised by run()
        self.first_size = 0
        try:
            self.first_size = self._out_channels(start.node)
            self._producer(start.node, start.node.outputs[0])
        except Decline as e:
            self.pending = str(e)
            self.producers.setdefault(start.node, start)

    # -- union-find and maps ----------------------------------------------------------
    def _find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def _fresh(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def length(self, value: ir.Value, axis: int) -> int | None:
        m = self.maps.get(value)
        return int(m.size) if m is not None else self.shapes.dim(value, axis)

    def _set(self, value: ir.Value, axis: int, new: np.ndarray, via: str | None = None) -> None:
        old = self.maps.get(value)
        if old is None:
            if not np.any(new >= 0):
                return
            size = self.shapes.dim(value, axis)
            if isinstance(size, int) and size != new.size:
                raise Decline(f"'{value.name}' has {size} channels where {new.size} were "
                              "expected")
            self.maps[value] = new.copy()
            self.axes[value] = axis
            if via is not None:
                self.via[value] = via
            self.todo.append(value)
            return
        if self.axes[value] != axis:
            raise Decline(f"'{value.name}' would carry the channels on two axes")
        if old.size != new.size:
            raise Decline(f"'{value.name}' has {old.size} channels where {new.size} were "
                          "expected")
        both = (old >= 0) & (new >= 0) & (old != new)
        for a, b in zip(old[both].tolist(), new[both].tolist(), strict=True):
            self._union(a, b)
        fill = (old < 0) & (new >= 0)
        if np.any(fill):
            old[fill] = new[fill]
            self.todo.append(value)

    def couple(self, a: ir.Value, axis_a: int, b: ir.Value, axis_b: int,
               src: np.ndarray | None = None) -> None:
        """Position p of b's channel axis is position src[p] of a's (-1: unrelated)."""
        len_b = self.length(b, axis_b)
        if src is None:
            n = self.length(a, axis_a) if len_b is None else len_b
            if n is None:
                raise Decline(f"the channel count of '{a.name}' is unknown")
            src = np.arange(n)
            len_b = n
        len_a = self.length(a, axis_a)
        if len_a is None:
            len_a = int(src.max()) + 1 if src.size else 0
        ma = self.maps.get(a)
        mb = self.maps.get(b)
        new_a = ma.copy() if ma is not None else np.full(len_a, -1, dtype=np.int64)
        new_b = mb.copy() if mb is not None else np.full(src.size, -1, dtype=np.int64)
        if new_b.size != src.size:
            raise Decline(f"'{b.name}' has {new_b.size} channels where {src.size} were expected")
        if a is b:
            new_b = new_a
        ok = src >= 0
        if np.any(src[ok] >= new_a.size):
            raise Decline(f"'{a.name}' has {new_a.size} channels, fewer than its use needs")
        pos = np.nonzero(ok)[0]
        xs, ys = new_a[src[pos]], new_b[pos]
        sel = (xs >= 0) & (ys >= 0) & (xs != ys)
        for x, y in zip(xs[sel].tolist(), ys[sel].tolist(), strict=True):
            self._union(x, y)
        to_b = (xs >= 0) & (ys < 0)
        new_b[pos[to_b]] = xs[to_b]
        for p, y in zip(src[pos[(xs < 0) & (ys >= 0)]].tolist(),
                        ys[(xs < 0) & (ys >= 0)].tolist(), strict=True):
            if new_a[p] >= 0:
                self._union(int(new_a[p]), y)
            else:
                new_a[p] = y
        self._set(a, axis_a, new_a)
        if a is not b:
            self._set(b, axis_b, new_b)
        elif np.any(new_a != self.maps.get(a, new_a)):
            self._set(a, axis_a, new_a)

    # -- traversal ---------------------------------------------------------------------
    def run(self) -> ChannelGroup:
        if self.pending is not None:
            raise Decline(self.pending)
        while self.todo:
            value = self.todo.pop()
            try:
                self._step(value)
            except Decline as e:
                via = self.via.get(value)
                raise Decline(f"{e} (reached through {via})" if via else str(e)) from None
        return self.finish()

    def _step(self, value: ir.Value) -> None:
        if value.is_graph_output():
            raise Decline(f"its channels reach the graph output '{value.name}'")
        producer = value.producer()
        if producer is None:
            if not is_constant(value):
                raise Decline(f"it is coupled to the graph input '{value.name}'")
            raise Decline(f"it is coupled to the constant '{value.name}'")
        self._visit(producer, value)
        for use in list(value.uses()):
            self._visit(use.node, value)

    def _visit(self, node: ir.Node, value: ir.Value) -> None:
        if node.graph is not self.graph:
            raise Decline(f"its channels are used inside a subgraph ({label(node)})")
        microsoft = node.domain == "com.microsoft" and node.op_type in MS_ELEMENTWISE
        if node.op_type in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization"):
            raise Decline(f"its channels reach {label(node)}, which normalises over them "
                          "(the residual stream)")
        if node.domain not in ("", "ai.onnx") and not microsoft:
            raise Decline(f"its channels reach {label(node)} of domain '{node.domain}'")
        axis = self.axes[value]
        op = node.op_type
        if op in UNARY or op in BINARY or microsoft:
            rules.elementwise(self, node, value, axis)
        elif op in _LAYERS:
            self._layer(node, value, axis)
        elif op in POOLING or op in NORM_PARAMS:
            rules.per_channel(self, node, value, axis)
        elif op in REDUCE:
            rules.reduce(self, node, value, axis)
        elif op in ("Shape", "Size"):
            shape_read(self, node, value, axis)
        else:
            rule = rules.LAYOUT_RULES.get(op)
            if rule is None:
                raise Decline(f"its channels reach {label(node)}, which mixes channels")
            rule(self, node, value, axis)

    # -- layers with a weight ------------------------------------------------------------
    def _weight(self, node: ir.Node) -> np.ndarray:
        if node.op_type == "Einsum" and einsum_matrix(node) is None:
            raise Decline(f"its channels reach {label(node)}, which mixes channels")
        w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        conv = node.op_type in ("Conv", "ConvTranspose")
        if w is None or (w.ndim != 2 if not conv else w.ndim < 3):
            raise Decline(f"its channels reach {label(node)}, whose weight is not a constant")
        return w

    def _out_channels(self, node: ir.Node) -> int:
        w = self._weight(node)
        if node.op_type == "Conv":
            return int(w.shape[0])
        if node.op_type == "ConvTranspose":
            return int(w.shape[1]) * int_attr(node, "group", 1)
        if node.op_type == "Einsum":
            return int(w.shape[self._use(node).out_axis])
        trans_b = node.op_type == "Gemm" and int_attr(node, "transB") == 1
        return int(w.shape[0 if trans_b else 1])

    def _use(self, node: ir.Node) -> WeightUse:
        if node.op_type == "Conv":
            return WeightUse(node, node.inputs[1], 1, 0)  # type: ignore[arg-type]
        if node.op_type == "ConvTranspose":
            return WeightUse(node, node.inputs[1], 0, 1)  # type: ignore[arg-type]
        if node.op_type == "Einsum":
            reduce, out = einsum_matrix(node)  # type: ignore[misc]
            return WeightUse(node, node.inputs[1], reduce, out)  # type: ignore[arg-type]
        trans_b = node.op_type == "Gemm" and int_attr(node, "transB") == 1
        return WeightUse(node, node.inputs[1], 1 if trans_b else 0, 0 if trans_b else 1)  # type: ignore[arg-type]

    def _channel_axis(self, node: ir.Node, w: np.ndarray, output: bool) -> int:
        if node.op_type in ("Conv", "ConvTranspose"):
            return 1 - w.ndim
        if node.op_type == "Gemm" and not output and int_attr(node, "transA") == 1:
            return -2
        return -1

    def _layer(self, node: ir.Node, value: ir.Value, axis: int) -> None:
        w = self._weight(node)
        if node.op_type == "ConvTranspose" and int_attr(node, "group", 1) != 1:
            raise Decline(f"its channels reach the grouped {label(node)}")
        use = self._use(node)
        if is_carry_through(use):
            self._depthwise(node, value, axis, w)
            return
        if value is node.outputs[0]:
            if axis != self._channel_axis(node, w, True):
                raise Decline(f"{label(node)} is reached on a non-channel axis")
            self._producer(node, value)
            return
        if value is not node.inputs[0]:
            raise Decline(f"its channels reach {label(node)} as a weight or bias operand")
        if axis != self._channel_axis(node, w, False):
            raise Decline(f"its channels reach {label(node)} on a non-reduced axis")
        reduce = int(w.shape[use.reduce_axis])
        groups = int_attr(node, "group", 1) if node.op_type == "Conv" else 1
        n = self.length(value, axis)
        if n is not None and n != reduce * groups:
            raise Decline(f"{label(node)} reduces over {reduce * groups} inputs, not {n}")
        if groups > 1:  # the same index goes from every group
            self.couple(value, axis, value, axis, np.arange(reduce * groups) % reduce)
        if node not in self.consumers:
            self.consumers[node] = use
            self._share(node, use, value, axis)

    def _producer(self, node: ir.Node, out: ir.Value, ids: np.ndarray | None = None) -> None:
        w = self._weight(node)
        axis = self._channel_axis(node, w, True)
        if node in self.producers:
            return
        use = self._use(node)
        n = self._out_channels(node)
        if ids is None:
            ids = self._fresh(n)
            groups = int_attr(node, "group", 1) if node.op_type == "Conv" else 1
            per = n // groups
            for o in range(per, n):
                self._union(int(ids[o]), int(ids[o % per]))
        self.producers[node] = use
        self._set(out, axis, ids)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None:
            self.const_operand(node, 2, bias, out, -1 if node.op_type == "Gemm" else 0,
                               absolute=node.op_type != "Gemm")
        self._share(node, use, out, axis)

    def _share(self, node: ir.Node, use: WeightUse, value: ir.Value, axis: int) -> None:
        """Every other layer reading the same weight must lose the same channels."""
        shared = other_reader_through_identity(use.weight)
        if shared is not None:
            raise Decline(f"weight '{use.weight.name}' is the tensor '{shared[0].name}', also "
                          f"read by {label(shared[1])} through Identity (a shared weight); "
                          "pruning one reader would copy it")
        for u in list(use.weight.uses()):
            other = u.node
            if other is node:
                continue
            same = (u.idx == 1 and other.op_type == node.op_type and other.graph is self.graph
                    and dict(_attrs(other)) == dict(_attrs(node)))
            if not same:
                raise Decline(f"weight '{use.weight.name}' is shared with {label(other)}")
            via = f"weight '{use.weight.name}' shared with {label(other)}"
            if node in self.producers:
                if other not in self.producers:
                    self.producers[other] = self._use(other)
                    self._set(other.outputs[0], axis, self.maps[value], via=via)
            elif other not in self.consumers:
                if other.inputs[0] is None:
                    raise Decline(f"{label(other)} has no input")
                self._set(other.inputs[0], axis, self.maps[value], via=via)

    def _depthwise(self, node: ir.Node, value: ir.Value, axis: int, w: np.ndarray) -> None:
        groups = int_attr(node, "group", 1)
        mult = int(w.shape[0]) // groups
        if axis != 1 - w.ndim or value is not node.inputs[0] and value is not node.outputs[0]:
            raise Decline(f"its channels reach {label(node)} on a non-channel axis")
        inp, out = node.inputs[0], node.outputs[0]
        assert inp is not None
        self.couple(inp, axis, out, axis, np.arange(groups * mult) // mult)
        self.carries[node] = self._use(node)
        self.const_operand(node, 1, node.inputs[1], out, 0, absolute=True)  # type: ignore[arg-type]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            self.const_operand(node, 2, node.inputs[2], out, 0, absolute=True)
        self.edit(ShapeEdit("group", node, inp, axis))

    # -- constants and edits -------------------------------------------------------------
    def const_operand(self, node: ir.Node, idx: int, value: ir.Value, ref: ir.Value, axis: int,
                      *, absolute: bool = False) -> None:
        """A constant input whose `axis` (negative, or absolute) follows `ref`'s channels."""
        arr = const_array(value)
        if arr is None:
            raise Decline(f"{label(node)} has a non-constant parameter '{value.name}'")
        m = self.maps.get(ref)
        n = None if m is None else int(m.size)
        if absolute:
            if arr.ndim <= axis or arr.shape[axis] == 1 and n != 1:
                return
            ax = axis
        else:
            if arr.ndim < -axis or arr.shape[axis] == 1:
                return
            ax = arr.ndim + axis
        if n is not None and arr.shape[ax] != n:
            raise Decline(
                f"{label(node)} has a constant '{value.name}' of shape {list(arr.shape)} "
                f"that does not broadcast over {n} channels"
            )
        self.consts[(node, idx)] = (value, ax, ref)

    def edit(self, e: ShapeEdit) -> None:
        self.edits[(e.kind, e.node, e.index)] = e

    # -- result ----------------------------------------------------------------------------
    def _classes(self) -> dict[int, int]:
        cls: dict[int, int] = {}
        for node in self.producers:
            for i in self.maps[node.outputs[0]].tolist():
                r = self._find(i)
                if r not in cls:
                    cls[r] = len(cls)
        return cls

    def _canon(self, m: np.ndarray, cls: dict[int, int]) -> np.ndarray:
        return np.array([cls[self._find(i)] if i >= 0 else -1 for i in m.tolist()],
                        dtype=np.int64)

    def finish(self) -> ChannelGroup:
        cls = self._classes()
        g = self._empty(len(cls))
        maps = {v: self._canon(m, cls) for v, m in self.maps.items()}
        g.maps = maps
        for node, use in self.producers.items():
            g.producers.append(use)
            g.use_maps[use] = maps[node.outputs[0]]
        for node, use in self.consumers.items():
            g.consumers.append(use)
            m = maps[node.inputs[0]]  # type: ignore[index]
            w = const_array(use.weight)
            assert w is not None
            g.use_maps[use] = m[: w.shape[use.reduce_axis]]
        for (node, _), (value, ax, ref) in self.consts.items():
            g.constants.append(ConstSlice(value, ax, node, maps[ref]))
        g.edits = list(self.edits.values())
        g.reshapes = [e.node for e in g.edits if e.kind == "reshape"]
        self._check(g)
        return g

    def _empty(self, size: int) -> ChannelGroup:
        g = ChannelGroup(name=self.name, size=size)
        g.members = dict(self.axes)
        return g

    def declined(self, reason: str) -> ChannelGroup:
        g = self._empty(self.first_size)
        g.producers = list(self.producers.values())
        g.consumers = list(self.consumers.values())
        g.skip_reason = reason
        return g

    def _check(self, g: ChannelGroup) -> None:
        roles: dict[ir.Value, set[str]] = {}
        for u in g.producers:
            roles.setdefault(u.weight, set()).add("out")
        for u in g.consumers:
            roles.setdefault(u.weight, set()).add("in")
        for weight, role in roles.items():
            if len(role) > 1:
                raise Decline(f"weight '{weight.name}' is both a producer and a consumer")
        if not g.consumers:
            raise Decline("no MatMul/Gemm/Conv consumes its channels")
        for c in g.constants:
            if c.cls is not None and c.cls.size != const_array(c.value).shape[c.axis]:  # type: ignore[union-attr]
                raise Decline(f"constant '{c.value.name}' of {label(c.node)} does not follow "
                              "the channels")


def _attrs(node: ir.Node) -> Sequence[tuple[str, object]]:
    return sorted((k, repr(v)) for k, v in node.attributes.items())
