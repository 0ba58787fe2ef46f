"""Loading and saving models safely.

Models are loaded with onnx_ir so external data stays memory-mapped, external-data
locations are checked before anything is read from them, and saving goes through a
temporary file that is renamed into place only once it is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxprune.errors import InputError
from onnxprune.io.external_data import (
    ModelBytes,
    check_external_file,
    check_external_locations,
    external_data_files,
    iter_tensor_protos,
    model_bytes,
    serialized_model,
)
from onnxprune.io.files import atomic_path, check_writable, fsync_path, same_file
from onnxprune.io.validate import check_input_model

__all__ = [
    "load_model",
    "save_model",
    "check_output_path",
    "uses_external_data",
    "serialized_model",
    "model_bytes",
    "ModelBytes",
    "external_data_files",
    "check_external_file",
    "stored_bytes",
]

_TWO_GB = 2**31
MIN_OPSET = 11  # Clip/Dropout take their parameters as inputs from here on


def load_model(path: str | os.PathLike[str], *, validate: bool = True) -> ir.Model:
    """Loads a model file, checking it is readable, valid ONNX with safe external data.

    Raises InputError with a one-line reason for a missing file, a folder, a file that is
    not ONNX (or is truncated), external data that escapes the model's folder or ends
    early, and (with `validate`) any defect the validation gate finds: checker errors,
    undefined types, initializer sizes that contradict their dims.
    """
    p = Path(path)
    if "\x00" in str(p):
        raise InputError(f"{str(p)!r}: the path contains a NUL byte; check the path")
    if not p.exists():
        raise InputError(f"{p}: no such file; check the path")
    if p.is_dir():
        raise InputError(f"{p}: is a folder, not an .onnx file; give the model file inside it")
    if not p.is_file():
        raise InputError(f"{p}: not a regular file (a device or FIFO); give the model file")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, onnx.checker.ValidationError) as e:
        raise InputError(
            f"{p}: not a readable ONNX model (truncated or not ONNX: {type(e).__name__}); "
            "re-export or re-download it"
        ) from e
    except OSError as e:
        raise InputError(f"{p}: cannot read ({e.strerror}); check permissions") from e
    if not proto.graph.node and not proto.graph.output:
        raise InputError(f"{p}: contains no ONNX graph (empty or not an ONNX file)")
    check_external_locations(proto, p)
    if validate:
        check_input_model(proto, p)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:  # onnx_ir raises plain exceptions on malformed protos
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise InputError(f"{p}: malformed ONNX model ({first}); run onnx.checker on it") from e
    ir.external_data.set_base_dir(model.graph, str(p.parent))
    return model


def uses_external_data(model: ir.Model) -> bool:
    """Whether any initializer is stored outside the .onnx file."""
    return any(
        isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()
    )


def stored_bytes(path: str | os.PathLike[str]) -> int:
    """The bytes a model takes on disk: the .onnx file and the external data it refers to."""
    p = Path(path)
    total = p.stat().st_size
    for f in external_data_files(p):
        with contextlib.suppress(OSError):
            total += f.stat().st_size
    return total


def _weights_nbytes(model: ir.Model) -> int:
    return sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
    )


def _model_data_files(model: ir.Model) -> set[Path]:
    """The data files an in-memory model still reads its weights from."""
    files: set[Path] = set()
    for graph in model.graphs():
        for v in graph.initializers.values():
            if isinstance(v.const_value, ir.ExternalTensor):
                with contextlib.suppress(OSError, RuntimeError):
                    files.add(Path(v.const_value.path).resolve())
    return files


def check_output_path(
    output: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]], *,
    force: bool = False,
) -> Path:
    """Refuses an output path that would destroy an input or write somewhere unexpected.

    Refused (exit 2): any spelling of an input file (unless `force`) or of a data file an
    input model refers to; a symlink, device, FIFO or folder; a missing folder; and for a
    model output, a `<name>.data` beside it that is a link or not a regular file.
    """
    out = Path(output)
    check_writable(out)
    for src in inputs:
        s = Path(src)
        if same_file(out, s) and not force:
            raise InputError(
                f"{out}: is the input model; choose another output path or pass --force"
            )
        for data in external_data_files(s):
            if same_file(out, data):
                raise InputError(f"{out}: is the data file of the input model {s}; choose "
                                 "another output path")
    legacy = out.with_name(f"{out.name}.data")
    if legacy.is_symlink() or (legacy.exists() and not legacy.is_file()):
        raise InputError(f"{legacy}: the data path beside the output is a symbolic link or "
                         "not a regular file; remove it or choose another output path")
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _free_data_name(out: Path, digest: str, taken: set[Path]) -> Path:
    """The first name for the output's data that names no existing file and nothing an
    input refers to: `<out>.data`, else `<out>.<sha256 prefix>.data` (then `-1`, `-2`)."""
    names = [f"{out.name}.data", f"{out.name}.{digest[:12]}.data"]
    names += [f"{out.name}.{digest[:12]}-{i}.data" for i in range(1, 100)]
    for name in names:
        candidate = out.with_name(name)
        if not os.path.lexists(candidate) and candidate.resolve() not in taken:
            return candidate
    raise InputError(f"{out.parent}: no free name for the output's data file; clean the folder")


def _relocate(proto_path: Path, old: str, new: str) -> None:
    proto = onnx.load(str(proto_path), load_external_data=False)
    for tensor in iter_tensor_protos(proto.graph):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save(proto, str(proto_path))


def _own_data_files(out: Path) -> set[Path]:
    """Data files the existing output refers to that were written as its own (named after
    it, in its folder): those may go once a new output replaces it."""
    own = set()
    for f in external_data_files(out):
        if (f.parent == out.parent.resolve() and f.name.startswith(f"{out.name}.")
                and f.name.endswith(".data") and not Path(f).is_symlink()):
            own.add(f)
    return own


def save_model(
    model: ir.Model, path: str | os.PathLike[str], *, external_data: bool | None = None,
    keep: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Saves so that `path` always holds a complete model: the earlier one or the new one.

    External data goes to a file under a name no existing file and no input uses
    (`<name>.data`, or `<name>.<sha256>.data` when that is taken); it is complete before
    the model that refers to it is renamed into place, and the earlier output's own data
    file is deleted only after. So a kill at any instant leaves a loadable pair, and the
    new model never shares a data file with the input. `keep` names input models whose
    data files must survive. External data is used when `external_data` is true, or when
    it is None and the model already had external data or is over 2 GB.
    """
    out = Path(path)
    check_writable(out)
    if external_data is None:
        external_data = uses_external_data(model) or _weights_nbytes(model) >= _TWO_GB
    elif not external_data and uses_external_data(model):
        # Inline was asked for: read the weights in, or the copy would point at the
        # input's data file under a path that is wrong from the new location.
        ir.external_data.load_to_model(model)
    protected = _model_data_files(model)
    for src in keep:
        protected |= external_data_files(src)
        with contextlib.suppress(OSError, RuntimeError):
            protected.add(Path(src).resolve())
    old_own = _own_data_files(out)
    written: Path | None = None
    with atomic_path(out) as tmp:
        if not external_data:
            ir.save(model, tmp)
        else:
            tmp_data = out.with_name(f"{tmp.name}.data")
            try:
                ir.save(model, tmp, external_data=tmp_data.name)
                if tmp_data.exists():
                    fsync_path(tmp_data)
                    final = _free_data_name(out, _sha256(tmp_data), protected | old_own)
                    _relocate(tmp, tmp_data.name, final.name)
                    os.replace(tmp_data, final)
                    written = final
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp_data.unlink()
                raise
    if written is not None:
        fsync_path(out.parent)
    keep_now = protected | ({written.resolve()} if written is not None else set())
    for f in old_own - keep_now:
        with contextlib.suppress(OSError):
            f.unlink()
    return out
