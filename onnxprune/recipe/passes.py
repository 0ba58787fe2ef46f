"""The passes a PruneConfig asks for, in the order they run."""

from __future__ import annotations

import onnx_ir as ir

from onnxprune.attention.remove_heads import RemoveHeadsPass
from onnxprune.calibration.calibration import Calibration
from onnxprune.calibration.data import Batch
from onnxprune.prune.cleanup import CleanupPass
from onnxprune.prune.remove_neurons import Progress, RemoveNeuronsPass
from onnxprune.prune.zero_weights import ZeroWeightsPass
from onnxprune.recipe.config import PruneConfig
from onnxprune.repair.augment import Augment
from onnxprune.repair.distill import DEFAULT_AUGMENT, DistillRepairPass

__all__ = ["build_passes"]


def build_passes(
    config: PruneConfig,
    model: ir.Model | None = None,
    progress: Progress | None = None,
    batches: list[Batch] | None = None,
) -> list[ir.passes.PassBase]:
    """The pruning passes to run (`batches`: the calibration data, when given).

    Without `model` only builds them, which checks the passes' own options."""
    calib = None
    if config.calibration is not None:
        calib = Calibration(
            batches or [],  # empty when only validating options
            token_mask=config.token_mask,
            reconstruct="lstsq" if config.reconstruct == "distill" else  # distill starts there
            config.reconstruct or "lstsq",
            ridge=config.ridge,
            provider=config.calibration_provider,
        )
    # With data, OBS selection (choose and refit jointly) beats scoring then refitting:
    # on MiniLM at 50 % FFN, cosine 0.955 vs 0.952 for activation + lstsq.
    criterion = config.criterion or ("obs" if config.calibration is not None else "l1")
    out: list[ir.passes.PassBase] = []
    if config.sparsity is not None and config.mode == "structured":
        out.append(
            RemoveNeuronsPass(
                sparsity=config.sparsity,
                criterion=criterion,
                calibration=calib,
                progress=progress,
                global_ranking=config.global_ranking,
                max_group_sparsity=config.max_group_sparsity,
                round_to=config.round_to,
                ignore=config.ignore,
                seed=config.seed,
            )
        )
        # With data, distillation follows the least-squares repair by default: on MiniLM
        # at 50 % FFN, held-out cosine 0.9682 -> 0.9754 (benchmarks/distill.py).
        if config.distills(model) and model is not None and calib is not None:
            out.append(DistillRepairPass(
                reference=model.clone(),  # shares the weights; passes replace, not edit
                calibration=calib, seconds=config.repair_seconds,
                max_steps=config.repair_steps,
                augment=Augment(copies=DEFAULT_AUGMENT if config.repair_augment is None
                                else config.repair_augment),
                kept=out[-1].kept))  # type: ignore[attr-defined]
    if config.heads is not None:
        out.append(
            RemoveHeadsPass(
                fraction=config.heads,
                global_ranking=config.global_heads or None,  # None: global with data
                max_block_fraction=config.max_block_heads,
                calibration=calib,
                ignore=config.ignore,
            )
        )
    zero_sparsity = config.sparsity if config.mode == "unstructured" else None
    if config.threshold is not None or zero_sparsity is not None or config.nm is not None:
        out.append(
            ZeroWeightsPass(
                threshold=config.threshold, sparsity=zero_sparsity, nm=config.nm,
                ignore=config.ignore,
            )
        )
    if not out and config.quantize is None:
        # The default recipe without data: only what provably changes no output.
        out.append(CleanupPass(batches=batches, ignore=config.ignore))
    return out


