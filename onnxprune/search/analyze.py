"""Sensitivity analysis: for every unit, the quality drop at several sparsities.

The first phase of every target search, and on its own `onnxprune analyze`: people would
rather look at these curves than read them (plot.py draws them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass

from onnxprune.calibration.calibration import Calibration
from onnxprune.calibration.data import Batch
from onnxprune.errors import InputError
from onnxprune.search.masked import MaskedModel
from onnxprune.search.quality import BuiltinMetric, UserMetric
from onnxprune.search.sensitivity import Evaluator, UnitAnalysis, analyse_units, measure_curves
from onnxprune.search.units import find_units

__all__ = ["Analysis", "analyze_model"]

Progress = Callable[[int, int, str], None]


@dataclass
class Analysis:
    units: list[UnitAnalysis]
    evaluator: Evaluator
    skipped: dict[str, str] = field(default_factory=dict)
    holdout_source: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "metric": self.evaluator.name,
            "base": self.evaluator.base,
            "holdout": self.holdout_source,
            "units": [{
                "unit": a.unit.name, "kind": a.unit.kind, "items": a.unit.items,
                "flops_per_item": a.unit.flops, "params_per_item": a.unit.params,
                "drop": {str(k): a.curve[k] for k in sorted(a.curve)},
            } for a in self.units],
            "skipped": self.skipped,
        }


def analyze_model(model: ir.Model, calib: Calibration, holdout: Sequence[Batch], *,
                  metric: BuiltinMetric | UserMetric = "cosine",
                  levels: Sequence[float] = (0.125, 0.25, 0.375, 0.5, 0.75),
                  heads: bool = True, max_fraction: float = 0.8,
                  ignore: tuple[str, ...] = (), holdout_source: str = "",
                  progress: Progress | None = None) -> Analysis:
    """Orders every unit's items by OBS and measures each unit alone at `levels`."""
    if any(not 0 < f < 1 for f in levels):
        raise InputError(f"--levels must be fractions in (0, 1), got {list(levels)}")
    NameFixPass()(model)
    units, skipped = find_units(model, calib, ignore)
    if not heads:
        units = [u for u in units if u.kind != "heads"]
    if not units:
        reasons = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3]) or (
            "no MatMul/Gemm with a constant weight and no attention block")
        raise InputError(f"nothing prunable to analyse ({reasons}); see onnxprune inspect")
    analyses = analyse_units(model, units, calib.batches, token_mask=calib.token_mask,
                             max_fraction=max_fraction, progress=progress)
    evaluator = Evaluator(MaskedModel(model, units), holdout, metric)
    measure_curves(analyses, evaluator, levels, progress)
    return Analysis(analyses, evaluator, skipped, holdout_source)
