"""The public entry points: prune(), verify(), inspect().

Each accepts a path, an onnx.ModelProto or an onnx_ir.Model and returns the same kind it
got; inside, everything is an onnx_ir.Model run through an onnx_ir PassManager.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, TypeVar

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxprune.attention.blocks import AttentionBlock, find_attention_blocks
from onnxprune.attention.remove_heads import RemoveHeadsPass
from onnxprune.calibration.calibration import Calibration, Reconstruct
from onnxprune.calibration.data import (
    Batch,
    input_specs,
    load_batches,
    random_batches,
)
from onnxprune.calibration.mask import AUTO, NONE, resolve_token_mask
from onnxprune.calibration.propagate import SECTION_ABOVE_BYTES, weight_bytes
from onnxprune.channels.groups import find_channel_groups
from onnxprune.channels.model import ChannelGroup
from onnxprune.core.accounting import ModelStats, model_stats
from onnxprune.core.pages import release_pages
from onnxprune.errors import InputError, OnnxPruneError, UnsupportedModelError
from onnxprune.io.detached import check_detached
from onnxprune.io.models import (
    MIN_OPSET,
    check_output_path,
    load_model,
    save_model,
    serialized_model,
    stored_bytes,
)
from onnxprune.io.runtime import ModelSource, Provider, make_session
from onnxprune.io.validate import check_finite_weights
from onnxprune.prune.cleanup import CleanupPass
from onnxprune.prune.remove_neurons import Progress, RemoveNeuronsPass
from onnxprune.prune.zero_weights import ZeroWeightsPass
from onnxprune.quant.driver import QuantizeConfig, quantize_model
from onnxprune.quant.insert_qdq import QuantizeQDQResult
from onnxprune.quant.qdq_pass import QuantizeQDQPass
from onnxprune.repair.augment import Augment
from onnxprune.repair.distill import DEFAULT_AUGMENT, DistillRepairPass
from onnxprune.search.analyze import Analysis, analyze_model
from onnxprune.search.distill import DistillStage, run_distill
from onnxprune.search.plans import Plan
from onnxprune.search.quality import BUILTIN_METRICS, BuiltinMetric, UserMetric, load_user_metric
from onnxprune.search.search import (
    DEFAULT_MAX_DROP,
    SearchConfig,
    SearchResult,
    Target,
    apply_decisions,
    decided_units,
    search,
    split_holdout,
)
from onnxprune.verify.compare import Tolerances, VerifyResult, compare_models
from onnxprune.verify.golden import Golden, compare_golden, load_golden
from onnxprune.verify.golden import save_golden as write_golden

__all__ = [
    "PruneConfig",
    "PruneReport",
    "Inspection",
    "prune",
    "prune_model",
    "verify",
    "verify_golden",
    "save_golden",
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
    reconstruct: Reconstruct | Literal["distill"] | None = None
    ridge: float | None = None  # None: per layer, by cross-validation on the batches
    repair_seconds: float | None = None  # time budget of the distillation repair
    repair_steps: int | None = None  # optimiser steps per block of the distillation repair
    calibration_provider: Provider = "cpu"  # where calibration batches run
    repair_augment: int | None = None  # edited copies of the calibration sentences (distill)
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

    @property
    def is_default(self) -> bool:
        """No pruning option given: the default recipe (see prune_model)."""
        return all(v is None for v in (self.sparsity, self.threshold, self.nm, self.heads,
                                       self.quantize, self.target, self.plan))

    def distills(self, model: ir.Model | None) -> bool:
        """Whether --sparsity with data ends with the distillation repair: asked for, or by
        default on a model with less than SECTION_ABOVE_BYTES of weights (a bigger one is
        calibrated section by section to stay near its own size in memory, and the default
        step budget would not serve its blocks anyway)."""
        if self.reconstruct is not None:
            return self.reconstruct == "distill"
        return model is not None and weight_bytes(model) < SECTION_ABOVE_BYTES

    @property
    def _repair_tuning(self) -> str | None:
        """The first distillation option given, if any."""
        return next((n for n, v in (("--repair-seconds", self.repair_seconds),
                                    ("--repair-steps", self.repair_steps),
                                    ("--repair-augment", self.repair_augment))
                     if v is not None), None)

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
        elif search_only and not (self.is_default and self.calibration is not None):
            raise InputError(f"{search_only[0]} only applies to a --target search (or to "
                             "--calibration given alone)")
        elif search_only:
            _check_metric(self.metric, self.eval)
            if self.max_drop is not None and self.max_drop < 0:
                raise InputError(f"--max-drop must be >= 0, got {self.max_drop}")
        searching = self.target is not None or self.is_default and self.calibration is not None
        if searching and self._repair_tuning and self.reconstruct != "distill":
            raise InputError(f"{self._repair_tuning} tunes the distillation repair; a search "
                             "distils only with --reconstruct distill")
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
        if self.repair_seconds is not None and not self.repair_seconds > 0:
            raise InputError(f"--repair-seconds must be > 0, got {self.repair_seconds}")
        if self.repair_steps is not None and self.repair_steps < 1:
            raise InputError(f"--repair-steps must be >= 1, got {self.repair_steps}")
        if self.repair_augment is not None and self.repair_augment < 0:
            raise InputError(f"--repair-augment must be >= 0, got {self.repair_augment}")
        tuning = self._repair_tuning
        if tuning is not None and self.reconstruct not in (None, "distill"):
            raise InputError(f"{tuning} tunes the distillation repair; it does not apply to "
                             f"--reconstruct {self.reconstruct}")
        calib = None
        if self.calibration is not None:
            calib = Calibration(
                batches or [],  # empty when only validating options
                token_mask=self.token_mask,
                reconstruct="lstsq" if self.reconstruct == "distill" else  # distill starts there
                self.reconstruct or "lstsq",
                ridge=self.ridge,
                provider=self.calibration_provider,
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
            # With data, distillation follows the least-squares repair by default: on MiniLM
            # at 50 % FFN, held-out cosine 0.9682 -> 0.9754 (benchmarks/distill.py).
            if self.distills(model) and model is not None and calib is not None:
                out.append(DistillRepairPass(
                    reference=model.clone(),  # shares the weights; passes replace, not edit
                    calibration=calib, seconds=self.repair_seconds,
                    max_steps=self.repair_steps,
                    augment=Augment(copies=DEFAULT_AUGMENT if self.repair_augment is None
                                    else self.repair_augment),
                    kept=out[-1].kept))  # type: ignore[attr-defined]
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
            # The default recipe without data: only what provably changes no output.
            out.append(CleanupPass(batches=batches, ignore=self.ignore))
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
    token_mask: str | None = None  # the input whose zeros marked padding rows, if any

    def to_dict(self) -> dict[str, object]:
        return {
            "modified": self.modified,
            "token_mask": self.token_mask,
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
    check_finite_weights(model)
    release_pages(model)  # the check read every weight; the passes read them again in turn
    config.check_planning()
    config, mask_note = _with_token_mask(model, config)
    if config.is_default and config.calibration is not None:
        original = model.graph  # the search prunes a copy; kept if nothing fits the budget
        report = _prune_planned(model, replace(config, target=_AS_MUCH_AS_ALLOWED), progress,
                                on_plan)
        _as_default_recipe(report, config)
        if report.search is not None and report.search.over_budget:
            model.graph = original
            report.after, report.modified, report.plan, report.search = (
                report.before, False, None, None)
        report.token_mask = config.token_mask
        if mask_note:
            report.notes.insert(0, mask_note)
        return report
    if config.target is not None or config.plan is not None:
        report = _prune_planned(model, config, progress, on_plan)
        report.token_mask = config.token_mask
        if mask_note:
            report.notes.insert(0, mask_note)
        return report
    batches = config.batches(model)
    distills = config.distills(model)
    passes = config.passes(model, progress, batches)
    before = model_stats(model)
    modified = False
    for p in passes:
        modified = p(model).modified or modified
        release_pages(model)
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
    if (config.calibration is not None and config.sparsity is not None
            and config.mode == "structured" and config.reconstruct is None and not distills):
        report.notes.append(
            f"repair: least squares only: distillation is not run by default on a model with "
            f"{SECTION_ABOVE_BYTES >> 30} GiB of weights or more; --reconstruct distill runs it")
    report.token_mask = config.token_mask
    if mask_note:
        report.notes.insert(0, mask_note)
    if config.is_default:
        report.notes.extend(_cleanup_notes(passes))
        stored = _int8_embeddings(model, batches)
        if stored is not None:
            report.passes["Int8Embeddings"] = stored.to_dict()
            report.modified = True
            report.after = model_stats(model)
            mib = (stored.constant_bytes_before - stored.constant_bytes_after) / 2**20
            report.notes.insert(-1, f"default recipe: embedding tables stored in int8 "
                                f"({mib:.1f} MiB less; checked within the default "
                                "tolerances before it was kept)")
    elif not report.modified:
        report.notes.append("the model was left unchanged: nothing met the pruning criteria")
    return report


# The default recipe with data asks the planner for an unreachable share, so it removes as
# much as the quality budget allows and no more.
_AS_MUCH_AS_ALLOWED = "flops=0.01"
MORE_OPTIONS = ("--calibration DATA (removes as much as --max-drop, default "
                f"{DEFAULT_MAX_DROP:g}, allows), --sparsity F, --heads F, --target flops=F, "
                "--quantize int8")


def _cleanup_notes(passes: list[ir.passes.PassBase]) -> list[str]:
    """What the default recipe without data did, and what would do more."""
    res = next(p.result for p in passes if isinstance(p, CleanupPass))
    unread, constant = sum(res.unread.values()), sum(res.constant.values())
    did = (f"{unread} never-read channel(s) removed, {constant} constant channel(s) folded "
           f"into the next bias, {res.shared_constants} duplicate constant(s) shared"
           if unread or constant or res.shared_constants else "nothing dead or duplicated found")
    return [f"default recipe (no pruning option): lossless clean-up: {did}. MatMul/Gemm "
            "weights stay float: int8 storage of those made onnxruntime slower (see README)",
            f"to make it smaller: {MORE_OPTIONS}"]


def _int8_embeddings(model: ir.Model, batches: list[Batch] | None) -> QuantizeQDQResult | None:
    """The default recipe's one storage change: embedding tables (Gather of a constant) in
    int8, rows gathered before dequantizing. Measured on MiniLM: 60.6 % of the file, cosine
    min 0.9997, onnxruntime not slower (benchmarks/weight_storage.py); int8 for MatMul
    weights made onnxruntime slower there, so those stay float. Kept only when it saves
    bytes (a table tied to an output projection would be stored twice) and the model still
    passes the default tolerances against the input on the given or generated batches."""
    qdq = QuantizeQDQPass(weight_only=True, ops=())
    try:
        qdq.requires(model)
    except OnnxPruneError:
        return None  # opset < 13 or already quantized: left alone
    trial = model.clone()
    qdq(trial)
    res = qdq.result
    if not any(layer.quantized for layer in res.layers) or res.float_weights_kept or (
            res.constant_bytes_after >= res.constant_bytes_before):
        return None
    check = batches or random_batches(input_specs(model))
    if not compare_models(model, trial, check, tolerances=Tolerances.defaults()).ok:
        return None
    model.graph = trial.graph
    return res


def _as_default_recipe(report: PruneReport, config: PruneConfig) -> None:
    """A search for as much as the budget allows succeeds when it stays within budget."""
    r = report.search
    assert r is not None
    budget = DEFAULT_MAX_DROP if config.max_drop is None else config.max_drop
    r.reached = not r.over_budget
    metric = r.plan.summary.get("metric", "cosine")
    r.message = (f"default recipe with --calibration: removed as much as --max-drop {budget:g} "
                 f"allows: FLOPs at {r.share:.1%} of the original, {metric} drop {r.drop:.4f}"
                 if r.reached else f"default recipe with --calibration: nothing removable "
                 f"within --max-drop {budget:g} ({metric} drop {r.drop:.4f} at best)")
    report.notes = [n for n in report.notes if not n.startswith("target ")]
    report.notes.append(r.message)


def _with_token_mask(model: ir.Model, config: PruneConfig) -> tuple[PruneConfig, str | None]:
    """The config with its token mask resolved: named, detected from the graph (None or
    "auto"), or off ("none"); and a note when it was detected. Only data-driven steps read
    it, so without calibration data nothing is said."""
    uses_data = config.calibration is not None
    mask, note = resolve_token_mask(model, config.token_mask)
    quantize = config.quantize
    if quantize is not None and quantize.token_mask in (None, AUTO, NONE):
        quantize = replace(quantize, token_mask=mask)
    return replace(config, token_mask=mask, quantize=quantize), note if uses_data else None


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
                                reconstruct="lstsq" if plan.repair == "distill" else
                                plan.repair, ridge=config.ridge)  # type: ignore
        reference = model.clone() if plan.repair == "distill" else None
        kept_n, _ = apply_decisions(model, plan.neurons, plan.heads, calib, progress,
                                    config.ignore, units, absorb_inputs=plan.refit_inputs)
        # A plan whose blocks all kept least squares (0 steps) has nothing to replay.
        if reference is not None and calib is not None and any(plan.distill_steps.values()):
            res = run_distill(model, reference, calib, kept_n, seconds=None,
                              augment=plan.distill_augment, steps=plan.distill_steps,
                              horizons=plan.distill_horizons)
            report.passes["DistillRepairPass"] = res.to_dict()
        report.plan = plan
    else:
        assert batches is not None and config.target is not None
        cfg = SearchConfig(Target.parse(config.target),
                           DEFAULT_MAX_DROP if config.max_drop is None else config.max_drop,
                           _metric(config.metric, config.eval), ignore=config.ignore)
        stage = None
        if config.reconstruct == "distill":
            stage = DistillStage(
                seconds=config.repair_seconds, steps=config.repair_steps,
                augment=DEFAULT_AUGMENT if config.repair_augment is None
                else config.repair_augment)
        result, pruned = search(model, cfg, batches, holdout=config.holdout_batches(model),
                                token_mask=config.token_mask, ridge=config.ridge,
                                progress=progress, on_plan=on_plan, distill=stage)
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
    calib = Calibration(fit, token_mask=resolve_token_mask(m, token_mask)[0])
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
    check_output_path(output, [model])
    m = load_model(model)
    prune_model(m, cfg)
    return save_model(m, output, keep=[model])  # type: ignore[return-value]


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
    data: str | os.PathLike[str] | Sequence[Batch] | None = None,
    *,
    min_cosine: float | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    min_sqnr_db: float | None = None,
    min_top1: float | None = None,
    top1: bool | None = None,
    tolerances: Tolerances | None = None,
    providers: Sequence[Provider] = ("cpu",),
    shapes: dict[str, tuple[int, ...]] | None = None,
    generated_inputs: bool = False,
) -> VerifyResult:
    """Compares candidate against reference on onnxruntime; the result is true when ok.

    `data` is a path, a list of batches (then `generated_inputs` says whether they were
    made up from the signature), or None to generate inputs. Tolerances follow the CLI's
    rule, so both give the same verdict: none given enforces the defaults
    (Tolerances.defaults(): cosine 0.99 for embeddings and other outputs, top-1 agreement
    0.99 for class scores); any given enforces exactly those. `tolerances=` passes a
    Tolerances object instead (Tolerances() enforces only finite outputs).
    """
    tol = _resolve_tolerances(tolerances, min_cosine=min_cosine, atol=atol, rtol=rtol,
                              min_sqnr_db=min_sqnr_db, min_top1=min_top1, top1=top1)
    # Paths go to onnxruntime as paths; only the reference's input signature is read here.
    ref_src = _session_source(reference)
    cand_src = _session_source(candidate)
    if data is None or isinstance(data, (str, os.PathLike)):
        batches, generated = verification_batches(_to_ir(ref_src), data, shapes)
    else:
        batches, generated = list(data), generated_inputs
    return compare_models(
        ref_src, cand_src, batches, providers=providers, tolerances=tol,
        generated_inputs=generated,
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
    tolerances: Tolerances | None = None,
    providers: Sequence[Provider] = ("cpu",),
) -> VerifyResult:
    """Compares candidate with outputs saved by save_golden (`onnxprune verify --save-golden`),
    with the same metrics and tolerance rule as verify()."""
    tol = _resolve_tolerances(tolerances, min_cosine=min_cosine, atol=atol, rtol=rtol,
                              min_sqnr_db=min_sqnr_db, min_top1=min_top1, top1=top1)
    return compare_golden(load_golden(golden), _session_source(candidate),
                          providers=providers, tolerances=tol)


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
        try:  # the graph without its big weights; their sizes checked against their dims
            check_detached(data, data.weights)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OnnxPruneError(
                f"the rewritten model fails onnx.checker ({first}); nothing was written. "
                "Please report this with the model's op list (onnxprune inspect)"
            ) from e
        if load:
            make_session(data, "cpu")
