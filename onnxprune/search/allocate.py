"""Allocation: which units to prune how far, from measured sensitivities, verified as it goes.

The allocator is greedy on the measured drop curves: it repeatedly takes the jump (one unit
to a deeper level) with the smallest drop per unit of cost saved, looking past the next
level so that a curve which is flat after a bump is still found. Every `checkpoint` of the
total cost it evaluates the whole candidate on held-out batches through the masked model; if
the drop is over the budget it rolls back, one unit at a time, the jumps since the last
checkpoint that hurt most, and freezes those units. It stops at the target, or when nothing
more fits the budget. Stopped short of the target, it tries to finish in one jump: the few
units whose curves promise the least drop for the missing cost, frozen or not, each cut by
just that cost (down to single items), evaluated whole; the best that fits is taken. A
roll-back freezes a whole unit, yet the last fraction of a percent is often a few dozen
channels that some unit still takes at little cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from onnxprune.search.sensitivity import Evaluator, UnitAnalysis, candidate_of
from onnxprune.search.units import Unit

__all__ = ["Allocation", "allocate", "uniform", "UNIFORM", "CHECKPOINT"]

UNIFORM = "uniform"  # label prefix of uniform allocations
CHECKPOINT = 0.025  # of the total cost between two evaluations of the whole candidate
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
             need: int, total: int, max_drop: float, checkpoint: float = CHECKPOINT,
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
    if mark_saved < need:
        mark, mark_saved, mark_drop = _finish(analyses, evaluator, cost, need, max_drop,
                                              mark, mark_saved, mark_drop)
        if mark_saved >= need:
            result.history.append((mark_saved / total, mark_drop))
    result.removed, result.saved, result.drop = mark, mark_saved, mark_drop
    result.reached = mark_saved >= need
    return result


FINISH_TRIES = 4  # units evaluated for the finishing jump


def _finish(analyses: Sequence[UnitAnalysis], evaluator: Evaluator, cost: Cost, need: int,
            max_drop: float, removed: dict[str, int], saved: int, drop: float,
            ) -> tuple[dict[str, int], int, float]:
    """The state after the best single jump that meets the target within the budget, or
    the state as given when none does (see the module doc)."""
    missing = need - saved
    jumps = []
    for a in analyses:
        c, cur = cost(a.unit), removed[a.unit.name]
        if c <= 0:
            continue
        k = cur + -(-missing // c)  # the fewest items that cover the missing cost
        if k <= a.max_removed:
            jumps.append((a.drop(k) - a.drop(cur), a.unit.name, k, c * (k - cur)))
    best = (removed, saved, drop)
    for _, name, k, gain in sorted(jumps)[:FINISH_TRIES]:
        trial = dict(removed, **{name: k})
        d = evaluator.drop(candidate_of(analyses, trial))
        if d <= max_drop and (best[1] < need or d < best[2]):
            best = (trial, saved + gain, d)
    return best


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
