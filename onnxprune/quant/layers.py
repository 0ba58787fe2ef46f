"""Which nodes 8-bit quantization can touch, how, and why not the others.

One analysis shared by calibration (which tensors to capture), the QDQ pass (what to
rewrite) and the report (what stayed float and why). A layer is a MatMul/Gemm/Conv with a
constant float32 weight, or a Gather from a constant embedding table; everything else that
looked like a candidate is returned as a `Declined` with a reason a user can act on.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxprune.core.weights import const_array, is_constant
from onnxprune.errors import UnsupportedModelError

__all__ = [
    "QLayer",
    "Declined",
    "find_layers",
    "check_not_quantized",
    "QUANTIZED_OPS",
    "layer_name",
]

LayerKind = Literal["MatMul", "Gemm", "Conv", "Gather", "ActMatMul"]

# Ops whose presence means the model has already been quantized (any domain).
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
    "ConvInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits",
    "MatMulBnb4", "QGemm", "QAttention", "QEmbedLayerNormalization", "GatherBlockQuantized",
    "DynamicQuantizeLSTM", "QOrderedMatMul", "QOrderedAttention",
})


@dataclass(frozen=True)
class QLayer:
    """A node the QDQ pass can quantize.

    `weight_axis` is the weight's output-channel axis (one int8 scale per output channel);
    `activation` is the float input that gets a per-tensor QuantizeLinear (None for Gather);
    `bias_index` is the input that becomes int32 (Gemm C, Conv B) when activations are
    quantized; for "ActMatMul" both inputs are activations and there is no weight.
    """

    node: ir.Node
    kind: LayerKind
    activation: ir.Value | None
    weight: ir.Value | None
    weight_axis: int
    weight_index: int
    bias_index: int | None = None
    second_activation: ir.Value | None = None

    @property
    def name(self) -> str:
        return layer_name(self.node)

    def effective_weight(self) -> np.ndarray | None:
        """The [in, out] matrix of y = x @ w for MatMul/Gemm (None for Conv/Gather)."""
        if self.kind not in ("MatMul", "Gemm") or self.weight is None:
            return None
        w = const_array(self.weight)
        assert w is not None
        return np.ascontiguousarray(w.T) if self.weight_axis == 0 else w


@dataclass(frozen=True)
class Declined:
    node: str
    op_type: str
    reason: str


def layer_name(node: ir.Node) -> str:
    return node.name or f"{node.op_type}({', '.join(o.name or '?' for o in node.outputs)})"


def check_not_quantized(model: ir.Model) -> None:
    """Refuses a model that already holds quantization ops: quantizing twice compounds error."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type in QUANTIZED_OPS or node.op_type.startswith("QLinear"):
            raise UnsupportedModelError(
                f"node '{layer_name(node)}' ({node.op_type}) shows the model is already "
                "quantized; quantize the original float model instead"
            )


def _attr(node: ir.Node, name: str, default: float) -> float:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _float_weight(value: ir.Value | None) -> tuple[np.ndarray | None, str | None]:
    """(array, None) for a usable float32 constant, else (None, why not)."""
    arr = const_array(value)
    if arr is None:
        return None, "not constant"
    if arr.dtype in (np.float16,) or (value is not None and value.dtype == ir.DataType.BFLOAT16):
        return None, f"weight '{value.name if value else '?'}' is {arr.dtype}; only float32 " \
            "weights are quantized (convert the model to float32 first)"
    if arr.dtype != np.float32:
        return None, f"weight '{value.name if value else '?'}' is {arr.dtype}, not float32"
    return arr, None


def _classify(node: ir.Node, allow_act_matmul: bool) -> QLayer | Declined | None:
    op = node.op_type
    name = layer_name(node)
    if op == "MatMul":
        a, b = node.inputs[0], node.inputs[1]
        wb, why_b = _float_weight(b)
        if wb is not None:
            if wb.ndim != 2:
                return Declined(name, op, f"weight is {wb.ndim}-D; only 2-D weights are quantized")
            return QLayer(node, "MatMul", a, b, 1, 1)
        if why_b != "not constant":
            return Declined(name, op, why_b or "")
        if const_array(a) is not None:
            return Declined(name, op, "the constant is the left operand; not supported")
        if not allow_act_matmul:
            return Declined(
                name, op,
                "both inputs are activations (e.g. attention QK^T or attention x V); "
                "quantizing them wrecks attention, so they stay float by default",
            )
        return QLayer(node, "ActMatMul", a, None, -1, -1, second_activation=b)
    if op == "Gemm":
        wb, why = _float_weight(node.inputs[1])
        if wb is None:
            return Declined(name, op, why or "")
        if _attr(node, "transA", 0) != 0:
            return Declined(name, op, "transA=1 is not supported")
        if _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
            return Declined(name, op, "alpha/beta other than 1 are not supported")
        trans_b = _attr(node, "transB", 0) == 1
        n = wb.shape[0] if trans_b else wb.shape[1]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None:
            c = const_array(bias)
            if c is None or c.dtype != np.float32 or c.size not in (1, n) or c.ndim > 2:
                return Declined(
                    name, op, "bias C is not a constant float32 vector; onnxruntime cannot "
                    "fuse such a Gemm into an integer kernel"
                )
        return QLayer(node, "Gemm", node.inputs[0], node.inputs[1], 0 if trans_b else 1, 1,
                      2 if bias is not None else None)
    if op == "Conv":
        w, why = _float_weight(node.inputs[1])
        if w is None:
            return Declined(name, op, why or "")
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and const_array(bias) is None:
            return Declined(name, op, "bias is not constant")
        return QLayer(node, "Conv", node.inputs[0], node.inputs[1], 0, 1,
                      2 if bias is not None else None)
    if op == "Gather":
        table, why = _float_weight(node.inputs[0])
        if table is None:
            return None if why == "not constant" else Declined(name, op, why or "")
        if table.ndim != 2 or _attr(node, "axis", 0) != 0:
            return Declined(name, op, "only row lookups (axis 0) in a 2-D table are quantized")
        return QLayer(node, "Gather", None, node.inputs[0], 0, 0)
    return None


def find_layers(
    model: ir.Model,
    *,
    ops: Sequence[str] = ("MatMul", "Gemm", "Conv"),
    embeddings: bool = True,
    exclude: Sequence[str] = (),
    activation_matmuls: bool = False,
) -> tuple[list[QLayer], list[Declined]]:
    """Quantizable layers of the main graph, in graph order, and the declined candidates.

    `exclude` globs match the node name, its op type, the weight name or an output name.
    Nodes inside subgraphs (If/Loop bodies) are not touched.
    """
    wanted = set(ops) | ({"Gather"} if embeddings else set())
    layers: list[QLayer] = []
    declined: list[Declined] = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in wanted:
            continue
        names = [node.name or "", node.op_type, *(o.name or "" for o in node.outputs)]
        names += [v.name or "" for v in node.inputs if is_constant(v)]
        if any(fnmatch.fnmatchcase(n, pat) for n in names if n for pat in exclude):
            declined.append(Declined(layer_name(node), node.op_type, "matches --exclude"))
            continue
        found = _classify(node, activation_matmuls)
        if isinstance(found, QLayer):
            layers.append(found)
        elif found is not None:
            declined.append(found)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.graph is not model.graph and node.op_type in wanted:
            declined.append(Declined(layer_name(node), node.op_type,
                                     "inside a subgraph (If/Loop/Scan body); not supported"))
    return layers, declined
