"""The public entry points: prune(), quantize(), verify(), inspect(), analyze().

Each accepts a path, an onnx.ModelProto or an onnx_ir.Model and returns the same kind it
got; inside, everything is an onnx_ir.Model run through an onnx_ir PassManager. The work is
done below: recipe/ (the config, the passes, the pipeline), verify/, search/.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import onnx
import onnx_ir as ir

from onnxprune.attention.blocks import AttentionBlock, find_attention_blocks
from onnxprune.calibration.calibration import Calibration
from onnxprune.calibration.data import Batch
from onnxprune.calibration.mask import resolve_token_mask
from onnxprune.channels.groups import find_channel_groups
from onnxprune.channels.model import ChannelGroup
from onnxprune.core.accounting import (
    ModelStats,
    describe_shapes,
    fixed_input_shapes,
    model_stats,
    run_flops,
)
from onnxprune.errors import InputError
from onnxprune.io.models import check_output_path, load_model, save_model, stored_bytes
from onnxprune.io.runtime import ModelSource, Provider
from onnxprune.prune.remove_neurons import Progress
from onnxprune.quant.config import QuantizeConfig
from onnxprune.recipe.config import PruneConfig, check_metric, chosen_metric, from_options
from onnxprune.recipe.pipeline import verification_batches
from onnxprune.recipe.run import PruneReport, check_supported, prune_model
from onnxprune.search.analyze import Analysis, analyze_model
from onnxprune.search.search import split_holdout
from onnxprune.verify.compare import Tolerances, VerifyResult, compare_models
from onnxprune.verify.golden import Golden, compare_golden, load_golden
from onnxprune.verify.golden import save_golden as write_golden

__all__ = [
    "PruneConfig",
    "PruneReport",
    "Inspection",
    "prune",
    "quantize",
    "verify",
    "verify_golden",
    "save_golden",
    "inspect",
    "analyze",
]

ModelLike = TypeVar("ModelLike", str, os.PathLike, onnx.ModelProto, ir.Model)


def _session_source(model: ModelSource | onnx.ModelProto) -> ModelSource:
    """What onnxruntime can open: a path or an ir.Model (a ModelProto is converted)."""
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    return model


def _to_ir(model: ModelSource | onnx.ModelProto) -> ir.Model:
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    if isinstance(model, bytes):
        return ir.serde.deserialize_model(onnx.ModelProto.FromString(model))
    return load_model(model)


def prune(
    model: ModelLike,
    config: PruneConfig | None = None,
    *,
    output: str | os.PathLike[str] | None = None,
    **options: object,
) -> ModelLike:
    """Prunes a model given as a path, ModelProto or ir.Model; returns the same kind.

    With a path, `output` is required and the path of the written model is returned.
    Options are the fields of PruneConfig, e.g. prune(model, sparsity=0.5).
    """
    cfg = config or PruneConfig(**options)  # type: ignore[arg-type]
    if isinstance(model, ir.Model):
        prune_model(model, cfg)
        return model
    if isinstance(model, onnx.ModelProto):
        m = ir.serde.deserialize_model(model)
        prune_model(m, cfg)
        return ir.serde.serialize_model(m)  # type: ignore[return-value]
    if output is None:
        raise InputError("prune() on a path needs output=...")
    check_output_path(output, [model])
    m = load_model(model)
    prune_model(m, cfg)
    return save_model(m, output, keep=[model])  # type: ignore[return-value]


def quantize(
    model: ModelLike,
    calibration: str | os.PathLike[str] | Sequence[Batch] | None = None,
    *,
    output: str | os.PathLike[str] | None = None,
    **options: Any,
) -> ModelLike:
    """8-bit QDQ as `onnxprune quantize` makes it; returns the same kind it got.

    Options are the fields of QuantizeConfig (e.g. weight_only=True, exclude=(...))."""
    unknown = sorted(set(options) - set(QuantizeConfig.__dataclass_fields__))
    if unknown:
        raise InputError(f"quantize() got an unknown option '{unknown[0]}'; see QuantizeConfig")
    config = PruneConfig(calibration=calibration, quantize=from_options(QuantizeConfig, options))
    return prune(model, config, output=output)


def verify(
    reference: ModelSource | onnx.ModelProto,
    candidate: ModelSource | onnx.ModelProto,
    data: str | os.PathLike[str] | Sequence[Batch] | None = None,
    *,
    min_cosine: float | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    min_sqnr_db: float | None = None,
    min_top1: float | None = None,
    top1: bool | None = None,
    min_top5: float | None = None,
    max_kl: float | None = None,
    min_exact: float | None = None,
    tolerances: Tolerances | None = None,
    providers: Sequence[Provider] = ("cpu",),
    shapes: dict[str, tuple[int, ...]] | None = None,
    generated_inputs: bool = False,
    outputs: Sequence[str] | None = None,
    output_kinds: Mapping[str, str] | None = None,
    token_mask: str | None = None,
) -> VerifyResult:
    """Compares candidate against reference on onnxruntime; the result is true when ok.

    `data` is a path, a list of batches (then `generated_inputs` says whether they were
    made up from the signature), or None to generate inputs. Tolerances follow the CLI's
    rule, so both give the same verdict: none given enforces the defaults
    (Tolerances.defaults(): cosine 0.99 for embeddings and other outputs, top-1 agreement
    0.99 for class scores); any given enforces exactly those. `tolerances=` passes a
    Tolerances object instead (Tolerances() enforces only finite outputs). `outputs` checks
    only those outputs, `output_kinds` says what an output is (onnxprune.verify.kinds.KINDS)
    instead of what the graph says, `token_mask` names the [batch, seq] input whose zeros
    mark padding tokens that per-token outputs are not compared on.
    """
    tol = _resolve_tolerances(tolerances, min_cosine=min_cosine, atol=atol, rtol=rtol,
                              min_sqnr_db=min_sqnr_db, min_top1=min_top1, top1=top1,
                              min_top5=min_top5, max_kl=max_kl, min_exact=min_exact)
    # Paths go to onnxruntime as paths; only the reference's input signature is read here.
    ref_src = _session_source(reference)
    cand_src = _session_source(candidate)
    if data is None or isinstance(data, (str, os.PathLike)):
        batches, generated = verification_batches(_to_ir(ref_src), data, shapes)
    else:
        batches, generated = list(data), generated_inputs
    return compare_models(
        ref_src, cand_src, batches, providers=providers, tolerances=tol,
        generated_inputs=generated, outputs=outputs, output_kinds=output_kinds,
        token_mask=token_mask,
    )


def verify_golden(
    candidate: ModelSource | onnx.ModelProto,
    golden: str | os.PathLike[str],
    *,
    min_cosine: float | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    min_sqnr_db: float | None = None,
    min_top1: float | None = None,
    top1: bool | None = None,
    min_top5: float | None = None,
    max_kl: float | None = None,
    min_exact: float | None = None,
    tolerances: Tolerances | None = None,
    providers: Sequence[Provider] = ("cpu",),
    outputs: Sequence[str] | None = None,
    output_kinds: Mapping[str, str] | None = None,
    token_mask: str | None = None,
) -> VerifyResult:
    """Compares candidate with outputs saved by save_golden (`onnxprune verify --save-golden`),
    with the same metrics, options and tolerance rule as verify()."""
    tol = _resolve_tolerances(tolerances, min_cosine=min_cosine, atol=atol, rtol=rtol,
                              min_sqnr_db=min_sqnr_db, min_top1=min_top1, top1=top1,
                              min_top5=min_top5, max_kl=max_kl, min_exact=min_exact)
    return compare_golden(load_golden(golden), _session_source(candidate),
                          providers=providers, tolerances=tol, outputs=outputs,
                          output_kinds=output_kinds, token_mask=token_mask)


def save_golden(
    model: ModelSource | onnx.ModelProto,
    golden: str | os.PathLike[str],
    data: str | os.PathLike[str] | Sequence[Batch] | None = None,
    *,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> Golden:
    """Runs `model` on `data` (or generated inputs) and saves inputs + outputs to `golden`."""
    src = _session_source(model)
    if data is None or isinstance(data, (str, os.PathLike)):
        batches, _ = verification_batches(_to_ir(src), data, shapes)
    else:
        batches = list(data)
    return write_golden(src, batches, golden)


def _resolve_tolerances(tolerances: Tolerances | None, **options: object) -> Tolerances:
    given = [k for k, v in options.items() if v is not None and k != "top1"]
    if tolerances is not None:
        if given:
            raise InputError(f"give tolerances=Tolerances(...) or {given[0]}=..., not both")
        return tolerances
    return Tolerances.from_options(**options)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Inspection:
    stats: ModelStats
    groups: tuple[ChannelGroup, ...]
    opset: int | None
    attention: tuple[AttentionBlock, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {
            "opset": self.opset,
            "stats": self.stats.to_dict(),
            "groups": [g.to_dict() for g in self.groups],
            "attention_blocks": [b.to_dict() for b in self.attention],
        }


def inspect(model: ModelSource | onnx.ModelProto) -> Inspection:
    """What is prunable in the model, and for every group that is not, why."""
    m = _to_ir(model)
    size = stored_bytes(model) if isinstance(model, (str, os.PathLike)) else None
    opset = m.opset_imports.get("", m.opset_imports.get("ai.onnx"))
    stats = model_stats(m, size)
    shapes = fixed_input_shapes(m)
    flops = None if shapes is None else run_flops(m, shapes)
    if flops is not None:
        stats = replace(stats, run_flops=flops, run_shapes=describe_shapes(shapes))
    return Inspection(
        stats, tuple(find_channel_groups(m)), opset,
        tuple(find_attention_blocks(m)),
    )


def analyze(
    model: ModelSource | onnx.ModelProto,
    calibration: str | os.PathLike[str] | Sequence[Batch],
    *,
    token_mask: str | None = None,
    metric: str | None = None,
    eval: str | Callable[[object], float] | None = None,
    holdout: str | os.PathLike[str] | Sequence[Batch] | None = None,
    levels: Sequence[float] = (0.125, 0.25, 0.375, 0.5, 0.75),
    heads: bool = True,
    ignore: tuple[str, ...] = (),
    progress: Progress | None = None,
) -> Analysis:
    """Sensitivity curves: each prunable unit's quality drop when pruned alone."""
    m = _to_ir(model)
    check_supported(m)
    check_metric(metric, eval)
    cfg = PruneConfig(calibration=calibration, holdout=holdout)
    batches = cfg.batches(m)
    assert batches is not None
    fit, held_out, split = split_holdout(batches, cfg.holdout_batches(m))
    source = "--holdout" if split is None else f"calibration data, held out: {split}"
    calib = Calibration(fit, token_mask=resolve_token_mask(m, token_mask)[0])
    return analyze_model(m, calib, held_out, metric=chosen_metric(metric, eval), levels=levels,
                         heads=heads, ignore=ignore, holdout_source=source, progress=progress)


