"""What every onnxprune pass shares when it runs inside an onnx_ir PassManager.

- calibration given as a path or plain batches is completed against the model when the
  pass runs (the model's inputs are known then; see calibration/calibration.py);
- the PassResult a pass returns carries its report (`result.report`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import onnx_ir as ir

__all__ = ["ReportPassResult", "ReportingPass", "Deferred"]


@runtime_checkable
class Deferred(Protocol):
    """Pass input completed against the model when the pass runs
    (calibration.PendingCalibration: a path or batches become a Calibration)."""

    def resolve(self, model: ir.Model) -> Any: ...


@dataclass
class ReportPassResult(ir.passes.PassResult):
    """An ir.passes.PassResult that also holds what the pass did (its `result` object)."""

    report: Any = None


class ReportingPass(ir.passes.InPlacePass):
    """Base of onnxprune's passes: completes pending calibration, returns the report."""

    calibration: Any = None
    result: Any = None

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /
                 ) -> ReportPassResult:
        model = (model_or_result.model if isinstance(model_or_result, ir.passes.PassResult)
                 else model_or_result)
        if isinstance(self.calibration, Deferred):
            self.calibration = self.calibration.resolve(model)
        res = super().__call__(model_or_result)
        return ReportPassResult(res.model, res.modified, report=self.result)
