"""QuantizeLinear/DequantizeLinear insertion: int8 weights, 8-bit activations.

Weights become int8 initializers (symmetric, one scale per output channel) read through a
DequantizeLinear, and the float originals leave the file, so the model shrinks ~4x.
Activations get one per-tensor QuantizeLinear each, with the scale and zero point the
caller calibrated, and one DequantizeLinear per quantized consumer: the layout
onnxruntime's QDQ fusions turn into integer kernels (MatMul -> MatMulIntegerToFloat,
Gemm with an int32 bias -> QGemm, Conv with a quantized output -> QLinearConv) and that
TensorRT and NPU compilers consume.

A weight read by several layers (directly, or through Identity nodes as exporters
de-duplicate it) is stored once in int8, with one scale; each layer dequantizes that copy.
SmoothQuant multiplies a weight by its activation's factor, so a shared weight can take
a factor only when every reader divides by the same one; the pass refuses anything else
rather than write one smoothed copy per reader (a file bigger than the float one).

The pass only rewrites; it does not decide. Scales, SmoothQuant vectors and which layers
stay float come in from the caller (`onnxprune.quant.driver` makes those choices from
calibration data), so the pass is deterministic and usable in any PassManager.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from onnxprune.core.pages import release_pages
from onnxprune.core.passes import ReportingPass
from onnxprune.core.weights import const_array, constant_readers, constant_source
from onnxprune.errors import InputError, UnsupportedModelError
from onnxprune.quant.layers import QLayer, check_not_quantized, find_layers, layer_name
from onnxprune.quant.qdq_build import QdqBuilder, constant_bytes
from onnxprune.quant.qerror import ActDtype, dequantize_weight, quantize_weight, sqnr_db
from onnxprune.quant.scale_fold import fold_channel_scale

__all__ = [
    "EmbeddingLayout", "ActivationQuant", "QuantizedLayer", "QuantizeQDQResult", "InsertQDQPass",
]

logger = logging.getLogger(__name__)

EmbeddingLayout = Literal["gather-first", "dequantize-first"]
_NP = {"uint8": np.uint8, "int8": np.int8}
# (id of the float source constant, output-channel axis, smoothing factor's bytes or None)
_WeightKey = tuple[int, int, bytes | None]


def _smooth_key(smooth: np.ndarray | None) -> bytes | None:
    """Equal factors are one factor, whichever array object carries them."""
    return None if smooth is None else np.asarray(smooth, np.float32).tobytes()


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
    constant_bytes_before: int = 0  # initializers and Constant nodes
    constant_bytes_after: int = 0
    float_weights_kept: tuple[str, ...] = ()
    smoothing_folded: tuple[str, ...] = ()  # tensors whose SmoothQuant division cost nothing

    def to_dict(self) -> dict[str, object]:
        return {
            "smoothing_folded": list(self.smoothing_folded),
            "layers": [layer.to_dict() for layer in self.layers],
            "constant_bytes_before": self.constant_bytes_before,
            "constant_bytes_after": self.constant_bytes_after,
            "float_weights_kept": list(self.float_weights_kept),
        }


class InsertQDQPass(ReportingPass):
    """Inserts QDQ around MatMul/Gemm/Conv inputs and int8 embedding tables.

    `activations` maps an activation tensor name to its quantization; a layer whose
    activation is missing there stays float (unless `weight_only`). `outputs` does the same
    for Conv outputs (QLinearConv needs a quantized output). `keep_float` maps layer names
    to the reason they must stay float (e.g. measured sensitivity).

    Without ranges only weight-only layers and embedding tables are quantized.
    QuantizeQDQPass (quant/qdq_pass.py) is this pass driven by calibration data.
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
        embedding_layout: EmbeddingLayout = "gather-first",
    ) -> None:
        super().__init__()
        if embedding_layout not in ("gather-first", "dequantize-first"):
            raise InputError(
                f"embedding layout must be gather-first or dequantize-first, got "
                f"'{embedding_layout}'"
            )
        self.embedding_layout = embedding_layout
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
        self._b = QdqBuilder(graph)
        self._int8: dict[_WeightKey, tuple[tuple[ir.Value, ir.Value, ir.Value], np.ndarray,
                                           float]] = {}
        self._row_scales: dict[_WeightKey, ir.Value] = {}
        self._act_q: dict[int, ir.Value] = {}
        before = constant_bytes(graph)
        order = {layer_name(node): i for i, node in enumerate(graph)}
        layers, declined = find_layers(
            model, ops=self.ops, embeddings=self.embeddings, exclude=self.exclude,
            activation_matmuls=self.activation_matmuls,
        )
        done = [QuantizedLayer(d.node, d.op_type, False, d.reason) for d in declined]
        todo: list[QLayer] = []
        for layer in layers:
            reason = self.keep_float.get(layer.name)
            if reason is None and not self.weight_only and layer.kind != "Gather":
                missing = [v for v in (layer.activation, layer.second_activation)
                           if v is not None and v.name not in self.activations]
                if missing:
                    reason = f"activation '{missing[0].name}' has no calibrated range"
            if reason is None:
                todo.append(layer)
            else:
                done.append(QuantizedLayer(layer.name, layer.node.op_type, False, reason,
                                           layer.weight.name if layer.weight else None))
        self._check_shared_smoothing(todo)
        self._folded = self._fold_smoothing(todo)
        # Embedding lookups go last: gathering int8 first moves the lookup's consumers
        # (Quantize nodes inserted for other layers included) onto the dequantized rows.
        for layer in sorted(todo, key=lambda layer: layer.kind == "Gather"):
            done.append(self._quantize(layer))
            release_pages(model)  # a big model's float weights are read one at a time
        sources = {id(s): s for layer in todo if (s := constant_source(layer.weight)) is not None}
        modified = bool(todo) or bool(self._folded)
        if modified:
            ir.passes.common.RemoveUnusedNodesPass()(model)  # drops the float weights too
        kept = tuple(sorted({s.name or "?" for s in sources.values()
                             if s.uses() or s.is_graph_output()}))
        done.sort(key=lambda r: order.get(r.node, len(order)))  # graph order
        self.result = QuantizeQDQResult(tuple(done), before, constant_bytes(graph), kept,
                                        tuple(self._folded))
        return ir.passes.PassResult(model, modified=modified)

    def _smooth_of(self, layer: QLayer) -> np.ndarray | None:
        """The SmoothQuant factor this layer's weight is multiplied by (None: none)."""
        if self.weight_only or layer.kind == "Gather" or layer.activation is None:
            return None
        return self.activations[layer.activation.name or ""].smooth

    def _check_shared_smoothing(self, todo: list[QLayer]) -> None:
        """Refuses smoothing that would need one copy of a shared weight per reader."""
        by_source: dict[int, list[QLayer]] = {}
        for layer in todo:
            source = constant_source(layer.weight)
            if source is not None:
                by_source.setdefault(id(source), []).append(layer)
        for layers in by_source.values():
            keys = {_smooth_key(self._smooth_of(layer)) for layer in layers}
            smoothed = [layer for layer in layers if self._smooth_of(layer) is not None]
            if not smoothed:
                continue
            source = constant_source(layers[0].weight)
            assert source is not None
            others = [n for n in constant_readers(source)
                      if all(n is not layer.node for layer in layers)]
            if len(keys) > 1 or others or source.is_graph_output():
                act = smoothed[0].activation
                other = next((layer_name(n) for n in others), None) or next(
                    (layer.name for layer in layers if _smooth_key(self._smooth_of(layer))
                     != _smooth_key(self._smooth_of(smoothed[0]))), "a graph output")
                raise InputError(
                    f"weight '{source.name}' is read by '{smoothed[0].name}', whose input "
                    f"'{act.name if act else '?'}' has a SmoothQuant factor, and by '{other}', "
                    "which does not divide by the same one; smoothing it would store one copy "
                    "of the weight per reader: give that activation smooth=None"
                )

    def _fold_smoothing(self, todo: list[QLayer]) -> list[str]:
        """Folds each smoothing division into the tensor's producers where that is exact.

        Done before any weight is quantized, because the fold may rescale the output columns
        of the layer that produces the tensor. Only tensors read by quantized layers alone
        qualify: any other reader would see the rescaled values.
        """
        readers: dict[str, set[ir.Node]] = {}
        values: dict[str, ir.Value] = {}
        for layer in todo:
            for v in (layer.activation, layer.second_activation):
                if v is not None and v.name and not self.weight_only and layer.kind != "Gather":
                    readers.setdefault(v.name, set()).add(layer.node)
                    values[v.name] = v
        folded = []
        for name, value in values.items():
            smooth = self.activations[name].smooth
            if smooth is None or not all(user in readers[name] for user, _ in value.uses()):
                continue
            inv = (1.0 / smooth).astype(np.float32)
            if fold_channel_scale(value, inv, self._b.const):
                folded.append(name)
        return folded

    def _stored(self, layer: QLayer, smooth: np.ndarray | None) -> (
        tuple[_WeightKey, tuple[ir.Value, ir.Value, ir.Value], np.ndarray, float]
    ):
        """The layer's weight in int8 (values, scales, zero points), made once per float
        weight, output-channel axis and smoothing: layers sharing a weight share it.

        The weight is read from the node as it is now: smoothing may have been folded into
        it (the layer's output columns rescaled) after the layer was found.
        """
        assert layer.weight is not None
        current = layer.node.inputs[layer.weight_index]
        source = constant_source(current)
        assert current is not None and source is not None
        key = (id(source), layer.weight_axis, _smooth_key(smooth))
        if key not in self._int8:
            w = const_array(source)
            assert w is not None
            if smooth is not None:
                shape = [1] * w.ndim
                shape[1 if layer.weight_axis == 0 else 0] = -1  # the input-channel axis
                w = w * smooth.reshape(shape)
            q, scale = quantize_weight(w, layer.weight_axis)
            wsqnr = sqnr_db(w, dequantize_weight(q, scale, layer.weight_axis))
            stored = self._b.int8_const(source.name or "weight", q, scale)
            self._int8[key] = (stored, scale, wsqnr)
        stored, scale, wsqnr = self._int8[key]
        return key, stored, scale, wsqnr

    def _weight(self, layer: QLayer, smooth: np.ndarray | None) -> (
        tuple[ir.Value, np.ndarray, float]
    ):
        """A DequantizeLinear of the layer's stored int8 weight, for this layer alone."""
        _, stored, scale, wsqnr = self._stored(layer, smooth)
        base = stored[0].name or "weight"
        base = base[: -len("_quantized")] if base.endswith("_quantized") else base
        dq = self._b.dequantize_const(base, stored, layer.weight_axis, layer.node)
        return dq, scale, wsqnr

    def _quantized_activation(self, value: ir.Value, consumer: ir.Node) -> ir.Value:
        """A fresh DequantizeLinear output for `consumer`, after the tensor's one Quantize."""
        if id(value) not in self._act_q:
            aq = self.activations[value.name or ""]
            pre = []
            if aq.smooth is not None and value.name not in self._folded:
                pre.append(self._b.smooth(value, (1.0 / aq.smooth).astype(np.float32)))
            src = pre[0].outputs[0] if pre else value
            zp = np.array(aq.zero_point, _NP[self.dtype])
            self._act_q[id(value)] = self._b.quantize(value, src, aq.scale, zp, pre)
        return self._b.dequantize(self._act_q[id(value)], value, consumer)

    def _quantize(self, layer: QLayer) -> QuantizedLayer:
        node = layer.node
        quant_act = not self.weight_only and layer.kind != "Gather"
        act = layer.activation
        smooth = None
        if quant_act and act is not None:
            smooth = self.activations[act.name or ""].smooth
        summary = wsqnr = None
        if layer.kind == "Gather" and self.embedding_layout == "gather-first":
            key, stored, scale, wsqnr = self._stored(layer, None)
            base = constant_source(layer.weight).name or "table"  # type: ignore[union-attr]
            if key not in self._row_scales:
                self._row_scales[key] = self._b.const(f"{base}_row_scale", scale.reshape(-1, 1))
            self._b.gather_first(node, base, stored[0], self._row_scales[key])
            summary = (float(scale.min()), float(np.median(scale)), float(scale.max()))
        elif layer.weight is not None:
            wq, scale, wsqnr = self._weight(layer, smooth)
            node.replace_input_with(layer.weight_index, wq)
            summary = (float(scale.min()), float(np.median(scale)), float(scale.max()))
        fused = False
        if quant_act:
            assert act is not None
            for index, value in enumerate(node.inputs[:2]):
                if value is not None and value in (act, layer.second_activation):
                    node.replace_input_with(index, self._quantized_activation(value, node))
            if layer.bias_index is not None and summary is not None:
                self._int32_bias(layer, self.activations[act.name or ""].scale)
            fused = layer.kind in ("MatMul", "ActMatMul", "Gemm")
            if layer.kind == "Conv":
                aq = self.outputs.get(node.outputs[0].name or "")
                fused = aq is not None and self._b.qdq_after(
                    node, aq.scale, np.array(aq.zero_point, _NP[self.dtype])
                )
        return QuantizedLayer(
            layer.name, node.op_type, True, "" if fused or not quant_act else
            "quantized, but onnxruntime will run it in float (output not calibrated)",
            layer.weight.name if layer.weight is not None else None, summary, wsqnr,
            act.name if act is not None and quant_act else None, fused,
        )

    def _int32_bias(self, layer: QLayer, act_scale: float) -> None:
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
            logger.warning("bias of %s overflows int32 at scale s_x * s_w; it is clipped",
                           layer.name)
        q = np.clip(q, -(2**31 - 1), 2**31 - 1).astype(np.int32)
        base = bias.name if bias is not None and bias.name else f"{layer.name}_bias"
        dq = self._b.dequantized_const(base, q, scale, 0, node)
        node.replace_input_with(layer.bias_index, dq)
