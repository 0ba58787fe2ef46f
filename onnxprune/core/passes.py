"""What every onnxprune pass shares when it runs inside an onnx_ir PassManager.

- `calibration=` accepts a Calibration, a path (.npz or a folder of them), a list of
  batches or an iterator of batches, and is checked when the pass is built, not deep
  inside a run;
- a path or plain batches become a Calibration when the pass runs (the model's inputs are
  known then), with the token mask detected from the graph;
- the PassResult a pass returns carries its report (`result.report`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxprune.calibration.data import Batch, batch_files, input_specs, load_batches
from onnxprune.calibration.mask import AUTO, resolve_token_mask
from onnxprune.errors import InputError
from onnxprune.repair.reconstruct import Calibration, Reconstruct

__all__ = ["ReportPassResult", "ReportingPass", "PendingCalibration", "CalibrationLike",
           "as_calibration"]

CalibrationLike = Calibration | str | os.PathLike[str] | Iterable[Batch]


@dataclass
class ReportPassResult(ir.passes.PassResult):
    """An ir.passes.PassResult that also holds what the pass did (its `result` object)."""

    report: Any = None


@dataclass(frozen=True)
class PendingCalibration:
    """Calibration given as a path or batches; completed against the model when it runs."""

    source: Path | tuple[Batch, ...]
    token_mask: str | None = AUTO
    reconstruct: Reconstruct = "lstsq"
    ridge: float | None = None

    def resolve(self, model: ir.Model) -> Calibration:
        if isinstance(self.source, Path):
            batches = list(load_batches(self.source, input_specs(model)))
        else:
            batches = list(self.source)
        mask, _ = resolve_token_mask(model, self.token_mask)
        return Calibration(batches, token_mask=mask, reconstruct=self.reconstruct,
                           ridge=self.ridge)


def as_calibration(
    calibration: CalibrationLike | PendingCalibration | None,
    *,
    token_mask: str | None = AUTO,
) -> Calibration | PendingCalibration | None:
    """Checks what a pass was given as calibration data, with a clear error now.

    A Calibration is used as it is; a path must name .npz data; a list or iterator must
    hold batches (mappings of input name to array), and is read once here.
    """
    if calibration is None or isinstance(calibration, (Calibration, PendingCalibration)):
        return calibration
    if isinstance(calibration, (str, os.PathLike)):
        batch_files(calibration)  # exists, and is .npz data
        return PendingCalibration(Path(calibration), token_mask=token_mask)
    if isinstance(calibration, (bytes, Mapping, np.ndarray)) or not isinstance(
            calibration, Iterable):
        what = "one batch" if isinstance(calibration, Mapping) else type(calibration).__name__
        raise InputError(
            f"calibration= got {what}; give a path to .npz data, a list of batches "
            "(dicts of input name -> array) or an iterator of them"
        )
    batches = tuple(calibration)
    for i, b in enumerate(batches):
        if not isinstance(b, Mapping) or not all(
                isinstance(k, str) and isinstance(v, np.ndarray) for k, v in b.items()):
            raise InputError(f"calibration batch {i} is a {type(b).__name__}; each batch must "
                             "be a dict of input name -> numpy array")
    if not batches:
        raise InputError("calibration= holds no batches")
    return PendingCalibration(batches, token_mask=token_mask)


class ReportingPass(ir.passes.InPlacePass):
    """Base of onnxprune's passes: completes pending calibration, returns the report."""

    calibration: Any = None
    result: Any = None

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /
                 ) -> ReportPassResult:
        model = (model_or_result.model if isinstance(model_or_result, ir.passes.PassResult)
                 else model_or_result)
        if isinstance(self.calibration, PendingCalibration):
            self.calibration = self.calibration.resolve(model)
        res = super().__call__(model_or_result)
        return ReportPassResult(res.model, res.modified, report=self.result)


def with_token_mask(calib: Calibration, model: ir.Model, given: str | None) -> Calibration:
    """`calib` with its token mask resolved against the model (None/auto: detected)."""
    mask, _ = resolve_token_mask(model, given)
    return replace(calib, token_mask=mask)
