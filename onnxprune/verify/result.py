"""What a verification found: the limits enforced, each output's metrics, the verdict.

Tolerances either follow each output's kind (the defaults: onnxprune.verify.kinds.KINDS)
or are exactly the limits a user gave, applied to every output they mean something for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from onnxprune.errors import InputError
from onnxprune.verify.kinds import KINDS, KindLimits, OutputKind
from onnxprune.verify.metrics import Accumulator

__all__ = ["Tolerances", "OutputMetrics", "VerifyResult", "DEFAULT_MIN_COSINE",
           "DEFAULT_MIN_TOP1", "NO_LIMITS", "finish_metrics", "limits_for"]

# The verdict when no tolerance is given, in the CLI and the Python API alike, is the
# per-kind table of onnxprune.verify.kinds; these two are its cosine and top-1 limits.
DEFAULT_MIN_COSINE = 0.99
DEFAULT_MIN_TOP1 = 0.99


@dataclass(frozen=True)
class Tolerances:
    """Limits a candidate must meet; None means the metric is reported, not enforced.

    `Tolerances()` enforces nothing but finiteness; `Tolerances.defaults()` is the verdict
    used when the user gives no tolerance. `top1=True` computes top-1 agreement on every
    output (not only class scores); `False` never.
    """

    min_cosine: float | None = None
    atol: float | None = None
    rtol: float | None = None
    min_sqnr_db: float | None = None
    min_top1: float | None = None
    top1: bool | None = None
    # Applied by output kind when set (the defaults): the limits of onnxprune.verify.kinds.
    # KINDS for each output's kind. Explicit limits apply to every output they mean
    # something for (top-1/top-5/KL where there are classes).
    by_kind: bool = False
    min_top5: float | None = None
    max_kl: float | None = None
    min_exact: float | None = None

    @classmethod
    def defaults(cls) -> Tolerances:
        """What `onnxprune verify` and `onnxprune.verify()` enforce when told nothing."""
        return cls(min_cosine=DEFAULT_MIN_COSINE, min_top1=DEFAULT_MIN_TOP1, by_kind=True)

    @classmethod
    def from_options(
        cls,
        *,
        min_cosine: float | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        min_sqnr_db: float | None = None,
        min_top1: float | None = None,
        top1: bool | None = None,
        min_top5: float | None = None,
        max_kl: float | None = None,
        min_exact: float | None = None,
    ) -> Tolerances:
        """The CLI's rule, shared by the API: no limit given means the defaults; any limit
        given means exactly the limits given."""
        given = (min_cosine, atol, rtol, min_sqnr_db, min_top1, min_top5, max_kl, min_exact)
        names = ("min_cosine", "atol", "rtol", "min_sqnr_db", "min_top1", "min_top5", "max_kl",
                 "min_exact")
        for name, v in zip(names, given, strict=True):
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise InputError(f"tolerance {name}={v!r} must be a finite number")
            if v is not None and name in ("atol", "rtol", "max_kl") and v < 0:
                raise InputError(f"tolerance {name}={v} must be >= 0")
        if all(v is None for v in given):
            return replace(cls.defaults(), top1=top1)
        return cls(min_cosine, atol, rtol, min_sqnr_db, min_top1, top1, False, min_top5,
                   max_kl, min_exact)

    def describe(self) -> str:
        """One line saying what is enforced."""
        if self.by_kind:
            return ("defaults by output kind: " + "; ".join(
                f"{k}: {info.limits.describe()}" for k, info in KINDS.items()))
        parts = [f"{k} {v}" for k, v in (("cosine min >=", self.min_cosine),
                                          ("atol", self.atol), ("rtol", self.rtol),
                                          ("SQNR dB >=", self.min_sqnr_db),
                                          ("top-1 >=", self.min_top1),
                                          ("top-5 overlap >=", self.min_top5),
                                          ("mean KL <=", self.max_kl),
                                          ("exact match >=", self.min_exact)) if v is not None]
        return ", ".join(parts) or "nothing but finite outputs"


NO_LIMITS = Tolerances()  # finite outputs only: the library default of compare_*


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
    kind: OutputKind = "regression"
    kind_reason: str = ""
    top5_agreement: float | None = None
    kl_mean: float | None = None
    exact_match: float = 1.0
    max_rel_diff: float = 0.0  # max |d| / max |ref|
    rows: int = 0  # rows compared (tokens where a token mask picked them)

    @property
    def ok(self) -> bool:
        return not self.failures

    def line(self) -> str:
        """One readable line: the output, its kind and why, its metrics and its verdict."""
        if self.kind == "integer":
            numbers = f"exact match {self.exact_match:.4f}"
        else:
            numbers = (f"cosine min {self.cosine_min:.6f} mean {self.cosine_mean:.6f}, SQNR "
                       f"{self.sqnr_db:.2f} dB, max |d| {self.max_abs_diff:.3g}")
        for label, v in (("top-1", self.top1_agreement), ("top-5", self.top5_agreement),
                         ("KL", self.kl_mean)):
            if v is not None:
                numbers += f", {label} {v:.4f}"
        why = f" ({self.kind_reason})" if self.kind_reason else ""
        head = f"{self.name} [{self.provider}, {self.kind}{why}]: {numbers}"
        return f"{head}: ok" if self.ok else f"{head}: FAILED: {'; '.join(self.failures)}"


@dataclass(frozen=True)
class VerifyResult:
    """The comparison of every output on every provider; true when all are within tolerance.

    `assert result` and `if not result:` test the verdict; `result.summary()` gives readable
    lines and `result.raise_for_failure()` raises an AssertionError listing each failure.
    `weak` lists why a verdict says little (random token ids): it does not change `ok`.
    """

    outputs: tuple[OutputMetrics, ...]
    batches: int
    generated_inputs: bool
    tolerances: Tolerances
    against: str = "reference model"  # or "golden outputs FILE"
    weak: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def is_weak(self) -> bool:
        return bool(self.weak)

    def __bool__(self) -> bool:
        return self.ok

    @property
    def failures(self) -> list[str]:
        """'output [provider]: reason' for each failed check."""
        return [f"{o.name} [{o.provider}]: {f}" for o in self.outputs for f in o.failures]

    def summary(self) -> str:
        """The verdict, what was enforced, and one line per output."""
        verdict = "passed" if self.ok else "FAILED"
        data = "generated inputs (random values)" if self.generated_inputs else "given data"
        lines = [f"verification {verdict} against the {self.against} on {self.batches} "
                 f"batch(es) of {data}; enforced: {self.tolerances.describe()}"]
        lines += [f"  {o.line()}" for o in self.outputs]
        lines += [f"  weak verdict: {w}" for w in self.weak]
        return "\n".join(lines)

    def raise_for_failure(self) -> None:
        """Raises AssertionError listing every failure (nothing when ok); for tests and CI."""
        if not self.ok:
            raise AssertionError("verification failed:\n" + "\n".join(
                f"  - {f}" for f in self.failures) + "\n" + self.summary())

    def __repr__(self) -> str:
        return f"VerifyResult(ok={self.ok}, failures={self.failures!r})"

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "batches": self.batches,
            "generated_inputs": self.generated_inputs,
            "weak": list(self.weak),
            "against": self.against,
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


def limits_for(kind: OutputKind, tol: Tolerances) -> KindLimits:
    """What gates an output of this kind: the kind's defaults, or exactly what was given."""
    if tol.by_kind:
        return KINDS[kind].limits
    return KindLimits(min_cosine=tol.min_cosine, min_sqnr_db=tol.min_sqnr_db,
                      min_top1=tol.min_top1, min_top5=tol.min_top5, max_kl=tol.max_kl,
                      min_exact=tol.min_exact)


def finish_metrics(name: str, provider: str, acc: Accumulator, tol: Tolerances) -> OutputMetrics:
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
    kind = acc.decision.kind
    lim = limits_for(kind, tol)
    top1, top5, kl = acc.top1, acc.top5, acc.kl_mean
    failures: list[str] = []
    if acc.nonfinite:
        failures.append(f"{acc.nonfinite} NaN/Inf values in the candidate's output")
    if lim.min_exact is not None and not acc.exact_match >= lim.min_exact:
        failures.append(f"exact match {acc.exact_match:.4f} < {lim.min_exact}")
    if lim.min_cosine is not None and not (cos_min >= lim.min_cosine):
        failures.append(f"cosine min {cos_min:.6f} < {lim.min_cosine}")
    if (tol.atol is not None or tol.rtol is not None) and acc.allclose_violations:
        failures.append(
            f"{acc.allclose_violations} values outside atol={tol.atol or 0} "
            f"rtol={tol.rtol or 0} (max abs diff {acc.max_abs:.3g})"
        )
    if lim.max_abs is not None and acc.abs_violations:
        failures.append(f"max |d| {acc.max_abs:.3g} > {lim.max_abs} ({acc.abs_violations} "
                        "values)")
    if lim.max_rel is not None and not acc.max_rel <= lim.max_rel:
        failures.append(f"max |d| / max |ref| {acc.max_rel:.3g} > {lim.max_rel}")
    if lim.min_sqnr_db is not None and not (sqnr >= lim.min_sqnr_db):
        failures.append(f"SQNR {sqnr:.2f} dB < {lim.min_sqnr_db} dB")
    if lim.min_top1 is not None and top1 is not None and top1 < lim.min_top1:
        failures.append(f"top-1 agreement {top1:.4f} < {lim.min_top1}")
    beyond = acc.top1_beyond_dominant()
    if lim.min_top1 is not None and beyond is not None and beyond[1] < lim.min_top1:
        cls, agree, steps = beyond
        failures.append(f"top-1 agreement {agree:.4f} < {lim.min_top1} on the {steps} steps "
                        f"where either model picks a class other than {cls}, the class most "
                        "steps pick")
    if lim.min_top5 is not None and top5 is not None and top5 < lim.min_top5:
        failures.append(f"top-5 overlap {top5:.4f} < {lim.min_top5}")
    if lim.max_kl is not None and kl is not None and not kl <= lim.max_kl:
        failures.append(f"mean KL {kl:.4g} > {lim.max_kl}")
    return OutputMetrics(
        name, provider, acc.max_abs, mean_abs, cos_mean, cos_min, sqnr, top1,
        acc.nonfinite, acc.allclose_violations, tuple(failures), kind, acc.decision.reason,
        top5, kl, acc.exact_match, acc.max_rel, acc.rows,
    )
