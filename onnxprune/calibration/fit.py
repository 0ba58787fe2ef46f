"""Generated inputs the original model actually runs on.

A symbolic dim says nothing about which sizes a model accepts: a detector needs an image
side that is a multiple of its stride (a 4x4 image fails inside a Concat), a speech model
needs enough samples for its convolution stack. So sizes are tried, from the smallest
that usually works, until the reference model runs on onnxruntime; the first that runs is
used. When none runs, one line names the inputs and what to give instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxprune.calibration.data import (
    MAX_GENERATED_BYTES,
    Batch,
    InputSpec,
    input_specs,
    random_batches,
)
from onnxprune.errors import DataError
from onnxprune.io.runtime import ModelSource, make_session

__all__ = ["fitting_batches", "SIZE_LADDER"]

logger = logging.getLogger(__name__)

# (batch, spatial side, sequence length) per try, after the plain default of 4 everywhere.
SIZE_LADDER: tuple[tuple[int, int, int], ...] = (
    (1, 32, 8), (1, 64, 16), (1, 224, 128), (1, 320, 128), (1, 640, 512),
)


def _role(spec: InputSpec, axis: int) -> int:
    """0: batch, 1: spatial (image sides), 2: sequence (tokens, samples, anything else)."""
    rank = len(spec.dims or ())
    if axis == 0:
        return 0
    if np.issubdtype(spec.dtype, np.floating) and rank >= 4:
        return 1
    return 2


def _shapes(specs: Sequence[InputSpec], fixed: Mapping[str, tuple[int, ...]],
            sizes: tuple[int, int, int]) -> dict[str, tuple[int, ...]]:
    symbols: dict[str, int] = {}
    for spec in specs:  # a symbol a --shape fixed keeps that size everywhere
        for want, got in zip(spec.dims or (), fixed.get(spec.name, ()), strict=False):
            if isinstance(want, str):
                symbols.setdefault(want, got)
    out: dict[str, tuple[int, ...]] = dict(fixed)
    for spec in specs:
        if spec.name in out or spec.dims is None:
            continue
        dims = []
        for axis, d in enumerate(spec.dims):
            if isinstance(d, int):
                dims.append(d)
            else:
                size = sizes[_role(spec, axis)]
                dims.append(symbols.setdefault(d, size) if d else size)
        out[spec.name] = tuple(dims)
    return out


def _free_inputs(specs: Sequence[InputSpec], fixed: Mapping[str, tuple[int, ...]]) -> list[str]:
    return [s.name for s in specs if s.name not in fixed and s.dims is not None
            and any(not isinstance(d, int) for d in s.dims)]


def fitting_batches(
    model: ir.Model,
    overrides: Mapping[str, tuple[int, ...]] | None = None,
    *,
    source: ModelSource | None = None,
    count: int = 2,
    seed: int = 0,
) -> list[Batch]:
    """`count` generated batches the model runs on (see the module docstring).

    `overrides` fixes the shapes of some inputs (--shape); `source` is what onnxruntime
    loads (the model's path, when there is one), `model` by default. The plain default
    (every free dim 4) is tried first, then SIZE_LADDER.
    """
    specs = input_specs(model)
    fixed = dict(overrides or {})
    free = _free_inputs(specs, fixed)
    default = random_batches(specs, fixed, count=count, seed=seed)  # checks the overrides
    if not free:
        return default
    session = make_session(model if source is None else source, "cpu")
    tried: list[str] = []
    last_error = ""
    candidates: list[list[Batch] | tuple[int, int, int]] = [default, *SIZE_LADDER]
    for candidate in candidates:
        if isinstance(candidate, tuple):
            shapes = _shapes(specs, fixed, candidate)
            nbytes = sum(math.prod(shapes[s.name]) * s.dtype.itemsize for s in specs)
            if nbytes > MAX_GENERATED_BYTES:
                continue
            batches = random_batches(specs, shapes, count=count, seed=seed)
        else:
            batches = candidate
        described = ", ".join(f"{n}:{','.join(map(str, batches[0][n].shape))}" for n in free)
        try:
            session.run(None, batches[0])
        except Exception as e:
            tried.append(described)
            last_error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            logger.info("the model does not run on generated inputs %s: %s", described,
                        last_error)
            continue
        if tried:
            logger.info("generated inputs fit at %s (after %s)", described, "; ".join(tried))
        return batches
    raise DataError(
        f"the model runs on none of the generated input sizes tried for "
        f"{', '.join(free)} ({'; '.join(tried)}); give each with --shape "
        f"{' '.join(f'{n}:D0,D1,...' for n in free)} or give real inputs with --data "
        f"(last onnxruntime error: {last_error[:200]})"
    )
