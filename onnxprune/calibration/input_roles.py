"""What an integer input is for, read from the graph: ids that index a table, or a mask.

Generated ids must stay inside the table they index: an id past the end of an embedding
table is either an onnxruntime error or (on CUDA) silent garbage, and a verdict on either
says nothing about the model. The bound is found by following the input through ops that
keep its values (Cast, Reshape, Unsqueeze, ...) to every Gather that reads a constant
table with it; the smallest table wins.
"""

from __future__ import annotations

import re

import onnx_ir as ir

__all__ = ["index_bounds", "is_mask_name"]

# Ops whose output holds the input's values, only moved or retyped.
_VALUE_KEEPING = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity",
                  "Expand", "Transpose", "Tile"}
_MASK_NAME = re.compile(r"(^|_)mask$|attention_mask|padding_mask", re.IGNORECASE)


def is_mask_name(name: str) -> bool:
    """attention_mask, input_mask, padding_mask, *_mask: 1 for a real token, 0 for padding."""
    return bool(_MASK_NAME.search(name))


def _table_rows(node: ir.Node) -> int | None:
    """Rows of the constant table a Gather reads on its gather axis (None: not constant)."""
    data = node.inputs[0] if node.inputs else None
    if data is None:
        return None
    tensor = data.const_value
    if tensor is None:
        producer = data.producer()
        if producer is None or producer.op_type != "Constant":
            return None
        attr = producer.attributes.get("value")
        tensor = attr.value if attr is not None else None
    if tensor is None or not tensor.shape:
        return None
    attr = node.attributes.get("axis")
    axis = int(attr.value) if attr is not None else 0
    dims = list(tensor.shape)
    if not -len(dims) <= axis < len(dims):
        return None
    rows = dims[axis]
    return int(rows) if isinstance(rows, int) else None


def _bound(value: ir.Value, depth: int = 0) -> int | None:
    best: int | None = None
    if depth > 8:
        return None
    for node, index in value.uses():
        found: int | None = None
        if node.op_type == "Gather" and index == 1:
            found = _table_rows(node)
        elif node.op_type in _VALUE_KEEPING and index == 0:
            for out in node.outputs:
                sub = _bound(out, depth + 1)
                if sub is not None:
                    found = sub if found is None else min(found, sub)
        if found is not None:
            best = found if best is None else min(best, found)
    return best


def index_bounds(model: ir.Model) -> dict[str, int]:
    """For each integer graph input that indexes a constant table: the table's row count."""
    out: dict[str, int] = {}
    for v in model.graph.inputs:
        if v.dtype is None or v.const_value is not None or not v.dtype.is_integer():
            continue
        bound = _bound(v)
        if bound is not None and bound > 0:
            out[v.name or ""] = bound
    return out
