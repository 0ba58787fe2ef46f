"""Comparing a candidate model with its reference on onnxruntime.

The reference runs on the CPU provider (the ground truth); the candidate runs on every
provider asked for. Metrics are accumulated batch by batch, so any amount of data fits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from onnxprune.calibration.data import Batch
from onnxprune.errors import DataError, InputError
from onnxprune.runtime import ModelSource, Provider, make_session

__all__ = ["Tolerances", "OutputMetrics", "VerifyResult", "compare_models"]


@dataclass(frozen=True)
class Tolerances:
    """Limits a candidate must meet; None means the metric is reported, not enforced."""

    min_cosine: float | None = None
    atol: float | None = None
    rtol: float | None = None
    min_sqnr_db: float | None = None
    min_top1: float | None = None


@dataclass
class _Accumulator:
    max_abs: float = 0.0
    abs_sum: float = 0.0
    count: int = 0
    signal: float = 0.0
    noise: float = 0.0
    cosines: list[float] = field(default_factory=list)
    top1_same: int = 0
    top1_total: int = 0
    nonfinite: int = 0
    allclose_violations: int = 0

    def add(self, ref: np.ndarray, cand: np.ndarray, atol: float, rtol: float) -> None:
        r = ref.astype(np.float64)
        c = cand.astype(np.float64)
        self.nonfinite += int(np.count_nonzero(~np.isfinite(c)))
        diff = np.abs(r - c)
        diff = np.where(np.isfinite(diff), diff, np.inf)
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
        self.abs_sum += float(diff.sum())
        self.count += diff.size
        self.signal += float(np.sum(r * r))
        self.noise += float(np.sum((r - c) ** 2))
        self.allclose_violations += int(np.count_nonzero(diff > atol + rtol * np.abs(r)))
        rows_r = r.reshape(r.shape[0], -1) if r.ndim >= 2 else r.reshape(1, -1)
        rows_c = c.reshape(rows_r.shape)
        norms = np.linalg.norm(rows_r, axis=1) * np.linalg.norm(rows_c, axis=1)
        dots = np.sum(rows_r * rows_c, axis=1)
        both_zero = (np.linalg.norm(rows_r, axis=1) == 0) & (np.linalg.norm(rows_c, axis=1) == 0)
        # Identical rows are exactly 1 (rounding in dot / (|r| |c|) gives 1 +- 1 ulp, which
        # would fail --min-cosine 1.0 on an identical copy); the rest is clipped to [-1, 1].
        same = np.all(rows_r == rows_c, axis=1)
        cos = np.where(
            both_zero | same,
            1.0,
            np.clip(dots / np.where(norms == 0, np.inf, norms), -1.0, 1.0),
        )
        self.cosines.extend(float(x) for x in cos)
        if _looks_like_scores(ref):
            self.top1_same += int(np.sum(ref.argmax(-1) == cand.argmax(-1)))
            self.top1_total += int(np.prod(ref.shape[:-1]))


def _looks_like_scores(arr: np.ndarray) -> bool:
    """Class scores: float, at least 2-D, a short last axis, not unit-norm embeddings."""
    if not (np.issubdtype(arr.dtype, np.floating) and arr.ndim >= 2):
        return False
    if not 2 <= arr.shape[-1] <= 1000:
        return False
    norms = np.linalg.norm(arr.astype(np.float64), axis=-1)
    return not np.allclose(norms, 1.0, atol=1e-3)


@dataclass(frozen=True)
class OutputMetrics:
    name: str
    provider: str
    max_abs_diff: float
    mean_abs_diff: float
    cosine_mean: float
    cosine_min: float
    sqnr_db: float
    top1_agreement: float | None
    nonfinite: int
    allclose_violations: int
    failures: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class VerifyResult:
    outputs: tuple[OutputMetrics, ...]
    batches: int
    generated_inputs: bool
    tolerances: Tolerances

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "batches": self.batches,
            "generated_inputs": self.generated_inputs,
            "tolerances": {k: v for k, v in vars(self.tolerances).items()},
            "outputs": [
                {**{k: _json_float(v) for k, v in vars(o).items()}, "ok": o.ok}
                for o in self.outputs
            ],
        }


def _json_float(v: object) -> object:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, tuple):
        return list(v)
    return v


def _finish(
    name: str, provider: str, acc: _Accumulator, tol: Tolerances
) -> OutputMetrics:
    mean_abs = acc.abs_sum / acc.count if acc.count else 0.0
    if acc.noise == 0:
        sqnr = math.inf
    elif acc.signal == 0:
        sqnr = -math.inf
    elif not (acc.signal / acc.noise > 0):  # NaN from a reference that outputs NaN
        sqnr = math.nan
    else:
        sqnr = 10 * math.log10(acc.signal / acc.noise)
    cos = np.asarray(acc.cosines) if acc.cosines else np.ones(1)
    cos_mean = float(np.mean(cos)) if np.all(np.isfinite(cos)) else math.nan
    cos_min = float(np.min(cos)) if np.all(np.isfinite(cos)) else math.nan
    top1 = acc.top1_same / acc.top1_total if acc.top1_total else None
    failures: list[str] = []
    if acc.nonfinite:
        failures.append(f"{acc.nonfinite} NaN/Inf values in the candidate's output")
    if tol.min_cosine is not None and not (cos_min >= tol.min_cosine):
        failures.append(f"cosine min {cos_min:.6f} < {tol.min_cosine}")
    if (tol.atol is not None or tol.rtol is not None) and acc.allclose_violations:
        failures.append(
            f"{acc.allclose_violations} values outside atol={tol.atol or 0} "
            f"rtol={tol.rtol or 0} (max abs diff {acc.max_abs:.3g})"
        )
    if tol.min_sqnr_db is not None and not (sqnr >= tol.min_sqnr_db):
        failures.append(f"SQNR {sqnr:.2f} dB < {tol.min_sqnr_db} dB")
    if tol.min_top1 is not None and top1 is not None and top1 < tol.min_top1:
        failures.append(f"top-1 agreement {top1:.4f} < {tol.min_top1}")
    return OutputMetrics(
        name, provider, acc.max_abs, mean_abs, cos_mean, cos_min, sqnr, top1,
        acc.nonfinite, acc.allclose_violations, tuple(failures),
    )


def compare_models(
    reference: ModelSource,
    candidate: ModelSource,
    batches: Iterable[Batch],
    *,
    providers: Sequence[Provider] = ("cpu",),
    tolerances: Tolerances = Tolerances(),
    generated_inputs: bool = False,
) -> VerifyResult:
    """Runs both models on every batch and compares each output of the candidate."""
    ref_sess = make_session(reference, "cpu")
    cand_sessions = {p: make_session(candidate, p) for p in providers}
    ref_outputs = [o.name for o in ref_sess.get_outputs()]
    for p, sess in cand_sessions.items():
        cand_outputs = [o.name for o in sess.get_outputs()]
        if cand_outputs != ref_outputs:
            raise InputError(
                f"outputs differ: reference has {ref_outputs}, candidate ({p}) has "
                f"{cand_outputs}; compare models with the same outputs"
            )
    atol = tolerances.atol or 0.0
    rtol = tolerances.rtol or 0.0
    accs = {(p, name): _Accumulator() for p in providers for name in ref_outputs}
    count = 0
    for batch in batches:
        try:
            ref = ref_sess.run(None, batch)
        except Exception as e:
            raise DataError(f"reference model failed on batch {count}: {_first_line(e)}") from e
        for p, sess in cand_sessions.items():
            try:
                cand = sess.run(None, batch)
            except Exception as e:
                raise DataError(
                    f"candidate model failed on batch {count} ({p}): {_first_line(e)}"
                ) from e
            for name, r, c in zip(ref_outputs, ref, cand, strict=False):
                if r.shape != c.shape:
                    raise InputError(
                        f"output '{name}' has shape {list(c.shape)} in the candidate, "
                        f"{list(r.shape)} in the reference"
                    )
                accs[(p, name)].add(r, c, atol, rtol)
        count += 1
    if count == 0:
        raise DataError("no batches to verify with")
    metrics = tuple(
        _finish(name, p, accs[(p, name)], tolerances) for p in providers for name in ref_outputs
    )
    return VerifyResult(metrics, count, generated_inputs, tolerances)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
