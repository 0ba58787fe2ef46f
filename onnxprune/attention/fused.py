"""Recognising fused attention ops: the head count is an attribute, not a Reshape literal.

- com.microsoft Attention (onnxruntime's transformer optimizer): one packed [in, Wq+Wk+Wv]
  weight and bias, attributes num_heads and optionally qkv_hidden_sizes;
- com.microsoft MultiHeadAttention: 3-D Q, K, V from separate projections, an optional
  packed bias, attribute num_heads;
- com.microsoft GroupQueryAttention: 3-D Q, K, V with num_heads / kv_num_heads; a K/V head
  goes together with the query heads that read it;
- ONNX Attention (opset 23+): 3-D inputs with q_num_heads / kv_num_heads, or 4-D inputs
  split by Reshape/Transpose exactly as in the unfused form.
Past/present key-value caches are declined except for GroupQueryAttention's, fed as graph
inputs and returned as graph outputs (the pruned model reads and writes the kept heads' slice
of the cache); Attention's rotary flag is declined.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxprune.attention.block import Projection
from onnxprune.attention.closing import close
from onnxprune.attention.trace import Decline, Trace, int_attr, label
from onnxprune.channels.model import ConstSlice
from onnxprune.core.weights import WeightUse, const_array

__all__ = ["recognise_fused"]


def _present(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _unused_outputs(node: ir.Node, first: int) -> None:
    for out in node.outputs[first:]:
        if out.uses() or out.is_graph_output():
            raise Decline(f"output '{out.name}' of {label(node)} (a key/value cache or "
                           "attention weights) is used")


def recognise_fused(walk: Trace, node: ir.Node) -> None:
    """Fills `walk.block` for a fused attention node, or raises Decline."""
    walk.block.nodes.add(node)
    if node.domain == "com.microsoft" and node.op_type == "Attention":
        _ms_attention(walk, node)
    elif node.domain == "com.microsoft" and node.op_type == "GroupQueryAttention":
        _ms_group_query(walk, node)
    elif node.domain == "com.microsoft":
        _ms_multihead(walk, node)
    else:
        _onnx_attention(walk, node)


def _ms_attention(walk: Trace, node: ir.Node) -> None:
    heads = int_attr(node, "num_heads", 0)
    if heads <= 0:
        raise Decline(f"{label(node)} has no num_heads attribute")
    if int_attr(node, "do_rotary", 0):
        raise Decline(f"{label(node)} applies rotary embeddings (do_rotary)")
    for i, what in ((4, "a past key/value state"), (6, "a past sequence length")):
        if _present(node, i) is not None:
            raise Decline(f"{label(node)} takes {what}")
    _unused_outputs(node, 1)
    weight = node.inputs[1]
    w = const_array(weight)
    if w is None or w.ndim != 2:
        raise Decline(f"{label(node)} has no constant 2-D weight")
    sizes_attr = node.attributes.get("qkv_hidden_sizes")
    widths = list(sizes_attr.as_ints()) if sizes_attr is not None else [w.shape[1] // 3] * 3
    if len(widths) != 3 or sum(widths) != w.shape[1]:
        raise Decline(f"{label(node)}: Q/K/V widths {widths} do not add up to the weight's "
                       f"{w.shape[1]} columns")
    bias = _present(node, 2)
    b = const_array(bias)
    if bias is not None and (b is None or b.ndim != 1):
        raise Decline(f"{label(node)} has a bias that is not a 1-D constant")
    offset = 0
    for k, (role, width) in enumerate(zip("qkv", widths, strict=True)):
        use = WeightUse(node, weight, 0, 1)  # type: ignore[arg-type]
        bslice = ConstSlice(bias, 0, node) if bias is not None else None  # type: ignore[arg-type]
        walk.block.projections.append(Projection(role, use, bslice, offset, 0))
        walk.widths[role] = width
        if sizes_attr is not None:
            walk.site(node, k, role, "qkv_hidden_sizes")
        offset += width
    walk.site(node, 0, "head", "num_heads")
    attention_bias = _present(node, 5)
    if attention_bias is not None:
        walk.masks.append((attention_bias, -3, "head"))
    walk.trace_output(node.outputs[0], merged=True)
    close(walk, heads_attr=heads)


def _ms_multihead(walk: Trace, node: ir.Node) -> None:
    heads = int_attr(node, "num_heads", 0)
    if heads <= 0:
        raise Decline(f"{label(node)} has no num_heads attribute")
    key, value = _present(node, 1), _present(node, 2)
    if key is None or value is None:
        raise Decline(f"{label(node)} takes packed QKV or KV in one input")
    for i in (6, 7, 8, 9):
        if _present(node, i) is not None:
            raise Decline(f"{label(node)} takes a past key/value state or cache input")
    _unused_outputs(node, 1)
    for role, inp in zip("qkv", (node.inputs[0], key, value), strict=True):
        walk.trace_flat(inp, role)  # type: ignore[arg-type]
    bias = _present(node, 3)
    if bias is not None:
        b = const_array(bias)
        if b is None or b.ndim != 1 or b.size != sum(walk.widths.values()):
            raise Decline(f"{label(node)} has a bias that is not a packed 1-D constant")
        offset = 0
        for role in "qkv":
            walk.block.packed.append((ConstSlice(bias, 0, node), role, offset))
            offset += walk.widths[role]
    walk.site(node, 0, "head", "num_heads")
    for i in (4, 5):  # key padding mask [B, L] broadcasts; attention bias may be per head
        mask = _present(node, i)
        if mask is not None and i == 5:
            walk.masks.append((mask, -3, "head"))
    walk.trace_output(node.outputs[0], merged=True)
    close(walk, heads_attr=heads)


def _ms_group_query(walk: Trace, node: ir.Node) -> None:
    """com.microsoft GroupQueryAttention: 3-D Q [.., heads * size] and K/V [.., kv_heads *
    size] from separate projections; query head h reads K/V head h // (heads / kv_heads), so
    one unit is a K/V head with its query heads. Rotary inside the op (do_rotary) rotates each
    head alike with shared cos/sin caches, so removing whole heads leaves the others as they
    were."""
    heads = int_attr(node, "num_heads", 0)
    kv_heads = int_attr(node, "kv_num_heads", 0)
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise Decline(f"{label(node)} has num_heads {heads} and kv_num_heads {kv_heads}")
    key, value = _present(node, 1), _present(node, 2)
    if key is None or value is None:
        raise Decline(f"{label(node)} takes packed QKV in one input")
    if _present(node, 11) is not None:
        raise Decline(f"{label(node)} takes a per-head attention sink")
    _unused_outputs(node, 3)
    past = [v for v in (_present(node, 3), _present(node, 4)) if v is not None]
    if any(not v.is_graph_input() for v in past):
        raise Decline(f"{label(node)} takes a past key/value cache computed in the graph")
    for v in past:  # the cache as fed [B, kv_heads, past, size]: fed at the pruned width
        walk.member(v, -3, "kvhead")
        walk.caches.add(v)
    for out in node.outputs[1:3]:  # present key/value [B, kv_heads, S, size]
        walk.member(out, -3, "kvhead")
        if any(u.node is not node for u in out.uses()):
            raise Decline(f"output '{out.name}' of {label(node)} (the present cache) is read "
                          "in the graph")
        if out.is_graph_output():
            walk.caches.add(out)
    for role, inp, count in (("q", node.inputs[0], heads), ("k", key, kv_heads),
                             ("v", value, kv_heads)):
        walk.trace_flat(inp, role)  # type: ignore[arg-type]
        walk.split[role] = (None, count, None)  # type: ignore[assignment]
    walk.repeated.update({"k", "v"})  # the op repeats K/V over the query heads itself
    walk.site(node, 0, "head", "num_heads")
    walk.site(node, 0, "kvhead", "kv_num_heads")
    bias = _present(node, 10)
    if bias is not None:
        walk.masks.append((bias, -3, "head"))
    walk.trace_output(node.outputs[0], merged=True)
    close(walk)


def _onnx_attention(walk: Trace, node: ir.Node) -> None:
    for i in (4, 5):
        if _present(node, i) is not None:
            raise Decline(f"{label(node)} takes a past key/value state")
    _unused_outputs(node, 1)
    q_heads = int_attr(node, "q_num_heads", 0)
    kv_heads = int_attr(node, "kv_num_heads", 0)
    mask = _present(node, 3)
    if mask is not None:
        walk.masks.append((mask, -3, "head"))
    if q_heads or kv_heads:  # 3-D inputs [B, S, heads * size]
        if q_heads != kv_heads:
            raise Decline(f"{label(node)} has {q_heads} query and {kv_heads} key/value "
                           "heads (grouped-query or multi-query attention)")
        for role, inp in zip("qkv", node.inputs[:3], strict=True):
            walk.trace_flat(inp, role)  # type: ignore[arg-type]
        walk.site(node, 0, "head", "q_num_heads")
        walk.site(node, 0, "head", "kv_num_heads")
        walk.trace_output(node.outputs[0], merged=True)
        close(walk, heads_attr=q_heads)
        return
    for role, inp in zip("qkv", node.inputs[:3], strict=True):  # 4-D [B, heads, S, size]
        walk.trace_heads(inp, -3, -1, role)  # type: ignore[arg-type]
    walk.trace_output(node.outputs[0], -3, -1)
    close(walk)

