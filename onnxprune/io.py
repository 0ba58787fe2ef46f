"""Loading and saving models safely.

Models are loaded with onnx_ir so external data stays memory-mapped, external-data
locations are checked before anything is read from them, and saving goes through a
temporary file that is renamed into place only once it is complete.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxprune.errors import InputError
from onnxprune.files import atomic_path

__all__ = [
    "load_model",
    "save_model",
    "check_output_path",
    "uses_external_data",
    "serialized_model",
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


def _check_external_locations(proto: onnx.ModelProto, path: Path) -> None:
    """Refuses external-data locations that point outside the model's folder."""
    base = path.parent.resolve()
    for tensor in _iter_tensor_protos(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        where = f"{path}: tensor '{tensor.name}' has external data at '{location}'"
        if not location or os.path.isabs(location) or Path(location).is_absolute():
            raise InputError(
                f"{where}, an absolute or empty path; external data must sit beside the model"
            )
        target = (base / location).resolve()
        if not target.is_relative_to(base):
            raise InputError(
                f"{where}, which escapes the model's folder; move the data next to the model"
            )
        if not target.is_file():
            raise InputError(f"{where}, which does not exist; copy the data file beside the model")


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    """Loads a model file, checking it is readable ONNX with safe external data.

    Raises InputError with a one-line reason for a missing file, a folder, a file that is
    not ONNX (or is truncated) and external data that escapes the model's folder.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file; check the path")
    if p.is_dir():
        raise InputError(f"{p}: is a folder, not an .onnx file; give the model file inside it")
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
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:  # onnx_ir raises plain exceptions on malformed protos
        raise InputError(f"{p}: malformed ONNX model ({e}); run onnx.checker on it") from e
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


def check_output_path(
    output: str | os.PathLike[str], inputs: list[str | os.PathLike[str]], *, force: bool = False
) -> Path:
    """Refuses to write over an input file or into a folder that does not exist."""
    out = Path(output)
    for src in inputs:
        s = Path(src)
        same = out.exists() and s.exists() and out.resolve() == s.resolve()
        if same and not force:
            raise InputError(
                f"{out}: is the input model; choose another output path or pass --force"
            )
    if out.is_dir():
        raise InputError(f"{out}: is a folder; give a file name such as {out / 'model.onnx'}")
    if not out.parent.exists():
        raise InputError(f"{out.parent}: output folder does not exist; create it first")
    return out


def save_model(
    model: ir.Model, path: str | os.PathLike[str], *, external_data: bool | None = None
) -> Path:
    """Saves atomically: a complete file appears at `path`, or nothing changes there.

    External data is written to `<name>.data` beside the model when `external_data` is
    true, or when it is None and the model already had external data or is over 2 GB.
    """
    out = Path(path)
    if external_data is None:
        external_data = uses_external_data(model) or _weights_nbytes(model) >= _TWO_GB
    elif not external_data and uses_external_data(model):
        # Inline was asked for: read the weights in, or the copy would point at the
        # input's data file under a path that is wrong from the new location.
        ir.external_data.load_to_model(model)
    with atomic_path(out) as tmp:
        if external_data:
            # The data file is written atomically by onnx_ir; the proto that points at it
            # appears only when the rename succeeds.
            ir.save(model, tmp, external_data=f"{out.name}.data")
        else:
            ir.save(model, tmp)
    return out


@contextlib.contextmanager
def serialized_model(model: ir.Model) -> Iterator[bytes]:
    """The model as protobuf bytes, inside a context where its external data resolves.

    onnx.checker and onnxruntime resolve the external data of a model given as bytes
    against the working directory, so the context switches to the data's folder for its
    duration (weights are neither copied nor linked; the input folder is not written).
    """
    proto = ir.serde.serialize_model(model)
    if proto.ByteSize() >= _TWO_GB - 2**20:
        raise InputError(
            "the model is over 2 GB with its rewritten weights held in memory; "
            "this is not supported yet"
        )
    folders = {
        str(Path(v.const_value.base_dir).resolve())
        for v in model.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    }
    if len(folders) > 1:
        raise InputError("external data spread over several folders is not supported")
    previous = os.getcwd()
    if folders:
        os.chdir(folders.pop())
    try:
        yield proto.SerializeToString()
    finally:
        os.chdir(previous)
