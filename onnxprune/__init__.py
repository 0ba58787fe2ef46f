"""onnxprune: make trained ONNX models smaller and faster without retraining.

Passes are onnx_ir passes; prune(), verify() and inspect() accept a path, an
onnx.ModelProto or an onnx_ir.Model.
"""

from onnxprune.api import PruneConfig, PruneReport, inspect, prune, verify
from onnxprune.errors import (
    DataError,
    InputError,
    OnnxPruneError,
    ProviderError,
    UnsupportedModelError,
)
from onnxprune.graph.channels import ChannelGroup, find_channel_groups
from onnxprune.passes.remove_neurons import RemoveNeuronsPass
from onnxprune.passes.zero_weights import ZeroWeightsPass
from onnxprune.scoring.criteria import register_criterion
from onnxprune.verify import Tolerances, VerifyResult

__all__ = [
    "ChannelGroup",
    "DataError",
    "InputError",
    "OnnxPruneError",
    "PruneConfig",
    "PruneReport",
    "ProviderError",
    "RemoveNeuronsPass",
    "Tolerances",
    "UnsupportedModelError",
    "VerifyResult",
    "ZeroWeightsPass",
    "find_channel_groups",
    "inspect",
    "prune",
    "register_criterion",
    "verify",
]
__version__ = "0.1.0"
