"""A model serialized without its weights, the weights handed over as arrays.

A protobuf message cannot exceed 2 GB, and a model whose weights are written into it is
held twice (the arrays, then the message) before onnxruntime makes its own third copy. So
the graph handed to onnxruntime and to onnx.checker carries no weight over
`DETACH_MIN_BYTES`: each such initializer is an external-data reference to PLACEHOLDER, an
empty file in a private temporary folder, and its array (memory-mapped from the model's
data file, or the array a pass wrote) goes to onnxruntime with
`SessionOptions.add_initializer`, which uses the buffer in place (onnxruntime 1.20-1.32,
CPU provider).

The placeholder is empty on purpose: should onnxruntime ever read a reference instead of
using the array it was given (a provider that plans the weight on another device), reading
fails loudly; it can never read zeros or a file of the same name elsewhere.

Copies that remain, and why:
- Initializers under DETACH_MIN_BYTES, in subgraphs, of types numpy/onnxruntime cannot share
  (bfloat16, float8, 4-bit, strings) or listed as graph inputs stay inline in the message
  (small, rare, or needed by onnx shape inference).
- A caller that serializes the model itself (`ir.serde.serialize_model`) and passes the
  proto holds one transient copy of the in-memory weights until they are detached from it.
- onnxruntime prepacks MatMul weights on the CPU (a packed copy, faster GEMM): kept for
  models under PREPACK_LIMIT_BYTES of detached weights, turned off above it.
- CUDA sessions get the arrays with `add_external_initializers`, which copies them into the
  graph before they go to the device (add_initializer would be refused for a weight planned
  on the GPU).
- Some of onnxruntime's CPU graph optimizers (Conv and QDQ fusions) read a weight from the
  graph: the shared attempt fails on the empty placeholder and the session is rebuilt with
  `add_external_initializers` (a copy of every detached weight of that session).

Not copies, but counted in RSS: a memory-mapped weight's pages are resident once read
(scoring, a forward pass), so a command that reads every weight would peak at about the
model's size plus what it writes. Calibration runs the model section by section, so after
each section `graph.pages.release_pages` hands the pages it read back to the page cache
(madvise(MADV_DONTNEED) on the read-only map: the data stays valid and is read again from
the cache on the next touch); the resident weights are then those of one section.
Each ExternalTensor maps the data file once; sessions reuse those maps, which is why the
CLI verifies a pruned model against a clone of the loaded model rather than the file
(onnxruntime would map every weight a second time).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

__all__ = [
    "initializer_proto",
    "DETACH_MIN_BYTES",
    "PLACEHOLDER",
    "PREPACK_LIMIT_BYTES",
    "check_detached",
    "detach_from_proto",
    "placeholder_folder",
    "serialize_detached",
]

DETACH_MIN_BYTES = 1024
PREPACK_LIMIT_BYTES = 512 << 20
PLACEHOLDER = "onnxprune-weight-held-in-memory.bin"

# numpy dtypes onnxruntime's OrtValue.ortvalue_from_numpy wraps without conversion
_SHAREABLE = {
    ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.INT8,
    ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32,
    ir.DataType.UINT32, ir.DataType.INT64, ir.DataType.UINT64, ir.DataType.BOOL,
}


def _shareable_array(value: ir.Value, graph: ir.Graph) -> np.ndarray | None:
    """The initializer's array when it should travel apart from the message, else None."""
    t = value.const_value
    if t is None or value in graph.inputs or t.dtype not in _SHAREABLE:
        return None
    if t.nbytes < DETACH_MIN_BYTES:
        return None
    arr = t.numpy()  # ExternalTensor: a view of onnx_ir's memory map; ir.Tensor: its array
    if arr.dtype.byteorder == ">" or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
    return arr


def _placeholder(tensor: onnx.TensorProto, nbytes: int) -> None:
    tensor.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, val in (("location", PLACEHOLDER), ("offset", "0"), ("length", str(nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, val


def initializer_proto(value: ir.Value, graph: ir.Graph) -> onnx.TensorProto:
    """The initializer as a TensorProto named after `value`: a data-less placeholder when its
    weight travels apart (model_bytes takes the array from the model), else in full."""
    t = value.const_value
    assert t is not None
    if _shareable_array(value, graph) is not None:
        proto = onnx.TensorProto(name=value.name or "", data_type=t.dtype.value,
                                 dims=[int(d) for d in t.shape.numpy()])
        _placeholder(proto, t.nbytes)
        return proto
    proto = ir.serde.serialize_tensor(t)
    proto.name = value.name or ""
    return proto


def serialize_detached(model: ir.Model) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The model as a proto whose big main-graph weights are placeholders, and those weights.

    While serializing, each detached initializer briefly holds a data-less ExternalTensor
    stand-in, so onnx_ir never copies its bytes into the message; the originals are put
    back before returning (also on error).
    """
    graph = model.graph
    weights: dict[str, np.ndarray] = {}
    saved: dict[ir.Value, ir.TensorProtocol] = {}
    try:
        for value in graph.initializers.values():
            arr = _shareable_array(value, graph)
            if arr is None or value.name is None:
                continue
            t = value.const_value
            assert t is not None
            weights[value.name] = arr
            saved[value] = t
            value.const_value = ir.ExternalTensor(
                PLACEHOLDER, offset=0, length=t.nbytes, dtype=t.dtype, shape=t.shape,
                name=value.name, base_dir="")
        proto = ir.serde.serialize_model(model)
    finally:
        for value, t in saved.items():
            value.const_value = t
    for tensor in proto.graph.initializer:
        if tensor.name in weights:
            _placeholder(tensor, weights[tensor.name].nbytes)
    return proto, weights


def _read_names(graph: onnx.GraphProto) -> set[str]:
    """Every name a node of `graph` or of its subgraphs reads."""
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                names |= _read_names(sub)
    return names


def detach_from_proto(model: ir.Model, proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Turns the big main-graph weights of `proto` (a serialization of `model`) into
    placeholders in place and returns their arrays, taken from `model` without copying."""
    graph = model.graph
    weights: dict[str, np.ndarray] = {}
    used = _read_names(proto.graph) | {i.name for i in proto.graph.input}
    for tensor in proto.graph.initializer:
        value = graph.initializers.get(tensor.name)
        if value is None or tensor.name not in used:
            continue  # onnxruntime drops an unread initializer: nothing to hand it
        arr = _shareable_array(value, graph)
        if arr is None or tuple(arr.shape) != tuple(tensor.dims):
            continue
        weights[tensor.name] = arr
        _placeholder(tensor, arr.nbytes)
    return weights


@contextlib.contextmanager
def placeholder_folder() -> Iterator[str]:
    """A private folder holding the empty PLACEHOLDER file, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="onnxprune-") as folder:
        Path(folder, PLACEHOLDER).touch()
        yield folder


def check_detached(proto_bytes: bytes, weights: Mapping[str, np.ndarray]) -> None:
    """onnx.checker (full) on the graph without its detached weights.

    The checker resolves external references against the model file's folder, so the
    message is checked as a file in a private folder beside an empty placeholder: the graph,
    types, shapes and small tensors are checked by onnx; the detached weights' byte counts
    are checked here against their dims (the arrays carry their own shapes, so this holds
    by construction unless a pass wrote a wrong array).
    """
    proto = onnx.ModelProto.FromString(proto_bytes)
    for tensor in proto.graph.initializer:
        if tensor.name not in weights:
            continue
        arr = weights[tensor.name]
        dims = tuple(int(d) for d in tensor.dims)
        if tuple(arr.shape) != dims:
            raise ValueError(f"initializer '{tensor.name}' has dims {list(dims)} but its "
                             f"array has shape {list(arr.shape)}")
    with placeholder_folder() as folder:
        path = os.path.join(folder, "model.onnx")
        with open(path, "wb") as f:
            f.write(proto_bytes)
        onnx.checker.check_model(path, full_check=True)
