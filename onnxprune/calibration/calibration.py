"""Calibration: the batches a pass runs, the token mask, and how removal repairs.

Passes take `calibration=` as a Calibration, a path (.npz or a folder of them), a list of
batches or an iterator of batches. What they were given is checked when the pass is built,
not deep inside a run; a path or plain batches become a Calibration when the pass runs
(the model's inputs are known then), with the token mask detected from the graph.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxprune.calibration.data import Batch, check_source, input_specs, load_batches
from onnxprune.calibration.mask import AUTO, resolve_token_mask
from onnxprune.calibration.raw import DataSource
from onnxprune.errors import InputError
from onnxprune.io.runtime import Provider

__all__ = ["Calibration", "Reconstruct", "PendingCalibration", "CalibrationLike",
           "as_calibration", "with_token_mask"]

Reconstruct = Literal["none", "bias", "lstsq"]


@dataclass(frozen=True)
class Calibration:
    """Calibration data and what to do with it."""

    batches: Sequence[Batch]
    token_mask: str | None = None
    reconstruct: Reconstruct = "lstsq"
    ridge: float | None = None  # None: chosen per layer by cross-validation
    provider: Provider = "cpu"  # where calibration batches run


CalibrationLike = Calibration | str | os.PathLike[str] | Iterable[Batch]


@dataclass(frozen=True)
class PendingCalibration:
    """Calibration given as a path or batches; completed against the model when it runs."""

    source: Path | DataSource | tuple[Batch, ...]
    token_mask: str | None = AUTO
    reconstruct: Reconstruct = "lstsq"
    ridge: float | None = None

    def resolve(self, model: ir.Model) -> Calibration:
        if isinstance(self.source, (Path, DataSource)):
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

    A Calibration is used as it is; a path must name .npz data, text or images; a list or
    iterator must hold batches (mappings of input name to array), and is read once here.
    """
    if calibration is None or isinstance(calibration, (Calibration, PendingCalibration)):
        return calibration
    if isinstance(calibration, (str, os.PathLike)):
        check_source(calibration)  # exists, and is .npz data, text or images
        source = calibration if isinstance(calibration, DataSource) else Path(calibration)
        return PendingCalibration(source, token_mask=token_mask)
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


def with_token_mask(calib: Calibration, model: ir.Model, given: str | None) -> Calibration:
    """`calib` with its token mask resolved against the model (None/auto: detected)."""
    mask, _ = resolve_token_mask(model, given)
    return replace(calib, token_mask=mask)
