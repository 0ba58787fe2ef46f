"""onnxprune: make trained ONNX models smaller and faster without retraining.

Passes are onnx_ir passes (usable in an ir.passes.PassManager, e.g. on
`torch.onnx.export(..., dynamo=True).model`); each returns a PassResult whose `report` says
what it did. prune(), verify() and inspect() accept a path, an onnx.ModelProto or an
onnx_ir.Model.
"""

from onnxprune.api import (
    PruneConfig,
    PruneReport,
    analyze,
    inspect,
    prune,
    save_golden,
    verify,
    verify_golden,
)
from onnxprune.errors import (
    DataError,
    InputError,
    OnnxPruneError,
    ProviderError,
    UnsupportedModelError,
)
from onnxprune.graph.channels import ChannelGroup, find_channel_groups
from onnxprune.passes.base import ReportPassResult
from onnxprune.passes.canonical_gelu import CanonicalGeluPass
from onnxprune.passes.cleanup import CleanupPass
from onnxprune.passes.quantize_qdq import QuantizeQDQPass
from onnxprune.passes.reconstruct import Calibration
from onnxprune.passes.remove_heads import RemoveHeadsPass
from onnxprune.passes.remove_neurons import RemoveNeuronsPass
from onnxprune.passes.zero_weights import ZeroWeightsPass
from onnxprune.quantize import QuantizeConfig
from onnxprune.scoring.criteria import register_criterion
from onnxprune.verify import Tolerances, VerifyResult

__all__ = [
    "Calibration",
    "CanonicalGeluPass",
    "ChannelGroup",
    "CleanupPass",
    "DataError",
    "InputError",
    "OnnxPruneError",
    "PruneConfig",
    "PruneReport",
    "ProviderError",
    "QuantizeConfig",
    "QuantizeQDQPass",
    "RemoveHeadsPass",
    "RemoveNeuronsPass",
    "ReportPassResult",
    "Tolerances",
    "UnsupportedModelError",
    "VerifyResult",
    "ZeroWeightsPass",
    "analyze",
    "find_channel_groups",
    "inspect",
    "prune",
    "register_criterion",
    "save_golden",
    "verify",
    "verify_golden",
]
__version__ = "0.1.0"
