"""8-bit QDQ quantization of a float model, driven by calibration data.

The driver makes the decisions the QDQ pass only carries out:

1. find the quantizable layers (and say why the others are not);
2. stream the calibration batches once, collecting per activation tensor a histogram,
   per-channel extremes and a row sample (`calibration.ranges`);
3. per activation tensor, choose the range (the calibration method's, or a tighter clip
   that lowers its consumers' output error) and, where it clearly helps, a SmoothQuant
   vector that moves outlier channels into the weights (`calibration.qerror`);
4. keep in float the few layers whose measured output SQNR is worst (`max_float_layers`);
5. run `QuantizeQDQPass` with those choices and return a report that says, per layer,
   what was done and why.

Tensors holding infinities or mask constants never get a range: their layers stay float.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx_ir as ir

from onnxprune.calibration.data import Batch
from onnxprune.calibration.qerror import (
    ActDtype,
    ActivationChoice,
    Method,
    activation_qparams,
    choose_activation,
    combine_sqnr,
    dequantize_weight,
    method_range,
    quantize_weight,
    sqnr_db,
)
from onnxprune.calibration.ranges import RangeCollector, collect_ranges
from onnxprune.errors import InputError
from onnxprune.graph.qlayers import QLayer, check_not_quantized, find_layers
from onnxprune.passes.quantize_qdq import ActivationQuant, QuantizeQDQPass

__all__ = ["QuantizeConfig", "LayerReport", "QuantizeReport", "quantize_model"]

logger = logging.getLogger(__name__)

_OPS = ("MatMul", "Gemm", "Conv")


@dataclass(frozen=True)
class QuantizeConfig:
    """Options of `quantize_model`; every field has a default that works on transformers.

    method: how an activation range is read from calibration (minmax, percentile of the
        values at `percentile`, or entropy: TensorRT's KL threshold).
    search_clip: also try tighter clipping ranges and keep whichever gives the lowest output
        error of the layers reading the tensor (measured on sampled calibration rows).
    smooth: SmoothQuant migration strength alpha in [0, 1] (None: off); applied per tensor
        only where it lowers the consumers' output error.
    max_float_layers: at most this many layers are kept float for their measured output
        SQNR (worst first, and only those below `min_sqnr_db`); None means no such budget.
    token_mask: graph input (e.g. attention_mask) whose zeros mark padding rows that must
        not shape the statistics.
    """

    method: Method = "percentile"
    percentile: float = 99.99
    activation_dtype: ActDtype = "uint8"
    weight_only: bool = False
    ops: tuple[str, ...] = _OPS
    exclude: tuple[str, ...] = ()
    max_float_layers: int | None = None
    min_sqnr_db: float = 25.0
    smooth: float | None = 0.5
    search_clip: bool = True
    quantize_embeddings: bool = True
    activation_matmuls: bool = False
    token_mask: str | None = None
    sample_rows: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("minmax", "percentile", "entropy"):
            raise InputError(
                f"calibration method '{self.method}' is unknown; use minmax, percentile or entropy"
            )
        if self.activation_dtype not in ("uint8", "int8"):
            raise InputError(f"activation dtype must be uint8 or int8, got {self.activation_dtype}")
        if not 50.0 < self.percentile <= 100.0:
            raise InputError(f"percentile must be in (50, 100], got {self.percentile}")
        bad_ops = sorted(set(self.ops) - set(_OPS))
        if bad_ops:
            raise InputError(f"cannot quantize op '{bad_ops[0]}'; choose from {', '.join(_OPS)}")
        if self.max_float_layers is not None and self.max_float_layers < 0:
            raise InputError(f"max_float_layers must be >= 0, got {self.max_float_layers}")
        if self.smooth is not None and not 0.0 <= self.smooth <= 1.0:
            raise InputError(f"smooth (SmoothQuant alpha) must be in [0, 1], got {self.smooth}")
        if self.sample_rows < 1:
            raise InputError(f"sample_rows must be >= 1, got {self.sample_rows}")


@dataclass(frozen=True)
class LayerReport:
    node: str
    op_type: str
    quantized: bool
    reason: str = ""
    integer_kernel: bool = False
    weight: str | None = None
    weight_scale: tuple[float, float, float] | None = None  # min, median, max
    weight_sqnr_db: float | None = None
    activation: str | None = None
    activation_range: tuple[float, float] | None = None
    activation_scale: float | None = None
    activation_zero_point: int | None = None
    range_choice: str | None = None
    smoothed: bool = False
    activation_sqnr_db: float | None = None
    layer_sqnr_db: float | None = None

    def to_dict(self) -> dict[str, object]:
        out = {}
        for key, value in asdict(self).items():
            if value is None:
                continue
            if isinstance(value, float):
                value = _rounded(value)
            elif isinstance(value, tuple):
                value = [_rounded(v) for v in value]
            out[key] = value
        return out


def _rounded(v: float) -> float | str:
    return round(v, 6 if abs(v) < 1 else 3) if np.isfinite(v) else str(v)


@dataclass(frozen=True)
class QuantizeReport:
    config: QuantizeConfig
    layers: tuple[LayerReport, ...]
    float_tensors: tuple[tuple[str, str], ...] = ()  # (tensor, why it stayed float)
    batches: int = 0
    float_bytes_removed: int = 0
    int8_bytes_added: int = 0
    float_weights_kept: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def quantized(self) -> int:
        return sum(layer.quantized for layer in self.layers)

    @property
    def kept_float(self) -> int:
        return sum(not layer.quantized for layer in self.layers)

    def to_dict(self) -> dict[str, object]:
        return {
            "config": {k: list(v) if isinstance(v, tuple) else v
                       for k, v in asdict(self.config).items()},
            "quantized_layers": self.quantized,
            "float_layers": self.kept_float,
            "calibration_batches": self.batches,
            "float_bytes_removed": self.float_bytes_removed,
            "int8_bytes_added": self.int8_bytes_added,
            "float_weights_kept": list(self.float_weights_kept),
            "float_tensors": dict(self.float_tensors),
            "seconds": round(self.seconds, 3),
            "layers": [layer.to_dict() for layer in self.layers],
        }


@dataclass
class _Plan:
    choices: dict[str, ActivationChoice] = field(default_factory=dict)
    layer_sqnr: dict[str, float] = field(default_factory=dict)
    keep_float: dict[str, str] = field(default_factory=dict)
    float_tensors: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, ActivationQuant] = field(default_factory=dict)


def quantize_model(
    model: ir.Model, config: QuantizeConfig, batches: Sequence[Batch] | Iterable[Batch] | None
) -> QuantizeReport:
    """Quantizes `model` in place to 8-bit QDQ and reports what was done to each layer.

    Static activation quantization needs `batches` (arrays keyed by graph input name, any
    number, ragged shapes allowed); weight-only mode can run without them.
    """
    start = time.perf_counter()
    check_not_quantized(model)
    layers, _ = find_layers(
        model, ops=config.ops, embeddings=config.quantize_embeddings, exclude=config.exclude,
        activation_matmuls=config.activation_matmuls,
    )
    if batches is None and not config.weight_only:
        raise InputError(
            "static activation quantization needs calibration data: pass --calibration DATA "
            "(a .npz file or a folder of them), or quantize weights only"
        )
    if config.token_mask is not None and config.token_mask not in {
        v.name for v in model.graph.inputs
    }:
        raise InputError(
            f"token mask '{config.token_mask}' is not a graph input "
            f"(inputs: {', '.join(v.name or '?' for v in model.graph.inputs)})"
        )
    plan = _Plan()
    count = 0
    if batches is not None:
        tensors = _tensors_to_calibrate(layers, config.weight_only)
        seen = 0

        def on_batch(n: int) -> None:
            nonlocal seen
            seen = n

        collectors = collect_ranges(
            model, tensors, batches, token_mask=config.token_mask,
            sample_rows=config.sample_rows, seed=config.seed, on_batch=on_batch,
        )
        count = seen
        _plan_activations(layers, collectors, config, plan)
    _choose_float_layers(layers, config, plan)
    if batches is not None:
        _replan_after_exclusion(layers, collectors, config, plan)
    activations = {
        name: ActivationQuant(c.scale, c.zero_point, c.smooth)
        for name, c in plan.choices.items()
    }
    qdq = QuantizeQDQPass(
        activations=activations, outputs=plan.outputs, dtype=config.activation_dtype,
        weight_only=config.weight_only, ops=config.ops, embeddings=config.quantize_embeddings,
        exclude=config.exclude, keep_float=plan.keep_float,
        activation_matmuls=config.activation_matmuls,
    )
    qdq(model)
    reports = tuple(_layer_report(r, plan) for r in qdq.result.layers)
    return QuantizeReport(
        config, reports, tuple(sorted(plan.float_tensors.items())), count,
        qdq.result.float_bytes_removed, qdq.result.int8_bytes_added,
        qdq.result.float_weights_kept, time.perf_counter() - start,
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


def _consumers(layers: Sequence[QLayer], keep: dict[str, str]) -> dict[str, list[QLayer]]:
    by_tensor: dict[str, list[QLayer]] = {}
    for layer in layers:
        if layer.name in keep:
            continue
        for value in (layer.activation, layer.second_activation):
            if value is not None and value.name:
                by_tensor.setdefault(value.name, []).append(layer)
    return by_tensor


def _plan_activations(
    layers: Sequence[QLayer],
    collectors: dict[str, RangeCollector],
    config: QuantizeConfig,
    plan: _Plan,
) -> None:
    """Per activation tensor: a range (and smoothing) choice, or the reason it stays float."""
    for name, consumers in _consumers(layers, plan.keep_float).items():
        collector = collectors[name]
        why = collector.bad or (None if collector.seen else "never computed on the data")
        if why is not None:
            plan.float_tensors[name] = why
            for layer in consumers:
                plan.keep_float[layer.name] = f"input '{name}' {why}"
            continue
        _choose_for(name, consumers, collector, config, plan)
    if not config.weight_only:
        for layer in layers:
            out = layer.node.outputs[0].name or ""
            if layer.kind == "Conv" and out in collectors and collectors[out].seen:
                c = collectors[out]
                if c.bad is None:
                    lo, hi = method_range(c, config.method, config.percentile,
                                          config.activation_dtype)
                    plan.outputs[out] = ActivationQuant(
                        *activation_qparams(lo, hi, config.activation_dtype)
                    )


def _choose_for(
    name: str,
    consumers: list[QLayer],
    collector: RangeCollector,
    config: QuantizeConfig,
    plan: _Plan,
) -> None:
    dense = [layer for layer in consumers if layer.kind in ("MatMul", "Gemm")]
    weights = [w for w in (layer.effective_weight() for layer in dense) if w is not None]
    if config.weight_only:
        x = collector.sample
        for layer, w in zip(dense, weights, strict=True):
            q, s = quantize_weight(w, 1)
            plan.layer_sqnr[layer.name] = sqnr_db(x @ w, x @ dequantize_weight(q, s, 1))
        return
    only_weights = len(dense) == len(consumers)
    choice = choose_activation(
        collector, weights if only_weights else [], method=config.method,
        percentile=config.percentile, dtype=config.activation_dtype,
        smooth_alpha=config.smooth if only_weights and weights else None,
        search=config.search_clip and only_weights and bool(weights),
    )
    plan.choices[name] = choice
    for layer, sq in zip(dense if only_weights else [], choice.layer_sqnr, strict=False):
        plan.layer_sqnr[layer.name] = combine_sqnr(
            sq, plan.layer_sqnr.get(f"{layer.name}#other", float("inf"))
        )
    if not only_weights:
        for layer in consumers:
            plan.layer_sqnr[layer.name] = combine_sqnr(
                plan.layer_sqnr.get(layer.name, float("inf")), choice.activation_sqnr
            )


def _choose_float_layers(layers: Sequence[QLayer], config: QuantizeConfig, plan: _Plan) -> None:
    """Keeps the worst layers (lowest output SQNR, under `min_sqnr_db`) float, within budget."""
    budget = config.max_float_layers
    if not budget:
        return
    ranked = sorted(
        (sq, name) for name, sq in plan.layer_sqnr.items()
        if "#" not in name and name not in plan.keep_float and sq < config.min_sqnr_db
    )
    for sq, name in ranked[:budget]:
        plan.keep_float[name] = (
            f"sensitive: output SQNR {sq:.1f} dB < {config.min_sqnr_db:g} dB when quantized, "
            f"among the {budget} worst kept float (max_float_layers)"
        )
    del layers


def _replan_after_exclusion(
    layers: Sequence[QLayer],
    collectors: dict[str, RangeCollector],
    config: QuantizeConfig,
    plan: _Plan,
) -> None:
    """Re-chooses the ranges of tensors that lost a consumer to the float budget."""
    for name, consumers in _consumers(layers, plan.keep_float).items():
        if name not in plan.choices:
            continue
        before = len([layer for layer in layers if layer.activation is not None
                      and layer.activation.name == name])
        if len(consumers) != before:
            _choose_for(name, consumers, collectors[name], config, plan)
    used = {v.name for layer in layers if layer.name not in plan.keep_float
            for v in (layer.activation, layer.second_activation) if v is not None}
    for name in list(plan.choices):
        if name not in used:
            del plan.choices[name]


def _layer_report(r: object, plan: _Plan) -> LayerReport:
    from onnxprune.passes.quantize_qdq import QuantizedLayer

    assert isinstance(r, QuantizedLayer)
    choice = plan.choices.get(r.activation or "") if r.activation else None
    sq = plan.layer_sqnr.get(r.node)
    return LayerReport(
        r.node, r.op_type, r.quantized, r.reason, r.integer_kernel, r.weight, r.weight_scale,
        r.weight_sqnr_db, r.activation,
        (choice.lo, choice.hi) if choice else None,
        choice.scale if choice else None,
        choice.zero_point if choice else None,
        choice.how if choice else None,
        bool(choice is not None and choice.smooth is not None),
        choice.activation_sqnr if choice else None,
        sq if r.quantized or sq is not None else None,
    )
