"""Units a plan decides about: an FFN channel group (items = neurons) or an attention block
(items = heads), each seen through the one consumer weight that reads its channels.

Removing item i of a unit is, for the model's output, the same as zeroing the consumer's
input rows of that item (a neuron's row of the down projection, a head's rows of the output
projection): what the producers compute for a removed item is never read again. That is
what lets one session evaluate any candidate by swapping consumer weights (masked.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxprune.attention.remove_heads import output_group, recognise_blocks
from onnxprune.calibration.calibration import Calibration
from onnxprune.channels.groups import find_channel_groups
from onnxprune.channels.model import ChannelGroup
from onnxprune.core.weights import const_array
from onnxprune.repair.reconstruct import common_input, consumer_target, shared_input

__all__ = ["Unit", "find_units"]

Kind = Literal["neurons", "heads"]


@dataclass(frozen=True)
class Unit:
    name: str  # the group or block name the passes (and plans) use
    kind: Kind
    items: int  # channels or heads
    width: int  # consumer input channels per item: 1, or the head size
    group: ChannelGroup  # the consumer(s) as a channel group, for the repair code
    flops: int  # weight-MatMul FLOPs per row that one item costs
    params: int  # parameters one item costs
    # The tensor the unit's first layers read (the FFN's up projection, Q/K/V), when they
    # share one: a real removal refits its readers to absorb the error of units before.
    source: str | None = None

    @property
    def x(self) -> str:
        """The tensor every consumer reads."""
        value = shared_input(self.group)
        assert value is not None and value.name
        return value.name

    @property
    def gain(self) -> np.ndarray | None:
        """γ of the LayerNorm after the residual sum, which weights the selection."""
        return consumer_target(self.group).norm_scale

    def columns(self, items: np.ndarray) -> np.ndarray:
        """Consumer input channels of the given items."""
        items = np.asarray(items, dtype=np.int64)
        return (items[:, None] * self.width + np.arange(self.width)[None, :]).reshape(-1)

    def max_remove(self, max_fraction: float) -> int:
        return min(self.items - 1, int(np.floor(max_fraction * self.items + 1e-9)))


def _other_dim(use: object) -> int:
    w = const_array(use.weight)  # type: ignore[attr-defined]
    assert w is not None
    return int(w.shape[1 - use.reduce_axis])  # type: ignore[attr-defined]


def _in_dim(use: object) -> int:
    w = const_array(use.weight)  # type: ignore[attr-defined]
    assert w is not None
    return int(w.shape[use.reduce_axis])  # type: ignore[attr-defined]


def _source(uses: list) -> str | None:
    value = common_input(uses)
    return None if value is None else value.name


def _neuron_unit(g: ChannelGroup) -> Unit:
    macs = sum(_in_dim(u) for u in g.producers) + sum(_other_dim(u) for u in g.consumers)
    return Unit(g.name, "neurons", g.size, 1, g, 2 * macs, macs + len(g.constants),
                _source(g.producers))


def find_units(model: ir.Model, calibration: Calibration | None = None,
               ignore: tuple[str, ...] = ()) -> tuple[list[Unit], dict[str, str]]:
    """Prunable units in graph order, and why every other group or block is left out.

    The model's nodes must be named (NameFixPass), since units are found again by name.
    """
    order = {node: i for i, node in enumerate(model.graph)}
    units: list[Unit] = []
    skipped: dict[str, str] = {}
    for g in find_channel_groups(model, ignore=ignore):
        if not g.prunable:
            skipped[g.name] = g.skip_reason or "not prunable"
        elif shared_input(g) is None:
            skipped[g.name] = "its consumers read different tensors"
        elif not g.is_matrix:
            skipped[g.name] = "its channels are Conv filters or blocks; the planner weighs " \
                "MatMul/Gemm channels only (use --sparsity)"
        elif any(u.node.graph is not model.graph for u in g.consumers):
            skipped[g.name] = "its consumer is inside a subgraph"
        else:
            units.append(_neuron_unit(g))
    for b in recognise_blocks(model, ignore, calibration):
        if not b.prunable or b.output is None:
            skipped[b.name] = b.skip_reason or "not prunable"
            continue
        dv = b.v_head_size
        # Q, K, V: head_size columns of an [in, out] weight; output: dv rows.
        macs = sum(p.head_size * _in_dim(p.use) for p in b.projections)
        macs += dv * _other_dim(b.output)
        biases = sum(p.head_size for p in b.projections if p.bias is not None)
        units.append(Unit(b.name, "heads", b.num_heads, dv, output_group(b), 2 * macs,
                          macs + biases, _source([p.use for p in b.projections])))
    units.sort(key=lambda u: order.get(u.group.consumers[0].node, 0))
    return units, skipped
