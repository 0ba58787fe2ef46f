"""What each model output is, read from the graph, and which metrics judge it.

One metric cannot judge every output: top-1 agreement passes a 2-class probability that
moved by 0.40 and fails a sentence embedding on noise; cosine passes a map that is 3x too
bright; an [N, 1] output has a per-row cosine of 1, 0 or -1 only. So each output gets a
kind, decided first by what produces it (the strongest evidence), then by its name, then
by its shape, and the kind picks the metrics and their default limits:

=============  ==========================================  ==============================
kind           decided by                                  gated by default
=============  ==========================================  ==============================
probabilities  Softmax / Sigmoid producer (or rows in      max |d| <= 0.05; top-1 >= 0.99
               [0, 1] summing to 1, no graph)              (rows summing to 1 only)
scores         LogSoftmax producer; named logits/scores;   top-1 >= 0.99, top-5 overlap
               [B, C] (C <= 1000) or [B, T, C] from a      >= 0.90 (C > 5), mean KL of
               linear head (per step for sequences)        softmax <= 0.05 nats
embedding      pooled (ReduceMean/ReduceSum/GlobalPool,    cosine min >= 0.99, SQNR >= 15
               Gather of one token) or normalized          dB (magnitude)
               (LpNormalization, x / ||x||); named so
hidden         [B, T, D] not from a linear head            cosine min >= 0.99, SQNR >= 15
                                                           dB
regression     dense maps (rank >= 4), boxes, named        cosine min >= 0.99, SQNR >= 15
               box/depth/offset..., anything else          dB
scalar         one value per row ([N], [N, 1])             max |d| / max |ref| <= 0.05,
                                                           SQNR >= 15 dB
integer        integer or bool dtype (ids, masks, labels)  exact match >= 0.99
=============  ==========================================  ==============================

For [B, T, C] scores whose steps mostly pick one class (CTC blank, background), top-1 is
also required on the steps where either model picks another class: 99 % overall agreement
can be every spoken step wrong.
SQNR 15 dB (relative L2 error 0.18) is looser than what cosine 0.99 allows for an error
orthogonal to the output (about 17 dB), so it fails only what cosine cannot see: a wrong
scale or offset. The table is `KINDS` below; `kinds_table()` gives its rows for a README.
A user who knows better names the kind per output (`output_kinds={"name": "scores"}`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Literal, get_args

import numpy as np
import onnx_ir as ir

from onnxprune.errors import InputError

__all__ = ["OutputKind", "KindLimits", "KindInfo", "KINDS", "KindDecision", "OutputFacts",
           "OutputPart",
           "graph_facts", "decide_kind", "kind_from_values", "check_kinds", "kinds_table"]

OutputKind = Literal["probabilities", "scores", "embedding", "hidden", "regression",
                     "scalar", "integer"]
OUTPUT_KINDS: tuple[str, ...] = get_args(OutputKind)


@dataclass(frozen=True)
class KindLimits:
    """Default limits of one kind; None: reported (where it applies), not enforced."""

    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    max_abs: float | None = None
    max_rel: float | None = None  # max |d| / max |ref|
    min_top1: float | None = None
    min_top5: float | None = None
    max_kl: float | None = None
    min_exact: float | None = None

    def describe(self) -> str:
        names = {"min_cosine": "cosine min >=", "min_sqnr_db": "SQNR dB >=",
                 "max_abs": "max |d| <=", "max_rel": "max |d|/max |ref| <=",
                 "min_top1": "top-1 >=", "min_top5": "top-5 overlap >=",
                 "max_kl": "mean KL <=", "min_exact": "exact match >="}
        return ", ".join(f"{names[f.name]} {getattr(self, f.name)}" for f in fields(self)
                         if getattr(self, f.name) is not None)


@dataclass(frozen=True)
class KindInfo:
    kind: OutputKind
    what: str
    limits: KindLimits


_SQNR = 15.0
KINDS: Mapping[str, KindInfo] = {
    "probabilities": KindInfo("probabilities", "probabilities (Softmax/Sigmoid)",
                              KindLimits(max_abs=0.05, min_top1=0.99)),
    "scores": KindInfo("scores", "class scores / logits, per step for [B, T, C]",
                       KindLimits(min_top1=0.99, min_top5=0.90, max_kl=0.05)),
    "embedding": KindInfo("embedding", "pooled or normalized embeddings",
                          KindLimits(min_cosine=0.99, min_sqnr_db=_SQNR)),
    "hidden": KindInfo("hidden", "hidden states [B, T, D]",
                       KindLimits(min_cosine=0.99, min_sqnr_db=_SQNR)),
    "regression": KindInfo("regression", "regression values, boxes, dense maps",
                           KindLimits(min_cosine=0.99, min_sqnr_db=_SQNR)),
    "scalar": KindInfo("scalar", "one value per row ([N], [N, 1])",
                       KindLimits(max_rel=0.05, min_sqnr_db=_SQNR)),
    "integer": KindInfo("integer", "integer ids, labels, masks",
                        KindLimits(min_exact=0.99)),
}


def kinds_table() -> list[tuple[str, str, str]]:
    """(kind, what it is, default limits) rows, for a README or `--help`."""
    return [(k, info.what, info.limits.describe()) for k, info in KINDS.items()]


def check_kinds(kinds: Mapping[str, str] | None, names: list[str] | tuple[str, ...]) -> None:
    """Fails early on a kind override that names no output or no kind."""
    for name, kind in (kinds or {}).items():
        if name not in names:
            raise InputError(f"output kind given for '{name}', which is not a model output "
                             f"(outputs: {', '.join(names)})")
        if kind not in OUTPUT_KINDS:
            raise InputError(f"output kind '{kind}' for '{name}' is not one of "
                             f"{', '.join(OUTPUT_KINDS)}")


@dataclass(frozen=True)
class KindDecision:
    kind: OutputKind
    reason: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.reason}"


@dataclass(frozen=True)
class OutputFacts:
    """What the graph says about one output: the op that computes it (past reshapes) and
    whether it is a pooled or normalized vector."""

    op: str
    node: str
    pooled: str = ""      # the pooling op ('ReduceMean', ...) or ''
    normalized: str = ""  # the normalizing op or ''
    linear: bool = False  # a MatMul/Gemm (+ constant bias) head
    # A Concat of differently made parts (a detector's boxes, class probabilities and mask
    # coefficients in one tensor): judged part by part, each by its own kind.
    parts: tuple[OutputPart, ...] = ()

    def where(self) -> str:
        return f"{self.op} '{self.node}'"


@dataclass(frozen=True)
class OutputPart:
    """Indices start:stop along `axis` of an output, made by one kind of op."""

    axis: int
    start: int
    stop: int
    facts: OutputFacts

    def label(self, output: str) -> str:
        return f"{output}[{':, ' * self.axis}{self.start}:{self.stop}]"

    def take(self, array: np.ndarray) -> np.ndarray:
        index = [slice(None)] * array.ndim
        index[self.axis] = slice(self.start, self.stop)
        return array[tuple(index)]


# Ops that move values around without computing new ones: look through them.
_SHAPE_OPS = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Cast"}
_POOL_OPS = {"ReduceMean", "ReduceSum", "ReduceMax", "GlobalAveragePool", "GlobalMaxPool"}
_NORM_DIVISORS = {"ReduceL2", "Sqrt", "ReduceSumSquare", "LpNormalization"}


def _through_shape_ops(value: ir.Value) -> ir.Node | None:
    node = value.producer()
    while node is not None and node.op_type in _SHAPE_OPS and node.inputs and node.inputs[0]:
        node = node.inputs[0].producer()  # type: ignore[union-attr]
    return node


def _is_const(value: ir.Value | None) -> bool:
    if value is None:
        return False
    if value.const_value is not None:
        return True
    p = value.producer()
    return p is not None and p.op_type == "Constant"


def _reaches(value: ir.Value | None, ops: set[str], depth: int = 4) -> str:
    """The first op of `ops` found walking back at most `depth` producers (first inputs)."""
    while value is not None and depth > 0:
        node = value.producer()
        if node is None:
            return ""
        if node.op_type in ops:
            return node.op_type
        value = next((i for i in node.inputs if i is not None and not _is_const(i)), None)
        depth -= 1
    return ""


def _facts(value: ir.Value) -> OutputFacts | None:
    node = _through_shape_ops(value)
    if node is None:
        return None
    op, name = node.op_type, node.name or (node.outputs[0].name or "")
    if op in _POOL_OPS:
        return OutputFacts(op, name, pooled=op)
    if op == "LpNormalization":
        return OutputFacts(op, name, normalized=op)
    if op == "Div" and len(node.inputs) == 2:
        divisor = _reaches(node.inputs[1], _NORM_DIVISORS)
        if divisor:
            return OutputFacts(op, name, normalized=divisor)
        if _reaches(node.inputs[0], {"ReduceSum", "ReduceMean"}, depth=2):
            return OutputFacts(op, name, pooled="ReduceSum / count")  # masked mean pooling
    if op in ("Gather", "Slice") and _is_const(node.inputs[1] if len(node.inputs) > 1 else None):
        src = node.inputs[0]
        if src is not None and src.shape is not None and len(src.shape) == 3:
            return OutputFacts(op, name, pooled=f"{op} of one token")
    linear = op in ("MatMul", "Gemm")
    if op == "Add" and any(_is_const(i) for i in node.inputs):
        other = next((i for i in node.inputs if i is not None and not _is_const(i)), None)
        inner = other.producer() if other is not None else None
        linear = inner is not None and inner.op_type in ("MatMul", "Gemm")
    return OutputFacts(op, name, linear=linear)


def graph_facts(model: ir.Model) -> dict[str, OutputFacts | None]:
    """Facts for every graph output by name (None: the output is a graph input or constant)."""
    out = {}
    for v in model.graph.outputs:
        facts = _facts(v)
        parts = _parts(v)
        if facts is not None and parts:
            facts = replace(facts, parts=parts)
        out[v.name or ""] = facts
    return out


_MAX_PARTS = 8


def _parts(value: ir.Value) -> tuple[OutputPart, ...]:
    """The output's parts when, along one non-batch axis, it is a Concat of values made by
    different ops (followed through Transpose, shape-keeping Reshape, and Concats along other
    axes whose inputs are all made alike); () when it is one thing."""
    if value.shape is None:
        return ()
    for axis in range(1, len(value.shape)):
        found = _partition(value, axis, depth=6)
        if found and 2 <= len(found) <= _MAX_PARTS:
            start, parts = 0, []
            for size, facts in found:
                parts.append(OutputPart(axis, start, start + size, facts))
                start += size
            return tuple(parts)
    return ()


def _partition(value: ir.Value, axis: int, depth: int) -> list[tuple[int, OutputFacts]] | None:
    """[(size, facts)] of the runs of alike parts along `axis`, or None where unknown."""
    node = value.producer()
    if node is None or depth == 0 or not node.inputs or node.inputs[0] is None:
        return None
    src = node.inputs[0]
    if node.op_type in ("Identity", "Cast"):
        return _partition(src, axis, depth - 1)
    if node.op_type == "Transpose":
        perm = node.attributes.get_ints("perm")
        if perm is None or axis >= len(perm):
            return None
        return _partition(src, perm[axis], depth - 1)
    if node.op_type == "Reshape":
        a, b = src.shape, value.shape
        if (a is None or b is None or len(a) <= axis or len(b) <= axis
                or not all(isinstance(d, int) for d in a[1:axis + 1])
                or list(a[1:axis + 1]) != list(b[1:axis + 1])):
            return None
        return _partition(src, axis, depth - 1)
    if node.op_type != "Concat":
        return None
    rank = len(value.shape) if value.shape is not None else None
    cat = node.attributes.get_int("axis", 0)
    if rank is not None and cat < 0:
        cat += rank
    if cat != axis:  # e.g. detection scales side by side: each must split alike
        splits = [_partition(i, axis, depth - 1) if i is not None else None
                  for i in node.inputs]
        first = splits[0]
        if first is None or any(s is None or [(n, f.op) for n, f in s]
                                != [(n, f.op) for n, f in first] for s in splits):
            return None
        return first
    runs: list[tuple[int, OutputFacts]] = []
    for i in node.inputs:
        size = None if i is None or i.shape is None or len(i.shape) <= axis else i.shape[axis]
        facts = _facts(i) if i is not None else None
        if not isinstance(size, int) or facts is None:
            return None
        if runs and runs[-1][1].op == facts.op:
            runs[-1] = (runs[-1][0] + size, runs[-1][1])
        else:
            runs.append((size, facts))
    return runs


_SCORES = re.compile(r"logit|score|class|label", re.IGNORECASE)
_PROBS = re.compile(r"prob", re.IGNORECASE)
_HIDDEN = re.compile(r"hidden|state", re.IGNORECASE)
_EMBED = re.compile(r"embed|pool|sentence|vector|feature|encod", re.IGNORECASE)
_REGRESSION = re.compile(r"box|bbox|coord|offset|delta|depth|regress|disparity|flow",
                         re.IGNORECASE)


def _is_distribution(ref: np.ndarray) -> bool:
    if ref.ndim < 1 or ref.shape[-1] < 2 or ref.size == 0:
        return False
    r = ref.astype(np.float64)
    return bool(r.min() >= 0 and r.max() <= 1
                and np.allclose(r.sum(-1), 1.0, atol=1e-3))


def decide_kind(name: str, facts: OutputFacts | None, ref: np.ndarray) -> KindDecision:
    """The kind of output `name`: graph facts first, then its name, then its shape."""
    if not np.issubdtype(ref.dtype, np.floating):
        return KindDecision("integer", f"{ref.dtype} values")
    if facts is not None:
        if facts.op in ("Softmax", "Sigmoid"):
            return KindDecision("probabilities", f"produced by {facts.where()}")
        if facts.op == "LogSoftmax":
            return KindDecision("scores", f"log-probabilities from {facts.where()}")
        if facts.normalized:
            return KindDecision("embedding", f"normalized ({facts.normalized}) by "
                                             f"{facts.where()}")
        if facts.pooled and ref.ndim <= 2 and (ref.ndim < 2 or ref.shape[-1] > 1):
            return KindDecision("embedding", f"pooled ({facts.pooled}) by {facts.where()}")
    named = _by_name(name, ref)
    if named is not None:
        return named
    where = f" from {facts.where()}" if facts is not None else ""
    if ref.ndim <= 1 or ref.shape[-1] == 1:
        return KindDecision("scalar", f"one value per row, shape {list(ref.shape)}{where}")
    if facts is None:
        return kind_from_values(name, ref)
    if ref.ndim == 2:
        if facts.linear and ref.shape[-1] <= 1000:
            return KindDecision("scores", f"[batch, {ref.shape[-1]}] from a linear head "
                                          f"{facts.where()}")
        return KindDecision("embedding", f"[batch, {ref.shape[-1]}] vectors{where}")
    if ref.ndim == 3:
        if facts.linear:
            return KindDecision("scores", f"[batch, steps, {ref.shape[-1]}] from a linear head "
                                          f"{facts.where()}: per-step class scores")
        return KindDecision("hidden", f"[batch, steps, {ref.shape[-1]}]{where}")
    return KindDecision("regression", f"dense rank-{ref.ndim} map{where}")


def _by_name(name: str, ref: np.ndarray) -> KindDecision | None:
    if _PROBS.search(name) and _is_distribution(ref):
        return KindDecision("probabilities", f"named '{name}', rows in [0, 1] summing to 1")
    if ref.ndim >= 1 and ref.shape[-1] >= 2:
        if _SCORES.search(name) or _PROBS.search(name):
            return KindDecision("scores", f"named '{name}'")
        if _HIDDEN.search(name):
            return KindDecision("hidden" if ref.ndim >= 3 else "embedding", f"named '{name}'")
        if _EMBED.search(name):
            return KindDecision("embedding", f"named '{name}'")
    if _REGRESSION.search(name):
        return KindDecision("regression", f"named '{name}'")
    return None


def kind_from_values(name: str, ref: np.ndarray) -> KindDecision:
    """The kind without a graph (golden files saved before kinds were recorded): the name,
    then the values of the reference's first batch."""
    if not np.issubdtype(ref.dtype, np.floating):
        return KindDecision("integer", f"{ref.dtype} values")
    named = _by_name(name, ref)
    if named is not None:
        return named
    if ref.ndim <= 1 or ref.shape[-1] == 1:
        return KindDecision("scalar", f"one value per row, shape {list(ref.shape)}")
    if _is_distribution(ref):
        return KindDecision("probabilities", "rows in [0, 1] summing to 1 (no graph)")
    if ref.ndim >= 4:
        return KindDecision("regression", f"dense rank-{ref.ndim} map (no graph)")
    if ref.ndim == 3:
        return KindDecision("hidden", "[batch, steps, dim] (no graph)")
    norms = np.linalg.norm(ref.astype(np.float64), axis=-1)
    if ref.shape[-1] > 1000 or np.allclose(norms, 1.0, atol=1e-3):
        return KindDecision("embedding", "unit-norm or wide rows (no graph)")
    return KindDecision("scores", f"[batch, {ref.shape[-1]}] rows (no graph)")
