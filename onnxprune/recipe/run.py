"""Running a PruneConfig on a model in memory: fixed options, a target search, a saved plan,
or the default recipe; and the report of what was done.

Saving, verifying and the files around it are the pipeline's (recipe/pipeline.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxprune.attention.remove_heads import RemoveHeadsPass
from onnxprune.calibration.calibration import Calibration
from onnxprune.calibration.data import Batch
from onnxprune.calibration.fit import fitting_batches
from onnxprune.calibration.mask import AUTO, NONE, resolve_token_mask
from onnxprune.calibration.propagate import SECTION_ABOVE_BYTES
from onnxprune.core.accounting import ModelStats, inference_flops, model_stats
from onnxprune.core.pages import release_pages
from onnxprune.errors import OnnxPruneError, OptionError, UnsupportedModelError
from onnxprune.io.models import MIN_OPSET
from onnxprune.io.validate import check_finite_weights
from onnxprune.prune.cleanup import CleanupPass
from onnxprune.prune.remove_neurons import Progress, RemoveNeuronsPass
from onnxprune.prune.zero_weights import ZeroWeightsPass
from onnxprune.quant.driver import quantize_model
from onnxprune.quant.insert_qdq import QuantizeQDQResult
from onnxprune.quant.ort_layout import for_onnxruntime
from onnxprune.quant.qdq_pass import QuantizeQDQPass
from onnxprune.recipe.config import PruneConfig, chosen_metric
from onnxprune.recipe.passes import build_passes
from onnxprune.repair.distill import DEFAULT_AUGMENT
from onnxprune.search.apply import apply_decisions, decided_units
from onnxprune.search.distill import DistillStage, run_distill
from onnxprune.search.plans import Plan
from onnxprune.search.search import DEFAULT_MAX_DROP, SearchConfig, SearchResult, Target, search
from onnxprune.verify.compare import Tolerances, compare_models

logger = logging.getLogger(__name__)

__all__ = ["PruneReport", "prune_model", "check_supported", "MORE_OPTIONS"]


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
    check_batches: list[Batch] | None = None,
) -> PruneReport:
    """Runs the configured passes on `model` in place and says what they did.

    `check_batches`: the user's verification data, which the default recipe's trials are
    checked on (before calibration data or generated inputs).

    `progress(done, total, label)` is called as calibrated pruning moves from group to group.
    `on_plan(plan)` hears of every better plan a target search finds (for Ctrl-C).
    """
    check_supported(model)
    kept = check_finite_weights(model)
    release_pages(model)  # the check read every weight; the passes read them again in turn
    config.check()
    config, mask_note = _with_token_mask(model, config)
    report = _prune(model, config, progress, on_plan, check_batches)
    report.token_mask = config.token_mask
    if mask_note:
        report.notes.insert(0, mask_note)
    if kept:
        report.notes.insert(0, f"{len(kept)} non-finite constant(s) kept as the model uses "
                            f"them (masks, fill and start values; not scored, quantized or "
                            f"refit): {', '.join(str(k) for k in kept[:4])}"
                            + (" ..." if len(kept) > 4 else ""))
    return report


def _prune(model: ir.Model, config: PruneConfig, progress: Progress | None,
           on_plan: Callable[[Plan], None] | None,
           check_batches: list[Batch] | None) -> PruneReport:
    """The run for a config whose token mask is resolved; prune_model adds the notes every
    route shares."""
    if config.is_default and config.calibration is not None:
        original = model.graph  # the search prunes a copy; kept if nothing fits the budget
        report = _prune_planned(model, replace(config, target=_AS_MUCH_AS_ALLOWED), progress,
                                on_plan)
        _as_default_recipe(report, config)
        if report.search is not None and report.search.over_budget:
            model.graph = original
            report.after, report.modified, report.plan, report.search = (
                report.before, False, None, None)
        return report
    if config.planned:
        return _prune_planned(model, config, progress, on_plan)
    batches = config.batches(model)
    distills = config.distills(model)
    passes = build_passes(config, model, progress, batches)
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
    if config.is_default:
        report.notes.extend(_cleanup_notes(passes))
        stored, declined = _int8_embeddings(model, check_batches or batches)
        if declined:
            report.notes.insert(-1, f"default recipe: int8 embedding tables not kept: "
                                f"{declined}")
        if stored is not None:
            report.passes["Int8Embeddings"] = stored.to_dict()
            report.modified = True
            report.after = model_stats(model)
            mib = (stored.constant_bytes_before - stored.constant_bytes_after) / 2**20
            report.notes.insert(-1, f"default recipe: embedding tables stored in int8 "
                                f"({mib:.1f} MiB less; checked within the default "
                                "tolerances before it was kept)")
    elif not report.modified:
        why = ("nothing met the pruning criteria" if quantized is None
               else quantized.why_nothing() if not config.fixed
               else f"nothing met the pruning criteria and {quantized.why_nothing()}")
        report.notes.append(f"the model was left unchanged: {why}")
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


def _int8_embeddings(model: ir.Model, batches: list[Batch] | None
                     ) -> tuple[QuantizeQDQResult | None, str | None]:
    """The default recipe's one storage change: embedding tables (Gather of a constant) in
    int8, rows gathered before dequantizing. Measured on MiniLM: 60.6 % of the file, cosine
    min 0.9997, onnxruntime not slower (benchmarks/weight_storage.py); int8 for MatMul
    weights made onnxruntime slower there, so those stay float. A trial: kept only when it
    saves bytes (a table tied to an output projection would be stored twice) and the model
    still passes the default tolerances against the input on the given batches (the user's
    --data first) or inputs that fit the model; any failure leaves the model as it was and
    returns the reason (second item) instead of ending the run."""
    qdq = QuantizeQDQPass(weight_only=True, ops=())
    try:
        qdq.requires(model)
    except OnnxPruneError:
        return None, None  # opset < 13 or already quantized: left alone
    trial = model.clone()
    try:
        qdq(trial)
        res = qdq.result
        if not any(layer.quantized for layer in res.layers) or res.float_weights_kept or (
                res.constant_bytes_after >= res.constant_bytes_before):
            return None, None
        for_onnxruntime(trial)  # exact; as every int8 model onnxprune writes
        check = batches or fitting_batches(model)
        verdict = compare_models(model, trial, check, tolerances=Tolerances.defaults())
    except Exception as e:  # noqa: BLE001 - a trial: reported, never fatal
        logger.debug("int8 embedding trial failed", exc_info=True)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return None, f"the trial failed ({type(e).__name__}: {first[:200]})"
    if not verdict.ok:
        return None, f"outside the default tolerances ({'; '.join(verdict.failures[:2])})"
    model.graph = trial.graph
    return res, None


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
        if config.target.startswith("flops") and not config.is_default:
            _check_flops_target(model, batches[0])
        cfg = SearchConfig(Target.parse(config.target),
                           DEFAULT_MAX_DROP if config.max_drop is None else config.max_drop,
                           chosen_metric(config.metric, config.eval), ignore=config.ignore)
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


def _refuse_if_nothing_prunable(passes: list[ir.passes.PassBase]) -> None:
    """Structured pruning that found nothing it may touch is an error, with the reasons."""
    reasons: list[str] = []
    found = False
    for p in passes:
        if isinstance(p, RemoveNeuronsPass):
            found = found or any(g.reason is None or g.channels_after < g.channels_before
                                 for g in p.result.groups)
            reasons += [f"{g.group}: {g.reason}" for g in p.result.groups[:2]] or [
                "no MatMul/Gemm with a constant weight"]
        elif isinstance(p, RemoveHeadsPass):
            found = found or any(b.reason is None or b.heads_after < b.heads_before
                                 for b in p.result.blocks)
            reasons += [f"{b.block}: {b.reason}" for b in p.result.blocks[:2]] or [
                "no attention block recognised"]
        elif isinstance(p, ZeroWeightsPass):
            return  # zeroing always applies
    if reasons and not found:
        why = "; ".join(reasons)
        raise UnsupportedModelError(
            f"nothing prunable in this model ({why}); run onnxprune inspect for details"
        )




def _check_flops_target(model: ir.Model, batch: Batch) -> None:
    """`--target flops=` counts what the search can price: weight MatMul/Gemm FLOPs. A model
    whose cost is mostly convolutions would be aimed at the wrong quantity (a ResNet-50
    counts its one Gemm); refused with what to use instead."""
    shapes = {k: list(v.shape) for k, v in batch.items()}
    try:
        total = inference_flops(model, shapes)
        conv = inference_flops(model, shapes, ops=("Conv", "ConvTranspose"))
    except Exception:  # noqa: BLE001 - shape inference failed: nothing to warn about
        return
    if total and conv / total > 0.5:
        raise OptionError(
            f"@target flops counts MatMul/Gemm FLOPs, and {conv / total:.0%} of this model's "
            "FLOPs are convolutions, which the search does not price yet; use @target "
            "params=F, or @sparsity F with @calibration")
