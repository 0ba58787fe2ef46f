"""Counting what a model costs: parameters, non-zeros, op counts, MatMul/Gemm FLOPs.

FLOPs are counted per row of the activation (per token for a transformer, per sample for
an MLP), because batch and sequence sizes are usually symbolic: 2 * in * out for every
MatMul/Gemm with a constant weight. That is the figure structured pruning changes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxprune.core.weights import const_array, iter_nodes, weight_uses

__all__ = ["ModelStats", "model_stats", "inference_flops", "value_shapes", "run_flops",
           "fixed_input_shapes", "describe_shapes"]

# Counting FLOPs per run serializes the model for onnx's shape inference; above this many
# bytes of weights the count is skipped (the report says so) rather than copy them all.
RUN_FLOPS_MAX_BYTES = 512 << 20


@dataclass(frozen=True)
class ModelStats:
    parameters: int
    nonzero_parameters: int
    weight_flops_per_row: int
    op_counts: dict[str, int] = field(default_factory=dict)
    file_bytes: int | None = None
    # FLOPs of one run (Conv, ConvTranspose, MatMul/Gemm, LSTM) at the input shapes `run_shapes`
    run_flops: int | None = None
    run_shapes: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "run_flops": self.run_flops,
            "run_shapes": self.run_shapes,
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


def inference_flops(model: ir.Model, input_shapes: dict[str, list[int]],
                    ops: Collection[str] | None = None) -> int:
    """FLOPs (2 x multiply-adds) of one run with the given input shapes: Conv,
    ConvTranspose, MatMul (attention's activation products included), Gemm, and LSTM.

    Unlike `weight_flops_per_row`, this counts a CNN's convolutions, whose cost depends on
    the image size; shapes come from onnx shape inference on a copy with fixed inputs.
    `ops`: count only these op types.
    """
    inferred, shapes = _inferred(model, input_shapes)
    macs = 0
    for node in inferred.graph.node:
        if ops is not None and node.op_type not in ops:
            continue
        ins = list(node.input)
        out = shapes.get(node.output[0]) if node.output else None
        w = shapes.get(ins[1]) if len(ins) > 1 else None
        if out is None or w is None or not all(out) or not all(w):
            continue
        if node.op_type == "Conv":
            macs += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":
            x = shapes.get(ins[0])
            if x and all(x):
                macs += int(np.prod(x)) * int(np.prod(w[1:]))
        elif node.op_type == "Gemm" and len(w) == 2:
            macs += int(np.prod(out[:-1])) * w[0] * w[1]
        elif node.op_type == "MatMul":  # weights and activations alike (attention scores)
            macs += int(np.prod(out)) * (w[-2] if len(w) >= 2 else 1)
        elif node.op_type == "LSTM" and len(ins) > 2:
            x, r = shapes.get(ins[0]), shapes.get(ins[2])
            if x and r and all(x):
                macs += x[0] * x[1] * int(np.prod(w)) + x[0] * x[1] * int(np.prod(r))
    return 2 * macs


_FLOP_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM")


def _runtime_shapes(proto, input_shapes: dict[str, list[int]],  # noqa: ANN001
                    shapes: dict[str, list[int]]) -> None:
    """Fills the shapes of FLOP-counting nodes' tensors that onnx shape inference left
    unknown, from one onnxruntime run on zeros of the given input shapes.

    Shape inference stops at a Reshape whose target is computed at run time (ddddocr's CRNN:
    Shape -> Gather -> Concat -> Reshape before its LSTM and its classifier Gemm); without
    this, those ops counted no FLOPs at all, and pruning the Convs looked like it cut far
    more of the model than it does."""
    missing = []
    for node in proto.graph.node:
        if node.op_type not in _FLOP_OPS or not node.output:
            continue
        for name in (*node.input[:2], node.output[0]):
            dims = shapes.get(name)
            if name and (dims is None or not dims or not all(dims)) and name not in missing:
                missing.append(name)
    if not missing or any(i.name not in input_shapes for i in proto.graph.input
                          if i.name not in {t.name for t in proto.graph.initializer}):
        return
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    outputs = {o.name for o in probe.graph.output}
    for name in missing:
        if name not in outputs:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    feeds = {}
    for inp in probe.graph.input:
        if inp.name in input_shapes:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
            feeds[inp.name] = np.zeros(input_shapes[inp.name], dtype=dtype)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        values = sess.run(names, feeds)
    except Exception:  # noqa: BLE001 - a model ORT cannot run keeps its inferred shapes
        return
    for name, value in zip(names, values, strict=True):
        if name in missing:
            shapes[name] = list(np.shape(value))


def value_shapes(model: ir.Model, input_shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """Every tensor's shape for one run with the given input shapes (onnx shape inference;
    the inputs and outputs of Conv / MatMul / Gemm / LSTM it leaves unknown come from one
    onnxruntime run). Unknown dims are 0."""
    return _inferred(model, input_shapes)[1]


def _inferred(model: ir.Model, input_shapes: dict[str, list[int]]):  # noqa: ANN202
    import onnx

    proto = ir.serde.serialize_model(model)
    for inp in proto.graph.input:
        dims = input_shapes.get(inp.name)
        if dims is None:
            continue
        shape = inp.type.tensor_type.shape
        del shape.dim[:]
        for d in dims:
            shape.dim.add().dim_value = int(d)
    inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    shapes: dict[str, list[int]] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value for d in t.shape.dim]
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    for node in inferred.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            shapes[node.output[0]] = list(node.attribute[0].t.dims)
        if node.op_type in ("DequantizeLinear", "Identity") and node.input[0] in shapes:
            shapes.setdefault(node.output[0], shapes[node.input[0]])
    _runtime_shapes(inferred, input_shapes, shapes)
    return inferred, shapes


def run_flops(model: ir.Model, input_shapes: dict[str, list[int]]) -> int | None:
    """`inference_flops` at these input shapes, or None where it cannot be counted (shape
    inference fails, or the weights are over RUN_FLOPS_MAX_BYTES)."""
    weight_bytes = sum(int(v.const_value.nbytes) for v in _constants(model.graph)
                       if v.const_value is not None)
    if weight_bytes > RUN_FLOPS_MAX_BYTES:
        return None
    try:
        return inference_flops(model, input_shapes) or None
    except Exception:  # noqa: BLE001 - onnx shape inference refuses the graph: not counted
        return None


def fixed_input_shapes(model: ir.Model) -> dict[str, list[int]] | None:
    """The graph inputs' shapes when every dimension but the first (a batch, counted as 1) is
    fixed; else None."""
    shapes = {v.name: [d if isinstance(d, int) or i else 1 for i, d in enumerate(v.shape)]
              for v in model.graph.inputs if v.shape is not None and not v.is_initializer()}
    fixed = all(isinstance(d, int) for dims in shapes.values() for d in dims)
    return shapes if shapes and fixed else None


def describe_shapes(shapes: dict[str, list[int]]) -> str:
    """'input_ids 8x128, attention_mask 8x128': the shapes FLOPs per run were counted at."""
    return ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in shapes.items())
