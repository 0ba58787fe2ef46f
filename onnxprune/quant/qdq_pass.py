"""QuantizeQDQPass: int8 QDQ insertion that chooses its own ranges from calibration data.

InsertQDQPass (quant/insert_qdq.py) only rewrites, with ranges and float layers chosen by
the caller. Given `calibration` (or a `config`), this pass makes those choices itself,
through the same driver as `onnxprune quantize` (quant/driver.py), which runs InsertQDQPass
with the ranges it chose; without either it is InsertQDQPass.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import onnx_ir as ir

from onnxprune.calibration.calibration import CalibrationLike, as_calibration
from onnxprune.errors import InputError
from onnxprune.quant.config import QuantizeConfig
from onnxprune.quant.driver import quantize_model
from onnxprune.quant.insert_qdq import InsertQDQPass

__all__ = ["QuantizeQDQPass"]


class QuantizeQDQPass(InsertQDQPass):
    """Inserts QDQ around MatMul/Gemm/Conv inputs and int8 embedding tables.

    With `calibration` (a path, a list or iterator of batches, or a Calibration) the pass
    chooses ranges, SmoothQuant vectors and float layers as `onnxprune quantize` does
    (`config`: its options; the token mask is detected from the graph unless the config
    names one); `result` is then the QuantizeReport. `rewrite` takes InsertQDQPass's options
    (`activations=` ranges chosen elsewhere, `dtype=`, `weight_only=`, `ops=`, ...).
    """

    def __init__(self, *, calibration: CalibrationLike | None = None,
                 config: QuantizeConfig | None = None, **rewrite: Any) -> None:
        super().__init__(**rewrite)
        self.calibration = as_calibration(calibration)
        self.config = config
        if config is not None and rewrite.get("activations"):
            raise InputError("give QuantizeQDQPass activations= (ranges chosen elsewhere) or "
                             "config= (chosen from calibration data here), not both")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.calibration is None and self.config is None:
            return super().call(model)
        config = self.config or QuantizeConfig(
            activation_dtype=self.dtype, weight_only=self.weight_only, ops=self.ops,
            exclude=self.exclude, quantize_embeddings=self.embeddings,
            activation_matmuls=self.activation_matmuls, embedding_layout=self.embedding_layout,
        )
        batches = None
        if self.calibration is not None:  # completed against the model by ReportingPass
            batches = list(self.calibration.batches)
            if config.token_mask is None:
                config = replace(config, token_mask=self.calibration.token_mask)
        report = quantize_model(model, config, batches)
        self.result = report
        return ir.passes.PassResult(model, modified=report.quantized > 0)
