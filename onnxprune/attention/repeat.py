"""Where grouped-query attention spells its repeat factor (query heads per K/V head).

Thinning the query heads of every K/V group changes that factor, so every literal holding it
must be found and rewritten: the Expand target of transformers' repeat_kv (a literal, or in
the legacy export a Concat piece behind Where(Equal(t, -1), 1, t)) and the merged head count
of the Reshape after it (a literal, or in the legacy export Mul(kv_heads, factor)).
"""

from __future__ import annotations

import onnx_ir as ir

from onnxprune.attention.block import RepeatSite
from onnxprune.core.shape_literals import target_entries
from onnxprune.core.weights import const_array

__all__ = ["repeat_literal", "repeat_product"]


def repeat_literal(expand: ir.Node, head: int, out: list[RepeatSite]) -> bool:
    """Finds the repeat factor in the Expand target: a literal of the target itself, or of
    the Reshape(Concat) the legacy exporter wraps in Where(Equal(t, -1), 1, t)."""
    target, reader, index = expand.inputs[1], expand, 1
    where = target.producer() if target is not None else None
    if where is not None and where.op_type == "Where" and where.inputs[2] is not None:
        flat = where.inputs[2].producer()
        if flat is None or flat.op_type != "Reshape":
            return False
        target, reader, index = flat.inputs[0], flat, 0
    entries = target_entries(target)
    if target is None or not entries or len(entries) < -head:
        return False
    if entries[head].kind != "literal":
        return False
    out.append(RepeatSite(reader, index, head, target=True))
    return True


def repeat_product(reshape: ir.Node, e: object, out: list[RepeatSite]) -> bool:
    """The merged head count as the legacy exporter computes it: Unsqueeze(Mul(kv, group))
    inside the Reshape's Concat target; the Mul's constant is the repeat factor."""
    cat = reshape.inputs[1].producer() if reshape.inputs[1] is not None else None
    ci = getattr(e, "concat_input", None)
    if cat is None or ci is None or getattr(e, "kind", "") != "dynamic":
        return False
    unsq = cat.inputs[ci].producer() if cat.inputs[ci] is not None else None
    mul = unsq.inputs[0].producer() if unsq is not None and unsq.op_type == "Unsqueeze" \
        and unsq.inputs[0] is not None else None
    if mul is None or mul.op_type != "Mul":
        return False
    consts = [i for i, v in enumerate(mul.inputs) if v is not None and const_array(v) is not None]
    if len(consts) != 1 or const_array(mul.inputs[consts[0]]).size != 1:  # type: ignore[union-attr]
        return False
    out.append(RepeatSite(mul, consts[0], 0))
    return True
