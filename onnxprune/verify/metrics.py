"""Metrics accumulated batch by batch, so any amount of data fits in memory.

Everything is computed in float64 from the two models' outputs. Rows are the slices a
metric compares: for cosine, one per sample (or one per token once a token mask picks
tokens); for top-1/top-5/KL, one per position of every leading axis, so a [B, T, C]
sequence of class scores is judged step by step (a CTC head's decision is per step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxprune.verify.kinds import KindDecision

__all__ = ["Accumulator"]

_TOP5_MIN_CLASSES = 6  # top-5 overlap says nothing new with 5 classes or fewer


def _row_cosines(rows_r: np.ndarray, rows_c: np.ndarray) -> np.ndarray:
    nr, nc = np.linalg.norm(rows_r, axis=1), np.linalg.norm(rows_c, axis=1)
    dots = np.sum(rows_r * rows_c, axis=1)
    both_zero = (nr == 0) & (nc == 0)
    # Identical rows are exactly 1 (rounding in dot / (|r| |c|) gives 1 +- 1 ulp, which
    # would fail --min-cosine 1.0 on an identical copy); the rest is clipped to [-1, 1].
    same = np.all(rows_r == rows_c, axis=1)
    norms = nr * nc
    return np.where(both_zero | same, 1.0,
                    np.clip(dots / np.where(norms == 0, np.inf, norms), -1.0, 1.0))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    z = x - np.where(np.isfinite(m), m, 0.0)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def _top5_overlap(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Per row: the share of the reference's top 5 classes that are in the candidate's."""
    k = 5
    tr = np.argpartition(-r, k - 1, axis=-1)[:, :k]
    tc = np.argpartition(-c, k - 1, axis=-1)[:, :k]
    hits = (tr[:, :, None] == tc[:, None, :]).any(-1)
    return np.asarray(hits.sum(-1) / k, dtype=np.float64)


@dataclass
class Accumulator:
    """One output on one provider; `add` once per batch, then read the sums."""

    decision: KindDecision
    want_top1: bool = False
    max_abs: float = 0.0
    abs_sum: float = 0.0
    ref_max: float = 0.0
    count: int = 0
    signal: float = 0.0
    noise: float = 0.0
    cosines: list[float] = field(default_factory=list)
    top1_same: int = 0
    top1_total: int = 0
    top5_sum: float = 0.0
    top5_total: int = 0
    kl_sum: float = 0.0
    kl_total: int = 0
    exact_same: int = 0
    nonfinite: int = 0
    allclose_violations: int = 0
    abs_violations: int = 0
    rows: int = 0
    # Per-step decisions of a [B, T, C] sequence, kept to judge the steps that matter.
    sequence: bool = False
    ref_args: list[np.ndarray] = field(default_factory=list)
    cand_args: list[np.ndarray] = field(default_factory=list)

    def add(self, ref: np.ndarray, cand: np.ndarray, *, atol: float, rtol: float,
            max_abs: float | None, keep: np.ndarray | None = None) -> None:
        """`keep` (bool over the leading axes) picks the rows compared: a token mask."""
        if keep is not None:
            ref, cand = ref[keep], cand[keep]  # [tokens, ...]
        kind = self.decision.kind
        r = ref.astype(np.float64)
        c = cand.astype(np.float64)
        self.nonfinite += int(np.count_nonzero(~np.isfinite(c)))
        diff = np.abs(r - c)
        diff = np.where(np.isfinite(diff), diff, np.inf)
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.ref_max = max(self.ref_max, float(np.max(np.abs(r))))
        self.abs_sum += float(diff.sum())
        self.count += diff.size
        self.exact_same += int(np.count_nonzero(ref == cand))
        self.signal += float(np.sum(r * r))
        self.noise += float(np.sum((r - c) ** 2))
        self.allclose_violations += int(np.count_nonzero(diff > atol + rtol * np.abs(r)))
        if max_abs is not None:
            self.abs_violations += int(np.count_nonzero(diff > max_abs))
        if r.size == 0:
            return
        rows_r = r.reshape(r.shape[0], -1) if r.ndim >= 2 else r.reshape(1, -1)
        self.rows += rows_r.shape[0]
        self.cosines.extend(float(x) for x in _row_cosines(rows_r, c.reshape(rows_r.shape)))
        if r.ndim < 2 or r.shape[-1] < 2:
            return
        classes = r.shape[-1]
        flat_r, flat_c = r.reshape(-1, classes), c.reshape(-1, classes)
        if self.want_top1:
            ra, ca = flat_r.argmax(-1), flat_c.argmax(-1)
            self.top1_same += int(np.sum(ra == ca))
            self.top1_total += flat_r.shape[0]
            if self.sequence:
                self.ref_args.append(ra.astype(np.int32))
                self.cand_args.append(ca.astype(np.int32))
        if kind == "scores" and np.all(np.isfinite(flat_c)) and np.all(np.isfinite(flat_r)):
            if classes >= _TOP5_MIN_CLASSES:
                self.top5_sum += float(_top5_overlap(flat_r, flat_c).sum())
                self.top5_total += flat_r.shape[0]
            lp, lq = _log_softmax(flat_r), _log_softmax(flat_c)
            kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)
            self.kl_sum += float(np.sum(np.maximum(kl, 0.0)))
            self.kl_total += flat_r.shape[0]

    @property
    def top1(self) -> float | None:
        return self.top1_same / self.top1_total if self.top1_total else None

    def top1_beyond_dominant(self) -> tuple[int, float, int] | None:
        """(class, agreement, steps) on the steps where either model picks something other
        than the class most steps pick (CTC blank, background), when one class takes more
        than half the steps: there, overall top-1 is mostly the dominant class agreeing
        with itself (99 % agreement with every non-blank step wrong)."""
        if not self.ref_args:
            return None
        ref, cand = np.concatenate(self.ref_args), np.concatenate(self.cand_args)
        counts = np.bincount(ref)
        dominant = int(counts.argmax())
        if counts[dominant] * 2 <= ref.size:
            return None
        steps = (ref != dominant) | (cand != dominant)
        n = int(steps.sum())
        if n == 0:
            return None
        return dominant, float(np.mean(ref[steps] == cand[steps])), n

    @property
    def top5(self) -> float | None:
        return self.top5_sum / self.top5_total if self.top5_total else None

    @property
    def kl_mean(self) -> float | None:
        return self.kl_sum / self.kl_total if self.kl_total else None

    @property
    def exact_match(self) -> float:
        return self.exact_same / self.count if self.count else 1.0

    @property
    def max_rel(self) -> float:
        """max |d| / max |ref|: an error measure that holds its meaning on any scale."""
        if self.ref_max == 0:
            return 0.0 if self.max_abs == 0 else float("inf")
        return self.max_abs / self.ref_max
