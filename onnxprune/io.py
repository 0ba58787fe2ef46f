"""Loading and saving models safely.

Models are loaded with onnx_ir so external data stays memory-mapped, external-data
locations are checked before anything is read from them, and saving goes through a
temporary file that is renamed into place only once it is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxprune.errors import InputError
from onnxprune.files import NAME_MAX, atomic_path, check_writable, fsync_path, same_file
from onnxprune.validate import check_input_model, tensor_nbytes

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
]

_TWO_GB = 2**31
MIN_OPSET = 11  # Clip/Dropout take their parameters as inputs from here on


def _iter_tensor_protos(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_tensor_protos(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _iter_tensor_protos(g)


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def check_external_file(
    base: Path, location: str, *, where: str, offset: object = None, length: object = None,
    nbytes: int | None = None,
) -> Path:
    """Checks one external-data reference the way loading does, and returns its file.

    The file must be a relative path inside `base` (after resolving links), a regular file
    with a single hard link (onnx_ir refuses shared files when it maps them), and long
    enough for the tensor's offset and length. Nothing is opened or read.
    """
    if not isinstance(location, str):
        raise InputError(f"{where}: the location is not valid UTF-8 text; re-export it")
    if not location or "\x00" in location or os.path.isabs(location):
        raise InputError(
            f"{where}, an absolute, empty or NUL-containing path; external data must sit "
            "beside the model"
        )
    if any(len(part.encode("utf-8", "surrogateescape")) > NAME_MAX
           for part in Path(location).parts):
        raise InputError(f"{where}, a name over {NAME_MAX} bytes; rename the data file")
    base = base.resolve()
    try:
        target = (base / location).resolve()
    except (OSError, RuntimeError) as e:
        raise InputError(f"{where}, which cannot be resolved ({e}); fix the location") from e
    if not target.is_relative_to(base) or target == base:
        raise InputError(
            f"{where}, which escapes the model's folder; move the data next to the model"
        )
    try:
        st = target.stat()
    except OSError:
        raise InputError(
            f"{where}, which does not exist; copy the data file beside the model"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{where}, which is not a regular file; give the data as a file")
    if st.st_nlink > 1:
        raise InputError(
            f"{where}, a file with {st.st_nlink} hard links; onnx_ir refuses shared data "
            "files, so copy it (cp) to give it one link"
        )
    try:
        start = int(offset) if offset not in (None, "") else 0  # type: ignore[call-overload]
        size = int(length) if length not in (None, "") else None  # type: ignore[call-overload]
    except ValueError:
        raise InputError(f"{where}, with a non-integer offset or length; re-export it") from None
    if start < 0 or (size is not None and size < 0):
        raise InputError(f"{where}, with a negative offset or length; re-export it")
    if size is not None and nbytes is not None and size != nbytes:
        raise InputError(
            f"{where}, with length {size} where its dims need {nbytes} bytes; re-export it"
        )
    need = start + (size if size is not None else (nbytes or 0))
    if need > st.st_size:
        raise InputError(
            f"{where}, which needs bytes up to {need} but the file holds {st.st_size} "
            "(truncated, or an offset beyond the end); copy the complete data file"
        )
    return target


def _check_external_locations(proto: onnx.ModelProto, path: Path) -> None:
    """Refuses external-data references that point outside the model's folder or beyond
    the end of their file."""
    base = path.parent
    for tensor in _iter_tensor_protos(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = _external_info(tensor)
        location = info.get("location", "")
        where = f"{path}: tensor '{tensor.name}' has external data at {location[:80]!r}"
        check_external_file(base, location, where=where, offset=info.get("offset"),
                            length=info.get("length"), nbytes=tensor_nbytes(tensor))


def external_data_files(path: str | os.PathLike[str]) -> set[Path]:
    """The resolved data files a model file refers to (empty when it cannot be read).

    Used to keep outputs off the input's data: never raises, since a model that cannot be
    read is reported by load_model.
    """
    p = Path(path)
    try:
        if not p.is_file():
            return set()
        proto = onnx.load(str(p), load_external_data=False)
    except Exception:  # any unreadable file simply has no data files we must protect
        return set()
    files: set[Path] = set()
    for tensor in _iter_tensor_protos(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = _external_info(tensor).get("location", "")
            if (isinstance(location, str) and location and "\x00" not in location
                    and not os.path.isabs(location)):
                with contextlib.suppress(OSError, RuntimeError, ValueError):
                    files.add((p.parent / location).resolve())
    return files


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
    _check_external_locations(proto, p)
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
    for tensor in _iter_tensor_protos(proto.graph):
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


class ModelBytes(bytes):
    """A serialized model whose external data has been read in from the model's folder.

    onnxruntime resolves the external data of a model given as bytes against the working
    directory (and some of its optimizers refuse external data without a model path), so
    the bytes handed to a session or to onnx.checker carry every weight inline, read from
    the folder the model was loaded from after the same containment checks as loading.
    `base_dir` records that folder (None: the model had no external data).
    """

    base_dir: str | None = None


def _external_folder(model: ir.Model) -> str | None:
    """The one folder the model's external data sits in, each reference checked as at
    load (inside the folder, a regular file, long enough)."""
    folders: set[str] = set()
    for graph in model.graphs():
        for v in graph.initializers.values():
            t = v.const_value
            if not isinstance(t, ir.ExternalTensor):
                continue
            base = Path(t.base_dir or ".").resolve()
            folders.add(str(base))
            check_external_file(base, str(t.location), where=f"tensor '{v.name}' has external "
                                f"data at '{t.location}'", offset=t.offset, length=t.length,
                                nbytes=t.nbytes)
    if len(folders) > 1:
        raise InputError("external data spread over several folders is not supported")
    return folders.pop() if folders else None


def _inline_external(proto: onnx.ModelProto, base: str) -> None:
    """Reads every external tensor of `proto` from `base` into raw_data."""
    handles: dict[Path, object] = {}
    try:
        for tensor in _iter_tensor_protos(proto.graph):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = _external_info(tensor)
            path = check_external_file(
                Path(base), info.get("location", ""), where=f"tensor '{tensor.name}' has "
                f"external data at '{info.get('location', '')}'", offset=info.get("offset"),
                length=info.get("length"), nbytes=tensor_nbytes(tensor))
            f = handles.get(path)
            if f is None:
                f = handles[path] = open(path, "rb")  # noqa: SIM115 - closed below
            offset = int(info.get("offset") or 0)
            size = int(info["length"]) if info.get("length") else tensor_nbytes(tensor)
            f.seek(offset)  # type: ignore[attr-defined]
            tensor.raw_data = f.read(size)  # type: ignore[attr-defined]
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    finally:
        for f in handles.values():
            f.close()  # type: ignore[attr-defined]


def model_bytes(model: ir.Model, proto: onnx.ModelProto | None = None) -> ModelBytes:
    """The model (or `proto`, a serialized variant of it) as ModelBytes, weights inline."""
    proto = ir.serde.serialize_model(model) if proto is None else proto
    base = _external_folder(model)
    external = sum(v.const_value.nbytes for g in model.graphs()
                   for v in g.initializers.values()
                   if isinstance(v.const_value, ir.ExternalTensor))
    if proto.ByteSize() + external >= _TWO_GB - 2**20:
        raise InputError(
            "the model is over 2 GB with its weights held in memory; this is not supported "
            "yet"
        )
    if base is not None:
        _inline_external(proto, base)
    data = ModelBytes(proto.SerializeToString())
    data.base_dir = base
    return data


@contextlib.contextmanager
def serialized_model(model: ir.Model) -> Iterator[ModelBytes]:
    """The model as ModelBytes (weights inline), for onnx.checker and onnxruntime.

    Kept as a context for its callers; nothing depends on the working directory any more.
    """
    yield model_bytes(model)
