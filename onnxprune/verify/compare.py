"""Comparing a candidate model with its reference (or with saved outputs) on onnxruntime.

The reference runs on the CPU provider (the ground truth); the candidate runs on every
provider asked for. Metrics are accumulated batch by batch, so any amount of data fits.
Which metrics gate an output depends on what it is (onnxprune.verify.kinds has the table):
the kind is read from the reference graph (what produces the output), then from its name
and shape, and the result says which kind was inferred and why. Callers may name the kind
of an output, check only some outputs, and compare per-token outputs only where a mask
input is nonzero (padding says nothing about a model).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune.calibration.data import Batch
from onnxprune.calibration.propagate import SECTION_ABOVE_BYTES, sectioned_outputs, weight_bytes
from onnxprune.core import cache_slices
from onnxprune.core.pages import release_pages
from onnxprune.errors import DataError, InputError
from onnxprune.io.models import external_data_files, uses_external_data
from onnxprune.io.runtime import ModelSource, Provider, make_session
from onnxprune.verify.kinds import (
    KindDecision,
    OutputFacts,
    OutputKind,
    _is_distribution,
    check_kinds,
    decide_kind,
    graph_facts,
    kind_from_values,
)
from onnxprune.verify.metrics import Accumulator
from onnxprune.verify.result import (
    DEFAULT_MIN_COSINE,
    DEFAULT_MIN_TOP1,
    NO_LIMITS,
    OutputMetrics,
    Tolerances,
    VerifyResult,
    finish_metrics,
    limits_for,
)

__all__ = ["Tolerances", "OutputMetrics", "VerifyResult", "compare_models", "compare_outputs",
           "DEFAULT_MIN_COSINE", "DEFAULT_MIN_TOP1", "OutputKind", "output_kind",
           "reference_facts", "weak_reasons"]

logger = logging.getLogger(__name__)

KindsArg = Mapping[str, "str | KindDecision"]


def output_kind(name: str, ref: np.ndarray) -> OutputKind:
    """The kind of an output from its name and the reference's first batch alone (no
    graph); compare_models reads the graph first (onnxprune.verify.kinds.decide_kind)."""
    return kind_from_values(name, ref).kind


def reference_facts(model: ModelSource) -> dict[str, OutputFacts | None]:
    """What the reference graph says about each output; {} when it cannot be read (the
    kinds then come from names and values, and each says so)."""
    try:
        if isinstance(model, ir.Model):
            return graph_facts(model)
        if isinstance(model, bytes):
            return graph_facts(ir.from_proto(onnx.load_from_string(model)))
        return graph_facts(ir.from_proto(onnx.load(str(model), load_external_data=False)))
    except Exception as e:  # the comparison itself reports an unreadable model
        logger.info("output kinds from names and values: the graph was not read (%s)", e)
        return {}


def compare_models(
    reference: ModelSource,
    candidate: ModelSource,
    batches: Iterable[Batch],
    *,
    providers: Sequence[Provider] = ("cpu",),
    tolerances: Tolerances = NO_LIMITS,
    generated_inputs: bool = False,
    output_kinds: KindsArg | None = None,
    outputs: Sequence[str] | None = None,
    token_mask: str | None = None,
) -> VerifyResult:
    """Runs both models on every batch and compares each output of the candidate.

    `output_kinds` names the kind of some outputs (the rest are read from the reference
    graph), `outputs` checks only those outputs, `token_mask` names an input whose nonzero
    entries pick the tokens compared in per-token outputs ([B, S, ...] under a [B, S] mask).

    A reference with external data (a big model) runs over every batch first and its
    session is released before the candidate's is built, so the two models' weights are
    never resident together; the reference outputs are held meanwhile (the verification
    data is bounded by the data budget).
    """
    options = dict(providers=providers, tolerances=tolerances, generated_inputs=generated_inputs,
                   output_kinds=output_kinds, outputs=outputs, token_mask=token_mask,
                   facts=reference_facts(reference))
    if isinstance(reference, ir.Model) and weight_bytes(reference) >= SECTION_ABOVE_BYTES:
        # A big reference runs section by section: its weights are never all resident.
        batches = list(batches)
        saved = sectioned_outputs(reference, batches)
        if saved is not None:
            release_pages(reference)
            return compare_outputs([o.name or "" for o in reference.graph.outputs],
                                   lambda i, _: saved[i], candidate, batches,
                                   **options)  # type: ignore[arg-type]
    ref_sess = make_session(reference, "cpu")
    ref_outputs = [o.name for o in ref_sess.get_outputs()]

    def run_reference(i: int, batch: Batch) -> list[np.ndarray]:
        try:
            return list(ref_sess.run(None, batch))
        except Exception as e:
            hint = ("; the generated inputs do not fit this model: give each input's shape "
                    "with --shape NAME:D0,D1,... or real data with --data"
                    if generated_inputs else "")
            raise DataError(f"reference model failed on batch {i}: {_first_line(e)}{hint}") \
                from e

    if _has_external_data(reference):
        batches = list(batches)
        saved = [run_reference(i, b) for i, b in enumerate(batches)]
        del ref_sess, run_reference
        if isinstance(reference, ir.Model):
            release_pages(reference)
        return compare_outputs(ref_outputs, lambda i, _: saved[i], candidate, batches,
                               **options)  # type: ignore[arg-type]
    return compare_outputs(ref_outputs, run_reference, candidate, batches,
                           **options)  # type: ignore[arg-type]


def _has_external_data(model: ModelSource) -> bool:
    if isinstance(model, ir.Model):
        return uses_external_data(model)
    if isinstance(model, bytes):
        return False
    return bool(external_data_files(model))


def weak_reasons(batch: Batch, generated_inputs: bool) -> tuple[str, ...]:
    """Why a verdict on this (first) batch says little: made-up token ids. A model that
    reads tokens sees noise, and agreement on noise is no evidence about real text."""
    if not generated_inputs:
        return ()
    out = []
    for name, arr in batch.items():
        if (np.issubdtype(arr.dtype, np.integer) and arr.ndim and arr.size
                and len(np.unique(arr[: min(len(arr), 4)])) > 2):
            out.append(f"input '{name}' holds random token ids; agreement on them says "
                       "little about real inputs: give --data")
    return tuple(out)


def _decisions(names: Sequence[str], output_kinds: KindsArg | None) -> dict[str, KindDecision]:
    given = {n: (k if isinstance(k, KindDecision) else None) for n, k in
             (output_kinds or {}).items()}
    check_kinds({n: (k.kind if isinstance(k, KindDecision) else k)
                 for n, k in (output_kinds or {}).items()}, list(names))
    out: dict[str, KindDecision] = {}
    for name, k in (output_kinds or {}).items():
        out[name] = given[name] or KindDecision(k, "given by the user")  # type: ignore[arg-type]
    return out


def compare_outputs(
    names: Sequence[str],
    reference: Callable[[int, Batch], Sequence[np.ndarray]],
    candidate: ModelSource,
    batches: Iterable[Batch],
    *,
    providers: Sequence[Provider] = ("cpu",),
    tolerances: Tolerances = NO_LIMITS,
    generated_inputs: bool = False,
    against: str = "reference model",
    output_kinds: KindsArg | None = None,
    outputs: Sequence[str] | None = None,
    token_mask: str | None = None,
    facts: Mapping[str, OutputFacts | None] | None = None,
) -> VerifyResult:
    """Compares the candidate's outputs with `reference(i, batch)` (a model run, or outputs
    saved earlier) on every batch; the keywords are compare_models'. `facts` (from the
    reference graph) decide the kinds not given in `output_kinds`."""
    cand_sessions = {p: make_session(candidate, p) for p in providers}
    ref_outputs = list(names)
    for p, sess in cand_sessions.items():
        cand_outputs = [o.name for o in sess.get_outputs()]
        if cand_outputs != ref_outputs:
            raise InputError(
                f"outputs differ: the {against} has {ref_outputs}, candidate ({p}) has "
                f"{cand_outputs}; compare models with the same outputs"
            )
    checked = list(ref_outputs) if outputs is None else list(dict.fromkeys(outputs))
    for name in checked:
        if name not in ref_outputs:
            raise InputError(f"output '{name}' to check is not a model output "
                             f"(outputs: {', '.join(ref_outputs)})")
    if not checked:
        raise InputError("no outputs to check; name at least one")
    decided = _decisions(ref_outputs, output_kinds)
    accs: dict[tuple[str, str], Accumulator] = {}
    # A model whose heads were removed together with its key/value cache reads and writes
    # the kept slice of the cache: feed it that slice, compare that slice.
    caches = {p: cache_slices.parse(sess.get_modelmeta().custom_metadata_map.get(
        cache_slices.KEY)) for p, sess in cand_sessions.items()}
    count = 0
    weak: tuple[str, ...] = ()
    for batch in batches:
        if count == 0:
            weak = weak_reasons(batch, generated_inputs)
        keep = _token_keep(batch, token_mask)
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
                if name not in checked:
                    continue
                if r.shape != c.shape:
                    raise InputError(
                        f"output '{name}' has shape {list(c.shape)} in the candidate, "
                        f"{list(r.shape)} in the {against}"
                    )
                for label, r_part, c_part, part_facts in _judged_parts(
                        name, r, c, decided, facts):
                    acc = accs.get((p, label))
                    if acc is None:
                        acc = accs[(p, label)] = _accumulator(label, r_part, decided,
                                                              part_facts, tolerances)
                    picks = (keep if keep is not None
                             and r_part.shape[:keep.ndim] == keep.shape else None)
                    acc.add(r_part, c_part, atol=tolerances.atol or 0.0,
                            rtol=tolerances.rtol or 0.0,
                            max_abs=limits_for(acc.decision.kind, tolerances).max_abs,
                            keep=picks)
        count += 1
    if count == 0:
        raise DataError("no batches to verify with")
    metrics = tuple(
        finish_metrics(label, p, acc, tolerances) for p in providers
        for (q, label), acc in accs.items() if q == p
    )
    return VerifyResult(metrics, count, generated_inputs, tolerances, against, weak)


def _judged_parts(name: str, ref: np.ndarray, cand: np.ndarray,
                  decided: Mapping[str, KindDecision],
                  facts: Mapping[str, OutputFacts | None] | None):
    """(label, ref, cand, facts) for each part judged on its own: the whole output, or, for a
    Concat of differently made parts whose kind the user did not name, each part (a
    detector's boxes in pixels would hide its class probabilities in one cosine)."""
    whole = facts.get(name) if facts else None
    if whole is None or not whole.parts or name in decided:
        return [(name, ref, cand, facts)]
    if any(part.stop > ref.shape[part.axis] for part in whole.parts):
        return [(name, ref, cand, facts)]
    return [(part.label(name), part.take(ref), part.take(cand),
             {part.label(name): part.facts}) for part in whole.parts]


def _token_keep(batch: Batch, token_mask: str | None) -> np.ndarray | None:
    if token_mask is None:
        return None
    if token_mask not in batch:
        raise InputError(f"token mask '{token_mask}' is not an input of the batch "
                         f"(inputs: {', '.join(batch)})")
    return np.asarray(batch[token_mask]) != 0


def _accumulator(name: str, ref: np.ndarray, decided: Mapping[str, KindDecision],
                 facts: Mapping[str, OutputFacts | None] | None,
                 tol: Tolerances) -> Accumulator:
    if name in decided:
        decision = decided[name]
    elif facts:
        decision = decide_kind(name, facts.get(name), ref)
    else:
        decision = kind_from_values(name, ref)
    kind = decision.kind
    classes = ref.ndim >= 2 and ref.shape[-1] >= 2 and np.issubdtype(ref.dtype, np.floating)
    want = (kind == "scores" or (kind == "probabilities" and _is_distribution(ref))
            or (bool(tol.top1) and kind not in ("integer", "scalar")))
    return Accumulator(decision, want_top1=classes and want and tol.top1 is not False,
                       sequence=kind == "scores" and ref.ndim >= 3)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
