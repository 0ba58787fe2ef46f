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
    quantize,
    save_golden,
    verify,
    verify_golden,
)
from onnxprune.attention.remove_heads import RemoveHeadsPass
from onnxprune.calibration.calibration import Calibration
from onnxprune.channels.criteria import register_criterion
from onnxprune.channels.groups import find_channel_groups
from onnxprune.channels.model import ChannelGroup
from onnxprune.core.passes import ReportPassResult
from onnxprune.errors import (
    DataError,
    InputError,
    OnnxPruneError,
    ProviderError,
    UnsupportedModelError,
)
from onnxprune.prune.cleanup import CleanupPass
from onnxprune.prune.remove_neurons import RemoveNeuronsPass
from onnxprune.prune.zero_weights import ZeroWeightsPass
from onnxprune.quant.canonical_gelu import CanonicalGeluPass
from onnxprune.quant.config import QuantizeConfig
from onnxprune.quant.qdq_pass import QuantizeQDQPass
from onnxprune.verify.compare import Tolerances, VerifyResult

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
    "quantize",
    "register_criterion",
    "save_golden",
    "verify",
    "verify_golden",
]
__version__ = "0.1.0"
