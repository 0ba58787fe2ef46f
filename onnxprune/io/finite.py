"""Non-finite constants judged by what reads them, not by their value.

NaN in a constant is always a defect: scores, repairs and int8 scales built on it are
meaningless. ±inf is how exporters spell "nothing here": the value a masked position is
filled with (Where), the start of a running maximum (Max/Min, ScatterElements/ScatterND
with reduction max/min), a Clip bound, the padding row of an attention-bias table, a mask
added to logits right before Softmax. Those are accepted and reported; ±inf that a layer
multiplies (a MatMul/Gemm/Conv weight) or that reaches anything else is refused, naming the
tensor and the reader.

The rules, applied to every reader of a constant holding ±inf (looking through ops that only
move or pick values: Cast, Identity, Reshape, Unsqueeze, Squeeze, Expand, Tile, Transpose,
Slice, Concat, Gather's data, Flatten):

1. Where's X or Y, Max, Min, Clip's bounds, a comparison: a fill, bound or start value.
2. ScatterElements/ScatterND with reduction max or min, data or updates: a start value.
3. Add/Sub whose every path (through the moving ops above, Add, Sub, Where, Max, Min)
   ends in Softmax/LogSoftmax: a mask on logits.
4. Anything else (a weight, Mul, a graph output, ...): refused.

A ConstantOfShape whose `value` is ±inf is a fill by construction and is reported too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.errors import InputError

__all__ = ["MaskConstant", "accepted_non_finite", "is_finite_const"]

# Ops that only move, pick or retype values: an inf stays the same inf.
_MOVE = frozenset({"Cast", "CastLike", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Expand",
                   "Tile", "Transpose", "Slice", "Concat", "Flatten", "Gather",
                   "GatherElements", "GatherND"})
_FILL = frozenset({"Max", "Min", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Equal"})
_SOFTMAX = frozenset({"Softmax", "LogSoftmax"})
_TO_SOFTMAX = _MOVE | {"Add", "Sub", "Where", "Max", "Min"}


@dataclass(frozen=True)
class MaskConstant:
    """A constant holding ±inf that was accepted, and the op that makes it a mask/fill."""

    tensor: str
    reader: str  # the node, as "Op 'name'"
    role: str  # what the reader does with it: "fill value", "start value", ...

    def __str__(self) -> str:
        return f"'{self.tensor}' ({self.role}, read by {self.reader})"


def _label(node: ir.Node) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else node.op_type


def _array(value: ir.Value | ir.TensorProtocol | None) -> np.ndarray | None:
    t = value.const_value if isinstance(value, ir.Value) else value
    if t is None:
        return None
    try:
        dtype = t.dtype.numpy()
    except Exception:  # noqa: BLE001 - types numpy cannot hold (float8): nothing to check
        return None
    if not np.issubdtype(dtype, np.floating):
        return None
    return t.numpy()


def is_finite_const(value: ir.Value | None) -> bool:
    """False for a constant holding NaN or ±inf (a mask); True otherwise, including for
    values that are not constants. Passes that fold, scale or quantize constants ask this
    before touching one."""
    arr = _array(value) if value is not None else None
    return arr is None or bool(np.all(np.isfinite(arr)))


def _reaches_softmax(value: ir.Value, seen: set[ir.Value]) -> bool:
    if value in seen:
        return True
    seen.add(value)
    if value.is_graph_output() or not value.uses():
        return False
    for use in value.uses():
        node = use.node
        if node.op_type in _SOFTMAX:
            continue
        if node.op_type not in _TO_SOFTMAX or node.domain not in ("", "ai.onnx"):
            return False
        if not all(_reaches_softmax(o, seen) for o in node.outputs):
            return False
    return True


def _role(node: ir.Node, idx: int) -> str | None:
    """What `node` does with an inf read at input `idx`, or None when that is no mask use."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return None
    if op == "Where" and idx in (1, 2):
        return "fill value"
    if op in _FILL:
        return "start value" if op in ("Max", "Min") else "comparison bound"
    if op == "Clip" and idx in (1, 2):
        return "clip bound"
    if op in ("ScatterElements", "ScatterND") and idx in (0, 2):
        attr = node.attributes.get("reduction")
        if attr is not None and attr.as_string() in ("max", "min"):
            return f"scatter-{attr.as_string()} start value"
        return None
    if op in ("Add", "Sub") and _reaches_softmax(node.outputs[0], set()):
        return "mask before Softmax"
    return None


def _readers(value: ir.Value, seen: set[ir.Value]) -> list[tuple[ir.Node, int] | None]:
    """The (node, input index) that use the constant's values, looking through moving ops;
    None stands for a graph output."""
    if value in seen:
        return []
    seen.add(value)
    found: list[tuple[ir.Node, int] | None] = [None] if value.is_graph_output() else []
    for use in value.uses():
        node = use.node
        moves = node.op_type in _MOVE and node.domain in ("", "ai.onnx") and (
            not node.op_type.startswith("Gather") or use.idx == 0) and (
            node.op_type not in ("Reshape", "Expand", "Tile", "Slice") or use.idx == 0)
        if moves:
            for out in node.outputs:
                found.extend(_readers(out, seen))
        else:
            found.append((node, use.idx))
    return found


def _kind(arr: np.ndarray) -> str:
    pos, neg = bool(np.any(np.isposinf(arr))), bool(np.any(np.isneginf(arr)))
    return "±inf" if pos and neg else "+inf" if pos else "-inf"


def _constants(graph: ir.Graph) -> list[tuple[ir.Value, str]]:
    out = [(v, "initializer") for v in graph.initializers.values() if v not in graph.inputs]
    out += [(n.outputs[0], "constant") for n in graph
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.outputs]
    return out


def accepted_non_finite(model: ir.Model, where: str = "model") -> list[MaskConstant]:
    """Every constant holding ±inf that a reader uses as a fill, bound, start value or
    logit mask (see the module's rules), for the report; raises InputError, naming the
    tensor and the reader, for NaN anywhere and for ±inf any other reader sees."""
    accepted: list[MaskConstant] = []
    for graph in model.graphs():
        for node in graph:
            if node.op_type == "ConstantOfShape" and "value" in node.attributes:
                arr = _array(node.attributes["value"].as_tensor())
                if arr is not None and np.any(np.isnan(arr)):
                    raise InputError(f"{where}: ConstantOfShape '{node.name}' fills with NaN; "
                                     "fix the model")
                if arr is not None and np.any(np.isinf(arr)):
                    accepted.append(MaskConstant(node.outputs[0].name or "", _label(node),
                                                 f"{_kind(arr)} fill value"))
        for value, what in _constants(graph):
            arr = _array(value)
            if arr is None or np.all(np.isfinite(arr)):
                continue
            if np.any(np.isnan(arr)):
                raise InputError(f"{where}: {what} '{value.name}' holds NaN; fix the model's "
                                 "weights first")
            readers = _readers(value, set())
            if not readers:
                continue  # read by nothing: RemoveUnusedNodes drops it
            for reader in readers:
                role = None if reader is None else _role(*reader)
                if role is None:
                    seen = "the graph output" if reader is None else _label(reader[0])
                    raise InputError(
                        f"{where}: {what} '{value.name}' holds {_kind(arr)} and is read by "
                        f"{seen}, which does not use it as a mask or fill value (only "
                        "Where, Max/Min, Clip bounds, scatter max/min and Add/Sub before "
                        "Softmax do); fix the model's weights first")
                accepted.append(MaskConstant(value.name or "", _label(reader[0]),  # type: ignore[index]
                                             f"{_kind(arr)} {role}"))
    return accepted
