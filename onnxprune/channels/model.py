"""What a channel group is: the slices that go together, the constants and shape literals
that follow them, and the op families the fill (channels/fill.py) walks through."""


from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxprune.core.weights import WeightUse, const_array

__all__ = ["ChannelGroup", "ConstSlice", "ShapeEdit", "BINARY", "UNARY", "MS_ELEMENTWISE",
           "POOLING", "REDUCE", "DATA_INPUTS", "NORM_PARAMS"]

# Ops whose output channel c depends only on input channel c (and constants).
UNARY = frozenset(
    {
        "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid",
        "HardSwish", "Tanh", "Erf", "Softplus", "Softsign", "Mish", "Abs", "Neg", "Exp",
        "Log", "Sqrt", "Reciprocal", "Sin", "Cos", "Identity", "Cast", "Dropout", "Clip",
        "ThresholdedRelu", "Floor", "Ceil", "Round", "Sign",
    }
)
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean"})
# com.microsoft ops (onnxruntime's transformer optimizer) that act on each channel alone;
# a bias operand (BiasGelu's B, FastGelu's bias) is a per-channel constant, sliced.
MS_ELEMENTWISE = frozenset({"BiasGelu", "FastGelu", "Gelu", "QuickGelu"})
# For these, only the inputs listed may carry channels; the rest must be scalar constants.
DATA_INPUTS = {"Clip": (0,), "Dropout": (0,), "PRelu": (0, 1)}
# Ops that keep the channel axis (1, NCHW) and work on each channel alone.
POOLING = frozenset(
    {
        "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
        "GlobalLpPool",
    }
)
# Per-channel normalisations: inputs listed are [C] constants sliced with the channels.
NORM_PARAMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}
# Reductions that keep channels when they do not reduce over the channel axis.
REDUCE = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2",
                    "ReduceL1", "ReduceProd", "ReduceSumSquare", "ReduceLogSumExp"})
# Ops that move data around without mixing channels, given constant parameters.
_LAYOUT = frozenset({"Resize", "Upsample", "Pad", "Squeeze", "Unsqueeze", "Split", "Slice",
                     "Concat", "Flatten", "Reshape", "Transpose"})


@dataclass(frozen=True)
class ConstSlice:
    """A constant cut along `axis` when channels go (bias, scale, weight).

    `cls` maps each position of that axis to the group's channel (-1: not this group's);
    None means position p is channel p.
    """

    value: ir.Value
    axis: int
    node: ir.Node
    cls: np.ndarray | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ShapeEdit:
    """A constant or attribute that spells a channel count or offset and must follow.

    kind: "reshape" (target entry `index` of `node` input 1 shrinks with `value`'s axis),
    "split" (the split sizes follow the outputs), "slice" (starts/ends follow the input),
    "group" (a depthwise Conv's group attribute follows its input channels),
    "resize" (the sizes entry of the channel axis follows the output), "concat_last" (the
    constant last piece of a run-time Reshape target, input `index` of the Concat `node`).
    """

    kind: str
    node: ir.Node
    value: ir.Value
    axis: int
    index: int = 0
    # "slice" with bounds computed at run time: (starts, ends) folded from static shapes; the
    # slicing writes the new bounds as constants of this Slice's own.
    folded: tuple[tuple[int, ...], ...] | None = field(default=None, compare=False)


@dataclass
class ChannelGroup:
    """Everything that must shrink together when channel indices of one group are removed."""

    name: str
    size: int
    producers: list[WeightUse] = field(default_factory=list)
    consumers: list[WeightUse] = field(default_factory=list)
    constants: list[ConstSlice] = field(default_factory=list)
    reshapes: list[ir.Node] = field(default_factory=list)
    members: dict[ir.Value, int] = field(default_factory=dict)  # value -> negative axis
    skip_reason: str | None = None
    maps: dict[ir.Value, np.ndarray] = field(default_factory=dict)  # value -> channel per pos
    use_maps: dict[WeightUse, np.ndarray] = field(default_factory=dict)  # weight axis map
    edits: list[ShapeEdit] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return self.skip_reason is None

    @property
    def is_matrix(self) -> bool:
        """True when every weight is a 2-D matrix and position p is channel p everywhere
        (the plain MatMul/Gemm case the calibration repair and the planner work on)."""
        uses = self.producers + self.consumers
        if any(np.ndim(const_array(u.weight)) != 2 for u in uses):
            return False
        return all(_identity(m) for m in self.use_maps.values())

    @property
    def consumers_are_matrices(self) -> bool:
        """True when every consumer is a MatMul/Gemm reading channel p at position p (the
        MatMul repair applies, whatever the producers are)."""
        if any(np.ndim(const_array(u.weight)) != 2 for u in self.consumers):
            return False
        return all(_identity(self.use_maps[u]) for u in self.consumers if u in self.use_maps)

    def channel_map(self, use: WeightUse, role: str = "") -> np.ndarray:
        """Channel of every position on the use's sliced axis (producer: out, else reduce)."""
        m = self.use_maps.get(use)
        if m is not None:
            return m
        w = const_array(use.weight)
        assert w is not None
        axis = use.out_axis if (role or ("out" if use in self.producers else "in")) == "out" \
            else use.reduce_axis
        return np.arange(w.shape[axis])

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "channels": self.size,
            "producers": [u.node.name for u in self.producers],
            "consumers": [u.node.name for u in self.consumers],
            "prunable": self.prunable,
            "reason": self.skip_reason,
        }


def _identity(m: np.ndarray) -> bool:
    return bool(np.array_equal(m, np.arange(m.size)))


