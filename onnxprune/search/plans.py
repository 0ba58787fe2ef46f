"""A plan: the per-unit decisions of a pruning run, saved as JSON and reapplied exactly.

It names, for every pruned FFN group, the channels kept and, for every pruned attention
block, the heads kept; and how the consumers were repaired. A distillation repair also
records the optimiser steps each block took (and the edited sentence copies it fitted), so
the replay takes the same steps rather than running against the clock. Reapplying a plan to
the same model with the same calibration data gives the same bytes, so an export pipeline or
a CI job can prune without searching again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxprune.calibration.data import Batch
from onnxprune.errors import InputError
from onnxprune.io.files import atomic_path

__all__ = ["Plan", "data_fingerprint", "FORMAT"]

FORMAT = "onnxprune-plan/1"
_REPAIRS = ("none", "bias", "lstsq", "distill")
_MAX_STEPS = 2**31
_MAX_INDEX = 2**31  # a channel or head index beyond this is not from a real model
_MAX_PLAN_BYTES = 64 * 2**20


def data_fingerprint(batches: Sequence[Batch]) -> str:
    """sha256 over every batch's arrays (names, dtypes, shapes, bytes), in order."""
    h = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            a = np.ascontiguousarray(batch[name])
            h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Plan:
    neurons: dict[str, tuple[int, ...]] = field(default_factory=dict)  # group -> kept channels
    heads: dict[str, tuple[int, ...]] = field(default_factory=dict)  # block -> kept heads
    repair: str = "lstsq"
    token_mask: str | None = None
    calibration: str | None = None  # data_fingerprint of the fitting batches
    summary: dict[str, Any] = field(default_factory=dict)  # what the search measured
    split: str | None = None  # held-out part of the calibration data, see default_split
    # repair "distill": {"steps": {group: optimiser steps}, "horizons": {group: schedule
    # length in steps}, "augment": edited copies}
    distill: dict[str, Any] = field(default_factory=dict)
    # The real removal refit each later unit's input layers (search.apply_decisions). Plans
    # saved before that existed lack the key and replay without it, as they were made.
    refit_inputs: bool = False

    @property
    def distill_steps(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.distill.get("steps", {}).items()}

    @property
    def distill_horizons(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.distill.get("horizons", {}).items()}

    @property
    def distill_augment(self) -> int:
        return int(self.distill.get("augment", 0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "repair": self.repair,
            "token_mask": self.token_mask,
            "calibration_sha256": self.calibration,
            "calibration_split": self.split,
            "neurons": {k: list(v) for k, v in self.neurons.items()},
            "heads": {k: list(v) for k, v in self.heads.items()},
            **({"distill": self.distill} if self.repair == "distill" else {}),
            **({"refit_inputs": True} if self.refit_inputs else {}),
            "summary": self.summary,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        # One line per unit: plans are read (and diffed) by people too.
        d = self.to_dict()
        lines = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in d.items()
                 if k not in ("neurons", "heads", "summary")]
        for key in ("neurons", "heads"):
            units = [f"  {json.dumps(n)}: {json.dumps(v)}" for n, v in d[key].items()]
            lines.append(f' "{key}": {{' + ("\n" + ",\n".join(units) + "\n }," if units
                                           else "},"))
        lines.append(f' "summary": {json.dumps(d["summary"])}')
        text = "{\n" + "\n".join(lines) + "\n}"
        with atomic_path(Path(path)) as tmp:
            Path(tmp).write_text(text + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"{p}: no such plan file" if not p.exists() else
                             f"{p}: not a regular file; give the plan's JSON file")
        if p.stat().st_size > _MAX_PLAN_BYTES:
            raise InputError(f"{p}: {p.stat().st_size} bytes, too large for a plan")
        try:
            data = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{p}: not a JSON plan ({str(e).splitlines()[0][:120]})") from None
        except RecursionError:
            raise InputError(f"{p}: JSON nested too deeply to be a plan") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError(f"{p}: not an onnxprune plan (expected \"format\": \"{FORMAT}\")")

        def decisions(key: str) -> dict[str, tuple[int, ...]]:
            raw = data.get(key, {})
            ok = isinstance(raw, dict) and all(
                isinstance(v, list) and v and all(
                    type(i) is int and 0 <= i < _MAX_INDEX for i in v)
                for v in raw.values())
            if not ok:
                raise InputError(f"{p}: \"{key}\" must map names to non-empty lists of indices "
                                 f"(integers from 0 to {_MAX_INDEX - 1})")
            return {str(k): tuple(v) for k, v in raw.items()}

        def text(key: str) -> str | None:
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                raise InputError(f"{p}: \"{key}\" must be a string or null, not "
                                 f"{type(value).__name__}")
            return value

        repair = data.get("repair", "lstsq")
        if not isinstance(repair, str) or repair not in _REPAIRS:
            raise InputError(f"{p}: \"repair\" must be one of {', '.join(_REPAIRS)}")
        summary = data.get("summary") or {}
        if not isinstance(summary, dict):
            raise InputError(f"{p}: \"summary\" must be an object, not {type(summary).__name__}")
        distill = data.get("distill") or {}
        steps = distill.get("steps", {}) if isinstance(distill, dict) else None
        horizons = distill.get("horizons", {}) if isinstance(distill, dict) else None
        augment = distill.get("augment", 0) if isinstance(distill, dict) else None
        if not (all(isinstance(d, dict) and all(
                type(v) is int and 0 <= v < _MAX_STEPS for v in d.values())
                for d in (steps, horizons)) and type(augment) is int and 0 <= augment <= 64):
            raise InputError(f"{p}: \"distill\" must be {{\"steps\": {{group: steps >= 0}}, "
                             "\"horizons\": {group: steps >= 0}, \"augment\": copies from 0 "
                             "to 64}")
        if repair == "distill" and not distill:
            raise InputError(f"{p}: a \"distill\" repair needs its recorded \"distill\" "
                             "steps; save the plan again with this version")
        split = text("calibration_split")
        if split is not None:
            kind, _, count = split.partition(":")
            if kind not in ("rows", "batches") or not count.isdigit() or len(count) > 9:
                raise InputError(f"{p}: \"calibration_split\" must be rows:N or batches:N, "
                                 f"not '{split[:40]}'")
        refit_inputs = data.get("refit_inputs", False)
        if type(refit_inputs) is not bool:
            raise InputError(f"{p}: \"refit_inputs\" must be true or false")
        return cls(decisions("neurons"), decisions("heads"), repair, text("token_mask"),
                   text("calibration_sha256"), dict(summary), split,
                   {"steps": dict(steps), "horizons": dict(horizons), "augment": augment}
                   if repair == "distill" else {}, refit_inputs)

    def fit_batches(self, batches: Sequence[Batch] | None) -> list[Batch] | None:
        """The batches the repair was fitted on: the given data, checked, less the held-out
        part the search kept aside. A plan with repair needs the very batches it was made
        with, or the bytes differ."""
        if self.repair == "none" or not (self.neurons or self.heads):
            return None
        if batches is None:
            raise InputError(f"the plan's repair ({self.repair}) is fitted on calibration "
                             "data; pass the same --calibration data it was made with")
        fit = apply_split(batches, self.split)[0] if self.split else list(batches)
        if self.calibration is not None and data_fingerprint(fit) != self.calibration:
            raise InputError("the calibration data differs from the plan's (sha256 "
                             f"{self.calibration[:12]}...); pass the data the plan was made "
                             "with, or the result will not match it")
        return fit


def default_split(batches: Sequence[Batch]) -> str:
    """How calibration data is split when no held-out data is given: the last quarter of the
    batches ("batches:N"), or of the rows of a single batch ("rows:N")."""
    if len(batches) == 1:
        rows = {len(a) for a in batches[0].values() if np.ndim(a)}
        n = rows.pop() if len(rows) == 1 else 0
        if n >= 4:
            return f"rows:{max(1, n // 4)}"
    if len(batches) < 2:
        raise InputError("held-out data is needed to measure quality: give --holdout, or at "
                         "least 2 calibration batches (the last quarter is held out)")
    return f"batches:{max(1, len(batches) // 4)}"


def apply_split(batches: Sequence[Batch], split: str) -> tuple[list[Batch], list[Batch]]:
    """(fitting part, held-out part) of the batches, as `split` says."""
    kind, _, count = split.partition(":")
    try:
        n = int(count)
    except ValueError:
        raise InputError(f"the plan's calibration_split '{split}' is not kind:N") from None
    if kind == "rows" and len(batches) == 1 and n > 0:
        b = batches[0]
        rows = {len(a) for a in b.values() if np.ndim(a)}
        if len(rows) == 1 and rows.pop() > n:
            return [{k: v[:-n] for k, v in b.items()}], [{k: v[-n:] for k, v in b.items()}]
    if kind == "batches" and 0 < n < len(batches):
        return list(batches[:-n]), list(batches[-n:])
    raise InputError(f"cannot split the calibration data as '{split}': it has "
                     f"{len(batches)} batch(es); pass the data the plan was made with")
