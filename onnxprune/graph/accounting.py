"""Counting what a model costs: parameters, non-zeros, op counts, MatMul/Gemm FLOPs.

FLOPs are counted per row of the activation (per token for a transformer, per sample for
an MLP), because batch and sequence sizes are usually symbolic: 2 * in * out for every
MatMul/Gemm with a constant weight. That is the figure structured pruning changes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxprune.graph.weights import const_array, iter_nodes, weight_uses

__all__ = ["ModelStats", "model_stats"]


@dataclass(frozen=True)
class ModelStats:
    parameters: int
    nonzero_parameters: int
    weight_flops_per_row: int
    op_counts: dict[str, int] = field(default_factory=dict)
    file_bytes: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "parameters": self.parameters,
            "nonzero_parameters": self.nonzero_parameters,
            "weight_flops_per_row": self.weight_flops_per_row,
            "op_counts": dict(self.op_counts),
            "file_bytes": self.file_bytes,
        }


def _constants(graph: ir.Graph) -> list[ir.Value]:
    """Every constant tensor once: initializers and Constant node outputs, with subgraphs."""
    seen: dict[int, ir.Value] = {}
    graphs = [graph] + [
        a.as_graph()
        for n in iter_nodes(graph)
        for a in n.attributes.values()
        if a.type == ir.AttributeType.GRAPH
    ]
    for g in graphs:
        for v in g.initializers.values():
            if not v.is_graph_input():
                seen[id(v)] = v
    for n in iter_nodes(graph):
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and "value" in n.attributes:
            seen[id(n.outputs[0])] = n.outputs[0]
    return list(seen.values())


def model_stats(model: ir.Model, file_bytes: int | None = None) -> ModelStats:
    params = 0
    nonzero = 0
    for v in _constants(model.graph):
        arr = const_array(v)
        if arr is None or not np.issubdtype(arr.dtype, np.number):
            continue
        params += int(arr.size)
        nonzero += int(np.count_nonzero(arr))
    flops = 0
    for use in weight_uses(model.graph):
        shape = use.weight.shape
        if shape is not None and all(isinstance(d, int) for d in shape):
            flops += 2 * int(shape[0]) * int(shape[1])
    flops += _quantized_weight_flops(model.graph)
    ops = Counter(n.op_type for n in iter_nodes(model.graph))
    return ModelStats(params, nonzero, flops, dict(sorted(ops.items())), file_bytes)


def _quantized_weight_flops(graph: ir.Graph) -> int:
    """FLOPs of MatMul/Gemm whose weight is DequantizeLinear(constant): 8-bit layers count too."""
    total = 0
    for node in iter_nodes(graph):
        if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        producer = node.inputs[1].producer() if node.inputs[1] is not None else None
        if producer is None or producer.op_type != "DequantizeLinear":
            continue
        q = const_array(producer.inputs[0])
        if q is not None and q.ndim == 2:
            total += 2 * int(q.shape[0]) * int(q.shape[1])
    return total
