"""What the channel fill knows of shapes and attributes, and how a rule declines.

Shapes come from the graph's annotations, or from onnx shape inference on a copy for values
the exporter left unannotated (the legacy exporter's intermediate tensors). They travel with
one analysis as a `Shapes` object that the fill hands to every rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune.channels.model import ShapeEdit
from onnxprune.core.weights import const_array

__all__ = ["Decline", "Coupler", "Shapes", "label", "int_attr", "ints_attr", "prod",
           "shape_hints"]


class Decline(Exception):
    pass


def label(node: ir.Node) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else node.op_type


def int_attr(node: ir.Node, name: str, default: int = 0) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def ints_attr(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else [int(v) for v in attr.as_ints()]


class Shapes:
    """The static shape of every value one analysis meets: annotated, constant, or hinted.

    `hints` are the shapes onnx shape inference found for values the model leaves
    unannotated (see shape_hints), by name.
    """

    def __init__(self, hints: dict[str, list[int | None]] | None = None) -> None:
        self.hints = hints or {}

    def dims(self, value: ir.Value) -> list[int | None] | None:
        if value.shape is None:
            arr = const_array(value)
            if arr is not None:
                return list(arr.shape)
            return self.hints.get(value.name or "")
        return [d if isinstance(d, int) else None for d in value.shape]

    def rank(self, value: ir.Value) -> int | None:
        dims = self.dims(value)
        return None if dims is None else len(dims)

    def dim(self, value: ir.Value, axis: int) -> int | None:
        """Size of `value` at negative `axis`: 1 when broadcast (too low rank), None unknown."""
        dims = self.dims(value)
        if dims is None:
            return None
        if len(dims) < -axis:
            return 1
        return dims[axis]


class Coupler(Protocol):
    """What an op rule may ask of the fill that called it (channels/fill.py: Fill)."""

    shapes: Shapes
    axes: dict[ir.Value, int]

    def length(self, value: ir.Value, axis: int) -> int | None: ...

    def couple(self, a: ir.Value, axis_a: int, b: ir.Value, axis_b: int,
               src: np.ndarray | None = None) -> None: ...

    def const_operand(self, node: ir.Node, idx: int, value: ir.Value, ref: ir.Value,
                      axis: int, *, absolute: bool = False) -> None: ...

    def edit(self, e: ShapeEdit) -> None: ...


def shape_hints(model: ir.Model) -> dict[str, list[int | None]]:
    """Shapes of the main graph's unannotated values, from onnx shape inference on a copy."""
    graph = model.graph
    if all(v.shape is not None for n in graph for v in n.outputs):
        return {}
    try:
        proto = ir.serde.serialize_model(model)
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - hints only; the analysis declines without them
        return {}
    hints: dict[str, list[int | None]] = {}
    for vi in inferred.graph.value_info:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            hints[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                              for d in t.shape.dim]
    return hints


def prod(dims: Sequence[int | None]) -> int | None:
    if any(d is None for d in dims):
        return None
    return int(math.prod(dims))  # type: ignore[arg-type]
