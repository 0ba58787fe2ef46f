"""Per-unit analysis: OBS removal orders, repaired weights per level, and measured drops.

One pass of the calibration batches gives every unit's input Gram matrix on the original
model. From it, OBS (scoring/lstsq.py) orders each unit's items once: any prefix of the
order is the choice at that sparsity, and a ridge-to-prior least-squares solve gives the
repaired consumer weights for it. The drop in quality of each (unit, level) is then measured
on held-out batches through the masked model, with every other unit intact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxprune.attention.head_scores import obs_head_order
from onnxprune.calibration.data import Batch
from onnxprune.calibration.runner import capture, row_mask
from onnxprune.repair.lstsq import Problem, obs_order
from onnxprune.repair.reconstruct import DEFAULT_RIDGE, joined_weight
from onnxprune.search.masked import Candidate, MaskedModel, MaskedSession, run_batches
from onnxprune.search.quality import BuiltinMetric, UserMetric, builtin_score, call_user_metric
from onnxprune.search.units import Unit

__all__ = ["UnitAnalysis", "Evaluator", "analyse_units", "measure_curves", "Progress"]

Progress = Callable[[int, int, str], None]
_KEEP_LEVELS = 4  # repaired weights kept per unit (UnitAnalysis.weights)


@dataclass
class UnitAnalysis:
    """One unit's removal order and, per measured level, the drop it causes alone."""

    unit: Unit
    order: np.ndarray  # items, first removed first
    problem: Problem
    curve: dict[int, float] = field(default_factory=dict)  # items removed -> drop
    _cache: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def max_removed(self) -> int:
        return len(self.order)

    def kept(self, removed: int) -> np.ndarray:
        return np.setdiff1d(np.arange(self.unit.items), self.order[:removed])

    def weights(self, removed: int) -> tuple[np.ndarray, np.ndarray]:
        """Repaired joined consumer weights [C, D] (removed rows zero) and bias delta [D],
        in float32 (what the masked session runs). The last few levels asked for are kept:
        a search asks for dozens per unit, and keeping them all held ~0.9 GB on MiniLM."""
        if removed in self._cache:
            self._cache[removed] = self._cache.pop(removed)  # most recently used last
            return self._cache[removed]
        cols = self.unit.columns(self.kept(removed))
        sol = self.problem.solve(cols)
        w = np.zeros((self.problem.channels, sol.shape[1]), dtype=np.float32)
        w[cols] = sol[:-1]
        self._cache[removed] = (w, sol[-1].astype(np.float32))
        while len(self._cache) > _KEEP_LEVELS:
            del self._cache[next(iter(self._cache))]
        return self._cache[removed]

    def drop(self, removed: int) -> float:
        """Measured drop, linear between measured levels (0 at 0)."""
        if removed <= 0:
            return 0.0
        xs = np.array([0, *sorted(self.curve)], dtype=float)
        ys = np.array([0.0, *(self.curve[k] for k in sorted(self.curve))])
        return float(np.interp(removed, xs, ys))


def _grams(model: ir.Model, units: Sequence[Unit], batches: Sequence[Batch],
           token_mask: str | None) -> dict[str, np.ndarray]:
    """Σ [x,1]ᵀ[x,1] of every unit's consumer input over the unmasked rows, one pass."""
    grams = {u.x: np.zeros((u.group.size + 1, u.group.size + 1)) for u in units}

    def on_batch(arrays: dict[str, np.ndarray], batch: Batch) -> None:
        for name, gram in grams.items():
            x = arrays[name]
            lead = x.shape[:-1]
            rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
            mask = row_mask(batch, token_mask, rows.shape[0], tuple(lead))
            if mask is not None:
                rows = rows[mask]
            aug = np.hstack([rows, np.ones((rows.shape[0], 1))])
            gram += aug.T @ aug

    capture(model, list(grams), batches, on_batch)
    return {u.name: grams[u.x] for u in units}


def analyse_units(model: ir.Model, units: Sequence[Unit], batches: Sequence[Batch], *,
                  token_mask: str | None, max_fraction: float,
                  ridge: float = DEFAULT_RIDGE,
                  progress: Progress | None = None) -> list[UnitAnalysis]:
    """Statistics in one pass, then each unit's OBS removal order up to `max_fraction`.

    The target of each consumer is its own original output (on the original model the
    residual-aware target of the sequential repair is exactly that), so the cross term is
    H W₀ and needs no second pass.
    """
    grams = _grams(model, units, batches, token_mask)
    out = []
    for i, u in enumerate(units):
        if progress is not None:
            progress(i, len(units), f"ordering {u.name}")
        gram = grams[u.name]
        w0 = joined_weight(u.group)
        cross = gram[:, :-1] @ w0
        problem = Problem(gram, cross, ridge, w0)
        gain = u.gain
        kw = {"out_weights": None if gain is None else np.square(gain), "center": gain is not None}
        n = u.max_remove(max_fraction)
        if u.kind == "heads":
            order = obs_head_order(problem, u.items, n, **kw)  # type: ignore[arg-type]
        else:
            order = obs_order(problem, n, **kw)  # type: ignore[arg-type]
        out.append(UnitAnalysis(u, order, problem))
    return out


class Evaluator:
    """Quality of candidates on held-out batches, relative to the original model."""

    def __init__(self, masked: MaskedModel, holdout: Sequence[Batch],
                 metric: BuiltinMetric | UserMetric) -> None:
        self.masked = masked
        self.holdout = list(holdout)
        self.metric = metric
        self.evaluations = 0
        self.reference: list[list[np.ndarray]] = []
        if isinstance(metric, str):
            self.reference = run_batches(MaskedSession(masked, {}), self.holdout)
            self.base = 1.0
        else:
            self.base = self.quality_of(MaskedSession(masked, {}))

    @property
    def name(self) -> str:
        if isinstance(self.metric, str):
            return self.metric
        return str(getattr(self.metric, "__onnxprune_name__", "user metric"))

    def quality(self, candidate: Candidate) -> float:
        self.evaluations += 1
        return self.quality_of(MaskedSession(self.masked, candidate))

    def quality_of(self, session: ort.InferenceSession | MaskedSession) -> float:
        """The measure on a session: a masked candidate's, or a real (sliced) model's."""
        if isinstance(self.metric, str):
            return builtin_score(self.metric, self.reference, run_batches(session, self.holdout))
        return call_user_metric(self.metric, session)

    def drop(self, candidate: Candidate) -> float:
        return self.base - self.quality(candidate)


def candidate_of(analyses: Sequence[UnitAnalysis], removed: dict[str, int]) -> Candidate:
    by_name = {a.unit.name: a for a in analyses}
    return {n: by_name[n].weights(k) for n, k in removed.items() if k > 0}


def measure_curves(analyses: Sequence[UnitAnalysis], evaluator: Evaluator,
                   fractions: Sequence[float], progress: Progress | None = None) -> None:
    """Fills each unit's curve: the drop with only that unit pruned, at each fraction."""
    jobs = []
    for a in analyses:
        levels = sorted({min(a.max_removed, max(1, round(f * a.unit.items)))
                         for f in fractions if f > 0})
        jobs += [(a, k) for k in levels if k <= a.max_removed]
    for i, (a, k) in enumerate(jobs):
        if progress is not None:
            progress(i, len(jobs), f"{a.unit.name} -{k}")
        a.curve[k] = evaluator.drop({a.unit.name: a.weights(k)})
