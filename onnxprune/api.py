"""The public entry points: prune(), verify(), inspect().

Each accepts a path, an onnx.ModelProto or an onnx_ir.Model and returns the same kind it
got; inside, everything is an onnx_ir.Model run through an onnx_ir PassManager.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxprune.calibration.data import (
    Batch,
    input_specs,
    load_batches,
    random_batches,
)
from onnxprune.errors import InputError, OnnxPruneError, UnsupportedModelError
from onnxprune.graph.accounting import ModelStats, model_stats
from onnxprune.graph.attention import AttentionBlock, find_attention_blocks
from onnxprune.graph.channels import ChannelGroup, find_channel_groups
from onnxprune.io import MIN_OPSET, load_model, save_model, serialized_model
from onnxprune.passes.reconstruct import Calibration, Reconstruct
from onnxprune.passes.remove_heads import RemoveHeadsPass
from onnxprune.passes.remove_neurons import Progress, RemoveNeuronsPass
from onnxprune.passes.zero_weights import ZeroWeightsPass
from onnxprune.plan.analyze import Analysis, analyze_model
from onnxprune.plan.quality import BUILTIN_METRICS, BuiltinMetric, UserMetric, load_user_metric
from onnxprune.plan.recipe import Plan
from onnxprune.plan.search import (
    DEFAULT_MAX_DROP,
    SearchConfig,
    SearchResult,
    Target,
    apply_decisions,
    decided_units,
    search,
    split_holdout,
)
from onnxprune.quantize import QuantizeConfig, quantize_model
from onnxprune.runtime import ModelSource, Provider, make_session
from onnxprune.verify import Tolerances, VerifyResult, compare_models

__all__ = [
    "PruneConfig",
    "PruneReport",
    "Inspection",
    "prune",
    "prune_model",
    "verify",
    "inspect",
    "check_supported",
    "check_written",
    "verification_batches",
    "Plan",
    "SearchResult",
    "analyze",
]

ModelLike = TypeVar("ModelLike", str, os.PathLike, onnx.ModelProto, ir.Model)


@dataclass(frozen=True)
class PruneConfig:
    """What to do to a model. Structured removal and unstructured zeroing may be combined."""

    sparsity: float | None = None
    mode: Literal["structured", "unstructured"] = "structured"
    threshold: float | None = None
    nm: tuple[int, int] | None = None
    criterion: str | None = None
    calibration: str | os.PathLike[str] | Sequence[Batch] | None = None
    token_mask: str | None = None
    reconstruct: Reconstruct | None = None
    ridge: float | None = None  # None: per layer, by cross-validation on the batches
    global_ranking: bool = False
    max_group_sparsity: float = 0.9
    round_to: int = 1
    ignore: tuple[str, ...] = ()
    seed: int = 0
    heads: float | None = None  # fraction of attention heads removed (per block, or global)
    global_heads: bool = False
    max_block_heads: float = 0.75  # cap per block with global_heads
    quantize: QuantizeConfig | None = None  # 8-bit QDQ after pruning
    # Target search (instead of sparsity/heads): e.g. target="flops=0.75", max_drop=0.02.
    target: str | None = None
    max_drop: float | None = None  # default 0.01
    metric: str | None = None  # cosine (default), sqnr, top1
    eval: str | Callable[[object], float] | None = None  # user metric: module:function
    holdout: str | os.PathLike[str] | Sequence[Batch] | None = None
    plan: str | os.PathLike[str] | Plan | None = None  # reapply a saved plan

    def holdout_batches(self, model: ir.Model) -> list[Batch] | None:
        """The held-out batches given (None: the search holds out calibration batches)."""
        if isinstance(self.holdout, (str, os.PathLike)):
            return list(load_batches(self.holdout, input_specs(model)))
        return None if self.holdout is None else list(self.holdout)

    def check_planning(self) -> None:
        """Refuses contradictory combinations of target search, plan and fixed options."""
        fixed = [n for n, v in (("--sparsity", self.sparsity), ("--heads", self.heads),
                                ("--threshold", self.threshold), ("--nm", self.nm))
                 if v is not None]
        search_only = [n for n, v in (("--max-drop", self.max_drop), ("--metric", self.metric),
                                      ("--eval", self.eval), ("--holdout", self.holdout))
                       if v is not None]
        if self.target is not None and self.plan is not None:
            raise InputError("--target searches for a plan and --plan applies one: give one")
        if self.target is not None:
            Target.parse(self.target)
            if fixed:
                raise InputError(f"--target decides how much to prune; drop {fixed[0]}")
            if self.calibration is None:
                raise InputError("--target needs --calibration data to measure quality")
            if self.quantize is not None:
                raise InputError("--target with --quantize: the quality budget would not "
                                 "cover quantization; quantize the result afterwards")
            _check_metric(self.metric, self.eval)
            if self.max_drop is not None and self.max_drop < 0:
                raise InputError(f"--max-drop must be >= 0, got {self.max_drop}")
        elif search_only:
            raise InputError(f"{search_only[0]} only applies to a --target search")
        if self.plan is not None and (fixed or self.criterion is not None):
            raise InputError(f"--plan decides what to prune; drop {(fixed or ['--criterion'])[0]}")

    def batches(self, model: ir.Model) -> list[Batch] | None:
        """The calibration batches, checked against the model's inputs."""
        if self.calibration is None:
            return None
        if isinstance(self.calibration, (str, os.PathLike)):
            return list(load_batches(self.calibration, input_specs(model)))
        return list(self.calibration)

    def passes(
        self,
        model: ir.Model | None = None,
        progress: Progress | None = None,
        batches: list[Batch] | None = None,
    ) -> list[ir.passes.PassBase]:
        """The pruning passes to run (`batches`: the calibration data, when given)."""
        if self.reconstruct not in (None, "none") and self.calibration is None:
            raise InputError(f"--reconstruct {self.reconstruct} needs --calibration data")
        if self.ridge is not None and self.ridge < 0:
            raise InputError(f"--ridge must be >= 0, got {self.ridge}")
        calib = None
        if self.calibration is not None:
            calib = Calibration(
                batches or [],  # empty when only validating options
                token_mask=self.token_mask,
                reconstruct=self.reconstruct or "lstsq",
                ridge=self.ridge,
            )
        # With data, OBS selection (choose and refit jointly) beats scoring then refitting:
        # on MiniLM at 50 % FFN, cosine 0.955 vs 0.952 for activation + lstsq.
        criterion = self.criterion or ("obs" if self.calibration is not None else "l1")
        out: list[ir.passes.PassBase] = []
        if self.sparsity is not None and self.mode == "structured":
            out.append(
                RemoveNeuronsPass(
                    sparsity=self.sparsity,
                    criterion=criterion,
                    calibration=calib,
                    progress=progress,
                    global_ranking=self.global_ranking,
                    max_group_sparsity=self.max_group_sparsity,
                    round_to=self.round_to,
                    ignore=self.ignore,
                    seed=self.seed,
                )
            )
        if self.heads is not None:
            out.append(
                RemoveHeadsPass(
                    fraction=self.heads,
                    global_ranking=self.global_heads or None,  # None: global with data
                    max_block_fraction=self.max_block_heads,
                    calibration=calib,
                    ignore=self.ignore,
                )
            )
        zero_sparsity = self.sparsity if self.mode == "unstructured" else None
        if self.threshold is not None or zero_sparsity is not None or self.nm is not None:
            out.append(
                ZeroWeightsPass(
                    threshold=self.threshold, sparsity=zero_sparsity, nm=self.nm,
                    ignore=self.ignore,
                )
            )
        if not out and self.quantize is None:
            raise InputError(
                "nothing to do: give --sparsity, --heads, --threshold, --nm or --quantize int8 "
                "(see onnxprune --help)"
            )
        return out


@dataclass
class PruneReport:
    before: ModelStats
    after: ModelStats
    passes: dict[str, dict[str, object]] = field(default_factory=dict)
    modified: bool = False
    notes: list[str] = field(default_factory=list)
    plan: Plan | None = None  # the per-unit decisions, when a plan was searched or applied
    search: SearchResult | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "modified": self.modified,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "passes": self.passes,
            "notes": self.notes,
            "plan": None if self.plan is None else self.plan.to_dict(),
            "search": None if self.search is None else self.search.to_dict(),
        }


def check_supported(model: ir.Model, where: str = "model") -> None:
    """Fails early, with the reason, on models the passes cannot handle."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is None:
        raise UnsupportedModelError(f"{where}: imports no default ONNX opset")
    if opset < MIN_OPSET:
        raise UnsupportedModelError(
            f"{where}: opset {opset} is below {MIN_OPSET}; upgrade it first with "
            f"onnx.version_converter.convert_version(model, {MIN_OPSET})"
        )


def prune_model(
    model: ir.Model, config: PruneConfig, progress: Progress | None = None,
    on_plan: Callable[[Plan], None] | None = None,
) -> PruneReport:
    """Runs the configured passes on `model` in place and says what they did.

    `progress(done, total, label)` is called as calibrated pruning moves from group to group.
    `on_plan(plan)` hears of every better plan a target search finds (for Ctrl-C).
    """
    check_supported(model)
    config.check_planning()
    if config.target is not None or config.plan is not None:
        return _prune_planned(model, config, progress, on_plan)
    batches = config.batches(model)
    passes = config.passes(model, progress, batches)
    before = model_stats(model)
    modified = False
    for p in passes:
        modified = p(model).modified or modified
    if modified:
        RemoveUnusedNodesPass()(model)
    quantized = None
    if config.quantize is not None:
        quantized = quantize_model(model, config.quantize, batches)
        modified = modified or quantized.quantized > 0
    report = PruneReport(before=before, after=model_stats(model), modified=modified)
    for p in passes:
        res = getattr(p, "result", None)
        if res is not None:
            report.passes[type(p).__name__] = res.to_dict()
    if quantized is not None:
        report.passes["QuantizeQDQ"] = quantized.to_dict()
    _refuse_if_nothing_prunable(passes)
    if not report.modified:
        report.notes.append("the model was left unchanged: nothing met the pruning criteria")
    return report


def _prune_planned(model: ir.Model, config: PruneConfig, progress: Progress | None,
                   on_plan: Callable[[Plan], None] | None) -> PruneReport:
    """A target search, or a saved plan reapplied."""
    batches = config.batches(model)
    before = model_stats(model)
    report = PruneReport(before=before, after=before)
    if config.plan is not None:
        plan = config.plan if isinstance(config.plan, Plan) else Plan.load(config.plan)
        # Does the plan fit this model? That error says more than one about the data.
        units = decided_units(model, plan.neurons, plan.heads, None, config.ignore)
        fit = plan.fit_batches(batches)
        calib = None
        if fit is not None:
            calib = Calibration(fit, token_mask=config.token_mask or plan.token_mask,
                                reconstruct=plan.repair, ridge=config.ridge)  # type: ignore
        apply_decisions(model, plan.neurons, plan.heads, calib, progress, config.ignore, units)
        report.plan = plan
    else:
        assert batches is not None and config.target is not None
        cfg = SearchConfig(Target.parse(config.target),
                           DEFAULT_MAX_DROP if config.max_drop is None else config.max_drop,
                           _metric(config.metric, config.eval), ignore=config.ignore)
        result, pruned = search(model, cfg, batches, holdout=config.holdout_batches(model),
                                token_mask=config.token_mask, ridge=config.ridge,
                                progress=progress, on_plan=on_plan)
        model.graph = pruned.graph
        report.plan, report.search = result.plan, result
        report.notes.append(result.message)
    report.after = model_stats(model)
    report.modified = bool(report.plan.neurons or report.plan.heads)
    if not report.modified:
        report.notes.append("the model was left unchanged: the plan prunes nothing")
    return report


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
    _check_metric(metric, eval)
    cfg = PruneConfig(calibration=calibration, holdout=holdout)
    batches = cfg.batches(m)
    assert batches is not None
    fit, held_out, split = split_holdout(batches, cfg.holdout_batches(m))
    source = "--holdout" if split is None else f"calibration data, held out: {split}"
    calib = Calibration(fit, token_mask=token_mask)
    return analyze_model(m, calib, held_out, metric=_metric(metric, eval), levels=levels,
                         heads=heads, ignore=ignore, holdout_source=source, progress=progress)


def _check_metric(metric: str | None, eval: object) -> None:
    if metric is not None and eval is not None:
        raise InputError("give --metric or --eval, not both")
    if metric is not None and metric not in BUILTIN_METRICS:
        raise InputError(f"--metric '{metric}': choose from {', '.join(BUILTIN_METRICS)}")


def _metric(metric: str | None, eval: str | Callable[[object], float] | None
            ) -> BuiltinMetric | UserMetric:
    """The quality measure chosen (checked by _check_metric): cosine unless told."""
    if isinstance(eval, str):
        return load_user_metric(eval)
    return eval or metric or "cosine"  # type: ignore[return-value]


def _refuse_if_nothing_prunable(passes: list[ir.passes.PassBase]) -> None:
    """Structured pruning that found nothing it may touch is an error, with the reasons."""
    reasons: list[str] = []
    found = False
    for p in passes:
        if isinstance(p, RemoveNeuronsPass):
            found = found or any(g.reason is None for g in p.result.groups)
            reasons += [f"{g.group}: {g.reason}" for g in p.result.groups[:2]] or [
                "no MatMul/Gemm with a constant weight"]
        elif isinstance(p, RemoveHeadsPass):
            found = found or any(b.reason is None for b in p.result.blocks)
            reasons += [f"{b.block}: {b.reason}" for b in p.result.blocks[:2]] or [
                "no attention block recognised"]
        else:
            return  # zeroing always applies
    if passes and not found:
        why = "; ".join(reasons)
        raise UnsupportedModelError(
            f"nothing prunable in this model ({why}); run onnxprune inspect for details"
        )


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
    m = load_model(model)
    prune_model(m, cfg)
    return save_model(m, output)  # type: ignore[return-value]


def verification_batches(
    model: ir.Model,
    data: str | os.PathLike[str] | None,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> tuple[list[Batch], bool]:
    """The user's data, or inputs generated from the signature (second item True)."""
    specs = input_specs(model)
    if data is not None:
        return list(load_batches(data, specs)), False
    return random_batches(specs, shapes), True


def verify(
    reference: ModelSource | onnx.ModelProto,
    candidate: ModelSource | onnx.ModelProto,
    *,
    data: str | os.PathLike[str] | Sequence[Batch] | None = None,
    providers: Sequence[Provider] = ("cpu",),
    tolerances: Tolerances | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    generated_inputs: bool = False,
) -> VerifyResult:
    """Compares candidate against reference on onnxruntime; see VerifyResult.ok.

    `data` is a path, a list of batches (then `generated_inputs` says whether they were
    made up from the signature), or None to generate inputs.
    """
    # Paths go to onnxruntime as paths; only the reference's input signature is read here.
    ref_src = _session_source(reference)
    cand_src = _session_source(candidate)
    if data is None or isinstance(data, (str, os.PathLike)):
        batches, generated = verification_batches(_to_ir(ref_src), data, shapes)
    else:
        batches, generated = list(data), generated_inputs
    return compare_models(
        ref_src, cand_src, batches, providers=providers, tolerances=tolerances or Tolerances(),
        generated_inputs=generated,
    )


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
    size = Path(model).stat().st_size if isinstance(model, (str, os.PathLike)) else None
    opset = m.opset_imports.get("", m.opset_imports.get("ai.onnx"))
    return Inspection(
        model_stats(m, size), tuple(find_channel_groups(m)), opset,
        tuple(find_attention_blocks(m)),
    )


def check_written(model: ir.Model, *, load: bool = True) -> None:
    """The checks every model we write must pass: onnx.checker (full) and onnxruntime load.

    `load=False` skips the onnxruntime load for a caller that loads the model next anyway
    (verification on the CPU provider). Raises OnnxPruneError naming the failing check, so
    nothing broken is ever saved.
    """
    with serialized_model(model) as data:
        try:
            onnx.checker.check_model(data, full_check=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OnnxPruneError(
                f"the rewritten model fails onnx.checker ({first}); nothing was written. "
                "Please report this with the model's op list (onnxprune inspect)"
            ) from e
        if load:
            make_session(data, "cpu")
