"""Reading and writing constant tensors, whether initializers or Constant nodes.

Exporters store weights either way (the legacy torch exporter often as Constant nodes,
the dynamo exporter as initializers), and the legacy exporter also de-duplicates equal
initializers behind `Identity` nodes; passes should not care which.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

__all__ = [
    "matmul_use",
    "conv_use",
    "einsum_use",
    "producer_use",
    "new_initializer",
    "other_reader_through_identity",
    "const_array",
    "constant_source",
    "constant_readers",
    "const_shape",
    "set_const_array",
    "is_constant",
    "is_plain_constant",
    "WeightUse",
    "weight_uses",
    "conv_uses",
    "einsum_matrix",
    "einsum_uses",
    "iter_nodes",
]

_MAX_IDENTITY_CHAIN = 8


def _constant_node(value: ir.Value) -> ir.Node | None:
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        return node
    return None


def _identity_source(value: ir.Value) -> ir.Value | None:
    """The value an `Identity` chain ending at `value` copies, or None."""
    for _ in range(_MAX_IDENTITY_CHAIN):
        node = value.producer()
        if node is None or node.op_type != "Identity" or node.domain not in ("", "ai.onnx"):
            return None
        src = node.inputs[0]
        if src is None:
            return None
        if is_plain_constant(src):
            return src
        value = src
    return None


def is_plain_constant(value: ir.Value | None) -> bool:
    """True for initializers that are not graph inputs and for Constant node outputs."""
    if value is None:
        return False
    if value.const_value is not None and not value.is_graph_input():
        return True
    node = _constant_node(value)
    return node is not None and "value" in node.attributes


def is_constant(value: ir.Value | None) -> bool:
    """A plain constant, or an `Identity` of one (the legacy exporter's de-duplication)."""
    if value is None:
        return False
    return is_plain_constant(value) or _identity_source(value) is not None


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents, or None when it is not a constant."""
    if value is None:
        return None
    if not is_plain_constant(value):
        src = _identity_source(value)
        return None if src is None else const_array(src)
    if value.const_value is not None:
        return value.const_value.numpy()
    node = _constant_node(value)
    assert node is not None
    return node.attributes["value"].as_tensor().numpy()


def constant_source(value: ir.Value | None) -> ir.Value | None:
    """The plain constant a value is, or that an Identity chain ending at it copies.

    Two layers reading the same source hold one weight, however each reaches it: passes
    that write a new form of a weight (int8, rescaled) key it by this, so that the file
    keeps one copy of it.
    """
    if value is None:
        return None
    return value if is_plain_constant(value) else _identity_source(value)


def constant_readers(source: ir.Value) -> list[ir.Node]:
    """The nodes that read `source` directly or through chains of Identity nodes (the
    Identity nodes themselves not counted), each once, in no particular order."""
    readers: list[ir.Node] = []
    frontier, seen = [source], {id(source)}
    while frontier:
        value = frontier.pop()
        for user, _ in value.uses():
            if user.op_type == "Identity" and user.domain in ("", "ai.onnx"):
                if id(user.outputs[0]) not in seen:
                    seen.add(id(user.outputs[0]))
                    frontier.append(user.outputs[0])
            elif all(user is not r for r in readers):
                readers.append(user)
    return readers


def const_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The shape of a constant (as const_array would give it) without reading its data."""
    if value is None:
        return None
    if not is_plain_constant(value):
        src = _identity_source(value)
        return None if src is None else const_shape(src)
    tensor = value.const_value
    if tensor is None:
        node = _constant_node(value)
        assert node is not None
        tensor = node.attributes["value"].as_tensor()
    return tuple(int(d) for d in tensor.shape)


def set_const_array(value: ir.Value, array: np.ndarray) -> None:
    """Replaces a constant's contents and its recorded shape.

    An `Identity` output is not written through (its source may be read elsewhere): the
    Identity gets a fresh initializer as its input instead, so only this value changes.
    """
    if not is_plain_constant(value) and _identity_source(value) is not None:
        node = value.producer()
        assert node is not None and node.graph is not None
        fresh = new_initializer(node.graph, f"{value.name or 'const'}_data", array)
        node.replace_input_with(0, fresh)
        value.shape = ir.Shape(array.shape)
        return
    tensor = ir.tensor(np.ascontiguousarray(array), name=value.name)
    node = _constant_node(value)
    if node is not None and value.const_value is None:
        node.attributes["value"] = ir.AttrTensor("value", tensor)
    else:
        value.const_value = tensor
    value.shape = ir.Shape(array.shape)
    if value.dtype is None:
        value.dtype = tensor.dtype


@dataclass(frozen=True)
class WeightUse:
    """A MatMul/Gemm/Conv/ConvTranspose whose second operand is a constant weight.

    `reduce_axis` is the weight axis summed over (the input features or channels);
    `out_axis` is the weight axis of the output features. For MatMul and Gemm(transB=0) the
    weight is [in, out]; for Gemm(transB=1) it is [out, in]; Conv [out, in/group, *k];
    ConvTranspose [in, out/group, *k].
    """

    node: ir.Node
    weight: ir.Value
    reduce_axis: int
    out_axis: int


def iter_nodes(graph: ir.Graph) -> Iterator[ir.Node]:
    """Nodes of the graph and of all its subgraphs (If/Loop/Scan bodies)."""
    yield from ir.traversal.RecursiveGraphIterator(graph)


def _float_weight(node: ir.Node, ops: tuple[str, ...]) -> tuple[ir.Value, np.ndarray] | None:
    """Input 1 of a default-domain node of `ops` and its array, when a float constant."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ops or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    arr = const_array(weight)
    if weight is None or arr is None or not np.issubdtype(arr.dtype, np.floating):
        return None
    return weight, arr


def matmul_use(node: ir.Node) -> WeightUse | None:
    """The node as a MatMul/Gemm with a constant 2-D float weight as B, else None."""
    found = _float_weight(node, ("MatMul", "Gemm"))
    if found is None or found[1].ndim != 2:
        return None
    trans_b = node.op_type == "Gemm" and _int_attr(node, "transB") == 1
    return WeightUse(node, found[0], reduce_axis=1 if trans_b else 0,
                     out_axis=0 if trans_b else 1)


def conv_use(node: ir.Node) -> WeightUse | None:
    """The node as a Conv/ConvTranspose with a constant float weight, else None."""
    found = _float_weight(node, ("Conv", "ConvTranspose"))
    if found is None or found[1].ndim < 3:
        return None
    transposed = node.op_type == "ConvTranspose"
    return WeightUse(node, found[0], reduce_axis=0 if transposed else 1,
                     out_axis=1 if transposed else 0)


def weight_uses(graph: ir.Graph) -> list[WeightUse]:
    """Every MatMul/Gemm in the graph (and subgraphs) with a constant 2-D weight as B."""
    return [u for n in iter_nodes(graph) if (u := matmul_use(n)) is not None]


def conv_uses(graph: ir.Graph) -> list[WeightUse]:
    """Every Conv/ConvTranspose of the graph (and subgraphs) with a constant float weight."""
    return [u for n in iter_nodes(graph) if (u := conv_use(n)) is not None]


def einsum_matrix(node: ir.Node) -> tuple[int, int] | None:
    """(reduce_axis, out_axis) of the weight when Einsum `node` is a plain matrix product of
    its data (input 0) by a 2-D weight (input 1): "bsh,hd->bsd", "...i,ij->...j", "ij,kj->ik".
    None for anything else (attention's "bhqd,bhkd->bhqk", a weight given first, a batched or
    diagonal product), which the analyses then treat as an op that mixes channels."""
    if node.op_type != "Einsum" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    attr = node.attributes.get("equation")
    if attr is None:
        return None
    eq = attr.as_string().replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return None
    data, weight = terms
    if not arrow:  # implicit output: letters seen once, in alphabetical order
        letters = [c for c in lhs if c.isalpha()]
        out = ("..." if "..." in lhs else "") + "".join(
            sorted(c for c in set(letters) if letters.count(c) == 1))
    ell = data.startswith("...")
    body = data[3:] if ell else data
    if len(weight) != 2 or weight[0] == weight[1] or not weight.isalpha() or not body \
            or not body.isalpha() or len(set(body)) != len(body) or "..." in out[3:]:
        return None
    k = body[-1]
    if k not in weight:
        return None
    n = weight[1 - weight.index(k)]
    if n in body or out != ("..." if ell else "") + body[:-1] + n:
        return None
    return weight.index(k), weight.index(n)


def einsum_use(node: ir.Node) -> WeightUse | None:
    """The node as an Einsum that is a plain matrix product by a constant 2-D float
    weight, else None."""
    axes = einsum_matrix(node)
    if axes is None:
        return None
    arr = const_array(node.inputs[1])
    if arr is None or arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        return None
    return WeightUse(node, node.inputs[1], reduce_axis=axes[0], out_axis=axes[1])  # type: ignore[arg-type]


def einsum_uses(graph: ir.Graph) -> list[WeightUse]:
    """Every Einsum that is a plain matrix product by a constant 2-D float weight."""
    return [u for n in iter_nodes(graph) if (u := einsum_use(n)) is not None]


def producer_use(node: ir.Node) -> WeightUse | None:
    """The node as any weight user the channel analysis knows (MatMul/Gemm, Conv, Einsum)."""
    return matmul_use(node) or conv_use(node) or einsum_use(node)


def _int_attr(node: ir.Node, name: str, default: int = 0) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def new_initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """A new initializer holding `array`, named `base` (or `base_N` if that is taken)."""
    name, i = base, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    value = ir.Value(name=name, shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    return value


def other_reader_through_identity(value: ir.Value) -> tuple[ir.Value, ir.Node] | None:
    """For a weight read through Identity nodes: its source tensor and another node that
    reads that source (None when the weight is not behind Identity or is not shared).

    The legacy exporter de-duplicates equal tensors behind Identity nodes, and models that
    share one weight between layers (ALBERT) export that way too; cutting one reader would
    write a second, resized copy of the shared tensor.
    """
    root, chain = value, []
    while (node := root.producer()) is not None and node.op_type == "Identity":
        chain.append(node)
        if node.inputs[0] is None:
            return None
        root = node.inputs[0]
    if not chain:
        return None
    others = [u.node for u in root.uses() if u.node not in chain]
    return (root, others[0]) if others else None
