"""Folding an inference BatchNormalization into the Conv (or Gemm) before it.

y = γ (W x + b − μ) / √(σ² + ε) + β is a Conv with weights W·s and bias (b − μ)·s + β, where
s = γ / √(σ² + ε) per output channel. The dynamo exporter keeps BatchNormalization nodes;
folded, a CNN has fewer ops, its channel groups have fewer constants to slice, and every
Conv quantizes to one integer kernel. The arithmetic is done in float64, so the folded
model agrees with the original to float32 rounding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.core.rewire import take_over_output
from onnxprune.core.weights import const_array, new_initializer, set_const_array

__all__ = ["FoldBatchNormPass", "FoldBatchNormResult"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldBatchNormResult:
    folded: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {"folded": list(self.folded), "skipped": [list(s) for s in self.skipped]}


def _why_not(bn: ir.Node) -> str | None:
    x = bn.inputs[0]
    layer = x.producer() if x is not None else None
    if layer is None or layer.op_type != "Conv" or layer.domain not in ("", "ai.onnx"):
        return "its input is not a Conv"
    if x.is_graph_output() or len(x.uses()) != 1:  # type: ignore[union-attr]
        return "the Conv output is also read elsewhere"
    if any(o.uses() or o.is_graph_output() for o in bn.outputs[1:]):
        return "its training outputs are used"
    attr = bn.attributes.get("training_mode")
    if attr is not None and attr.as_int() != 0:
        return "it runs in training mode"
    if any(const_array(v) is None for v in bn.inputs[1:5]):
        return "its parameters are not constants"
    w = const_array(layer.inputs[1])
    if w is None or not np.issubdtype(w.dtype, np.floating):
        return "the Conv weight is not a float constant"
    if len(layer.inputs) > 2 and layer.inputs[2] is not None and const_array(
            layer.inputs[2]) is None:
        return "the Conv bias is not a constant"
    return None


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Folds every BatchNormalization that follows a Conv into that Conv."""

    def __init__(self) -> None:
        super().__init__()
        self.result = FoldBatchNormResult()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        folded: list[str] = []
        skipped: list[tuple[str, str]] = []
        for bn in list(graph):
            if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
                continue
            reason = _why_not(bn)
            if reason is not None:
                skipped.append((bn.name or "", reason))
                continue
            self._fold(graph, bn)
            folded.append(bn.name or "")
        self.result = FoldBatchNormResult(tuple(folded), tuple(skipped))
        logger.info("folded %d BatchNormalization nodes", len(folded))
        return ir.passes.PassResult(model, modified=bool(folded))

    @staticmethod
    def _fold(graph: ir.Graph, bn: ir.Node) -> None:
        conv = bn.inputs[0].producer()  # type: ignore[union-attr]
        assert conv is not None
        gamma, beta, mean, var = (const_array(v).astype(np.float64)  # type: ignore[union-attr]
                                  for v in bn.inputs[1:5])
        eps = bn.attributes["epsilon"].as_float() if "epsilon" in bn.attributes else 1e-5
        scale = gamma / np.sqrt(var + eps)
        w = const_array(conv.inputs[1])
        assert w is not None
        bias_in = conv.inputs[2] if len(conv.inputs) > 2 else None
        b = const_array(bias_in) if bias_in is not None else None
        b64 = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
        new_w = (w.astype(np.float64) * scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype)
        new_b = ((b64 - mean) * scale + beta).astype(w.dtype)
        weight = conv.inputs[1]
        assert weight is not None
        if len(weight.uses()) == 1 and not weight.is_graph_output():
            set_const_array(weight, new_w)
        else:
            conv.replace_input_with(1, new_initializer(graph, f"{weight.name}_bn", new_w))
        if bias_in is not None and len(bias_in.uses()) == 1 and not bias_in.is_graph_output():
            set_const_array(bias_in, new_b)
        else:
            fresh = new_initializer(graph, f"{conv.name or 'conv'}_bn_bias", new_b)
            if len(conv.inputs) > 2:
                conv.replace_input_with(2, fresh)
            else:
                conv.resize_inputs(3)
                conv.replace_input_with(2, fresh)
        out, y = conv.outputs[0], bn.outputs[0]
        # Copies, not y's objects: a clone of the model shares type objects with the original.
        shape = y.shape or out.shape
        out.shape = None if shape is None else shape.copy()
        out.type = out.type or (ir.TensorType(y.dtype) if y.dtype is not None else None)
        take_over_output(graph, y, out, "_bn_unused")
        ir.convenience.replace_all_uses_with(y, out)
        graph.remove(bn, safe=True)
