"""Golden outputs: a model's inputs and outputs saved once, compared against later.

CI then needs only the candidate model and a small .npz, not the full reference model
(what polygraphy's --save-outputs / --load-outputs do). One file holds every batch:
`input/<batch>/<name>` and `output/<batch>/<name>` arrays plus the output order, and
each output's kind as read from the model's graph (the comparison has no graph to read;
a file without kinds falls back to names and values).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxprune.calibration.data import Batch
from onnxprune.errors import DataError, InputError
from onnxprune.io.files import atomic_path
from onnxprune.io.runtime import ModelSource, Provider, make_session
from onnxprune.verify.compare import (
    NO_LIMITS,
    KindsArg,
    Tolerances,
    VerifyResult,
    compare_outputs,
    reference_facts,
)
from onnxprune.verify.kinds import (
    OUTPUT_KINDS,
    KindDecision,
    OutputFacts,
    OutputPart,
    decide_kind,
)

__all__ = ["Golden", "save_golden", "load_golden", "compare_golden"]

_FORMAT = "onnxprune-golden-1"


@dataclass(frozen=True)
class Golden:
    """Saved batches and, for each, the outputs in `names` order."""

    names: tuple[str, ...]
    batches: tuple[Batch, ...]
    outputs: tuple[tuple[np.ndarray, ...], ...]
    path: str = ""
    kinds: tuple[KindDecision | None, ...] = ()  # by `names`; None or () where not recorded
    # outputs judged part by part (a Concat of differently made parts), as recorded
    parts: Mapping[str, OutputFacts] = field(default_factory=dict)


def save_golden(model: ModelSource, batches: Iterable[Batch],
                path: str | os.PathLike[str]) -> Golden:
    """Runs `model` on the CPU provider on every batch and writes inputs + outputs."""
    sess = make_session(model, "cpu")
    names = tuple(o.name for o in sess.get_outputs())
    facts = reference_facts(model)
    arrays: dict[str, np.ndarray] = {}
    kept_batches: list[Batch] = []
    kept_outputs: list[tuple[np.ndarray, ...]] = []
    for i, batch in enumerate(batches):
        try:
            outs = tuple(sess.run(None, batch))
        except Exception as e:
            raise DataError(f"the model failed on batch {i}: {str(e).strip()[:200]}") from e
        for k, v in batch.items():
            arrays[f"input/{i}/{k}"] = v
        for k, v in zip(names, outs, strict=True):
            arrays[f"output/{i}/{k}"] = v
        kept_batches.append(batch)
        kept_outputs.append(outs)
    if not kept_batches:
        raise DataError("no batches to save golden outputs for")
    kinds = tuple(decide_kind(n, facts.get(n), a) if facts else None
                  for n, a in zip(names, kept_outputs[0], strict=True))
    arrays["__format__"] = np.array(_FORMAT)
    arrays["__outputs__"] = np.array(names)
    if all(k is not None for k in kinds):
        arrays["__kinds__"] = np.array([f"{k.kind}\t{k.reason}" for k in kinds if k])
    parts = {n: f for n, f in facts.items() if f is not None and f.parts and n in names}
    if parts:
        arrays["__parts__"] = np.array([
            f"{n}\t{p.axis}\t{p.start}\t{p.stop}\t{p.facts.op}\t{p.facts.node}"
            for n, f in parts.items() for p in f.parts])
    out = Path(path)
    if out.suffix != ".npz":
        raise InputError(f"{out}: golden outputs are written as .npz; name the file *.npz")
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return Golden(names, tuple(kept_batches), tuple(kept_outputs), str(out), kinds, parts)


def load_golden(path: str | os.PathLike[str]) -> Golden:
    """Reads a file written by save_golden, with a clear error for anything else."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such golden-output file (write one with --save-golden)")
    try:
        with np.load(p, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{p}: not a readable .npz file ({e})") from e
    if str(data.get("__format__", "")) != _FORMAT or "__outputs__" not in data:
        raise DataError(f"{p}: not a golden-output file written by onnxprune verify "
                        "--save-golden (a plain data .npz goes to --data)")
    names = tuple(str(n) for n in data["__outputs__"])
    count = 1 + max(int(k.split("/")[1]) for k in data if k.startswith("input/"))
    batches: list[Batch] = []
    outputs: list[tuple[np.ndarray, ...]] = []
    for i in range(count):
        pre = f"input/{i}/"
        batches.append({k[len(pre):]: v for k, v in data.items() if k.startswith(pre)})
        try:
            outputs.append(tuple(data[f"output/{i}/{n}"] for n in names))
        except KeyError as e:
            raise DataError(f"{p}: batch {i} lacks output {e}; save the file again") from e
    return Golden(names, tuple(batches), tuple(outputs), str(p), _read_kinds(data, names),
                  _read_parts(data, names))


def _read_parts(data: dict[str, np.ndarray], names: tuple[str, ...]
                ) -> dict[str, OutputFacts]:
    """The recorded parts of outputs judged part by part; {} where absent or odd."""
    found: dict[str, list[OutputPart]] = {}
    for text in (str(x) for x in data.get("__parts__", np.array([]))):
        fields_ = text.split("\t")
        if len(fields_) != 6 or fields_[0] not in names:
            return {}
        name, axis, start, stop, op, node = fields_
        try:
            part = OutputPart(int(axis), int(start), int(stop), OutputFacts(op, node))
        except ValueError:
            return {}
        found.setdefault(name, []).append(part)
    return {n: OutputFacts("Concat", "(recorded in the golden file)", parts=tuple(ps))
            for n, ps in found.items()}


def _read_kinds(data: dict[str, np.ndarray], names: tuple[str, ...]
                ) -> tuple[KindDecision | None, ...]:
    """Kinds saved with the outputs; none (names and values decide) where absent or odd."""
    saved = [str(x) for x in data.get("__kinds__", np.array([]))]
    if len(saved) != len(names):
        return ()
    out: list[KindDecision | None] = []
    for text in saved:
        kind, _, reason = text.partition("\t")
        out.append(KindDecision(kind, f"{reason} (recorded in the golden file)")  # type: ignore[arg-type]
                   if kind in OUTPUT_KINDS else None)
    return tuple(out)


def compare_golden(
    golden: Golden,
    candidate: ModelSource,
    *,
    providers: Sequence[Provider] = ("cpu",),
    tolerances: Tolerances = NO_LIMITS,
    output_kinds: KindsArg | None = None,
    outputs: Sequence[str] | None = None,
    token_mask: str | None = None,
) -> VerifyResult:
    """Compares the candidate's outputs on the saved inputs with the saved outputs; kinds
    recorded in the file apply unless `output_kinds` names others (see compare_models)."""
    kinds: dict[str, str | KindDecision] = {
        n: k for n, k in zip(golden.names, golden.kinds, strict=False)
        if k is not None and n not in golden.parts}
    kinds.update(output_kinds or {})
    return compare_outputs(golden.names, lambda i, _batch: golden.outputs[i], candidate,
                           golden.batches, providers=providers, tolerances=tolerances,
                           against=f"golden outputs {golden.path or ''}".strip(),
                           output_kinds=kinds, outputs=outputs, token_mask=token_mask,
                           facts=dict(golden.parts) or None)
