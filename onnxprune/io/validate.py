"""The validation gate every input model passes before any pass sees it.

A defect of the input must be reported as one line naming the tensor or node, not found
later as a crash deep in a pass, nor blamed on "the rewritten model". The gate runs on the
ModelProto (weights not loaded) right after reading it: the full onnx.checker (types,
attributes, topological order, SSA, unknown ops, shape inference), then what the checker
lets through and the passes cannot take: undefined element types, initializer sizes that
do not match their dims, dims of zero on an input. Declared dims below zero (paddle2onnx
writes -1 for "dynamic") are cleared to "unknown", which is what they mean.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto

from onnxprune.errors import InputError
from onnxprune.io.finite import MaskConstant, accepted_non_finite

__all__ = ["check_input_model", "check_finite_weights", "tensor_nbytes", "MAX_TENSOR_BYTES"]

logger = logging.getLogger(__name__)

MAX_TENSOR_BYTES = 2**40  # a declared initializer over 1 TiB is a corrupt header
_BITS = {TensorProto.INT4: 4, TensorProto.UINT4: 4}
for _name in ("FLOAT4E2M1", "INT2", "UINT2"):
    if hasattr(TensorProto, _name):
        _BITS[getattr(TensorProto, _name)] = 4 if _name == "FLOAT4E2M1" else 2


_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data",
                 "uint64_data")


def _itemsize(elem_type: int) -> int | None:
    """Bytes per element of a fixed-width element type (None: strings, sub-byte, unknown)."""
    if elem_type in _BITS or elem_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    try:
        return int(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return None


def _known_type(elem_type: int) -> bool:
    if elem_type == TensorProto.UNDEFINED:
        return False
    try:
        onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    except (KeyError, TypeError, ValueError):
        return False
    return True


def tensor_nbytes(tensor: TensorProto) -> int | None:
    """Bytes the tensor's dims and type need in raw form (None when not fixed-width)."""
    numel = math.prod(int(d) for d in tensor.dims)
    if tensor.data_type in _BITS:
        return (numel * _BITS[tensor.data_type] + 7) // 8
    size = _itemsize(tensor.data_type)
    return None if size is None else numel * size


def _check_tensor(tensor: TensorProto, where: str) -> None:
    """A tensor's type, dims and byte size agree, before anything reshapes its bytes."""
    name = f"{where}: tensor '{tensor.name}'"
    if not _known_type(tensor.data_type) and tensor.data_type != TensorProto.STRING:
        raise InputError(f"{name} has element type {tensor.data_type}, which is undefined or "
                         "unknown; re-export the model")
    if any(d < 0 for d in tensor.dims):
        raise InputError(f"{name} has negative dims {list(tensor.dims)}; re-export the model")
    nbytes = tensor_nbytes(tensor)
    if nbytes is not None and nbytes > MAX_TENSOR_BYTES:
        raise InputError(f"{name} declares {nbytes} bytes (dims {list(tensor.dims)}), beyond "
                         "any real model; the file is corrupt")
    if tensor.data_location == TensorProto.EXTERNAL:
        return  # sizes checked against the data file by io
    if tensor.HasField("raw_data"):
        if nbytes is not None and len(tensor.raw_data) != nbytes:
            raise InputError(f"{name} holds {len(tensor.raw_data)} bytes but its dims "
                             f"{list(tensor.dims)} need {nbytes}; re-export the model")
        return
    if tensor.data_type in _BITS:
        return  # packed several to a field value; left to the checker
    count = sum(len(getattr(tensor, f)) for f in _TYPED_FIELDS)
    numel = math.prod(int(d) for d in tensor.dims)
    if tensor.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
        numel *= 2
    if count != numel:
        raise InputError(f"{name} holds {count} values but its dims {list(tensor.dims)} need "
                         f"{numel}; re-export the model")


def _check_value_info(vi: onnx.ValueInfoProto, where: str, kind: str,
                      fixed_zero_ok: bool) -> None:
    t = vi.type
    if not t.HasField("tensor_type"):
        return
    tt = t.tensor_type
    if not _known_type(tt.elem_type):
        raise InputError(f"{where}: {kind} '{vi.name}' has element type {tt.elem_type} "
                         "(undefined or unknown); re-export the model")
    if not tt.HasField("shape"):
        return
    for axis, dim in enumerate(tt.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value < 0:
            logger.info("%s: %s '%s' axis %d declared %d; treated as unknown", where, kind,
                        vi.name, axis, dim.dim_value)
            dim.ClearField("dim_value")  # -1 is how some exporters say "dynamic"
        elif dim.HasField("dim_value") and dim.dim_value == 0 and not fixed_zero_ok:
            raise InputError(
                f"{where}: {kind} '{vi.name}' has its dimension on axis {axis} fixed at 0, so "
                "it only takes empty tensors; re-export it with a dynamic or positive size"
            )


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph in it (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g)


def _check_names(graph: onnx.GraphProto, where: str) -> None:
    """Node outputs are assigned once and no node output shadows an initializer."""
    initializers = {t.name for t in graph.initializer}
    produced: set[str] = set()
    for node in graph.node:
        seen_attrs: set[str] = set()
        for attr in node.attribute:
            if attr.name in seen_attrs:
                raise InputError(f"{where}: node '{node.name or node.op_type}' has attribute "
                                 f"'{attr.name}' twice; re-export the model")
            seen_attrs.add(attr.name)
        for out in node.output:
            if not out:
                continue
            if out in produced or out in initializers:
                raise InputError(f"{where}: tensor '{out}' is assigned twice (node "
                                 f"'{node.name or node.op_type}'); re-export the model")
            produced.add(out)


_STRING = 9  # FieldDescriptor.TYPE_STRING
_MESSAGE = 11  # FieldDescriptor.TYPE_MESSAGE


def _check_strings(message: object, where: str, path: str = "model") -> None:
    """Every string field decoded as text: protobuf hands back bytes for a string that is
    not valid UTF-8, which onnx_ir and every name comparison then trip over."""
    for field, value in message.ListFields():  # type: ignore[attr-defined]
        if field.type == _STRING:
            values = value if field.is_repeated else [value]
            for v in values:
                if not isinstance(v, str):
                    raise InputError(f"{where}: {path}.{field.name} is not valid UTF-8 text "
                                     f"({bytes(v)[:40]!r}); fix or re-export the model")
        elif field.type == _MESSAGE:
            values = value if field.is_repeated else [value]
            for i, v in enumerate(values):
                name = getattr(v, "name", "") or str(i)
                _check_strings(v, where, f"{path}.{field.name}[{name!s:.60}]")


def _run_checker(proto: onnx.ModelProto, path: Path) -> None:
    """onnx.checker with full shape inference, as one line naming the node or tensor.

    External data is resolved against the model's folder (the checker is given the path);
    a model whose dims were normalised is checked in memory (its weights live inline then,
    or the external files were already checked by io).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if _has_external(proto):
                onnx.checker.check_model(str(path), full_check=True)
            else:
                onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # ValidationError, InferenceError and friends
        lines = [ln.strip() for ln in str(e).splitlines()
                 if ln.strip() and not ln.strip().startswith("==>")]
        detail = " ".join(lines)
        detail = detail if len(detail) <= 400 else detail[:397] + "..."
        raise InputError(f"{path}: invalid input model: {detail or type(e).__name__}; "
                         "fix the model (onnx.checker.check_model(path, full_check=True) "
                         "shows the same)") from e


def _has_external(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == TensorProto.EXTERNAL
               for g in iter_graphs(proto.graph) for t in g.initializer)


def check_input_model(proto: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """The gate: raises InputError naming the first defect; normalises negative dims.

    Runs on the proto read without its external data; modifies only the in-memory proto.
    """
    p = Path(path)
    where = str(p)
    if not proto.HasField("graph"):
        raise InputError(f"{where}: contains no graph; re-export the model")
    _check_strings(proto, where)
    for graph in iter_graphs(proto.graph):
        for t in graph.initializer:
            _check_tensor(t, where)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    _check_tensor(attr.t, f"{where}: node '{node.name or node.op_type}'")
        _check_names(graph, where)
    main = proto.graph
    if not main.output:
        raise InputError(f"{where}: the graph has no outputs; re-export the model")
    init_names = {t.name for t in main.initializer}
    for vi in main.input:
        _check_value_info(vi, where, "input", fixed_zero_ok=vi.name in init_names)
    for vi in main.output:
        _check_value_info(vi, where, "output", fixed_zero_ok=True)
    for vi in main.value_info:
        _check_value_info(vi, where, "value", fixed_zero_ok=True)
    _run_checker(proto, p)


def check_finite_weights(model: ir.Model, where: str = "model") -> list[MaskConstant]:
    """Refuses constants holding NaN, and ±inf anywhere but a mask/fill use, before a pass
    reads them: scores, repairs and int8 scales built on them are meaningless (verification
    of such a model fails instead; only rewriting it is refused). Returns the accepted ±inf
    constants with their readers (io/finite.py: accepted_non_finite) for the report."""
    return accepted_non_finite(model, where)
