"""How much of a block a fraction removes, in which unit, and what to tell the user.

Multi-head attention removes whole heads. Grouped-query attention has two units: a whole
K/V group (one K/V head with the query heads that read it; K, V and the cache shrink too)
or the same number of query heads inside every group (Q and the output projection shrink,
the repeat factor drops). With few K/V heads the first is coarse (25 % of 2 groups rounds
to 0), so the unit that comes closer to the requested share of query heads is taken, whole
groups on a tie (they save more). Both are floors: never more than asked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnxprune.attention.block import AttentionBlock

__all__ = ["Choice", "choose", "query_keep"]

_EPS = 1e-9


@dataclass(frozen=True)
class Choice:
    granularity: str  # "heads", "kv-groups" or "query-heads"
    removed: int  # heads or K/V groups removed, or query heads removed per group
    note: str | None = None  # why less than asked, or why the other unit


def _pct(x: float) -> str:
    return f"{100 * x:.4g} %"


def choose(block: AttentionBlock, fraction: float, max_fraction: float = 1.0) -> Choice:
    """The unit and count `fraction` of the block's query heads comes to (see the module)."""
    units, group = block.num_heads, block.group
    total = units * group
    cap_u = min(units - 1, math.floor(max_fraction * units + _EPS))
    by_units = min(math.floor(fraction * units + _EPS), cap_u)
    if group == 1:
        reach = [k / units for k in range(1, cap_u + 1)]
        note = None
        if by_units / units < fraction - _EPS:
            note = (f"{_pct(fraction)} of {units} heads rounds to {by_units}; reachable: "
                    f"{_list(reach)}")
        return Choice("heads", by_units, note)
    cap_g = min(group - 1, math.floor(max_fraction * group + _EPS))
    by_query = min(math.floor(fraction * group + _EPS), cap_g)
    thin = block.thin_reason is None and by_query / group > by_units / units + _EPS
    reach = sorted({k / units for k in range(1, cap_u + 1)} | (
        {k / group for k in range(1, cap_g + 1)} if block.thin_reason is None else set()))
    got = by_query / group if thin else by_units / units
    head = f"{_pct(fraction)} of {units} K/V groups rounds to {by_units}"
    if thin:
        note = (f"{head}; query heads thinned instead: {by_query * units} of {total} "
                f"({_pct(got)}), {group} -> {group - by_query} per K/V head")
    elif got < fraction - _EPS:
        why = "" if block.thin_reason is None else \
            f" (query heads cannot be thinned: {block.thin_reason})"
        note = (f"{head} and {_pct(fraction)} of the {group} query heads per group to "
                f"{by_query}{why}")
    else:
        return Choice("kv-groups", by_units)
    if got < fraction - _EPS:
        note += f"; reachable: {_list(reach)}"
    return Choice("query-heads" if thin else "kv-groups", by_query if thin else by_units, note)


def _list(reach: list[float]) -> str:
    shown = ", ".join(_pct(r) for r in reach[:6])
    return (shown + " ...") if len(reach) > 6 else shown or "none"


def query_keep(scores: np.ndarray, units: int, drop: int) -> np.ndarray:
    """Query heads kept when the `drop` lowest scores of every group go (global indices)."""
    s = np.asarray(scores, dtype=np.float64).reshape(units, -1)
    keep = [u * s.shape[1] + np.sort(np.argsort(-s[u], kind="stable")[: s.shape[1] - drop])
            for u in range(units)]
    return np.sort(np.concatenate(keep)).astype(np.int64)
