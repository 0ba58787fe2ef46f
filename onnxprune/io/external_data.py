"""External data: checking the references of a model and reading them in.

Every reference is checked the same way wherever it is read (loading, sessions, the
checker): a relative path inside the model's folder after links are resolved, a regular
file with one hard link, long enough for the tensor. Sessions and onnx.checker get the graph
without its big weights (ModelBytes, see onnxprune.io.detached); the weights travel as arrays
memory-mapped from the model's folder after those checks, so nothing is ever resolved
against the working directory and no model is refused for being over 2 GB.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune.errors import InputError
from onnxprune.io.detached import PLACEHOLDER, detach_from_proto, serialize_detached
from onnxprune.io.files import NAME_MAX
from onnxprune.io.validate import tensor_nbytes

__all__ = [
    "check_external_file",
    "check_external_locations",
    "external_data_files",
    "iter_tensor_protos",
    "ModelBytes",
    "model_bytes",
    "serialized_model",
]

_TWO_GB = 2**31


def iter_tensor_protos(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_tensor_protos(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_tensor_protos(g)


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


def check_external_locations(proto: onnx.ModelProto, path: Path) -> None:
    """Refuses external-data references that point outside the model's folder or beyond
    the end of their file."""
    base = path.parent
    for tensor in iter_tensor_protos(proto.graph):
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
    for tensor in iter_tensor_protos(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = _external_info(tensor).get("location", "")
            if (isinstance(location, str) and location and "\x00" not in location
                    and not os.path.isabs(location)):
                with contextlib.suppress(OSError, RuntimeError, ValueError):
                    files.add((p.parent / location).resolve())
    return files


class ModelBytes(bytes):
    """A serialized model whose weights over DETACH_MIN_BYTES travel apart, as arrays.

    The bytes hold the graph with a placeholder reference for each weight in `weights`
    (main-graph initializers: arrays memory-mapped from the model's folder after the same
    containment checks as loading, or in memory); every other external tensor (subgraphs,
    types that cannot be shared) has been read in from that folder. onnxprune.io.runtime's
    make_session hands the arrays over; give these bytes to nothing else. `base_dir`
    records the folder the model's external data came from (None: it had none).
    """

    base_dir: str | None = None
    weights: dict[str, np.ndarray] = {}  # replaced per instance by model_bytes


def external_folder(model: ir.Model) -> str | None:
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


def _inline_external(proto: onnx.ModelProto, base: str, detached: Mapping[str, object]) -> None:
    """Reads every external tensor of `proto` from `base` into raw_data, except the
    placeholders of `detached` weights."""
    handles: dict[Path, object] = {}
    try:
        for tensor in iter_tensor_protos(proto.graph):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = _external_info(tensor)
            if info.get("location") == PLACEHOLDER and tensor.name in detached:
                continue
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


_UNKNOWN = object()


def model_bytes(model: ir.Model, proto: onnx.ModelProto | None = None, *,
                folder: str | None | object = _UNKNOWN) -> ModelBytes:
    """The model (or `proto`, a serialized variant of it) as ModelBytes, big weights apart.

    Refused only when the graph itself, without those weights, is over 2 GB. `folder`:
    external_folder(model), when the caller already checked it (sections of one model).
    """
    # checks every external reference as loading does
    base = external_folder(model) if folder is _UNKNOWN else folder
    if proto is None:
        proto, weights = serialize_detached(model)
    else:
        weights = detach_from_proto(model, proto)
    if base is not None:
        _inline_external(proto, base, weights)
    if proto.ByteSize() >= _TWO_GB - 2**20:
        raise InputError(
            "the model's graph is over 2 GB even without its large weights (many small "
            "initializers or subgraph weights); store them as external data"
        )
    data = ModelBytes(proto.SerializeToString())
    data.base_dir = base
    data.weights = weights
    return data


@contextlib.contextmanager
def serialized_model(model: ir.Model) -> Iterator[ModelBytes]:
    """The model as ModelBytes, for onnx.checker (onnxprune.io.detached.check_detached) and
    onnxruntime (runtime.make_session).

    Kept as a context for its callers; nothing depends on the working directory any more.
    """
    yield model_bytes(model)
