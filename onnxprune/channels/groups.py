"""Channel groups: which (tensor, axis) slices must be removed together.

One analysis answers, for every layer with a constant weight (MatMul, Gemm, Conv,
ConvTranspose): *if index i on the output axis of this layer goes, which other
(tensor, axis, index) must go with it?* Every tensor the channels reach gets an index map
along its channel axis: position p carries the group's channel `map[p]`, or -1 when that
position belongs to something else (another input of a Concat, say). Ops relate the maps of
their inputs and outputs through one primitive, `couple` (position p of one tensor is
position src[p] of another), which covers elementwise ops, Transpose, Concat and Split
offsets, Slice ranges, Flatten/Reshape blocks and grouped convolutions. Two positions that
must go together merge their channels (union-find), so a residual Add couples producers, a
packed projection split in two and multiplied back together is one channel per pair, and a
grouped Conv removes the same index from every group.

The fill stops at the layers that reduce over the channels (consumers). Whatever else it
touches (a graph output, a shape read, LayerNorm, Softmax, an unknown op) makes the whole
group unprunable, and the reason names the node.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import onnx_ir as ir

from onnxprune.channels.fill import Fill, is_carry_through
from onnxprune.channels.model import ChannelGroup
from onnxprune.channels.shapes import Decline, Shapes, shape_hints
from onnxprune.core.weights import producer_use

__all__ = ["find_channel_groups", "group_of"]


def find_channel_groups(model: ir.Model, *, ignore: Sequence[str] = (),
                        hints: dict[str, list[int | None]] | None = None) -> list[ChannelGroup]:
    """Every channel group of the main graph, prunable or not (with the reason).

    `hints`: shape_hints(model) when the caller already has them."""
    shapes = Shapes(shape_hints(model) if hints is None else hints)
    return _find(model, ignore, shapes)


def group_of(model: ir.Model, producer: ir.Node, hints: dict[str, list[int | None]]
             ) -> ChannelGroup | None:
    """The group `producer` (a weight user) starts, found again after other groups were
    sliced: one fill from it instead of the whole analysis, with `hints` from the
    shape_hints of an earlier analysis (the values of an unsliced group keep their shapes).
    """
    graph = model.graph
    use = producer_use(producer) if producer.graph is graph else None
    if use is None:
        return None
    fill = Fill(graph, use, Shapes(hints))
    try:
        return fill.run()
    except Decline as e:
        return fill.declined(str(e))


def _find(model: ir.Model, ignore: Sequence[str], shapes: Shapes) -> list[ChannelGroup]:
    graph = model.graph
    uses = [u for n in graph if (u := producer_use(n)) is not None]  # in graph order
    groups: list[ChannelGroup] = []
    claimed: set[ir.Node] = set()
    for use in uses:
        if use.node in claimed or is_carry_through(use):
            continue
        fill = Fill(graph, use, shapes)
        try:
            group = fill.run()
        except Decline as e:
            group = fill.declined(str(e))
        claimed.update(u.node for u in group.producers)
        if not group.prunable:
            # A fill that stopped early may not have met every coupled producer; one that
            # shares an activation with an earlier declined group is the same group.
            twin = next((g for g in groups if not g.prunable
                         and any(v in g.members for v in group.members)), None)
            if twin is not None:
                twin.producers.extend(u for u in group.producers if u not in twin.producers)
                twin.members.update(group.members)
                continue
        names = [u.node.name for u in group.producers + group.consumers]
        hit = next(((n, p) for n in names for p in ignore if fnmatch.fnmatchcase(n, p)), None)
        if group.prunable and hit is not None:
            group.skip_reason = f"node '{hit[0]}' matches --ignore '{hit[1]}'"
        groups.append(group)
    return groups
