"""Allocation: which units to prune how far, from measured sensitivities, verified as it goes.

The allocator is greedy on the measured drop curves: it repeatedly takes the jump (one unit
to a deeper level) with the smallest drop per unit of cost saved, looking past the next
level so that a curve which is flat after a bump is still found. Every `checkpoint` of the
total cost it evaluates the whole candidate on held-out batches through the masked model; if
the drop is over the budget it rolls back, one unit at a time, the jumps since the last
checkpoint that hurt most, and freezes those units. It stops at the target, or when nothing
more fits the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from onnxprune.plan.sensitivity import Evaluator, UnitAnalysis, candidate_of
from onnxprune.plan.units import Unit

__all__ = ["Allocation", "allocate", "uniform", "UNIFORM"]

UNIFORM = "uniform"  # label prefix of uniform allocations
Cost = Callable[[Unit], int]  # what one item of the unit costs (FLOPs or parameters)


@dataclass
class Allocation:
    removed: dict[str, int]  # unit -> items removed
    saved: int  # cost saved
    drop: float  # measured on held-out batches (masked model, independent repairs)
    reached: bool  # the target saving was met
    label: str = ""
    history: list[tuple[float, float]] = field(default_factory=list)  # (saved share, drop)
    rolled_back: list[str] = field(default_factory=list)


def _step(unit: Unit) -> int:
    """Granularity of the search: one head, or 1/32 of a group's channels."""
    return 1 if unit.kind == "heads" else max(1, unit.items // 32)


def _next_jump(analyses: Sequence[UnitAnalysis], removed: dict[str, int], frozen: set[str],
               cost: Cost, remaining: int) -> tuple[str, int] | None:
    best: tuple[float, str, int] | None = None
    for a in analyses:
        u = a.unit
        if u.name in frozen:
            continue
        cur, step, c = removed[u.name], _step(u), cost(u)
        if c <= 0:
            continue
        here = a.drop(cur)
        k = cur
        while k < a.max_removed:
            k = min(k + step, a.max_removed)
            gain = c * (k - cur)
            slope = (a.drop(k) - here) / gain
            if best is None or slope < best[0]:
                best = (slope, u.name, k)
            if gain >= remaining:
                break  # deeper jumps only overshoot the target
    return None if best is None else (best[1], best[2])


def allocate(analyses: Sequence[UnitAnalysis], evaluator: Evaluator, *, cost: Cost,
             need: int, total: int, max_drop: float, checkpoint: float = 0.025,
             label: str = "greedy") -> Allocation:
    """Greedy allocation with held-out checkpoints and roll-back (see the module doc)."""
    by_name = {a.unit.name: a for a in analyses}
    removed = {a.unit.name: 0 for a in analyses}
    frozen: set[str] = set()
    saved = 0
    mark = dict(removed)  # state at the last checkpoint that met the budget
    mark_saved, mark_drop = 0, 0.0
    result = Allocation(dict(removed), 0, 0.0, need <= 0, label)
    while saved < need:
        jump = _next_jump(analyses, removed, frozen, cost, need - saved)
        if jump is None:
            break
        name, k = jump
        saved += cost(by_name[name].unit) * (k - removed[name])
        removed[name] = k
        if saved - mark_saved < checkpoint * total and saved < need:
            continue
        drop = evaluator.drop(candidate_of(analyses, removed))
        while drop > max_drop:
            touched = [n for n in removed if removed[n] != mark[n]]
            if not touched:
                break
            trials = []
            for n in touched:
                trial = dict(removed, **{n: mark[n]})
                trials.append((evaluator.drop(candidate_of(analyses, trial)), n))
            drop, n = min(trials)
            saved -= cost(by_name[n].unit) * (removed[n] - mark[n])
            removed[n] = mark[n]
            frozen.add(n)
            result.rolled_back.append(n)
        if drop > max_drop:  # nothing left to roll back: keep the last good state
            removed, saved = dict(mark), mark_saved
            break
        mark, mark_saved, mark_drop = dict(removed), saved, drop
        result.history.append((saved / total, drop))
    result.removed, result.saved, result.drop = mark, mark_saved, mark_drop
    result.reached = mark_saved >= need
    return result


def uniform(analyses: Sequence[UnitAnalysis], evaluator: Evaluator, *, cost: Cost, need: int,
            kind: str = "neurons") -> Allocation | None:
    """The same fraction of every unit of one kind, the least that meets the target."""
    units = [a for a in analyses if a.unit.kind == kind]
    if not units:
        return None
    for i in range(1, 65):
        f = i / 64
        removed = {a.unit.name: 0 for a in analyses}
        for a in units:
            removed[a.unit.name] = min(a.max_removed, round(f * a.unit.items))
        saved = sum(cost(a.unit) * removed[a.unit.name] for a in units)
        if saved >= need:
            drop = evaluator.drop(candidate_of(analyses, removed))
            return Allocation(removed, saved, drop, True, f"{UNIFORM} {kind} {f:.0%}")
    return None
