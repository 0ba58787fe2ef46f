"""Comparing a candidate model with its reference (or with saved outputs) on onnxruntime.

The reference runs on the CPU provider (the ground truth); the candidate runs on every
provider asked for. Metrics are accumulated batch by batch, so any amount of data fits.
Which metrics gate an output depends on what it is: top-1 agreement means something for
class scores only, so it is neither reported nor enforced for embeddings or hidden states
unless asked for.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxprune.calibration.data import Batch
from onnxprune.calibration.propagate import SECTION_ABOVE_BYTES, sectioned_outputs, weight_bytes
from onnxprune.core import cache_slices
from onnxprune.core.pages import release_pages
from onnxprune.errors import DataError, InputError
from onnxprune.io.models import external_data_files, uses_external_data
from onnxprune.io.runtime import ModelSource, Provider, make_session

__all__ = ["Tolerances", "OutputMetrics", "VerifyResult", "compare_models", "compare_outputs",
           "DEFAULT_MIN_COSINE", "DEFAULT_MIN_TOP1", "OutputKind", "output_kind"]

# The verdict when no tolerance is given, in the CLI and the Python API alike: every row of
# an embedding / hidden-state output within cosine 0.99 of the reference, and class scores
# agreeing on the top class for 99 % of the rows (a per-row logit cosine is a poor proxy
# for the decision a classifier makes).
DEFAULT_MIN_COSINE = 0.99
DEFAULT_MIN_TOP1 = 0.99

OutputKind = Literal["scores", "embedding", "other"]
_SCORE_NAME = re.compile(r"logit|score|prob|class|label", re.IGNORECASE)
_EMBEDDING_NAME = re.compile(r"hidden|embed|pool|state|feature|sentence|encod|vector",
                             re.IGNORECASE)


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
    # Applied by output kind when set (the defaults): cosine for embeddings and other
    # outputs, top-1 agreement for class scores. Explicit limits above apply to every output.
    by_kind: bool = False

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
    ) -> Tolerances:
        """The CLI's rule, shared by the API: no limit given means the defaults; any limit
        given means exactly the limits given."""
        given = (min_cosine, atol, rtol, min_sqnr_db, min_top1)
        for name, v in zip(("min_cosine", "atol", "rtol", "min_sqnr_db", "min_top1"), given,
                           strict=True):
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise InputError(f"tolerance {name}={v!r} must be a finite number")
            if v is not None and name in ("atol", "rtol") and v < 0:
                raise InputError(f"tolerance {name}={v} must be >= 0")
        if all(v is None for v in given):
            return replace(cls.defaults(), top1=top1)
        return cls(min_cosine, atol, rtol, min_sqnr_db, min_top1, top1)

    def describe(self) -> str:
        """One line saying what is enforced."""
        if self.by_kind:
            return (f"defaults: cosine min >= {self.min_cosine} (embeddings, other outputs), "
                    f"top-1 agreement >= {self.min_top1} (class scores)")
        parts = [f"{k} {v}" for k, v in (("cosine min >=", self.min_cosine),
                                          ("atol", self.atol), ("rtol", self.rtol),
                                          ("SQNR dB >=", self.min_sqnr_db),
                                          ("top-1 >=", self.min_top1)) if v is not None]
        return ", ".join(parts) or "nothing but finite outputs"


def output_kind(name: str, ref: np.ndarray) -> OutputKind:
    """What an output holds, from its name and the reference's first batch.

    Class scores: named like logits/scores/probabilities, or a float [batch, classes] matrix
    with 2-1000 classes whose rows are not unit-norm. Hidden states ([batch, seq, dim]) and
    embeddings (named so, or unit-norm rows) are never class scores.
    """
    if not (np.issubdtype(ref.dtype, np.floating) and ref.ndim >= 2 and ref.shape[-1] >= 2):
        return "other"
    if _SCORE_NAME.search(name):
        return "scores"
    if _EMBEDDING_NAME.search(name) or ref.ndim > 2:
        return "embedding"
    if ref.shape[-1] > 1000:
        return "embedding"
    norms = np.linalg.norm(ref.astype(np.float64), axis=-1)
    return "embedding" if np.allclose(norms, 1.0, atol=1e-3) else "scores"


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
    kind: OutputKind | None = None

    def add(self, name: str, ref: np.ndarray, cand: np.ndarray, tol: Tolerances) -> None:
        if self.kind is None:
            self.kind = output_kind(name, ref)
        atol, rtol = tol.atol or 0.0, tol.rtol or 0.0
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
        if self._wants_top1(ref, tol):
            self.top1_same += int(np.sum(ref.argmax(-1) == cand.argmax(-1)))
            self.top1_total += int(np.prod(ref.shape[:-1]))

    def _wants_top1(self, ref: np.ndarray, tol: Tolerances) -> bool:
        """Class scores always; any float [..., >=2] output when asked (top1=True)."""
        if tol.top1 is False:
            return False
        if self.kind == "scores":
            return True
        return bool(tol.top1) and self.kind != "other"


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
    kind: OutputKind = "other"

    @property
    def ok(self) -> bool:
        return not self.failures

    def line(self) -> str:
        """One readable line: the output, its metrics and its verdict."""
        top1 = "" if self.top1_agreement is None else f", top-1 {self.top1_agreement:.4f}"
        head = (f"{self.name} [{self.provider}, {self.kind}]: cosine min {self.cosine_min:.6f} "
                f"mean {self.cosine_mean:.6f}, SQNR {self.sqnr_db:.2f} dB, max |d| "
                f"{self.max_abs_diff:.3g}{top1}")
        return f"{head}: ok" if self.ok else f"{head}: FAILED: {'; '.join(self.failures)}"


@dataclass(frozen=True)
class VerifyResult:
    """The comparison of every output on every provider; true when all are within tolerance.

    `assert result` and `if not result:` test the verdict; `result.summary()` gives readable
    lines and `result.raise_for_failure()` raises an AssertionError listing each failure.
    """

    outputs: tuple[OutputMetrics, ...]
    batches: int
    generated_inputs: bool
    tolerances: Tolerances
    against: str = "reference model"  # or "golden outputs FILE"

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

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
    kind = acc.kind or "other"
    min_cosine, min_top1 = tol.min_cosine, tol.min_top1
    if tol.by_kind:  # the defaults: the one metric that means something for this output
        min_cosine, min_top1 = (None, min_top1) if kind == "scores" else (min_cosine, None)
    failures: list[str] = []
    if acc.nonfinite:
        failures.append(f"{acc.nonfinite} NaN/Inf values in the candidate's output")
    if min_cosine is not None and not (cos_min >= min_cosine):
        failures.append(f"cosine min {cos_min:.6f} < {min_cosine}")
    if (tol.atol is not None or tol.rtol is not None) and acc.allclose_violations:
        failures.append(
            f"{acc.allclose_violations} values outside atol={tol.atol or 0} "
            f"rtol={tol.rtol or 0} (max abs diff {acc.max_abs:.3g})"
        )
    if tol.min_sqnr_db is not None and not (sqnr >= tol.min_sqnr_db):
        failures.append(f"SQNR {sqnr:.2f} dB < {tol.min_sqnr_db} dB")
    if min_top1 is not None and top1 is not None and top1 < min_top1:
        failures.append(f"top-1 agreement {top1:.4f} < {min_top1}")
    return OutputMetrics(
        name, provider, acc.max_abs, mean_abs, cos_mean, cos_min, sqnr, top1,
        acc.nonfinite, acc.allclose_violations, tuple(failures), kind,
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
    """Runs both models on every batch and compares each output of the candidate.

    A reference with external data (a big model) runs over every batch first and its
    session is released before the candidate's is built, so the two models' weights are
    never resident together; the reference outputs are held meanwhile (the verification
    data is bounded by the data budget).
    """
    if isinstance(reference, ir.Model) and weight_bytes(reference) >= SECTION_ABOVE_BYTES:
        # A big reference runs section by section: its weights are never all resident.
        batches = list(batches)
        saved = sectioned_outputs(reference, batches)
        if saved is not None:
            release_pages(reference)
            return compare_outputs([o.name or "" for o in reference.graph.outputs],
                                   lambda i, _: saved[i], candidate, batches,
                                   providers=providers, tolerances=tolerances,
                                   generated_inputs=generated_inputs)
    ref_sess = make_session(reference, "cpu")
    ref_outputs = [o.name for o in ref_sess.get_outputs()]

    def run_reference(i: int, batch: Batch) -> list[np.ndarray]:
        try:
            return list(ref_sess.run(None, batch))
        except Exception as e:
            raise DataError(f"reference model failed on batch {i}: {_first_line(e)}") from e

    if _has_external_data(reference):
        batches = list(batches)
        saved = [run_reference(i, b) for i, b in enumerate(batches)]
        del ref_sess, run_reference
        if isinstance(reference, ir.Model):
            release_pages(reference)
        return compare_outputs(ref_outputs, lambda i, _: saved[i], candidate, batches,
                               providers=providers, tolerances=tolerances,
                               generated_inputs=generated_inputs)
    return compare_outputs(ref_outputs, run_reference, candidate, batches,
                           providers=providers, tolerances=tolerances,
                           generated_inputs=generated_inputs)


def _has_external_data(model: ModelSource) -> bool:
    if isinstance(model, ir.Model):
        return uses_external_data(model)
    if isinstance(model, bytes):
        return False
    return bool(external_data_files(model))


def compare_outputs(
    names: Sequence[str],
    reference: Callable[[int, Batch], Sequence[np.ndarray]],
    candidate: ModelSource,
    batches: Iterable[Batch],
    *,
    providers: Sequence[Provider] = ("cpu",),
    tolerances: Tolerances = Tolerances(),
    generated_inputs: bool = False,
    against: str = "reference model",
) -> VerifyResult:
    """Compares the candidate's outputs with `reference(i, batch)` (a model run, or outputs
    saved earlier) on every batch."""
    cand_sessions = {p: make_session(candidate, p) for p in providers}
    ref_outputs = list(names)
    for p, sess in cand_sessions.items():
        cand_outputs = [o.name for o in sess.get_outputs()]
        if cand_outputs != ref_outputs:
            raise InputError(
                f"outputs differ: the {against} has {ref_outputs}, candidate ({p}) has "
                f"{cand_outputs}; compare models with the same outputs"
            )
    accs = {(p, name): _Accumulator() for p in providers for name in ref_outputs}
    # A model whose heads were removed together with its key/value cache reads and writes
    # the kept slice of the cache: feed it that slice, compare that slice.
    caches = {p: cache_slices.parse(sess.get_modelmeta().custom_metadata_map.get(
        cache_slices.KEY)) for p, sess in cand_sessions.items()}
    count = 0
    for batch in batches:
        ref_all = reference(count, batch)
        for p, sess in cand_sessions.items():
            ref = ref_all
            if caches[p]:
                cut = cache_slices.slice_arrays(dict(zip(ref_outputs, ref_all, strict=False)),
                                                caches[p])
                ref = [cut[n] for n in ref_outputs]
            try:
                cand = sess.run(None, cache_slices.slice_arrays(batch, caches[p])
                                if caches[p] else batch)
            except Exception as e:
                raise DataError(
                    f"candidate model failed on batch {count} ({p}): {_first_line(e)}"
                ) from e
            for name, r, c in zip(ref_outputs, ref, cand, strict=False):
                if r.shape != c.shape:
                    raise InputError(
                        f"output '{name}' has shape {list(c.shape)} in the candidate, "
                        f"{list(r.shape)} in the {against}"
                    )
                accs[(p, name)].add(name, r, c, tolerances)
        count += 1
    if count == 0:
        raise DataError("no batches to verify with")
    metrics = tuple(
        _finish(name, p, accs[(p, name)], tolerances) for p in providers for name in ref_outputs
    )
    return VerifyResult(metrics, count, generated_inputs, tolerances, against)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
