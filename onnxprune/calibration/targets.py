"""The original model's tensors that the repairs fit to.

One pass of the original model over all batches, kept in memory up to a byte budget and
spilled to a private temporary folder beyond it; groups captured in the order the repairs
ask for them when the store moves forward with a Propagator.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxprune.calibration.data import Batch
from onnxprune.calibration.propagate import SECTION_ABOVE_BYTES, OnBatch, Propagator, weight_bytes
from onnxprune.calibration.runner import capture
from onnxprune.errors import DataError
from onnxprune.io.runtime import Provider

__all__ = ["TargetStore", "Wanted"]


Wanted = tuple[Sequence[str], Sequence[str], Sequence[str]]  # (stop-before nodes, names, check)


class TargetStore:
    """The original model's tensors on every batch, captured before any edit.

    `wanted` lists, per group, the names of the nodes the group's capture may start before,
    the tensor names to store, and names captured only for the NaN/Inf check (ahead of the
    stored ones, so an error names a layer's input rather than the model's output). A model
    whose weights fit in `whole_below` bytes runs once, whole; a bigger one runs section by
    section (a Propagator over it), so no session ever holds all of its weights.

    Arrays are kept in memory up to `budget` bytes; beyond that they go to a private
    temporary folder (removed when the store is collected) and are read back memory-mapped.

    `forward=True` captures nothing up front: a group's tensors are captured when first
    asked for, by a Propagator over `model` whose cut follows the groups, and replace the
    group's before them. Memory then holds one group's tensors instead of every group's;
    groups are best asked for in graph order (going back recomputes from the inputs), and
    `model` must not be edited meanwhile.
    """

    def __init__(self, model: ir.Model, wanted: Sequence[Wanted], batches: Sequence[Batch], *,
                 provider: Provider = "cpu", budget: int = 2**30,
                 whole_below: int = SECTION_ABOVE_BYTES, forward: bool = False):
        self.names = list(dict.fromkeys(n for _, names, _ in wanted for n in names if n))
        self._arrays: list[dict[str, np.ndarray]] = [{} for _ in batches]
        self._held = 0
        self._budget = budget
        self._folder: Path | None = None
        self._forward: dict[str, tuple[list[ir.Node], list[str], list[str]]] | None = None
        if not self.names:
            return
        if forward:
            self._prop = Propagator(model, batches, provider)
            by_name = {n.name: n for n in model.graph if n.name}
            self._forward = {}
            for stops, names, check in wanted:
                entry = ([by_name[s] for s in stops if s in by_name],
                         [n for n in names if n], [n for n in check if n])
                for n in entry[1]:
                    self._forward.setdefault(n, entry)
            return
        if weight_bytes(model) < whole_below:
            check = [n for _, _, c in wanted for n in c if n and n not in self.names]
            capture(model, list(dict.fromkeys(check)) + self.names, batches,
                    self._storer(self.names), provider=provider)
            return
        prop = Propagator(model, batches, provider)
        by_name = {n.name: n for n in model.graph if n.name}
        order = {n: i for i, n in enumerate(model.graph)}
        steps = []
        for stops, names, check in wanted:
            nodes = [by_name[s] for s in stops if s in by_name]
            steps.append((min((order[n] for n in nodes), default=-1), nodes, names, check))
        for _, nodes, names, check in sorted(steps, key=lambda t: t[0]):
            keep = [n for n in names if n]
            if not keep:
                continue
            if nodes:
                prop.advance(nodes)
            extra = [n for n in check if n and n not in keep]
            prop.capture(list(dict.fromkeys(extra + keep)), self._storer(keep))

    def _storer(self, names: Sequence[str]) -> OnBatch:
        index = iter(range(len(self._arrays)))

        def store(arrays: dict[str, np.ndarray], batch: Batch) -> None:
            self._store(next(index), {n: arrays[n] for n in names})

        return store

    def _store(self, i: int, arrays: dict[str, np.ndarray]) -> None:
        kept = self._arrays[i]
        for name, arr in arrays.items():
            if name in kept:
                continue
            if self._held + arr.nbytes > self._budget:
                if self._folder is None:
                    self._folder = Path(tempfile.mkdtemp(prefix="onnxprune-targets-"))
                    weakref.finalize(self, shutil.rmtree, self._folder, True)
                path = self._folder / f"{i}_{len(kept)}.npy"
                np.save(path, arr)
                kept[name] = np.load(path, mmap_mode="r")
            else:
                self._held += arr.nbytes
                kept[name] = arr

    def _capture_group(self, name: str) -> None:
        """forward=True: the tensors of the group that stores `name`, in place of the last."""
        assert self._forward is not None
        entry = self._forward.get(name)
        if entry is None:
            return  # get() names what is missing
        nodes, keep, check = entry
        self._arrays = [{} for _ in self._arrays]
        self._held = 0
        if nodes:
            self._prop.advance(nodes)
        extra = [n for n in check if n not in keep]
        self._prop.capture(list(dict.fromkeys(extra + keep)), self._storer(keep))

    def get(self, names: Sequence[str], index: int) -> list[np.ndarray]:
        """The arrays of batch `index` (its position in the calibration batches)."""
        if self._forward is not None and self._arrays and names and any(
                n not in self._arrays[0] for n in names):
            self._capture_group(names[0])
        try:
            row = self._arrays[index]
            return [np.asarray(row[n]) for n in names]
        except (IndexError, KeyError) as e:
            raise DataError(f"no stored reference tensor {e} for calibration batch {index}; "
                            "please report") from e

    @property
    def spilled(self) -> bool:
        return self._folder is not None
