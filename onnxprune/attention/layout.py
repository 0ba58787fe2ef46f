"""Layout ops inside an attention block, understood by what they compute, not how they are spelt.

Exporters move the head axis around with Reshape/Transpose chains whose targets are
computed at run time from `Shape` of some tensor: the dynamo exporter transposes K as
Reshape([B, H, S, D] -> [-1, S, D]) -> Transpose -> Reshape(back to [B, H, D, S] read from
Shape(K)); the legacy exporter's decomposed SDPA reshapes the context to itself with
[Shape(ctx)[0], -1, Shape(q)[2], Shape(v)[3]]. Neither fixes a head count, and both
follow a pruned head count on their own.

`chain_permutation` evaluates such a chain on a tensor whose axes have distinct prime sizes:
when the result is a plain transpose of the chain's start, the chain is that transpose, and
the trace carries the head axis through it. Anything the small evaluator cannot settle
returns None and the caller declines with its usual reason.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxprune.core.weights import const_array

__all__ = ["chain_permutation", "is_self_reshape", "reads_own_last_dim"]

_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19)
_LAYOUT = frozenset({"Reshape", "Transpose"})
_STD = ("", "ai.onnx")


def _attr_int(node: ir.Node, name: str, default: int | None) -> int | None:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def _eval_shape(value: ir.Value, shapes: dict[ir.Value, tuple[int, ...]],
                depth: int = 12) -> np.ndarray | None:
    """A small int64 shape computation, with Shape(t) read from `shapes`; None if unknown."""
    arr = const_array(value)
    if arr is not None:
        return np.asarray(arr).astype(np.int64)
    node = value.producer()
    if node is None or depth == 0 or node.domain not in _STD:
        return None
    ins = []
    for i in node.inputs:
        if node.op_type == "Shape":
            break
        ins.append(None if i is None else _eval_shape(i, shapes, depth - 1))
    op = node.op_type
    try:
        if op == "Shape":
            src = node.inputs[0]
            if src not in shapes:
                return None
            full = np.asarray(shapes[src], dtype=np.int64)  # type: ignore[index]
            start = _attr_int(node, "start", 0)
            end = _attr_int(node, "end", None)
            return full[start:end]
        if any(x is None for x in ins[:1]):
            return None
        if op in ("Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape", "Flatten"):
            x = ins[0]
            assert x is not None
            if op == "Unsqueeze":
                return x.reshape(-1) if x.ndim == 0 else x
            return x.reshape(-1) if op != "Squeeze" else x.reshape(())
        if op == "Gather":
            x, idx = ins[0], ins[1]
            if idx is None or _attr_int(node, "axis", 0) != 0:
                return None
            return np.take(x, idx)  # type: ignore[arg-type]
        if op == "Slice":
            x, starts, ends = ins[0], ins[1], ins[2]
            if starts is None or ends is None or len(ins) > 3 and any(
                    v is not None and (v.size != 1 or int(v.reshape(-1)[0]) not in (0, 1))
                    for v in ins[3:]):
                return None
            s, e = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
            return x[s:e]  # type: ignore[index]
        if op == "Concat":
            if any(x is None for x in ins):
                return None
            return np.concatenate([x.reshape(-1) for x in ins])  # type: ignore[union-attr]
        if op in ("Mul", "Add", "Sub", "Div"):
            a, b = ins[0], ins[1]
            if b is None:
                return None
            f = {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract,
                 "Div": np.floor_divide}[op]
            return f(a, b)
    except (IndexError, ValueError):
        return None
    return None


def _reshape_dims(data_shape: tuple[int, ...], target: np.ndarray, allowzero: bool
                  ) -> tuple[int, ...] | None:
    dims = [int(t) for t in target.reshape(-1)]
    for i, d in enumerate(dims):
        if d == 0 and not allowzero:
            if i >= len(data_shape):
                return None
            dims[i] = data_shape[i]
    total = int(np.prod(data_shape))
    if dims.count(-1) == 1:
        rest = int(np.prod([d for d in dims if d != -1]))
        if rest == 0 or total % rest:
            return None
        dims[dims.index(-1)] = total // rest
    return tuple(dims) if int(np.prod(dims)) == total else None


def chain_permutation(end: ir.Node, rank_hint: int = 4, max_len: int = 4
                      ) -> tuple[ir.Value, list[int], list[ir.Node]] | None:
    """(start, perm, nodes) when the Reshape/Transpose chain ending at `end` computes
    Transpose(start, perm) for every size of `start`, else None.

    Walks back from `end` through Reshape/Transpose nodes and tries each tensor on the way
    as the chain's start, evaluating the Reshape targets from its shape.
    """
    chain: list[ir.Node] = []
    node: ir.Node | None = end
    while node is not None and node.op_type in _LAYOUT and node.domain in _STD \
            and len(chain) < max_len:
        chain.insert(0, node)
        start = node.inputs[0]
        if start is None:
            return None
        rank = len(start.shape) if start.shape is not None else rank_hint
        if len(chain) > 1 and rank <= len(_PRIMES):
            perm = _try(start, chain, rank)
            if perm is not None:
                return start, perm, list(chain)
        node = start.producer()
    return None


def _try(start: ir.Value, chain: list[ir.Node], rank: int) -> list[int] | None:
    dims = _PRIMES[:rank]
    data = np.arange(int(np.prod(dims))).reshape(dims)
    shapes: dict[ir.Value, tuple[int, ...]] = {start: dims}
    x = data
    for node in chain:
        if node.op_type == "Transpose":
            attr = node.attributes.get("perm")
            perm = list(attr.as_ints()) if attr is not None else list(range(x.ndim))[::-1]
            if len(perm) != x.ndim:
                return None
            x = np.transpose(x, perm)
        else:
            target = _eval_shape(node.inputs[1], shapes)  # type: ignore[arg-type]
            if target is None:
                return None
            new = _reshape_dims(x.shape, target, bool(_attr_int(node, "allowzero", 0)))
            if new is None:
                return None
            x = x.reshape(new)
        shapes[node.outputs[0]] = tuple(x.shape)
    if x.ndim != rank or sorted(x.shape) != sorted(dims):
        return None
    perm = [dims.index(d) for d in x.shape]
    return perm if np.array_equal(np.transpose(data, perm), x) else None


def is_self_reshape(node: ir.Node, rank: int, head: int) -> bool:
    """True when the Reshape keeps the head axis where it is: its target has the input's
    rank, infers the head axis (-1) or spells it as a literal (then rewritten), and spells
    every other axis from the shapes of tensors (batch, sequence: Shape reads, copies) or as
    a literal (the head size). The decomposed SDPA of both exporters reshapes its output to
    itself this way."""
    from onnxprune.core.shape_literals import target_entries

    entries = target_entries(node.inputs[1])
    if entries is None or len(entries) != rank:
        return False
    cat = node.inputs[1].producer() if node.inputs[1] is not None else None
    if const_array(node.inputs[1]) is None and (cat is None or cat.op_type != "Concat"):
        return False
    for pos, e in enumerate(entries):
        if pos == rank + head:
            if e.kind not in ("infer", "literal"):  # a literal head count is rewritten
                return False
        elif e.kind == "infer" and entries[rank + head].kind == "infer":
            return False
    return True


def reads_own_last_dim(node: ir.Node) -> bool:
    """True when the last entry of a Reshape's target is the last dim of its own input read
    at run time (Reshape(x, [-1, Shape(x)[-1]]): it keeps whatever width x has)."""
    target = node.inputs[1]
    cat = target.producer() if target is not None else None
    if cat is None or cat.op_type != "Concat" or not cat.inputs or cat.inputs[-1] is None:
        return False
    piece = cat.inputs[-1].producer()
    while piece is not None and piece.op_type in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
        piece = piece.inputs[0].producer() if piece.inputs[0] is not None else None
    if piece is None or piece.op_type not in ("Gather", "Slice"):
        return False
    shape = piece.inputs[0].producer() if piece.inputs[0] is not None else None
    if shape is None or shape.op_type != "Shape" or shape.inputs[0] is not node.inputs[0]:
        return False
    if shape.attributes.get("start") is not None or shape.attributes.get("end") is not None:
        return False
    first = const_array(piece.inputs[1])
    return first is not None and first.size == 1 and int(first.reshape(-1)[0]) == -1
