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

from onnxprune.quant.config import QuantizeConfig
from onnxprune.recipe.config import PruneConfig, from_options
from onnxprune.recipe.pipeline import Job, run_job

__all__ = ["OnnxPrune", "OnnxPruneQuantize", "PACKAGE_CONFIG"]

PACKAGE_CONFIG = str(Path(__file__).with_name("olive_config.json"))


def _options(config: type[BasePassConfig], record: type) -> dict[str, Any]:
    """The pass config's values named by the fields of `record` (PruneConfig or
    QuantizeConfig): Olive's parameters are the config's own field names."""
    return {f: getattr(config, f) for f in record.__dataclass_fields__ if hasattr(config, f)}


def _param(type_: Any, default: Any, description: str) -> PassConfigParam:
    return PassConfigParam(type_=type_, default_value=default, description=description)


def _run(model: ONNXModelHandler, config: type[BasePassConfig], output_model_path: str,
         prune_config: PruneConfig) -> ONNXModelHandler:
    """The same pipeline as the CLI (recipe.pipeline.run_job: checks, pruning, onnx.checker
    and an onnxruntime load), saved the way Olive stores models."""
    out = Path(output_model_path)
    out = out if out.suffix == ".onnx" else out / "model.onnx"
    handlers: list[ONNXModelHandler] = []

    def save(m: ir.Model, path: Path) -> None:
        handlers.append(model_proto_to_olive_model(ir.serde.serialize_model(m), path, config))

    run_job(Job(model.model_path, out, prune_config), save=save)
    return handlers[0]


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
        return _run(model, config, output_model_path,
                    from_options(PruneConfig, _options(config, PruneConfig)))


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
        options = _options(config, QuantizeConfig)
        return _run(model, config, output_model_path, PruneConfig(
            calibration=config.calibration, token_mask=config.token_mask,
            quantize=from_options(QuantizeConfig, options)))
