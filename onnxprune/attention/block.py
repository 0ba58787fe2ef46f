"""What one attention block is made of, as recognition reports it and head removal uses it.

Kept apart from the recognition code so that both the unfused and the fused recognisers,
the slicing and the pass share one vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from onnxprune.channels.model import ConstSlice
from onnxprune.core.weights import WeightUse

__all__ = ["AttentionBlock", "HeadCountSite", "Projection", "RepeatSite"]


@dataclass(frozen=True)
class Projection:
    """Q, K or V: columns [offset, offset + heads * head_size) of a constant weight."""

    role: str
    use: WeightUse
    bias: ConstSlice | None
    offset: int
    head_size: int


@dataclass(frozen=True)
class HeadCountSite:
    """A literal equal to heads * per_head that must be rewritten when heads go.

    Either entry `position` of a constant shape-like input (a Reshape or Expand target,
    Split sizes, Slice starts/ends: input `input_index`), or attribute `attribute` of a
    fused node (entry `position` of it when the attribute is a list).
    """

    node: ir.Node
    per_head: int
    position: int = -1
    attribute: str | None = None
    input_index: int = 1  # which input holds the literal (Slice ends: 2)
    # the part of per_head that each query head of a unit adds (1 for a query head count,
    # the Q head size for the Q width): thinning the query heads of every unit from g to g'
    # makes the literal units * (per_head + (g' - g) * per_query)
    per_query: int = 0


@dataclass(frozen=True)
class RepeatSite:
    """A literal equal to the repeat factor (query heads per K/V head): entry `index` of
    input `input_index` of `node`; with `target`, entry `index` (from the end) of the shape
    tensor that input is (an Expand target: rewritten as shape literals are, copied where
    other layers read it), else of a constant (a Mul by the factor)."""

    node: ir.Node
    input_index: int
    index: int = 0
    target: bool = False


@dataclass
class AttentionBlock:
    """One multi-head attention: everything removing a head touches, or why it cannot."""

    name: str  # the weights' common name prefix when they have one, else the anchor's name
    kind: str
    anchor: str = ""  # the Softmax or fused attention node the block was found from
    num_heads: int = 0  # removable units: heads, or K/V groups (grouped-query attention)
    group: int = 1  # query heads per unit: 1 for multi-head, heads / kv_heads for GQA
    projections: list[Projection] = field(default_factory=list)
    output: WeightUse | None = None
    sites: list[HeadCountSite] = field(default_factory=list)
    head_constants: list[ConstSlice] = field(default_factory=list)
    # per-head values computed at run time and read by this block's node (T5's position
    # bias, shared by every layer): (value, head axis from 0, reader); the reader gets a
    # Gather of the kept heads, the value itself stays whole for its other readers
    head_inputs: list[tuple[ir.Value, int, ir.Node]] = field(default_factory=list)
    # constants holding several roles' channels side by side: (slice, role, offset)
    packed: list[tuple[ConstSlice, str, int]] = field(default_factory=list)
    members: dict[ir.Value, tuple[int, int]] = field(default_factory=dict)
    member_query: dict[ir.Value, int] = field(default_factory=dict)  # see per_query
    # grouped-query attention: the literals spelling the repeat factor, and why query heads
    # cannot be thinned inside every unit (None when they can)
    repeats: list[RepeatSite] = field(default_factory=list)
    thin_reason: str | None = "not grouped-query attention"
    nodes: set[ir.Node] = field(default_factory=set)
    unresolved_masks: list[str] = field(default_factory=list)
    skip_reason: str | None = None

    @property
    def prunable(self) -> bool:
        return self.skip_reason is None

    @property
    def v_head_size(self) -> int:
        """Rows of the output projection per unit (group x the V head size)."""
        return self.group * next(p.head_size for p in self.projections if p.role == "v")

    @property
    def query_heads(self) -> int:
        return self.num_heads * self.group

    @property
    def out_head_size(self) -> int:
        return self.v_head_size

    def projection(self, role: str) -> Projection:
        return next(p for p in self.projections if p.role == role)

    def node_names(self) -> list[str]:
        names = [p.use.node.name or "" for p in self.projections]
        if self.output is not None:
            names.append(self.output.node.name or "")
        return [self.name, self.anchor, *names]

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "node": self.anchor,
            "heads": self.num_heads * self.group,
            "kv_heads": self.num_heads,
            "head_size": self.projections[0].head_size if self.projections else None,
            "projections": {p.role: p.use.node.name for p in self.projections},
            "output": None if self.output is None else self.output.node.name,
            "prunable": self.prunable,
            "reason": self.skip_reason,
        }
