"""Channel groups: which (tensor, axis) slices must be removed together.

Start at the output channels of a MatMul/Gemm with a constant weight and flood-fill through
the graph, in both directions, along every op that keeps those channels aligned
(elementwise ops, activations however they are decomposed, Cast, Transpose, a Reshape that
keeps the channel axis last). The fill stops at the MatMul/Gemm nodes that reduce over the
channels (consumers). Whatever else it touches (a graph output, a shape read, LayerNorm,
Softmax, an unknown op) makes the whole group unprunable, and the reason is kept.

Coupling comes for free: a residual Add pulls the other operand's producer into the same
group, so every producer feeding the sum loses the same channels.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx_ir as ir

from onnxprune.graph.weights import WeightUse, const_array, is_constant, weight_uses

__all__ = ["ChannelGroup", "ConstSlice", "find_channel_groups"]

# Ops whose output channel c depends only on input channel c (and constants).
UNARY = frozenset(
    {
        "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid",
        "HardSwish", "Tanh", "Erf", "Softplus", "Softsign", "Mish", "Abs", "Neg", "Exp",
        "Log", "Sqrt", "Reciprocal", "Sin", "Cos", "Identity", "Cast", "Dropout", "Clip",
        "ThresholdedRelu", "Floor", "Ceil", "Round", "Sign",
    }
)
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean"})
# For these, only the inputs listed may carry channels; the rest must be scalar constants.
_DATA_INPUTS = {"Clip": (0,), "Dropout": (0,), "PRelu": (0, 1)}


@dataclass(frozen=True)
class ConstSlice:
    """A per-channel constant (bias, scale) cut along `axis` when channels go."""

    value: ir.Value
    axis: int
    node: ir.Node


@dataclass
class ChannelGroup:
    """Everything that must shrink together when channel indices of one group are removed."""

    name: str
    size: int
    producers: list[WeightUse] = field(default_factory=list)
    consumers: list[WeightUse] = field(default_factory=list)
    constants: list[ConstSlice] = field(default_factory=list)
    reshapes: list[ir.Node] = field(default_factory=list)
    members: dict[ir.Value, int] = field(default_factory=dict)  # value -> negative axis
    skip_reason: str | None = None

    @property
    def prunable(self) -> bool:
        return self.skip_reason is None

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "channels": self.size,
            "producers": [u.node.name for u in self.producers],
            "consumers": [u.node.name for u in self.consumers],
            "prunable": self.prunable,
            "reason": self.skip_reason,
        }


class _Decline(Exception):
    pass


def _label(node: ir.Node) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else node.op_type


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _dim(value: ir.Value, axis: int) -> int | str | None:
    """Size of `value` at negative `axis`: 1 when broadcast (too low rank), None unknown."""
    if value.shape is None:
        arr = const_array(value)
        if arr is None:
            return None
        shape: Sequence[object] = arr.shape
    else:
        shape = list(value.shape)
    if len(shape) < -axis:
        return 1
    d = shape[axis]
    return d if isinstance(d, int) else None


class _Fill:
    def __init__(self, graph: ir.Graph, start: WeightUse, weight_users: dict[ir.Value, set]):
        self.graph = graph
        self.weight_users = weight_users
        out = start.node.outputs[0]
        self.group = ChannelGroup(
            name=start.node.name or out.name or "group",
            size=int(const_array(start.weight).shape[start.out_axis]),  # type: ignore[union-attr]
        )
        self.seen_nodes: set[ir.Node] = set()
        self.todo: list[ir.Value] = []
        self.pending: str | None = None  # a decline met while seeding, raised by run()
        try:
            self._add_producer(start)
        except _Decline as e:
            self.pending = str(e)
            self.group.producers.append(start)
            self.seen_nodes.add(start.node)
        self._member(out, -1)

    # -- bookkeeping -------------------------------------------------------------------
    def _member(self, value: ir.Value, axis: int) -> None:
        known = self.group.members.get(value)
        if known is not None:
            if known != axis:
                raise _Decline(f"'{value.name}' would carry the channels on two axes")
            return
        size = _dim(value, axis)
        if isinstance(size, int) and size != self.group.size:
            raise _Decline(
                f"'{value.name}' has {size} channels where {self.group.size} were expected"
            )
        self.group.members[value] = axis
        self.todo.append(value)

    def _add_producer(self, use: WeightUse) -> None:
        if use.node.op_type == "Gemm" and len(use.node.inputs) > 2 and use.node.inputs[2]:
            bias = use.node.inputs[2]
            self._const_operand(use.node, bias, -1)
        self.group.producers.append(use)
        self.seen_nodes.add(use.node)

    def _const_operand(self, node: ir.Node, value: ir.Value, axis: int) -> None:
        arr = const_array(value)
        if arr is None:  # e.g. a Gemm bias computed by an Identity: not a constant we can slice
            raise _Decline(f"{_label(node)} takes '{value.name}', which is not a constant")
        if arr.ndim < -axis or arr.shape[axis] == 1:
            return
        if arr.shape[axis] != self.group.size:
            raise _Decline(
                f"{_label(node)} has a constant '{value.name}' of shape {list(arr.shape)} "
                f"that does not broadcast over {self.group.size} channels"
            )
        self.group.constants.append(ConstSlice(value, arr.ndim + axis, node))

    # -- traversal ---------------------------------------------------------------------
    def run(self) -> ChannelGroup:
        if self.pending is not None:
            raise _Decline(self.pending)
        while self.todo:
            value = self.todo.pop()
            axis = self.group.members[value]
            if value.is_graph_output():
                raise _Decline(f"its channels reach the graph output '{value.name}'")
            producer = value.producer()
            if producer is None:
                if not is_constant(value):
                    raise _Decline(f"it is coupled to the graph input '{value.name}'")
                raise _Decline(f"it is coupled to the constant '{value.name}'")
            self._visit(producer, value, axis)
            for use in list(value.uses()):
                self._visit(use.node, value, axis)
        self._check_weights()
        return self.group

    def _visit(self, node: ir.Node, value: ir.Value, axis: int) -> None:
        if node in self.seen_nodes:
            return
        self.seen_nodes.add(node)
        if node.graph is not self.graph:
            raise _Decline(f"its channels are used inside a subgraph ({_label(node)})")
        if node.domain not in ("", "ai.onnx"):
            raise _Decline(f"its channels reach {_label(node)} of domain '{node.domain}'")
        op = node.op_type
        if op in UNARY or op in BINARY:
            self._elementwise(node, axis)
        elif op in ("MatMul", "Gemm"):
            self._matmul(node, value, axis)
        elif op == "Transpose":
            self._transpose(node, value, axis)
        elif op == "Reshape":
            self._reshape(node, axis)
        elif op in ("Shape", "Size"):
            raise _Decline(f"its channels are read by the shape op {_label(node)}")
        else:
            raise _Decline(f"its channels reach {_label(node)}, which mixes channels")

    def _elementwise(self, node: ir.Node, axis: int) -> None:
        data = _DATA_INPUTS.get(node.op_type)
        for i, inp in enumerate(node.inputs):
            if inp is None:
                continue
            if data is not None and i not in data:
                arr = const_array(inp)
                if arr is None or arr.size != 1:
                    raise _Decline(f"{_label(node)} has a non-scalar parameter '{inp.name}'")
                continue
            if is_constant(inp):
                self._const_operand(node, inp, axis)
                continue
            if _dim(inp, axis) == 1:
                continue  # broadcast over the channels: not coupled
            self._member(inp, axis)
        for k, out in enumerate(node.outputs):
            if node.op_type == "Dropout" and k == 1:
                if out.uses() or out.is_graph_output():
                    raise _Decline(f"the mask output of {_label(node)} is used")
                continue
            self._member(out, axis)

    def _matmul(self, node: ir.Node, value: ir.Value, axis: int) -> None:
        is_gemm = node.op_type == "Gemm"
        trans_a = is_gemm and _int(node, "transA") == 1
        trans_b = is_gemm and _int(node, "transB") == 1
        weight = node.inputs[1]
        w = const_array(weight)
        if w is None or w.ndim != 2:
            raise _Decline(f"its channels reach {_label(node)}, whose weight is not a constant")
        if value is node.outputs[0]:
            if axis != -1:
                raise _Decline(f"{_label(node)} is reached on a non-channel axis")
            use = WeightUse(node, weight, 1 if trans_b else 0, 0 if trans_b else 1)
            if w.shape[use.out_axis] != self.group.size:
                raise _Decline(f"{_label(node)} has {w.shape[use.out_axis]} output channels")
            self._add_producer(use)
            self._member(node.outputs[0], -1)
            return
        if value is not node.inputs[0]:
            raise _Decline(f"its channels reach {_label(node)} as a weight or bias operand")
        want = -2 if trans_a else -1
        if axis != want:
            raise _Decline(f"its channels reach {_label(node)} on a non-reduced axis")
        use = WeightUse(node, weight, 1 if trans_b else 0, 0 if trans_b else 1)
        if w.shape[use.reduce_axis] != self.group.size:
            raise _Decline(f"{_label(node)} reduces over {w.shape[use.reduce_axis]} inputs")
        self.group.consumers.append(use)

    def _transpose(self, node: ir.Node, value: ir.Value, axis: int) -> None:
        perm_attr = node.attributes.get("perm")
        if perm_attr is None:
            raise _Decline(f"{_label(node)} has no explicit perm")
        perm = list(perm_attr.as_ints())
        rank = len(perm)
        if -axis > rank:
            raise _Decline(f"{_label(node)} has a perm of the wrong rank")
        if value is node.inputs[0]:
            self._member(node.outputs[0], perm.index(rank + axis) - rank)
        else:
            self._member(node.inputs[0], perm[rank + axis] - rank)
        self._member(value, axis)

    def _reshape(self, node: ir.Node, axis: int) -> None:
        target = const_array(node.inputs[1])
        if target is None:
            raise _Decline(
                f"its channels reach {_label(node)}, whose shape is computed at run time"
            )
        if axis != -1 or target.size == 0 or int(target[-1]) not in (self.group.size, 0):
            raise _Decline(f"{_label(node)} does not keep the channel axis last")
        if int(target[-1]) == self.group.size:
            self.group.reshapes.append(node)
        self._member(node.inputs[0], -1)
        self._member(node.outputs[0], -1)

    def _check_weights(self) -> None:
        """A sliced weight must not be used by any node outside the group, or on two axes."""
        nodes = {u.node for u in self.group.producers + self.group.consumers}
        roles: dict[ir.Value, set[str]] = {}
        for u in self.group.producers:
            roles.setdefault(u.weight, set()).add("out")
        for u in self.group.consumers:
            roles.setdefault(u.weight, set()).add("in")
        for weight, role in roles.items():
            if len(role) > 1:
                raise _Decline(f"weight '{weight.name}' is both a producer and a consumer")
            outside = self.weight_users.get(weight, set()) - nodes
            if outside:
                other = next(iter(outside))
                raise _Decline(f"weight '{weight.name}' is shared with {_label(other)}")
        if not self.group.consumers:
            raise _Decline("no MatMul/Gemm consumes its channels")


def _int(node: ir.Node, name: str) -> int:
    attr = node.attributes.get(name)
    return 0 if attr is None else int(attr.as_int())


def find_channel_groups(model: ir.Model, *, ignore: Sequence[str] = ()) -> list[ChannelGroup]:
    """Every channel group of the main graph, prunable or not (with the reason)."""
    graph = model.graph
    uses = [u for u in weight_uses(graph) if u.node.graph is graph]
    weight_users: dict[ir.Value, set] = {}
    for v in graph.initializers.values():
        weight_users[v] = {u.node for u in v.uses()}
    for u in uses:
        weight_users.setdefault(u.weight, set()).update(x.node for x in u.weight.uses())
    groups: list[ChannelGroup] = []
    claimed: set[ir.Node] = set()
    for use in uses:
        if use.node in claimed:
            continue
        fill = _Fill(graph, use, weight_users)
        try:
            group = fill.run()
        except _Decline as e:
            group = fill.group
            group.skip_reason = str(e)
        claimed.update(u.node for u in group.producers)
        if not group.prunable:
            # A fill that stopped early may not have met every coupled producer; one that
            # shares an activation with an earlier declined group is the same group.
            twin = next((g for g in groups if not g.prunable
                         and any(v in g.members for v in group.members)), None)
            if twin is not None:
                twin.producers.extend(u for u in group.producers if u not in twin.producers)
                twin.members.update(group.members)
                continue
        names = [u.node.name for u in group.producers + group.consumers]
        hit = next(((n, p) for n in names for p in ignore if fnmatch.fnmatchcase(n, p)), None)
        if group.prunable and hit is not None:
            group.skip_reason = f"node '{hit[0]}' matches --ignore '{hit[1]}'"
        groups.append(group)
    return groups

