"""The distillation stage of a plan: after its channels are removed and refitted by least
squares, each pruned FFN block learns the original's block output (passes/distill.py).

A search runs it on every real removal, so the quality it measures - and the budget
correction it derives from it - are those of the distilled model. A plan records the steps
each block took; a replay takes exactly those steps, which gives the same bytes whatever the
machine's speed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.calibration.calibration import Calibration
from onnxprune.repair.augment import Augment
from onnxprune.repair.distill import DEFAULT_AUGMENT, DistillRepairPass, DistillResult

__all__ = ["DistillStage", "run_distill"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillStage:
    """How a search distils each real removal: a time cap and a step cap per block (neither:
    the pass's default arithmetic budget, so the search does not depend on the machine's
    load) and the edited copies of the calibration sentences."""

    seconds: float | None = None
    steps: int | None = None
    augment: int = DEFAULT_AUGMENT


def run_distill(model: ir.Model, reference: ir.Model, calib: Calibration,
                kept: Mapping[str, tuple[int, ...]], *, seconds: float | None, augment: int,
                max_steps: int | None = None, steps: Mapping[str, int] | None = None,
                horizons: Mapping[str, int] | None = None) -> DistillResult:
    """Distils the pruned groups named in `kept` of `model` (in place) against `reference`.

    `steps` and `horizons` replay a recorded run (DistillResult.steps, .horizons);
    otherwise `seconds` (shared by the blocks) and `max_steps` (per block) cap the
    optimisation (neither: the default arithmetic budget). Blocks whose group
    kept every channel are left alone, as are attention blocks (distillation covers FFN
    groups).
    """
    p = DistillRepairPass(
        reference=reference, calibration=calib, seconds=seconds, max_steps=max_steps,
        groups=set(kept) if steps is None else set(steps),
        kept={k: np.asarray(v, dtype=np.int64) for k, v in kept.items()},
        augment=Augment(copies=augment), steps=steps, horizons=horizons)
    p(model)
    logger.info("distillation: %d of %d blocks improved in %.0f s", p.result.distilled,
                len(p.result.blocks), p.result.seconds)
    return p.result
