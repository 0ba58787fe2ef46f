"""Input batches for verification and calibration.

A data source is a `.npz` file (one batch: arrays keyed by graph input name) or a folder
of `.npz` files (one batch each, in name order; shapes may differ between batches, e.g.
sequence length). Batches are checked against the model's inputs before they are used,
so a wrong name, dtype or rank fails with a message naming the input, not deep inside
onnxruntime.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxprune.errors import DataError

__all__ = [
    "Batch",
    "InputSpec",
    "input_specs",
    "load_batches",
    "random_batches",
    "parse_shape_overrides",
]

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """What a graph input accepts: name, numpy dtype and dims (str for symbolic, None unknown)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...] | None


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The real inputs of the graph (initializers listed as inputs are not data)."""
    specs = []
    for v in model.graph.inputs:
        if v.const_value is not None:
            continue
        if v.dtype is None:
            raise DataError(f"graph input '{v.name}' has no element type; re-export the model")
        dims: tuple[int | str | None, ...] | None = None
        if v.shape is not None:
            dims = tuple(
                d if isinstance(d, int) else (d.value if d.value else None) for d in v.shape
            )
        specs.append(InputSpec(v.name, np.dtype(v.dtype.numpy()), dims))
    return specs


def _check_batch(batch: Mapping[str, np.ndarray], specs: Sequence[InputSpec], where: str) -> Batch:
    names = {s.name for s in specs}
    extra = sorted(set(batch) - names)
    missing = sorted(names - set(batch))
    if missing:
        raise DataError(
            f"{where}: no array for model input '{missing[0]}' (have: {', '.join(sorted(batch))}); "
            "key each array by the graph input name"
        )
    if extra:
        raise DataError(
            f"{where}: array '{extra[0]}' matches no model input "
            f"(inputs: {', '.join(sorted(names))})"
        )
    out: Batch = {}
    for spec in specs:
        arr = np.asarray(batch[spec.name])
        if spec.dims is not None and arr.ndim != len(spec.dims):
            raise DataError(
                f"{where}: input '{spec.name}' has rank {arr.ndim}, the model expects "
                f"{len(spec.dims)} (dims {list(spec.dims)})"
            )
        if spec.dims is not None:
            for axis, (want, got) in enumerate(zip(spec.dims, arr.shape, strict=False)):
                if isinstance(want, int) and want != got:
                    raise DataError(
                        f"{where}: input '{spec.name}' has size {got} on axis {axis}, "
                        f"the model expects {want}"
                    )
        if arr.dtype != spec.dtype:
            same_kind = np.can_cast(arr.dtype, spec.dtype, casting="same_kind")
            if not same_kind:
                raise DataError(
                    f"{where}: input '{spec.name}' is {arr.dtype}, the model expects "
                    f"{spec.dtype}; convert the array"
                )
            arr = arr.astype(spec.dtype)
        out[spec.name] = arr
    return out


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e}); save with numpy.savez") from e


def batch_files(path: str | os.PathLike[str]) -> list[Path]:
    """The .npz files a data source names, checked to exist and to be non-empty."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such data file or folder")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix == ".npz")
        if not files:
            raise DataError(f"{p}: folder holds no .npz batches; put one .npz per batch there")
        return files
    if p.suffix != ".npz":
        raise DataError(f"{p}: data must be a .npz file or a folder of .npz files")
    return [p]


def load_batches(path: str | os.PathLike[str], specs: Sequence[InputSpec]) -> Iterator[Batch]:
    """Yields checked batches one at a time, so memory holds only the current one."""
    for f in batch_files(path):
        yield _check_batch(_read_npz(f), specs, str(f))


def parse_shape_overrides(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parses `name:d0,d1,...` strings given with --shape."""
    out: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = tuple(int(d) for d in dims.split(","))
            if any(d <= 0 for d in out[name]):
                raise ValueError
        except ValueError:
            raise DataError(
                f"--shape '{item}': expected NAME:D0,D1,... with positive integers, "
                "e.g. input_ids:8,128"
            ) from None
    return out


def _random_array(spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    lname = spec.name.lower()
    if spec.dtype == np.bool_:
        return np.asarray(rng.random(shape) < 0.5)
    if np.issubdtype(spec.dtype, np.integer):
        if "mask" in lname:
            return np.ones(shape, dtype=spec.dtype)
        if "type" in lname or "segment" in lname:
            return np.zeros(shape, dtype=spec.dtype)
        # Small non-negative ids stay valid for any embedding table with > 100 rows.
        return np.asarray(rng.integers(0, 100, size=shape), dtype=spec.dtype)
    return np.asarray(rng.standard_normal(shape), dtype=spec.dtype)


def random_batches(
    specs: Sequence[InputSpec],
    overrides: Mapping[str, tuple[int, ...]] | None = None,
    *,
    count: int = 2,
    default_dim: int = 4,
    seed: int = 0,
) -> list[Batch]:
    """Batches generated from the input signature, for when the user gave no data.

    Symbolic dims take `default_dim` unless `overrides` gives the full shape of an input.
    Integer inputs get small ids (masks all ones, type ids zero) so embeddings stay valid.
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - {s.name for s in specs})
    if unknown:
        raise DataError(
            f"--shape names '{unknown[0]}', which is not a model input "
            f"(inputs: {', '.join(s.name for s in specs)})"
        )
    rng = np.random.default_rng(seed)
    shapes: dict[str, tuple[int, ...]] = {}
    symbols: dict[str, int] = {}
    for spec in specs:
        if spec.name in overrides:
            shape = overrides[spec.name]
            if spec.dims is not None and len(shape) != len(spec.dims):
                raise DataError(
                    f"--shape {spec.name}: {len(shape)} dims given, the input has rank "
                    f"{len(spec.dims)}"
                )
            for axis, (want, got) in enumerate(zip(spec.dims or (), shape, strict=False)):
                if isinstance(want, int) and want != got:
                    raise DataError(
                        f"--shape {spec.name}: size {got} on axis {axis}, the input's dim "
                        f"there is fixed at {want}"
                    )
                if isinstance(want, str):
                    symbols.setdefault(want, got)
            shapes[spec.name] = shape
    for spec in specs:
        if spec.name in shapes:
            continue
        if spec.dims is None:
            raise DataError(
                f"input '{spec.name}' has unknown rank; give its shape with --shape "
                f"{spec.name}:D0,D1,... or pass --data"
            )
        shapes[spec.name] = tuple(
            d if isinstance(d, int) else symbols.get(d or "", default_dim) for d in spec.dims
        )
    return [
        {s.name: _random_array(s, shapes[s.name], rng) for s in specs} for _ in range(count)
    ]
