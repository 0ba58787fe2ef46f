"""Back from a flat [.., heads * size] tensor to its projection, through packed QKV.

Half of `Trace` (graph/attention_trace.py), kept apart to keep both readable: the Q, K and
V projections, their biases (read through the Identity nodes the legacy exporter puts in
front of de-duplicated constants), and packed projections cut by Split or Slice on the last
axis (GPT-2 c_attn, Phi-3 qkv_proj), whose split sizes and slice bounds follow the heads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxprune.attention.block import HeadCountSite, Projection
from onnxprune.channels.model import ConstSlice
from onnxprune.core.shape_literals import target_entries
from onnxprune.core.weights import WeightUse, const_array, is_constant

if TYPE_CHECKING:
    from onnxprune.attention.block import AttentionBlock

__all__ = ["Decline", "ProjectionTrace", "STD", "PASS", "int_attr", "label", "is_scalar"]

STD = ("", "ai.onnx")
PASS = frozenset({"Cast", "Identity", "Dropout"})


class Decline(Exception):
    """The block cannot be pruned safely; the message, naming the node, is the reason."""


def label(node: ir.Node) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else node.op_type


def is_scalar(value: ir.Value | None) -> bool:
    arr = const_array(value)
    return arr is not None and arr.size == 1


def int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def _constant_through_identity(value: ir.Value | None
                               ) -> tuple[ir.Value, ir.Node] | None:
    """(constant, the node that reads it) for a constant or an Identity of one (the legacy
    exporter de-duplicates equal initializers behind Identity nodes)."""
    if value is None:
        return None
    if is_constant(value):
        return value, None  # type: ignore[return-value]  # read directly: the caller's node
    node = value.producer()
    if node is not None and node.op_type == "Identity" and is_constant(node.inputs[0]):
        return node.inputs[0], node  # type: ignore[return-value]
    return None



class ProjectionTrace:
    """The projection side of a trace; `Trace` supplies the state used here."""

    block: AttentionBlock
    widths: dict[str, int]
    packed_parts: dict[ir.Node, dict[int, str]]
    slices: list[tuple[ir.Node, str, int, int]]
    flat_rank: int | None

    def member(self, value: ir.Value, axis: int, kind: str) -> None:
        raise NotImplementedError

    def site(self, node: ir.Node, position: int, kind: str, attribute: str | None = None) -> None:
        raise NotImplementedError

    def trace_flat(self, value: ir.Value, role: str, *, offset: int = 0) -> None:
        """Back from [.., heads*size] to the projection; through a packed QKV projection
        cut by Split or Slice on the last axis (then `offset` is the role's first column)."""
        bias: ConstSlice | None = None
        kind = role
        equal: tuple[int, int] | None = None  # (index, parts) of an equal Split
        end: int | None = None  # the role's last column + 1 in a packed projection
        while True:
            self.member(value, -1, kind)
            node = value.producer()
            if node is None:
                raise Decline(f"the {role.upper()} input '{value.name}' is not projected "
                               "in this graph")
            self.block.nodes.add(node)
            op = node.op_type if node.domain in STD else f"{node.domain}.{node.op_type}"
            if op == "Add" and any(_constant_through_identity(i) is not None
                                   for i in node.inputs):
                k = 0 if _constant_through_identity(node.inputs[0]) is not None else 1
                bias = self._bias(node, node.inputs[k], bias)  # type: ignore[arg-type]
                value = node.inputs[1 - k]  # type: ignore[assignment]
            elif op in ("Mul", "Div") and is_scalar(node.inputs[1]) or op in PASS:
                value = node.inputs[0]  # type: ignore[assignment]
            elif op in ("MatMul", "Gemm"):
                if equal is not None:
                    w = const_array(node.inputs[1])
                    cols = 0 if w is None else w.shape[0 if node.op_type == "Gemm" and int_attr(
                        node, "transB", 0) else -1]
                    offset += equal[0] * (cols // equal[1])
                    end = offset + cols // equal[1]
                self._projection(node, value, role, bias, offset, end)
                return
            elif op == "Split":
                offset, equal, end = self._packed_split(node, value, role, offset)
                kind = "packed"
                value = node.inputs[0]  # type: ignore[assignment]
            elif op == "Slice":
                offset, end = self._packed_slice(node, value, role, offset)
                kind = "packed"
                value = node.inputs[0]  # type: ignore[assignment]
            elif op == "Reshape" and kind == "packed":
                self._flat_reshape(node, role)
                value = node.inputs[0]  # type: ignore[assignment]
            else:
                raise Decline(f"{label(node)} feeds the {role.upper()} heads and is not "
                               "understood")

    def _bias(self, node: ir.Node, value: ir.Value, bias: ConstSlice | None) -> ConstSlice | None:
        const, holder = _constant_through_identity(value)  # type: ignore[misc]
        holder = holder or node
        arr = const_array(const)
        assert arr is not None
        if arr.size <= 1:
            return bias
        if bias is not None or arr.size != arr.shape[-1]:
            raise Decline(f"{label(node)} adds a constant that is not a bias")
        if holder is not node:
            self.block.nodes.add(holder)
        return ConstSlice(const, arr.ndim - 1, holder)

    def _axis_is_last(self, node: ir.Node, axis: int, value: ir.Value) -> bool:
        if axis == -1:
            return True
        rank = len(value.shape) if value.shape is not None else self.flat_rank
        return rank is not None and axis == rank - 1

    def _packed_split(self, node: ir.Node, value: ir.Value, role: str, offset: int
                      ) -> tuple[int, tuple[int, int] | None, int | None]:
        index = list(node.outputs).index(value)
        if not self._axis_is_last(node, int_attr(node, "axis", 0), node.inputs[0]):  # type: ignore[arg-type]
            raise Decline(f"{label(node)} splits the {role.upper()} projection on another axis")
        self.packed_parts.setdefault(node, {})[index] = role
        sizes = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if sizes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            raise Decline(f"{label(node)} splits the packed projection at run time")
        if sizes is None:  # equal parts (num_outputs, or no split input)
            return offset, (index, len(node.outputs)), None
        sizes = np.asarray(sizes).reshape(-1)
        self.site(node, index, role)
        first = offset + int(sizes[:index].sum())
        return first, None, first + int(sizes[index])

    def _packed_slice(self, node: ir.Node, value: ir.Value, role: str, offset: int
                      ) -> tuple[int, int]:
        starts, ends = const_array(node.inputs[1]), const_array(node.inputs[2])
        axes = const_array(node.inputs[3]) if len(node.inputs) > 3 else None
        steps = const_array(node.inputs[4]) if len(node.inputs) > 4 else None
        if starts is None or ends is None or starts.size != 1 or (
                steps is not None and int(steps.reshape(-1)[0]) != 1):
            raise Decline(f"{label(node)} cuts the {role.upper()} projection at run time")
        axis = int(axes.reshape(-1)[0]) if axes is not None else 0
        if not self._axis_is_last(node, axis, node.inputs[0]):  # type: ignore[arg-type]
            raise Decline(f"{label(node)} slices the {role.upper()} projection on another axis")
        start, end = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
        if start < 0:
            raise Decline(f"{label(node)} cuts the packed projection from its end")
        self.packed_parts.setdefault(node, {})[0] = role
        self.slices.append((node, role, start, end))
        return offset + start, offset + end

    def _flat_reshape(self, node: ir.Node, role: str) -> None:
        """A Reshape that keeps the packed channels on the last axis (2-D -> 3-D and back)."""
        entries = target_entries(node.inputs[1])
        if not entries:
            raise Decline(f"the target of {label(node)} cannot be read")
        last = entries[-1]
        if last.kind == "copy":
            raise Decline(f"{label(node)} copies the packed width from its input")
        if last.kind == "literal":
            self.site(node, -1, "packed")

    def _projection(self, node: ir.Node, value: ir.Value, role: str, bias: ConstSlice | None,
                    offset: int, end: int | None = None) -> None:
        w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None or w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
            raise Decline(f"{label(node)} ({role.upper()}) has no constant 2-D weight")
        if node.op_type == "Gemm" and int_attr(node, "transA", 0):
            raise Decline(f"{label(node)} uses transA")
        trans_b = node.op_type == "Gemm" and int_attr(node, "transB", 0) == 1
        use = WeightUse(node, node.inputs[1], 1 if trans_b else 0, 0 if trans_b else 1)  # type: ignore[arg-type]
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            if bias is not None or _constant_through_identity(node.inputs[2]) is None:
                raise Decline(f"{label(node)} has a bias that is not a plain constant")
            bias = self._bias(node, node.inputs[2], None)  # type: ignore[arg-type]
        cols = int(w.shape[use.out_axis])
        self.block.projections.append(Projection(role, use, bias, offset, 0))
        self.widths[role] = min(cols, end if end is not None else cols) - offset

    # -- forwards from the 4-D context to the output projection ----------------------------
    def slice_sites(self, unit: dict[str, int], query: int = 0) -> list[HeadCountSite]:
        """Starts and ends of the Slices that cut a packed projection, in units (`query`:
        the Q head size, what each query head of a unit adds once Q is passed)."""
        units = self.block.num_heads
        order = sorted(self.slices, key=lambda t: t[2])
        total = units * sum(unit[r] for _, r, _, _ in order)
        sites, before, q = [], 0, 0
        for node, role, start, end in order:
            if start != units * before:
                raise Decline(f"{label(node)} starts the {role.upper()} part at column {start}, "
                               f"not {units * before}")
            if before:
                sites.append(HeadCountSite(node, before, 0, None, 1, q))
            stop = before + unit[role]
            q += query if role == "q" else 0
            if end == units * stop and end < total:
                sites.append(HeadCountSite(node, stop, 0, None, 2, q))
            elif end < total:
                raise Decline(f"{label(node)} ends the {role.upper()} part at column {end}")
            before = stop
        return sites

    def check_packing(self) -> None:
        for node, parts in self.packed_parts.items():
            if node.op_type == "Split" and set(parts) != set(range(len(node.outputs))):
                free = next(i for i in range(len(node.outputs)) if i not in parts)
                raise Decline(f"output {free} of {label(node)} is not part of the attention")
