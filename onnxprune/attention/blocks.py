"""Attention blocks: which weights, shape literals and recorded shapes one head spans.

Head removal must shrink the Q, K and V projections, the output projection, and every
place that spells the head count, together; miss one and the model either fails to load or,
worse, silently regroups channels into different heads. So recognition is strict: it
follows the data from the Softmax (or a fused attention op) back to the projections and
forward to the output projection, tracking on every tensor which axis carries the heads,
and declines, with the reason, whatever it does not fully understand (run-time head
counts, grouped K/V, per-head masks, rotary embeddings, unknown ops).

Recognised forms:
- unfused, as both torch exporters write it: Q/K/V MatMul (+ bias Add) -> Reshape
  [.., H, D] -> Transpose -> MatMul(Q, Kᵀ) -> scale -> + mask -> Softmax -> MatMul(., V)
  -> Transpose -> Reshape [.., H*D] -> output MatMul;
- com.microsoft Attention (packed QKV weight) and MultiHeadAttention (separate 3-D Q/K/V);
- ONNX Attention (opset 23+), with 3-D inputs (q_num_heads) or 4-D inputs fed as above.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx_ir as ir

from onnxprune.attention.block import AttentionBlock, HeadCountSite, Projection
from onnxprune.attention.closing import close
from onnxprune.attention.fused import recognise_fused
from onnxprune.attention.trace import PASS, STD, Decline, Trace, int_attr, is_scalar, label
from onnxprune.core.weights import is_constant

__all__ = ["AttentionBlock", "HeadCountSite", "Projection", "find_attention_blocks"]


# -- entry points per form -------------------------------------------------------------------
def _softmax_block(graph: ir.Graph, softmax: ir.Node,
                   shapes: Mapping[str, Sequence[int]]) -> AttentionBlock | None:
    """Returns None when the Softmax is not fed by a product of two activations."""
    scores = _find_scores(softmax.inputs[0])  # type: ignore[arg-type]
    if scores is None:
        return None
    walk = Trace(graph, softmax, "unfused", shapes)
    try:
        axis = int_attr(softmax, "axis", -1)
        shape = softmax.inputs[0].shape  # type: ignore[union-attr]
        if axis not in (-1, 3 if shape is None else len(shape) - 1):
            raise Decline(f"{label(softmax)} normalises axis {axis}, not the key axis")
        walk.member(softmax.inputs[0], -3, "head")  # type: ignore[arg-type]
        for node, path in scores.chain:
            walk.block.nodes.add(node)
            walk.member(node.outputs[0], -3, "head")
            for i, other in enumerate(node.inputs):
                if other is None or other is path and not (node.op_type == "Where" and i == 0):
                    continue
                if node.op_type in ("Mul", "Div") and not is_scalar(other):
                    raise Decline(f"{label(node)} scales the scores per element")
                if node.op_type in ("Add", "Sub", "Where"):
                    walk.masks.append((other, -3, "head"))
        mm = scores.matmul
        walk.block.nodes.add(mm)
        walk.member(mm.outputs[0], -3, "head")
        walk.trace_heads(mm.inputs[0], -3, -1, "q")  # type: ignore[arg-type]
        walk.trace_heads(mm.inputs[1], -3, -2, "k")  # type: ignore[arg-type]
        ctx = _context_matmul(softmax, walk)
        walk.trace_heads(ctx.inputs[1], -3, -1, "v")  # type: ignore[arg-type]
        walk.trace_output(ctx.outputs[0], -3, -1)
        return close(walk)
    except Decline as e:
        walk.block.skip_reason = str(e)
        return walk.block


@dataclass
class _Scores:
    matmul: ir.Node
    chain: list[tuple[ir.Node, ir.Value]]  # (node, its input on the path), MatMul first


def _find_scores(value: ir.Value, depth: int = 8) -> _Scores | None:
    """The MatMul(Q, Kᵀ) behind a Softmax input, through scale, mask and cast ops."""
    node = value.producer()
    if node is None or depth == 0 or node.domain not in STD:
        return None
    if node.op_type == "MatMul":
        if any(i is None or is_constant(i) for i in node.inputs):
            return None
        return _Scores(node, [])
    if node.op_type in ("Add", "Sub", "Mul", "Div", "Where", "Cast", "Identity"):
        start = 1 if node.op_type == "Where" else 0
        for inp in node.inputs[start:]:
            if inp is None or is_constant(inp):
                continue
            found = _find_scores(inp, depth - 1)
            if found is not None:
                found.chain.append((node, inp))
                return found
    return None


def _nan_guard(value: ir.Value) -> ir.Node | None:
    """Where(IsNaN(p), c, p): what exporters add after Softmax for fully masked rows.

    It acts on each probability alone, so heads pass through it unchanged."""
    uses = list(value.uses())
    if len(uses) != 2 or value.is_graph_output():
        return None
    isnan = next((u.node for u in uses if u.node.op_type == "IsNaN"), None)
    where = next((u.node for u in uses if u.node.op_type == "Where" and u.idx == 2), None)
    if isnan is None or where is None or where.inputs[0] is not isnan.outputs[0]:
        return None
    if len(list(isnan.outputs[0].uses())) != 1 or not is_scalar(where.inputs[1]):
        return None
    return where


def _context_matmul(softmax: ir.Node, walk: Trace) -> ir.Node:
    value = softmax.outputs[0]
    while True:
        walk.member(value, -3, "head")
        guard = _nan_guard(value)
        if guard is not None:
            walk.block.nodes.update({guard, guard.inputs[0].producer()})  # type: ignore[arg-type]
            walk.member(guard.inputs[0], -3, "head")  # type: ignore[arg-type]
            value = guard.outputs[0]
            continue
        uses = list(value.uses())
        if value.is_graph_output() or len(uses) != 1:
            raise Decline(f"the attention probabilities '{value.name}' are used elsewhere")
        node = uses[0].node
        walk.block.nodes.add(node)
        if node.op_type in PASS:
            value = node.outputs[0]
            continue
        if node.op_type == "MatMul" and uses[0].idx == 0:
            return node
        raise Decline(f"the attention probabilities reach {label(node)}, not MatMul(., V)")


def _fused_block(graph: ir.Graph, node: ir.Node,
                 shapes: Mapping[str, Sequence[int]]) -> AttentionBlock:
    walk = Trace(graph, node, f"{node.domain or 'ai.onnx'}.{node.op_type}", shapes)
    try:
        recognise_fused(walk, node)
        return walk.block
    except Decline as e:
        walk.block.skip_reason = str(e)
        return walk.block


def find_attention_blocks(
    model: ir.Model,
    *,
    ignore: Sequence[str] = (),
    known_shapes: Mapping[str, Sequence[int]] | None = None,
) -> list[AttentionBlock]:
    """Every attention block of the main graph, prunable or not (with the reason).

    `known_shapes` (tensor name -> concrete shape, e.g. from one run) settles masks whose
    shape the file does not record.
    """
    shapes = known_shapes or {}
    blocks: list[AttentionBlock] = []
    for node in model.graph:
        block: AttentionBlock | None = None
        if node.op_type == "Softmax" and node.domain in STD:
            block = _softmax_block(model.graph, node, shapes)
        elif (node.domain == "com.microsoft"
              and node.op_type in ("Attention", "MultiHeadAttention", "GroupQueryAttention")) or (
                node.domain in STD and node.op_type == "Attention"):
            block = _fused_block(model.graph, node, shapes)
        if block is None:
            continue
        block.name = _display_name(block)
        hit = next(((n, p) for n in block.node_names() for p in ignore
                    if fnmatch.fnmatchcase(n, p)), None)
        if block.prunable and hit is not None:
            block.skip_reason = f"node '{hit[0]}' matches --ignore '{hit[1]}'"
        blocks.append(block)
    names = [b.name for b in blocks]
    for b in blocks:  # a prefix two blocks share names neither
        if names.count(b.name) > 1:
            b.name = b.anchor or b.name
    return blocks


def _display_name(block: AttentionBlock) -> str:
    """'bert.encoder.layer.0.attention.self' from the Q/K/V parameter names, when they share
    a dotted prefix: the same name for both exporters, where node names differ."""
    names = [p.bias.value.name for p in block.projections if p.bias is not None]
    names = [n for n in names if n] or [p.use.weight.name or "" for p in block.projections]
    names = list(dict.fromkeys(names))
    if len(names) == 1 and names[0].count(".") >= 3:  # one packed projection: drop 'c_attn.weight'
        return names[0].rsplit(".", 2)[0]
    if len(names) < 2:
        return block.name
    parts = [n.split(".") for n in names]
    prefix = []
    for tokens in zip(*parts, strict=False):
        if len(set(tokens)) != 1:
            break
        prefix.append(tokens[0])
    return ".".join(prefix) if len(prefix) >= 2 else block.name
