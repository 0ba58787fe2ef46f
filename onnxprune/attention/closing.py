"""Closing a trace: head counts and sizes settled, every literal and shape checked, and the
block closed (nothing inside it read from outside), or a Decline naming what is not."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxprune.attention.block import AttentionBlock, HeadCountSite, Projection
from onnxprune.attention.trace import Decline, Trace, label, only_shape_read
from onnxprune.core.shape_literals import target_entries
from onnxprune.core.weights import const_array, other_reader_through_identity

__all__ = ["close"]


def close(t: Trace, heads_attr: int | None = None) -> AttentionBlock:
    """Settles head counts and sizes from widths and split literals, then checks.

    With K/V heads repeated (grouped-query attention) the unit of removal is one K/V
    head together with the query heads that read it, so the repeat factor is kept."""
    b = t.block
    if b.output is None:
        raise Decline("no output projection found")
    heads: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for role, width in t.widths.items():
        node, h, d = t.split.get(role, (None, heads_attr, None))
        if d is not None:
            if width % d:
                raise Decline(f"head size {d} does not divide the {role.upper()} width "
                               f"{width}")
            if h is not None and h * d != width:
                raise Decline(f"{h} heads of size {d} do not make the {role.upper()} "
                               f"width {width}")
            h = width // d
        elif h is None:
            raise Decline(f"the {role.upper()} head count is not known")
        elif width % h:
            raise Decline(f"{h} heads do not divide the {role.upper()} width {width}")
        heads[role] = h
        sizes[role] = width // h
        if node is not None and t.split[role][1] is not None:
            t.site(node, -2, t.split_kind.get(role, "head"))
    if set(sizes) != {"q", "k", "v"}:
        raise Decline("Q, K and V projections were not all found")
    if sizes["q"] != sizes["k"]:
        raise Decline(f"Q and K have different head sizes ({sizes['q']}, {sizes['k']})")
    if heads["k"] != heads["v"]:
        raise Decline(f"K and V have different head counts ({heads['k']}, {heads['v']})")
    if t.repeated and t.repeated != {"k", "v"}:
        raise Decline("only one of K and V is repeated over the query heads")
    group = heads["q"] // heads["k"]
    if heads["q"] % heads["k"] or group > 1 and not t.repeated:
        raise Decline(f"{heads['q']} query heads read {heads['k']} key/value heads "
                       "without a repeat this analysis understands")
    if t.rep_literal not in (None, group):
        raise Decline(f"K/V heads are repeated {t.rep_literal} times, not {group}")
    b.num_heads, b.group = heads["k"], group
    if group > 1:
        b.kind = f"{b.kind}, grouped-query ({group} query heads per K/V head)"
    if t.caches:
        b.kind = f"{b.kind}, key/value cache (fed and returned at the pruned width)"
    unit = {"q": group * sizes["q"], "k": sizes["k"], "v": sizes["v"]}
    per = {"head": group, "kvhead": 1, "out": group * sizes["v"], **unit,
           "packed": sum(unit.values())}
    b.projections = [Projection(p.role, p.use, p.bias, p.offset, unit[p.role])
                     for p in b.projections]
    query = {"head": 1, "q": sizes["q"], "out": sizes["v"], "packed": sizes["q"]}
    b.sites = [HeadCountSite(n, per[k], pos, attr, per_query=query.get(k, 0))
               for n, pos, k, attr in t.pending]
    b.sites += t.slice_sites(unit, sizes["q"])
    t.check_packing()
    for site in b.sites:
        _check_literal(t, site)
    b.members = {v: (axis, per[k]) for v, (axis, k) in t.kinds.items()}
    b.member_query = {v: query.get(k, 0) for v, (_, k) in t.kinds.items()}
    b.repeats = list(t.repeat_sites)
    b.thin_reason = _thin_reason(t, group)
    w = const_array(b.output.weight)
    assert w is not None
    width = heads["q"] * sizes["v"]
    if w.shape[b.output.reduce_axis] != width:
        raise Decline(f"the output projection reads {w.shape[b.output.reduce_axis]} "
                       f"inputs, not {heads['q']} x {sizes['v']}")
    if t.merged_width not in (None, width):
        raise Decline(f"the merge Reshape spells width {t.merged_width}, not "
                      f"{heads['q']} x {sizes['v']}")
    for p in b.projections:
        bias = None if p.bias is None else const_array(p.bias.value)
        w_p = const_array(p.use.weight)
        assert w_p is not None
        if bias is not None and p.bias is not None and not p.bias.node.op_type.endswith(
                "Attention") and bias.shape[p.bias.axis] != w_p.shape[p.use.out_axis]:
            raise Decline(f"the {p.role.upper()} bias '{p.bias.value.name}' has "
                          f"{bias.shape[p.bias.axis]} entries")
    for mask, axis, kind in t.masks:
        t.check_mask(mask, axis, heads["q"] if kind == "head" else None)
    _check_closed(t)
    if b.unresolved_masks:
        raise Decline(f"cannot tell whether '{b.unresolved_masks[0]}' differs per head: "
                      "its shape is not recorded (give data to probe it)")
    return b

def _thin_reason(t: Trace, group: int) -> str | None:
    """Why the query heads of every K/V group cannot be thinned (None when they can)."""
    b = t.block
    if group == 1:
        return "not grouped-query attention"
    if t.repeat_unknown:
        return t.repeat_unknown
    for r in b.repeats:
        if r.target:
            entries = target_entries(r.node.inputs[r.input_index]) or []
            value = entries[r.index].value if len(entries) >= -r.index else None
        else:
            arr = const_array(r.node.inputs[r.input_index])
            value = None if arr is None or arr.size != 1 else int(np.asarray(arr).reshape(-1)[0])
        if value != group:
            return f"{label(r.node)} spells {value}, not the repeat factor {group}"
    for v, q in b.member_query.items():
        if q and (v.is_graph_input() or v.is_graph_output()):
            return f"'{v.name}' holds the query heads at the graph interface"
    return None


def _check_literal(t: Trace, site: HeadCountSite) -> None:
    """A literal about to be rewritten must spell what the analysis thinks it does."""
    if site.attribute is not None:
        return
    if site.node.op_type in ("Reshape", "Expand"):
        entries = target_entries(site.node.inputs[site.input_index])
        value = None if not entries else entries[site.position].value
    else:
        arr = const_array(site.node.inputs[site.input_index])
        value = None if arr is None else int(np.asarray(arr).reshape(-1)[site.position])
    want = t.block.num_heads * site.per_head
    if value != want:
        raise Decline(f"{label(site.node)} spells {value} where {want} "
                      f"({t.block.num_heads} x {site.per_head}) was expected")

def _check_closed(t: Trace) -> None:
    """Everything inside the block is read only inside it, and its shapes agree."""
    b = t.block
    inside = b.nodes | {b.output.node} if b.output else b.nodes
    for value, (axis, per) in b.members.items():
        if value.is_graph_output() and value not in t.caches:
            raise Decline(f"'{value.name}' inside the attention is a graph output")
        for use in value.uses():
            if use.node not in inside:
                if only_shape_read(use.node):
                    continue  # read at run time: follows the pruned head count
                raise Decline(f"'{value.name}' inside the attention is also read by "
                               f"{label(use.node)}")
        if value.shape is not None and len(value.shape) >= -axis:
            dim = value.shape[axis]
            if isinstance(dim, int) and dim != b.num_heads * per:
                raise Decline(f"the recorded shape of '{value.name}' has {dim} where "
                               f"{b.num_heads} x {per} was expected")
    users: dict[ir.Value, set[ir.Node]] = {}
    for p in b.projections:
        users.setdefault(p.use.weight, set()).add(p.use.node)
    users.setdefault(b.output.weight, set()).add(b.output.node)  # type: ignore[union-attr]
    for weight, nodes in users.items():
        shared = other_reader_through_identity(weight)
        if shared is not None:
            raise Decline(f"weight '{weight.name}' is the tensor '{shared[0].name}', also "
                           f"read by {label(shared[1])} through Identity (a shared weight)")
        other = [u.node for u in weight.uses() if u.node not in nodes]
        if other or weight.is_graph_output() or weight.is_graph_input():
            where = label(other[0]) if other else "the graph interface"
            raise Decline(f"weight '{weight.name}' is shared with {where}")
