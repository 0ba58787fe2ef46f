"""8-bit QDQ quantization of a float model, driven by calibration data.

The driver makes the decisions the QDQ pass only carries out:

1. find the quantizable layers (and say why the others are not);
2. stream the calibration batches once, collecting per activation tensor a histogram,
   per-channel extremes and a row sample (`calibration.ranges`);
3. per activation tensor, choose the range (the calibration method's, or a tighter clip
   that lowers its consumers' output error) and, where it clearly helps, a SmoothQuant
   vector that moves outlier channels into the weights (`calibration.qerror`);
4. keep in float the few layers whose measured output SQNR is worst (`max_float_layers`);
5. run `InsertQDQPass` with those choices and return a report that says, per layer,
   what was done and why.

Tensors holding infinities or mask constants never get a range: their layers stay float.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxprune.calibration.data import Batch
from onnxprune.conv.fold_batchnorm import FoldBatchNormPass
from onnxprune.core.pages import release_pages
from onnxprune.core.weights import constant_readers, constant_source
from onnxprune.errors import InputError, UnsupportedModelError
from onnxprune.quant.canonical_gelu import CanonicalGeluPass
from onnxprune.quant.config import AUTO_ALPHAS, QuantizeConfig
from onnxprune.quant.insert_qdq import (
    ActivationQuant,
    InsertQDQPass,
    QuantizedLayer,
)
from onnxprune.quant.layers import QLayer, check_not_quantized, find_layers, layer_name
from onnxprune.quant.ort_layout import for_onnxruntime, to_operator_format
from onnxprune.quant.qerror import (
    SMOOTH_GAIN,
    ActivationChoice,
    activation_qparams,
    choose_activation,
    dequantize_weight,
    method_range,
    quantize_weight,
    sqnr_db,
)
from onnxprune.quant.ranges import RangeCollector, collect_ranges
from onnxprune.quant.report import LayerReport, QuantizeReport

__all__ = ["quantize_model", "upgrade_opset", "MIN_QDQ_OPSET"]

logger = logging.getLogger(__name__)

MIN_QDQ_OPSET = 13


def upgrade_opset(model: ir.Model, target: int = MIN_QDQ_OPSET) -> int | None:
    """Converts a model below opset 13 (per-channel DequantizeLinear) with onnx's version
    converter, in place; returns the opset it had, or None when nothing changed.

    Per-tensor int8 weights would also run on opset 10-12, but lose accuracy on Conv
    filters of very different scales; the converter keeps the computation as it was.
    """
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if opset >= target:
        return None
    from onnx import version_converter

    proto = ir.serde.serialize_model(model)
    try:
        converted = version_converter.convert_version(proto, target)
    except Exception as e:  # noqa: BLE001 - the converter raises many kinds
        raise UnsupportedModelError(
            f"the model uses opset {opset}; int8 needs opset {target}+ and onnx's version "
            f"converter failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    new = ir.serde.deserialize_model(converted)
    # Weights kept in external data are still read from the model's folder, not the cwd.
    folders = {v.const_value.base_dir for v in model.graph.initializers.values()
               if isinstance(v.const_value, ir.ExternalTensor)}
    for folder in folders:
        ir.external_data.set_base_dir(new.graph, folder)
    model.graph = new.graph
    model.ir_version = max(model.ir_version, new.ir_version)
    logger.info("converted the model from opset %d to %d for per-channel int8", opset, target)
    return opset


@dataclass
class _Plan:
    choices: dict[str, ActivationChoice] = field(default_factory=dict)
    layer_sqnr: dict[str, float] = field(default_factory=dict)
    keep_float: dict[str, str] = field(default_factory=dict)
    float_tensors: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, ActivationQuant] = field(default_factory=dict)
    smooth_declined: dict[str, str] = field(default_factory=dict)  # tensor -> why not


def quantize_model(
    model: ir.Model, config: QuantizeConfig, batches: Iterable[Batch] | None
) -> QuantizeReport:
    """Quantizes `model` in place to 8-bit QDQ and reports what was done to each layer.

    Static activation quantization needs `batches` (arrays keyed by graph input name, any
    number, ragged shapes allowed; streamed once); weight-only mode can run without them,
    and with them also measures each layer's output SQNR.
    """
    start = time.perf_counter()
    check_not_quantized(model)
    if batches is None and not config.weight_only:
        raise InputError(
            "static activation quantization needs calibration data: pass --calibration DATA "
            "(a .npz file or a folder of them), or quantize weights only"
        )
    inputs = [v.name or "?" for v in model.graph.inputs]
    if config.token_mask is not None and config.token_mask not in inputs:
        raise InputError(
            f"token mask '{config.token_mask}' is not a graph input (inputs: {', '.join(inputs)})"
        )
    upgrade_opset(model)
    FoldBatchNormPass()(model)  # one integer Conv per Conv + BatchNormalization
    InsertQDQPass().requires(model)  # opset check before anything changes
    gelus: tuple[str, ...] = ()
    if config.canonicalize_gelu:
        gelu_pass = CanonicalGeluPass()
        gelu_pass(model)
        gelus = gelu_pass.result.rewritten
    layers, _ = find_layers(
        model, ops=config.ops, embeddings=config.quantize_embeddings, exclude=config.exclude,
        activation_matmuls=config.activation_matmuls,
    )
    for layer in layers:  # a NaN/Inf weight has no int8 scale
        w = layer.weight.const_value if layer.weight is not None else None
        if w is not None and np.issubdtype(w.dtype.numpy(), np.floating) and not np.all(
                np.isfinite(w.numpy())):
            raise InputError(f"weight '{layer.weight.name}' of node '{layer.node.name}' holds "
                             "NaN or Inf; it cannot be quantized (fix the model first)")
    release_pages(model)  # each stage below reads the weights again, one layer at a time
    plan = _Plan()
    count = 0
    if batches is not None:
        collectors, count = collect_ranges(
            model, _tensors_to_calibrate(layers, config.weight_only), batches,
            token_mask=config.token_mask, sample_rows=config.sample_rows, seed=config.seed,
            provider=config.provider,
        )
        _plan_activations(layers, collectors, config, plan)
        if _choose_float_layers(config, plan):
            _plan_activations(layers, collectors, config, plan)
        release_pages(model)
    qdq = InsertQDQPass(
        activations={
            name: ActivationQuant(c.scale, c.zero_point, c.smooth)
            for name, c in plan.choices.items()
        },
        outputs=plan.outputs, dtype=config.activation_dtype, weight_only=config.weight_only,
        ops=config.ops, embeddings=config.quantize_embeddings, exclude=config.exclude,
        keep_float=plan.keep_float, activation_matmuls=config.activation_matmuls,
        embedding_layout=config.embedding_layout,
    )
    qdq(model)
    if config.quant_format == "operator" and not config.weight_only:
        logger.info("operator format: %d MatMuls written as MatMulIntegerToFloat",
                    to_operator_format(model))
    for_onnxruntime(model)  # SkipLayerNormalization and the NaN guard are slow on its CPU
    reports = tuple(_layer_report(r, plan) for r in qdq.result.layers)
    if qdq.result.constant_bytes_after > qdq.result.constant_bytes_before:
        logger.warning(
            "the quantized constants take more bytes than the float ones (%d > %d); float "
            "weights kept beside their int8 copies: %s", qdq.result.constant_bytes_after,
            qdq.result.constant_bytes_before, ", ".join(qdq.result.float_weights_kept) or "none",
        )
    logger.info(
        "quantized %d layers, %d kept float, in %.1f s",
        sum(r.quantized for r in reports), sum(not r.quantized for r in reports),
        time.perf_counter() - start,
    )
    return QuantizeReport(
        config, reports, tuple(sorted(plan.float_tensors.items())), count,
        qdq.result.constant_bytes_before, qdq.result.constant_bytes_after,
        qdq.result.float_weights_kept, qdq.result.smoothing_folded, gelus,
        time.perf_counter() - start,
    )


def _tensors_to_calibrate(layers: Sequence[QLayer], weight_only: bool) -> dict[str, int]:
    """Activation name -> channel axis, for every layer input (and Conv output) to measure."""
    out: dict[str, int] = {}
    for layer in layers:
        axis = 1 if layer.kind == "Conv" else -1
        for value in (layer.activation, layer.second_activation):
            if value is not None and value.name:
                out.setdefault(value.name, axis)
        if layer.kind == "Conv" and not weight_only and layer.node.outputs[0].name:
            out.setdefault(layer.node.outputs[0].name, 1)
    return out


def _plan_activations(
    layers: Sequence[QLayer],
    collectors: dict[str, RangeCollector],
    config: QuantizeConfig,
    plan: _Plan,
) -> None:
    """Per activation tensor: a range (and smoothing) choice, or the reason it stays float.

    Called again after the float budget removed layers, so that a tensor's range is
    chosen for the layers that still read it.
    """
    plan.choices.clear()
    plan.smooth_declined.clear()
    by_tensor: dict[str, list[QLayer]] = {}
    for layer in layers:
        if layer.name in plan.keep_float:
            continue
        for value in (layer.activation, layer.second_activation):
            if value is not None and value.name:
                by_tensor.setdefault(value.name, []).append(layer)
    for name, consumers in by_tensor.items():
        collector = collectors[name]
        why = collector.bad or (None if collector.seen else "was never computed on the data")
        if why is not None and config.weight_only:
            continue  # activations stay float anyway; only the SQNR goes unmeasured
        if why is not None:
            plan.float_tensors[name] = why
            for layer in consumers:
                plan.keep_float[layer.name] = f"input '{name}' {why}"
            continue
        _choose_for(consumers, collector, config, plan, name)
    for layer in layers:
        out = layer.node.outputs[0].name or ""
        c = collectors.get(out)
        if layer.kind == "Conv" and c is not None and c.seen and c.bad is None:
            lo, hi = method_range(c, config.method, config.percentile, config.activation_dtype)
            plan.outputs[out] = ActivationQuant(
                *activation_qparams(lo, hi, config.activation_dtype)
            )


def _choose_for(
    consumers: list[QLayer],
    collector: RangeCollector,
    config: QuantizeConfig,
    plan: _Plan,
    name: str,
) -> None:
    """Chooses one tensor's quantization and records its dense consumers' output SQNR.

    Only MatMul/Gemm consumers have their output error measured (x @ w on the sampled rows);
    smoothing and clip search need every consumer to be one, since a Conv or an
    activation-by-activation MatMul cannot absorb the per-channel factor.
    """
    dense = [layer for layer in consumers if layer.kind in ("MatMul", "Gemm")]
    weights = [layer.effective_weight() for layer in dense]
    mats = [w for w in weights if w is not None]
    x = collector.sample
    if config.weight_only:
        for layer, w in zip(dense, mats, strict=True):
            q, s = quantize_weight(w, 1)
            plan.layer_sqnr[layer.name] = sqnr_db(x @ w, x @ dequantize_weight(q, s, 1))
        return
    only_dense = len(dense) == len(consumers)
    alphas = _alphas(config.smooth) if only_dense else ()
    shared = _shared_weight(consumers, name) if alphas else None
    if shared is not None:
        plan.smooth_declined[name] = shared
        alphas = ()
    choice = choose_activation(
        collector, mats, method=config.method, percentile=config.percentile,
        dtype=config.activation_dtype,
        smooth_alphas=alphas,
        # An alpha the user chose is used wherever it does not hurt; "auto" weighs the Mul.
        smooth_gain=SMOOTH_GAIN if config.smooth == "auto" else 1.0,
        search=config.search_clip and only_dense,
    )
    plan.choices[name] = choice
    for layer, sq in zip(dense, choice.layer_sqnr, strict=True):
        plan.layer_sqnr[layer.name] = sq


def _shared_weight(consumers: Sequence[QLayer], name: str) -> str | None:
    """Why tensor `name` cannot be smoothed because of a shared weight, or None.

    Smoothing multiplies each consumer's weight by the tensor's factor. A weight that
    another node reads too (a layer fed by another tensor, a layer kept float, the same
    table gathered as an embedding: an unrolled RNN, ALBERT, tied embeddings) would need a
    smoothed copy beside the original, one per factor: a file bigger than the float one.
    """
    nodes = {id(layer.node) for layer in consumers}
    for layer in consumers:
        source = constant_source(layer.weight)
        if source is None:
            continue
        other = next((n for n in constant_readers(source) if id(n) not in nodes), None)
        if other is not None or source.is_graph_output():
            by = f"node '{layer_name(other)}'" if other is not None else "a graph output"
            return (f"weight '{source.name}' of '{layer.name}' is also read by {by}, which "
                    f"does not read '{name}'; one SmoothQuant factor cannot serve both, and a "
                    "smoothed copy per reader would make the file bigger")
    return None


def _alphas(smooth: float | str | None) -> tuple[float, ...]:
    if smooth is None:
        return ()
    return AUTO_ALPHAS if smooth == "auto" else (float(smooth),)


def _choose_float_layers(config: QuantizeConfig, plan: _Plan) -> bool:
    """Keeps the worst layers (lowest output SQNR, under `min_sqnr_db`) float, within budget."""
    budget = config.max_float_layers
    if not budget:
        return False
    ranked = sorted(
        (sq, name) for name, sq in plan.layer_sqnr.items()
        if name not in plan.keep_float and sq < config.min_sqnr_db
    )
    for sq, name in ranked[:budget]:
        plan.keep_float[name] = (
            f"sensitive: output SQNR {sq:.1f} dB when quantized (< {config.min_sqnr_db:g} dB), "
            f"one of the {budget} worst kept float by max_float_layers"
        )
    return bool(ranked)


def _layer_report(r: QuantizedLayer, plan: _Plan) -> LayerReport:
    choice = plan.choices.get(r.activation or "") if r.activation else None
    sq = plan.layer_sqnr.get(r.node)
    return LayerReport(
        **vars(r),
        activation_range=(choice.lo, choice.hi) if choice else None,
        activation_scale=choice.scale if choice else None,
        activation_zero_point=choice.zero_point if choice else None,
        range_choice=choice.how if choice else None,
        smoothed=bool(choice is not None and choice.smooth is not None),
        smooth_declined=plan.smooth_declined.get(r.activation or "") if r.activation else None,
        activation_sqnr_db=choice.activation_sqnr if choice else None,
        layer_sqnr_db=sq if r.quantized or sq is not None else None,
    )
