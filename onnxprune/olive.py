"""Olive (olive-ai) passes that run onnxprune inside an Olive workflow.

Register them with the package config shipped beside this module
(`onnxprune/olive_config.json`, path: `onnxprune.olive.PACKAGE_CONFIG`) and name them in a
workflow's "passes": OnnxPrune (structured FFN / head removal, a target search, or the
default recipe), OnnxPruneQuantize (calibrated int8 QDQ). Calibration data is a path to
.npz batches (`calibration`), as on the command line. Needs `pip install onnxprune[olive]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx_ir as ir
from olive.hardware import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.passes import Pass
from olive.passes.onnx.common import get_external_data_config, model_proto_to_olive_model
from olive.passes.pass_config import BasePassConfig, PassConfigParam

from onnxprune.io.models import load_model
from onnxprune.quant.config import QuantizeConfig
from onnxprune.recipe.config import PruneConfig
from onnxprune.recipe.pipeline import check_written
from onnxprune.recipe.run import prune_model

__all__ = ["OnnxPrune", "OnnxPruneQuantize", "PACKAGE_CONFIG"]

PACKAGE_CONFIG = str(Path(__file__).with_name("olive_config.json"))


def _param(type_: Any, default: Any, description: str) -> PassConfigParam:
    return PassConfigParam(type_=type_, default_value=default, description=description)


def _save(model: ir.Model, config: type[BasePassConfig], output_model_path: str
          ) -> ONNXModelHandler:
    check_written(model)  # onnx.checker and an onnxruntime load, as the CLI does
    proto = ir.serde.serialize_model(model)
    out = Path(output_model_path)
    out = out if out.suffix == ".onnx" else out / "model.onnx"
    return model_proto_to_olive_model(proto, out, config)


class OnnxPrune(Pass):
    """Structured pruning: `sparsity` of every FFN group and/or `heads`, a `target` search
    within `max_drop`, or, with none of them, onnxprune's default recipe."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        return {
            "sparsity": _param(float, None, "fraction of each FFN group's neurons to remove"),
            "heads": _param(float, None, "fraction of each attention block's heads to remove"),
            "target": _param(str, None, "params=F, flops=F or latency=F (needs calibration)"),
            "max_drop": _param(float, None, "quality budget of a target search"),
            "calibration": _param(str, None, ".npz file or folder of .npz batches"),
            "token_mask": _param(str, None, "padding-mask input (default: detected; none)"),
            **get_external_data_config(),
        }

    def _run_for_config(self, model: ONNXModelHandler, config: type[BasePassConfig],
                        output_model_path: str) -> ONNXModelHandler:
        m = load_model(model.model_path)
        prune_model(m, PruneConfig(sparsity=config.sparsity, heads=config.heads,
                                   target=config.target, max_drop=config.max_drop,
                                   calibration=config.calibration,
                                   token_mask=config.token_mask))
        return _save(m, config, output_model_path)


class OnnxPruneQuantize(Pass):
    """8-bit QDQ as `onnxprune quantize` makes it (calibrated activations, int8 weights)."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        return {
            "calibration": _param(str, None, ".npz file or folder of .npz batches"),
            "weight_only": _param(bool, False, "int8 weights only (no calibration needed)"),
            "token_mask": _param(str, None, "padding-mask input (default: detected; none)"),
            **get_external_data_config(),
        }

    def _run_for_config(self, model: ONNXModelHandler, config: type[BasePassConfig],
                        output_model_path: str) -> ONNXModelHandler:
        m = load_model(model.model_path)
        prune_model(m, PruneConfig(calibration=config.calibration, token_mask=config.token_mask,
                                   quantize=QuantizeConfig(weight_only=config.weight_only)))
        return _save(m, config, output_model_path)
