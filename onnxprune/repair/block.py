"""A pruned block as a small differentiable numpy function.

A block is one channel group seen from outside: the producer MatMul/Gemm nodes, the
elementwise ops between them (bias, GELU however it is decomposed, SiLU, a SwiGLU gate), the
one consumer, and a short tail after the consumer - its bias, the residual Add and the
norm that follows, where one exists - so that the repair matches what the next layer reads
(after the norm) rather than the raw consumer output. Every op must act on each row (token)
on its own; anything else makes the block unsupported, with the reason.

The trainable parameters are the producers' and the consumer's weight matrices and the bias
vectors that belong to them; scalars inside activations and the norm's gain stay fixed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxprune.channels.model import ChannelGroup
from onnxprune.core.weights import const_array, is_constant
from onnxprune.repair.ops import OPS

__all__ = ["Block", "BlockFunction", "find_block"]

_NORMS = ("LayerNormalization", "RMSNormalization")
_TAIL_UNARY = frozenset({"Relu", "Gelu", "Tanh", "Sigmoid", "Identity", "Dropout"})
_MAX_TAIL = 6
_FLOATS = (ir.DataType.FLOAT, ir.DataType.DOUBLE)


@dataclass
class Block:
    """The nodes of one group's block, in graph order, and what goes in and out."""

    name: str
    nodes: list[ir.Node]
    inputs: list[ir.Value]  # activations read from outside, row-aligned with the first
    output: ir.Value
    params: list[ir.Value]  # trainable constants
    consts: dict[ir.Value, np.ndarray] = field(default_factory=dict)  # every constant operand
    norm: str | None = None  # op type of the norm the output is taken after


class _Unsupported(Exception):
    pass


def _label(node: ir.Node) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else node.op_type


def _attr(node: ir.Node, name: str, default: object = None) -> object:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _check_node(node: ir.Node) -> None:
    """Refuses ops or attributes the numpy function cannot reproduce row by row."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
        raise _Unsupported(f"{_label(node)} is not supported by the distillation repair")
    op = node.op_type
    if op == "Gemm" and _attr(node, "transA", 0):
        raise _Unsupported(f"{_label(node)} has transA=1")
    if op in ("MatMul", "Gemm"):
        w = const_array(node.inputs[1])
        if w is None or w.ndim != 2:
            raise _Unsupported(f"{_label(node)} has no constant 2-D weight")
    if op in _NORMS or op == "ReduceMean":
        axis = _attr(node, "axis", -1)
        rank = None if node.inputs[0].shape is None else len(node.inputs[0].shape)
        if op == "ReduceMean":
            axes = _attr(node, "axes")
            if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
                arr = const_array(node.inputs[1])
                axes = None if arr is None else arr.tolist()
            if _attr(node, "keepdims", 1) != 1 or axes is None or len(list(axes)) != 1:
                raise _Unsupported(f"{_label(node)} does not reduce the last axis only")
            axis = list(axes)[0]
        if axis != -1 and (rank is None or axis != rank - 1):
            raise _Unsupported(f"{_label(node)} does not work on the last axis")
        if op == "LayerNormalization" and len(node.outputs) > 1 and any(
                o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            raise _Unsupported(f"{_label(node)} exposes its mean or inverse deviation")
    if op == "Cast":
        to = _attr(node, "to")
        if to not in (ir.DataType.FLOAT, ir.DataType.DOUBLE, 1, 11):
            raise _Unsupported(f"{_label(node)} casts to a non-float type")
    if op == "Pow":
        p = const_array(node.inputs[1])
        if p is None or p.size != 1:
            raise _Unsupported(f"{_label(node)} has a non-constant exponent")
    if op == "Dropout" and len(node.outputs) > 1 and (
            node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        raise _Unsupported(f"{_label(node)} exposes its mask")


def _tail(consumer: ir.Node) -> tuple[list[ir.Node], str | None]:
    """Nodes after the consumer up to its bias, residual Add, activation or norm."""
    nodes: list[ir.Node] = []
    value = consumer.outputs[0]
    residual = False
    while len(nodes) < _MAX_TAIL:
        uses = list(value.uses())
        if value.is_graph_output() or len(uses) != 1:
            break
        node, idx = uses[0].node, uses[0].idx
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            break
        if op in _NORMS and idx == 0:
            try:
                _check_node(node)
            except _Unsupported:
                break
            if any(not is_constant(v) for v in node.inputs[1:] if v is not None):
                break
            return [*nodes, node], op
        if op in ("Add", "Sub", "Mul", "Div") and len(node.inputs) == 2:
            other = node.inputs[1 - idx]
            if other is None:
                break
            if not is_constant(other):
                # Shapes are often not recorded; rows that do not line up are caught when
                # the captured tensors are compared.
                known = other.shape is not None and value.shape is not None
                if op != "Add" or residual or known and (
                        list(other.shape) != list(value.shape)):  # type: ignore[union-attr]
                    break
                residual = True
        elif op not in _TAIL_UNARY:
            break
        nodes.append(node)
        value = node.outputs[0]
    return nodes, None


def find_block(group: ChannelGroup) -> Block:
    """The block of a prunable group; raises ValueError with the reason when unsupported."""
    try:
        return _find_block(group)
    except _Unsupported as e:
        raise ValueError(str(e)) from None


def _find_block(group: ChannelGroup) -> Block:
    if not group.prunable:
        raise _Unsupported(group.skip_reason or "the group is not prunable")
    if len(group.consumers) != 1:
        raise _Unsupported(f"{len(group.consumers)} consumers read the channels")
    if group.reshapes:
        raise _Unsupported(f"{_label(group.reshapes[0])} reshapes the channels")
    producer_inputs = {u.node.inputs[0] for u in group.producers}
    if len(producer_inputs) != 1:
        raise _Unsupported("the producers read different inputs")
    core: set[ir.Node] = {u.node for u in group.producers}
    core.update(u.node for u in group.consumers)
    for value in group.members:
        node = value.producer()
        if node is not None:
            core.add(node)
    consumer = group.consumers[0].node
    tail, norm = _tail(consumer)
    graph = consumer.graph
    assert graph is not None
    order = {n: i for i, n in enumerate(graph)}
    in_block = core | set(tail)
    nodes = sorted(in_block, key=lambda n: order[n])
    produced = {o for n in nodes for o in n.outputs}
    x = next(iter(producer_inputs))
    inputs: list[ir.Value] = [x]
    consts: dict[ir.Value, np.ndarray] = {}
    for node in nodes:
        _check_node(node)
        for v in node.inputs:
            if v is None or v in produced:
                continue
            arr = const_array(v)
            if arr is not None:
                consts[v] = arr
            elif v not in inputs:
                inputs.append(v)
    for node in nodes:  # every value made inside must stay inside, except the output
        for o in node.outputs[:1]:
            outside = [u.node for u in o.uses() if u.node not in in_block]
            last = tail[-1] if tail else consumer
            if node is not last and (outside or o.is_graph_output()):
                raise _Unsupported(f"'{o.name}' inside the block is also read outside it")
    output = (tail[-1] if tail else consumer).outputs[0]
    if any(v.dtype is not None and v.dtype not in _FLOATS for v in (output, x)):
        raise _Unsupported(f"'{output.name}' is not float32/float64")
    params = _trainable(group, nodes, tail, consts, in_block)
    return Block(group.name, nodes, inputs, output, params, consts, norm)


def _trainable(group: ChannelGroup, nodes: Sequence[ir.Node], tail: Sequence[ir.Node],
               consts: dict[ir.Value, np.ndarray], in_block: set[ir.Node]) -> list[ir.Value]:
    """Producer and consumer weights, group biases, Gemm biases and the consumer's bias."""
    chosen: list[ir.Value] = []
    for u in group.producers + group.consumers:
        chosen.append(u.weight)
        if u.node.op_type == "Gemm" and len(u.node.inputs) > 2 and u.node.inputs[2] is not None:
            chosen.append(u.node.inputs[2])
    chosen.extend(c.value for c in group.constants if c.node.op_type == "Add")
    for node in tail:  # the bias right after the consumer, before any residual or activation
        if node.op_type != "Add":
            break
        other = [v for v in node.inputs if v is not None and v in consts]
        if not other:
            break
        chosen.append(other[0])
    out = []
    for v in dict.fromkeys(chosen):
        arr = consts.get(v)
        if arr is None or arr.size <= 1 or arr.dtype not in (np.float32, np.float64):
            continue
        if any(u.node not in in_block for u in v.uses()):
            continue  # shared with nodes outside the block: changing it would change them
        out.append(v)
    return out


class BlockFunction:
    """Runs a block on rows and back-propagates a loss gradient to its parameters."""

    def __init__(self, block: Block, dtype: type = np.float32) -> None:
        self.block = block
        self.dtype = dtype
        self.consts = {v: np.asarray(a, dtype=dtype) for v, a in block.consts.items()}
        self.params = set(block.params)
        # Which values carry a gradient: the parameters and everything computed from them.
        self._needs: set[ir.Value] = set(block.params)
        for node in block.nodes:
            if any(v in self._needs for v in node.inputs if v is not None):
                self._needs.update(node.outputs[:1])
        self._attrs = [{k: a.value for k, a in node.attributes.items()} for node in block.nodes]

    def forward(self, feeds: dict[ir.Value, np.ndarray], params: dict[ir.Value, np.ndarray],
                keep: bool = True) -> tuple[np.ndarray, dict[ir.Value, np.ndarray]]:
        """The block output for rows `feeds` (2-D, one per block input) and the cache."""
        env: dict[ir.Value, np.ndarray] = dict(self.consts)
        env.update(params)
        env.update(feeds)
        for node, attrs in zip(self.block.nodes, self._attrs, strict=True):
            args = [env[v] for v in node.inputs if v is not None]
            env[node.outputs[0]] = OPS[node.op_type].forward(args, attrs)
        out = env[self.block.output]
        return out, env if keep else {}

    def backward(self, env: dict[ir.Value, np.ndarray], grad: np.ndarray
                 ) -> dict[ir.Value, np.ndarray]:
        """Gradients of the loss w.r.t. every parameter, given d loss / d output."""
        grads: dict[ir.Value, np.ndarray] = {self.block.output: grad}
        for node, attrs in zip(reversed(self.block.nodes), reversed(self._attrs), strict=True):
            g = grads.pop(node.outputs[0], None)
            if g is None:
                continue
            ins = [v for v in node.inputs if v is not None]
            needs = [v in self._needs for v in ins]
            if not any(needs):
                continue
            parts = OPS[node.op_type].backward([env[v] for v in ins], env[node.outputs[0]], g,
                                               needs, attrs)
            for v, p in zip(ins, parts, strict=False):
                if p is None:
                    continue
                grads[v] = grads[v] + p if v in grads else p
        return {v: grads[v] for v in self.block.params if v in grads}
