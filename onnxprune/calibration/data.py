"""Input batches for verification and calibration.

A data source is a `.npz` file (one batch: arrays keyed by graph input name) or a folder
of `.npz` files (one batch each, in name order; shapes may differ between batches, e.g.
sequence length); or text or a folder of images, which raw.py turns into the same arrays.
Batches are checked against the model's inputs before they are used, so a wrong name,
dtype or rank fails with a message naming the input, not deep inside onnxruntime.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import stat
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

import numpy as np

from onnxprune.calibration.input_roles import is_mask_name
from onnxprune.calibration.raw import data_kind, raw_batches
from onnxprune.calibration.specs import InputSpec, input_specs
from onnxprune.errors import DataError

__all__ = [
    "Batch",
    "InputSpec",
    "input_specs",
    "load_batches",
    "check_source",
    "random_batches",
    "parse_shape_overrides",
    "data_budget",
    "memory_budget",
    "npz_nbytes",
    "MAX_GENERATED_BYTES",
]

Batch = dict[str, np.ndarray]
logger = logging.getLogger(__name__)
MAX_GENERATED_BYTES = 2**26  # generated verification inputs, per batch


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
        if arr.ndim and arr.size == 0:
            raise DataError(f"{where}: input '{spec.name}' has no rows (shape "
                            f"{list(arr.shape)}); give at least one row")
        if np.issubdtype(arr.dtype, np.floating):
            finite = np.isfinite(arr)
            if np.isnan(arr).any() or not finite.any():
                raise DataError(f"{where}: input '{spec.name}' holds NaN or no finite value at "
                                "all; statistics and comparisons built on it mean nothing")
        out[spec.name] = arr
    return out


_NPY_MAGIC = b"\x93NUMPY"
_budget: list[int | None] = [None]  # bytes all calibration arrays may take; None: default


def default_budget() -> int:
    """A quarter of physical memory: calibration batches are held in memory together."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = 8 * 2**30
    return max(total // 4, 2**26)


def memory_budget() -> int:
    """The byte budget data files are checked against before anything is decompressed."""
    return _budget[0] if _budget[0] is not None else default_budget()


@contextlib.contextmanager
def data_budget(nbytes: int | None) -> Iterator[None]:
    """Sets the calibration memory budget for the duration of the block (None: default)."""
    if nbytes is not None and nbytes <= 0:
        raise DataError(f"--max-calibration-bytes must be positive, got {nbytes}")
    previous = _budget[0]
    _budget[0] = nbytes
    try:
        yield
    finally:
        _budget[0] = previous


def _npy_header(f: IO[bytes], where: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=100_000)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=100_000)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as e:
        raise DataError(f"{where}: not a readable .npy array ({e}); save with numpy.savez") \
            from None
    if dtype.hasobject:
        raise DataError(f"{where}: holds Python objects (pickled data is never loaded); save "
                        "numeric arrays")
    if any(int(d) < 0 for d in shape):
        raise DataError(f"{where}: negative dims {shape}; the file is corrupt")
    return tuple(int(d) for d in shape), dtype


def npz_nbytes(path: Path) -> int:
    """The bytes the arrays of a .npz file take once loaded, read from the zip's central
    directory and each .npy header: nothing is decompressed beyond the headers.

    Raises DataError for a .npy under a .npz name, a file that is not a zip, and a member
    whose header claims more bytes than the member holds (a corrupt or hostile file).
    """
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_NPY_MAGIC))
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if magic == _NPY_MAGIC:
        raise DataError(f"{path}: is a plain .npy array saved under a .npz name; save the "
                        "batch with numpy.savez(path, input_name=array, ...)")
    total = 0
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                where = f"{path}: array '{info.filename.removesuffix('.npy')}'"
                with z.open(info) as member:
                    shape, dtype = _npy_header(member, where)
                nbytes = math.prod(shape) * dtype.itemsize
                if nbytes > info.file_size:
                    raise DataError(f"{where}: its header claims {nbytes} bytes but the file "
                                    f"holds {info.file_size}; the file is corrupt")
                total += info.file_size
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, NotImplementedError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e}); save with numpy.savez") \
            from None
    return total


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, AttributeError, TypeError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e}); save with numpy.savez") from e


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def batch_files(path: str | os.PathLike[str]) -> list[Path]:
    """The .npz files a data source names, checked to exist and to be non-empty.

    Only regular files are read: a FIFO or device named *.npz in a folder is skipped (it
    could block forever or never end), and one given directly is refused.
    """
    p = Path(path)
    if "\x00" in str(p):
        raise DataError(f"{str(p)!r}: the data path contains a NUL byte")
    if not p.exists():
        raise DataError(f"{p}: no such data file or folder")
    if p.is_dir():
        files = []
        for f in sorted(p.iterdir()):
            if f.suffix != ".npz":
                continue
            if _is_regular(f):
                files.append(f)
            else:
                logger.warning("%s: not a regular file; skipped", f)
        if not files:
            raise DataError(f"{p}: folder holds no .npz batches and no images; put one .npz "
                            "per batch there, or .png/.jpg images")
        return files
    if p.suffix != ".npz":
        raise DataError(f"{p}: data must be a .npz file, a folder of .npz files or images, "
                        "or a .txt/.jsonl text file")
    if not _is_regular(p):
        raise DataError(f"{p}: not a regular file (a FIFO or device); give a .npz file")
    return [p]


def check_budget(files: Sequence[Path], budget: int | None = None) -> int:
    """Total loaded size of `files` from their headers; DataError when over the budget."""
    limit = memory_budget() if budget is None else budget
    total = 0
    for f in files:
        total += npz_nbytes(f)
        if total > limit:
            raise DataError(
                f"{f}: the data reaches {total} bytes once loaded, over the memory budget of "
                f"{limit} bytes; use fewer or smaller batches, or raise "
                "--max-calibration-bytes"
            )
    return total


def load_batches(path: str | os.PathLike[str], specs: Sequence[InputSpec]) -> Iterator[Batch]:
    """Yields checked batches one at a time. Every file's size is first checked from its
    headers against the memory budget, so a small file that unpacks to gigabytes (or
    claims to) is refused before anything is decompressed."""
    if data_kind(path) != "npz":
        yield from _checked_raw(path, specs)
        return
    files = batch_files(path)
    check_budget(files)
    for f in files:
        yield _check_batch(_read_npz(f), specs, str(f))


def _checked_raw(path: str | os.PathLike[str], specs: Sequence[InputSpec]) -> Iterator[Batch]:
    """Text or image batches, checked like .npz ones and held to the same memory budget."""
    limit, total = memory_budget(), 0
    for i, batch in enumerate(raw_batches(path, specs)):
        total += sum(a.nbytes for a in batch.values())
        if total > limit:
            raise DataError(f"{os.fspath(path)}: the data reaches {total} bytes once read, over "
                            f"the memory budget of {limit} bytes; use less of it, or raise "
                            "--max-calibration-bytes")
        yield _check_batch(batch, specs, f"{os.fspath(path)} (batch {i})")


def check_source(path: str | os.PathLike[str]) -> None:
    """Refuses a data path that names nothing readable, before any model is at hand."""
    if data_kind(path) == "npz":
        batch_files(path)
    elif not Path(os.fspath(path)).exists():
        raise DataError(f"{os.fspath(path)}: no such data file or folder")


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


def _valid_mask(shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    """Ones, with trailing zeros (padding) on every row but the first: what a tokenizer
    gives for a batch of texts of different lengths."""
    out = np.ones(shape, dtype=dtype)
    if len(shape) == 2 and shape[1] > 1:
        for row in range(1, shape[0]):
            out[row, int(rng.integers((shape[1] + 1) // 2, shape[1] + 1)):] = 0
    return out


def _random_array(spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    lname = spec.name.lower()
    if is_mask_name(spec.name) and len(shape) == 2 and (
            spec.dtype == np.bool_ or np.issubdtype(spec.dtype, np.number)):
        return _valid_mask(shape, spec.dtype, rng)
    if spec.dtype == np.bool_:
        return np.asarray(rng.random(shape) < 0.5)
    if np.issubdtype(spec.dtype, np.integer):
        if "mask" in lname:
            return np.ones(shape, dtype=spec.dtype)
        if spec.index_bound is not None:  # ids into a table: every id inside it
            return np.asarray(rng.integers(0, min(spec.index_bound, 100), size=shape),
                              dtype=spec.dtype)
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

    Symbolic dims take `default_dim` unless `overrides` gives the full shape of an input
    (calibration.fit.fitting_batches chooses sizes the model runs on). Integer inputs get
    small ids, below the rows of the table they index where the graph says so; masks are
    valid (ones, trailing zeros); type ids are zero.
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
    nbytes = sum(math.prod(shapes[s.name]) * s.dtype.itemsize for s in specs)
    if nbytes > MAX_GENERATED_BYTES:
        big = max(specs, key=lambda s: math.prod(shapes[s.name]) * s.dtype.itemsize)
        raise DataError(
            f"generated inputs would take {nbytes} bytes per batch (input '{big.name}' has "
            f"shape {list(shapes[big.name])}), over the cap of {MAX_GENERATED_BYTES}; give "
            "real data with --data, smaller --shape values, or skip verification"
        )
    return [
        {s.name: _random_array(s, shapes[s.name], rng) for s in specs} for _ in range(count)
    ]
