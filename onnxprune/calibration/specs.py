"""What a model's graph inputs accept, read once from the graph: the data readers (.npz,
text, images) all check and build their batches against this one description."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import onnx_ir as ir

from onnxprune.calibration.input_roles import index_bounds
from onnxprune.errors import DataError

__all__ = ["InputSpec", "input_specs", "value_dims"]

Dims = tuple[int | str | None, ...]


@dataclass(frozen=True)
class InputSpec:
    """What a graph input accepts: name, numpy dtype and dims (str for symbolic, None unknown),
    and for ids that index a constant table (Gather), the table's rows: generated ids stay
    below it."""

    name: str
    dtype: np.dtype
    dims: Dims | None
    index_bound: int | None = None


def value_dims(v: ir.Value) -> Dims | None:
    """A value's dims: ints where fixed, the symbol's name where named, None where unknown
    (None for the whole tuple when even the rank is unknown)."""
    if v.shape is None:
        return None
    return tuple(d if isinstance(d, int) else (d.value if d.value else None) for d in v.shape)


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The real inputs of the graph (initializers listed as inputs are not data)."""
    specs = []
    bounds = index_bounds(model)
    for v in model.graph.inputs:
        if v.const_value is not None:
            continue
        if v.dtype is None:
            raise DataError(f"graph input '{v.name}' has no element type; re-export the model")
        specs.append(InputSpec(v.name, np.dtype(v.dtype.numpy()), value_dims(v),
                               bounds.get(v.name)))
    return specs


T = TypeVar("T")


def whole_batches(items: Sequence[T], rows: int, fixed: bool, where: object, what: str
                  ) -> Sequence[T]:
    """`items` cut to whole batches of `rows` when the model's batch size is fixed (a
    partial last batch would not fit it; the run says how many are left out)."""
    left = len(items) % rows
    if not fixed or not left:
        return items
    logging.getLogger(__name__).warning(
        "%s: the model takes batches of exactly %d; the last %d %s(s) are left out",
        where, rows, left, what)
    if len(items) < rows:
        raise DataError(f"{where}: fewer {what}s than the model's fixed batch of {rows}")
    return items[: len(items) - left]
