"""QuantizeLinear/DequantizeLinear insertion: int8 weights, 8-bit activations.

Weights become int8 initializers (symmetric, one scale per output channel) read through a
DequantizeLinear, and the float originals leave the file, so the model shrinks ~4x.
Activations get one per-tensor QuantizeLinear each, with the scale and zero point the
caller calibrated, and one DequantizeLinear per quantized consumer: the layout
onnxruntime's QDQ fusions turn into integer kernels (MatMul -> MatMulIntegerToFloat,
Gemm with an int32 bias -> QGemm, Conv with a quantized output -> QLinearConv) and that
TensorRT and NPU compilers consume.

The pass only rewrites; it does not decide. Scales, SmoothQuant vectors and which layers
stay float come in from the caller (`onnxprune.quantize` makes those choices from
calibration data), so the pass is deterministic and usable in any PassManager.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from onnxprune.calibration.qerror import ActDtype, dequantize_weight, quantize_weight, sqnr_db
from onnxprune.errors import InputError, UnsupportedModelError
from onnxprune.graph.qlayers import Declined, QLayer, check_not_quantized, find_layers
from onnxprune.graph.weights import const_array

__all__ = ["ActivationQuant", "QuantizedLayer", "QuantizeQDQResult", "QuantizeQDQPass"]

logger = logging.getLogger(__name__)

_NP = {"uint8": np.uint8, "int8": np.int8}
_IR = {"uint8": ir.DataType.UINT8, "int8": ir.DataType.INT8}


@dataclass(frozen=True)
class ActivationQuant:
    """Per-tensor quantization of one activation; `smooth` divides it per channel first."""

    scale: float
    zero_point: int
    smooth: np.ndarray | None = None


@dataclass(frozen=True)
class QuantizedLayer:
    """What happened to one candidate layer."""

    node: str
    op_type: str
    quantized: bool
    reason: str = ""
    weight: str | None = None
    weight_scale: tuple[float, float, float] | None = None  # min, median, max
    weight_sqnr_db: float | None = None
    activation: str | None = None
    integer_kernel: bool = False  # laid out so onnxruntime can fuse it

    def to_dict(self) -> dict[str, object]:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class QuantizeQDQResult:
    layers: tuple[QuantizedLayer, ...] = ()
    float_bytes_removed: int = 0
    int8_bytes_added: int = 0
    float_weights_kept: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "float_bytes_removed": self.float_bytes_removed,
            "int8_bytes_added": self.int8_bytes_added,
            "float_weights_kept": list(self.float_weights_kept),
        }


@dataclass
class _Names:
    taken: set[str] = field(default_factory=set)

    def __call__(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name


class QuantizeQDQPass(ir.passes.InPlacePass):
    """Inserts QDQ around MatMul/Gemm/Conv inputs and int8 embedding tables.

    `activations` maps an activation tensor name to its quantization; a layer whose
    activation is missing there stays float (unless `weight_only`). `outputs` does the same
    for Conv outputs (QLinearConv needs a quantized output). `keep_float` maps layer names
    to the reason they must stay float (e.g. measured sensitivity).
    """

    def __init__(
        self,
        *,
        activations: Mapping[str, ActivationQuant] | None = None,
        outputs: Mapping[str, ActivationQuant] | None = None,
        dtype: ActDtype = "uint8",
        weight_only: bool = False,
        ops: tuple[str, ...] = ("MatMul", "Gemm", "Conv"),
        embeddings: bool = True,
        exclude: tuple[str, ...] = (),
        keep_float: Mapping[str, str] | None = None,
        activation_matmuls: bool = False,
    ) -> None:
        super().__init__()
        if dtype not in _NP:
            raise InputError(f"activation dtype must be uint8 or int8, got '{dtype}'")
        unknown = sorted(set(ops) - {"MatMul", "Gemm", "Conv"})
        if unknown:
            raise InputError(f"cannot quantize op '{unknown[0]}'; choose from MatMul, Gemm, Conv")
        self.activations = dict(activations or {})
        self.outputs = dict(outputs or {})
        self.dtype: ActDtype = dtype
        self.weight_only = weight_only
        self.ops = ops
        self.embeddings = embeddings
        self.exclude = exclude
        self.keep_float = dict(keep_float or {})
        self.activation_matmuls = activation_matmuls
        self.result = QuantizeQDQResult()

    def requires(self, model: ir.Model) -> None:
        check_not_quantized(model)
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if opset < 13:
            raise UnsupportedModelError(
                f"the model uses opset {opset}; per-channel DequantizeLinear needs opset 13+ "
                "(convert it with onnx.version_converter.convert_version(model, 13))"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self._names = _Names({v.name for n in graph for v in n.outputs if v.name})
        self._names.taken |= set(graph.initializers) | {v.name for v in graph.inputs if v.name}
        self._weights: dict[tuple[int, int], ir.Value] = {}
        self._act_q: dict[int, ir.Value] = {}
        self._removed = self._added = 0
        layers, declined = find_layers(
            model, ops=self.ops, embeddings=self.embeddings, exclude=self.exclude,
            activation_matmuls=self.activation_matmuls,
        )
        done = [_declined(d) for d in declined]
        touched: dict[int, ir.Value] = {}
        for layer in layers:
            reason = self.keep_float.get(layer.name)
            if reason is None and not self.weight_only and layer.kind != "Gather":
                missing = [v for v in (layer.activation, layer.second_activation)
                           if v is not None and v.name not in self.activations]
                if missing:
                    reason = f"activation '{missing[0].name}' has no calibrated range"
            if reason is not None:
                done.append(QuantizedLayer(layer.name, layer.node.op_type, False, reason,
                                           layer.weight.name if layer.weight else None))
                continue
            done.append(self._quantize(graph, layer))
            if layer.weight is not None:
                touched[id(layer.weight)] = layer.weight
        kept = self._drop_float_weights(graph, touched.values())
        self.result = QuantizeQDQResult(tuple(done), self._removed, self._added, kept)
        modified = any(layer.quantized for layer in done)
        if modified:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)

    # ------------------------------------------------------------------ constants

    def _const(self, graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
        name = self._names(base)
        value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
        value.shape = ir.Shape(array.shape)
        value.dtype = value.const_value.dtype  # type: ignore[union-attr]
        graph.register_initializer(value)
        return value

    # ------------------------------------------------------------------ weights

    def _weight(self, graph: ir.Graph, layer: QLayer, smooth: np.ndarray | None) -> (
        tuple[ir.Value, np.ndarray, float]
    ):
        """The dequantized weight value (shared by layers with the same weight and smoothing)."""
        assert layer.weight is not None
        key = (id(layer.weight), id(smooth) if smooth is not None else 0)
        w = const_array(layer.weight)
        assert w is not None
        if smooth is not None:
            in_axis = 1 if layer.weight_axis == 0 else 0
            shape = [1] * w.ndim
            shape[in_axis] = -1
            w = w * smooth.reshape(shape)
        q, scale = quantize_weight(w, layer.weight_axis)
        if key in self._weights:
            return self._weights[key], scale, sqnr_db(w, dequantize_weight(q, scale,
                                                                          layer.weight_axis))
        base = layer.weight.name or "weight"
        qv = self._const(graph, f"{base}_quantized", q)
        sv = self._const(graph, f"{base}_scale", scale)
        zv = self._const(graph, f"{base}_zero_point", np.zeros(scale.shape, np.int8))
        self._added += q.nbytes + scale.nbytes + scale.size
        node = ir.node("DequantizeLinear", [qv, sv, zv], {"axis": layer.weight_axis},
                       name=self._names(f"{base}_DequantizeLinear"))
        out = node.outputs[0]
        out.name = self._names(f"{base}_dequantized")
        out.dtype, out.shape = ir.DataType.FLOAT, ir.Shape(q.shape)
        graph.insert_before(layer.node, node)
        self._weights[key] = out
        return out, scale, sqnr_db(w, dequantize_weight(q, scale, layer.weight_axis))

    def _drop_float_weights(self, graph: ir.Graph, weights: object) -> tuple[str, ...]:
        kept = []
        for value in weights:  # type: ignore[attr-defined]
            if value.uses():
                kept.append(value.name or "?")
                continue
            arr = const_array(value)
            self._removed += 0 if arr is None else arr.nbytes
            if value.is_initializer() and not value.is_graph_output():
                graph.initializers.pop(value.name)
        return tuple(kept)

    # ------------------------------------------------------------------ activations

    def _quantized_activation(self, graph: ir.Graph, value: ir.Value, consumer: ir.Node) -> (
        ir.Value
    ):
        """A fresh DequantizeLinear output for `consumer`, after the tensor's one Quantize."""
        aq = self.activations[value.name or ""]
        if id(value) not in self._act_q:
            base = value.name or "activation"
            nodes = []
            src = value
            if aq.smooth is not None:
                inv = self._const(graph, f"{base}_smooth_inv", (1.0 / aq.smooth).astype(np.float32))
                mul = ir.node("Mul", [value, inv], name=self._names(f"{base}_Smooth"))
                src = mul.outputs[0]
                src.name, src.dtype, src.shape = self._names(f"{base}_smoothed"), value.dtype, \
                    value.shape
                nodes.append(mul)
            scale = self._const(graph, f"{base}_scale", np.array(aq.scale, np.float32))
            zp = self._const(graph, f"{base}_zero_point", np.array(aq.zero_point,
                                                                  _NP[self.dtype]))
            q = ir.node("QuantizeLinear", [src, scale, zp],
                        name=self._names(f"{base}_QuantizeLinear"))
            q.outputs[0].name = self._names(f"{base}_quantized")
            q.outputs[0].dtype, q.outputs[0].shape = _IR[self.dtype], value.shape
            nodes.append(q)
            producer = value.producer()
            if producer is not None:
                graph.insert_after(producer, nodes)
            else:
                graph.insert_before(graph.node(0), nodes)
            self._act_q[id(value)] = q.outputs[0]
        qv = self._act_q[id(value)]
        q_node = qv.producer()
        assert q_node is not None
        dq = ir.node("DequantizeLinear", [qv, q_node.inputs[1], q_node.inputs[2]],
                     name=self._names(f"{value.name}_DequantizeLinear"))
        dq.outputs[0].name = self._names(f"{value.name}_dequantized")
        dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, value.shape
        graph.insert_before(consumer, dq)
        return dq.outputs[0]

    def _quantize_output(self, graph: ir.Graph, node: ir.Node) -> bool:
        out = node.outputs[0]
        aq = self.outputs.get(out.name or "")
        if aq is None or out.is_graph_output():
            return False
        base = out.name or "output"
        scale = self._const(graph, f"{base}_scale", np.array(aq.scale, np.float32))
        zp = self._const(graph, f"{base}_zero_point", np.array(aq.zero_point, _NP[self.dtype]))
        q = ir.node("QuantizeLinear", [out, scale, zp], name=self._names(f"{base}_QuantizeLinear"))
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zp],
                     name=self._names(f"{base}_DequantizeLinear"))
        q.outputs[0].name = self._names(f"{base}_quantized")
        dq.outputs[0].name = self._names(f"{base}_dequantized")
        q.outputs[0].dtype, dq.outputs[0].dtype = _IR[self.dtype], ir.DataType.FLOAT
        q.outputs[0].shape = dq.outputs[0].shape = out.shape
        # Rewire the consumers first, so the new Quantize is not rewired onto itself.
        for user, index in list(out.uses()):
            user.replace_input_with(index, dq.outputs[0])
        graph.insert_after(node, [q, dq])
        return True

    # ------------------------------------------------------------------ one layer

    def _quantize(self, graph: ir.Graph, layer: QLayer) -> QuantizedLayer:
        node = layer.node
        quant_act = not self.weight_only and layer.kind != "Gather"
        act = layer.activation
        smooth = None
        if quant_act and act is not None:
            smooth = self.activations[act.name or ""].smooth
        summary = wsqnr = None
        if layer.weight is not None:
            wq, scale, wsqnr = self._weight(graph, layer, smooth)
            node.replace_input_with(layer.weight_index, wq)
            summary = (float(scale.min()), float(np.median(scale)), float(scale.max()))
        fused = False
        if quant_act:
            for index, value in enumerate(node.inputs[:2]):
                if value is not None and value in (act, layer.second_activation):
                    node.replace_input_with(index, self._quantized_activation(graph, value, node))
            assert act is not None
            fused = layer.kind in ("MatMul", "ActMatMul")
            if layer.bias_index is not None and summary is not None:
                self._int32_bias(graph, layer, self.activations[act.name or ""].scale)
            if layer.kind == "Gemm":
                fused = True
            if layer.kind == "Conv":
                fused = self._quantize_output(graph, node)
        return QuantizedLayer(
            layer.name, node.op_type, True, "" if fused or not quant_act else
            "quantized, but onnxruntime will run it in float (output not calibrated)",
            layer.weight.name if layer.weight is not None else None, summary, wsqnr,
            act.name if act is not None and quant_act else None, fused,
        )

    def _int32_bias(self, graph: ir.Graph, layer: QLayer, act_scale: float) -> None:
        """Bias as int32 with scale s_x * s_w[c]: the form QGemm/QLinearConv require."""
        node = layer.node
        assert layer.bias_index is not None
        bias = node.inputs[layer.bias_index]
        b = const_array(bias)
        wdq = node.inputs[layer.weight_index]
        assert b is not None and wdq is not None and wdq.producer() is not None
        w_scale = const_array(wdq.producer().inputs[1])  # type: ignore[union-attr]
        assert w_scale is not None
        b = np.broadcast_to(b.reshape(-1), w_scale.shape).astype(np.float64)
        scale = (act_scale * w_scale.astype(np.float64)).astype(np.float32)
        q = np.round(b / scale.astype(np.float64))
        if np.any(np.abs(q) >= 2**31 - 1):
            logger.warning("bias of %s overflows int32; it is clipped", layer.name)
        q = np.clip(q, -(2**31 - 1), 2**31 - 1).astype(np.int32)
        base = bias.name if bias is not None and bias.name else f"{layer.name}_bias"
        qv = self._const(graph, f"{base}_quantized", q)
        sv = self._const(graph, f"{base}_scale", scale)
        zv = self._const(graph, f"{base}_zero_point", np.zeros(q.shape, np.int32))
        dq = ir.node("DequantizeLinear", [qv, sv, zv], {"axis": 0},
                     name=self._names(f"{base}_DequantizeLinear"))
        dq.outputs[0].name = self._names(f"{base}_dequantized")
        dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(q.shape)
        graph.insert_before(node, dq)
        node.replace_input_with(layer.bias_index, dq.outputs[0])
        if bias is not None and not bias.uses() and bias.is_initializer():
            graph.initializers.pop(bias.name)


def _declined(d: Declined) -> QuantizedLayer:
    return QuantizedLayer(d.node, d.op_type, False, d.reason)
