"""Small in-memory models and an onnxruntime runner shared by the tests.

Builders return `onnx.ModelProto` (opset 17, float32, symbolic batch dim "batch") that pass
`onnx.checker.check_model(full_check=True)`; convert with `to_ir()` for passes that work on
onnx_ir. Weights are drawn from a seeded generator, so a builder called twice with the same
arguments gives the same model.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
BATCH = "batch"

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
DIGITS = MODELS / "digits_mlp.onnx"
DIGITS_TEST = MODELS / "digits_test.npz"
DIGITS_CALIB = MODELS / "digits_calib.npz"

ModelArg = onnx.ModelProto | ir.Model | str | os.PathLike


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    *,
    opset: int = OPSET,
    ir_version: int = IR_VERSION,
    name: str = "test",
    check: bool = True,
) -> onnx.ModelProto:
    """A model from onnx.helper pieces, checked (full_check) unless `check` is False."""
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def value_info(
    name: str, dims: Sequence[int | str], dtype: int = TensorProto.FLOAT
) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, list(dims))


def const_node(name: str, array: np.ndarray) -> onnx.NodeProto:
    """A Constant node whose output is called `name` (the way legacy exporters store weights)."""
    return helper.make_node(
        "Constant", [], [name], name=f"{name}_const", value=numpy_helper.from_array(array, name)
    )


def mlp_model(
    widths: Sequence[int],
    activation: str | None = "Relu",
    *,
    gemm: bool = False,
    trans_b: bool = False,
    weights_as_constants: bool = False,
    bias: bool = True,
    seed: int = 0,
) -> onnx.ModelProto:
    """MLP x[batch, widths[0]] -> ... -> y[batch, widths[-1]].

    Layer i is node `fc{i}` with weight `fc{i}.weight` and bias `fc{i}.bias`:
    - gemm=False: MatMul (weight [in, out]) then Add `fc{i}_bias` (when bias);
    - gemm=True: Gemm with C = bias; weight [out, in] with transB=1 when trans_b, else [in, out].
    `activation` (an op type such as "Relu", "Tanh"; None for none) follows every layer but
    the last, as node `act{i}`. Weights are He-scaled normals from `seed`.
    """
    if len(widths) < 2:
        raise ValueError("an MLP needs at least two widths")
    if trans_b and not gemm:
        raise ValueError("trans_b needs gemm=True")
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def add_const(name: str, array: np.ndarray) -> None:
        if weights_as_constants:
            nodes.append(const_node(name, array))
        else:
            inits.append(numpy_helper.from_array(array, name))

    x = "x"
    last = len(widths) - 2
    for i, (k, n) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        w = (rng.standard_normal((k, n)) * np.sqrt(2.0 / k)).astype(np.float32)
        b = (rng.standard_normal(n) * 0.1).astype(np.float32)
        wname, bname = f"fc{i}.weight", f"fc{i}.bias"
        out = "y" if i == last else f"fc{i}_out"
        if gemm:
            add_const(wname, np.ascontiguousarray(w.T) if trans_b else w)
            ins = [x, wname]
            if bias:
                add_const(bname, b)
                ins.append(bname)
            nodes.append(
                helper.make_node("Gemm", ins, [out], name=f"fc{i}", transB=int(trans_b))
            )
        else:
            add_const(wname, w)
            mm_out = f"fc{i}_mm" if bias else out
            nodes.append(helper.make_node("MatMul", [x, wname], [mm_out], name=f"fc{i}"))
            if bias:
                add_const(bname, b)
                nodes.append(helper.make_node("Add", [mm_out, bname], [out], name=f"fc{i}_bias"))
        x = out
        if activation is not None and i != last:
            act_out = f"act{i}_out"
            nodes.append(helper.make_node(activation, [x], [act_out], name=f"act{i}"))
            x = act_out
    return make_model(
        nodes,
        [value_info("x", [BATCH, widths[0]])],
        [value_info("y", [BATCH, widths[-1]])],
        inits,
        name="mlp",
    )


def mlp_forward(
    w: Mapping[str, np.ndarray],
    x: np.ndarray,
    layers: int,
    *,
    trans_b: bool = False,
    relu: bool = True,
    bias: bool = True,
) -> np.ndarray:
    """What an `mlp_model` (Relu or no activation) computes, in float64 numpy.

    `w` holds the weights by name (see `weights()`), so the expectation follows whatever a
    pass wrote into the model.
    """
    h = x.astype(np.float64)
    for i in range(layers):
        wi = np.asarray(w[f"fc{i}.weight"], np.float64)
        h = h @ (wi.T if trans_b else wi)
        if bias:
            h = h + w[f"fc{i}.bias"]
        if relu and i < layers - 1:
            h = np.maximum(h, 0)
    return h


def single_matmul_model(k: int = 8, n: int = 4, *, seed: int = 0) -> onnx.ModelProto:
    """x[batch, k] @ w[k, n] -> y: one MatMul feeding the graph output (nothing prunable)."""
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [value_info("x", [BATCH, k])],
        [value_info("y", [BATCH, n])],
        [numpy_helper.from_array(w, "w")],
        name="single_matmul",
    )


def shared_weight_model(k: int = 8, n: int = 8, *, seed: int = 0) -> onnx.ModelProto:
    """Two MatMuls reading the same weight `w` [k, n]: y = x @ w + z @ w."""
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="mm_a"),
        helper.make_node("MatMul", ["z", "w"], ["b"], name="mm_b"),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ]
    return make_model(
        nodes,
        [value_info("x", [BATCH, k]), value_info("z", [BATCH, k])],
        [value_info("y", [BATCH, n])],
        [numpy_helper.from_array(w, "w")],
        name="shared_weight",
    )


def passthrough_model(
    inputs: Mapping[str, tuple[int, Sequence[int | str] | None]],
) -> onnx.ModelProto:
    """Each input `name` (TensorProto dtype, dims; None: unknown rank) -> Identity -> `name_out`.

    For tests about inputs and data, where the computation does not matter. onnx.checker
    refuses graph inputs without a shape, so a model with an unknown-rank input is not
    checked (onnxruntime runs it).
    """
    nodes, ins, outs = [], [], []
    for name, (dtype, dims) in inputs.items():
        nodes.append(helper.make_node("Identity", [name], [f"{name}_out"], name=f"id_{name}"))
        shape = None if dims is None else list(dims)
        ins.append(helper.make_tensor_value_info(name, dtype, shape))
        outs.append(helper.make_tensor_value_info(f"{name}_out", dtype, shape))
    unknown_rank = any(dims is None for _, dims in inputs.values())
    return make_model(nodes, ins, outs, name="passthrough", check=not unknown_rank)


def to_ir(model: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(model)


def to_proto(model: ModelArg) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, ir.Model):
        return ir.serde.serialize_model(model)
    return onnx.load(str(model))


def weights(model: ModelArg) -> dict[str, np.ndarray]:
    """Every constant tensor by name: initializers and Constant-node `value`s (copies)."""
    proto = to_proto(model)
    out = {t.name: numpy_helper.to_array(t).copy() for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t).copy()
    return out


def replace_weight(model: onnx.ModelProto, name: str, array: np.ndarray) -> onnx.ModelProto:
    """A copy of `model` whose initializer `name` holds `array`."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for i, t in enumerate(copy.graph.initializer):
        if t.name == name:
            copy.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, name))
            return copy
    raise KeyError(name)


def run(model: ModelArg, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Runs a model (ModelProto, ir.Model or path) on onnxruntime's CPU provider."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if isinstance(model, (str, os.PathLike)):
        sess = ort.InferenceSession(str(model), sess_options=opts, providers=providers)
    elif isinstance(model, ir.Model) and any(
        isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()
    ):
        # Memory-mapped weights: onnxruntime needs them in a file beside the model.
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            ir.save(model, path, external_data="model.onnx.data")
            sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    else:
        data = to_proto(model).SerializeToString()
        sess = ort.InferenceSession(data, sess_options=opts, providers=providers)
    return sess.run(None, dict(feeds))


def random_input(shape: Sequence[int], *, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(tuple(shape)).astype(np.float32)


def save(
    model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool = False
) -> Path:
    """Writes `model` to `path`; with external_data, every tensor goes to `<name>.data`.

    Works on a copy: onnx.save with external data rewrites the proto it is given.
    """
    p = Path(path)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if external_data:
        onnx.save(
            copy, str(p), save_as_external_data=True, all_tensors_to_one_file=True,
            location=f"{p.name}.data", size_threshold=0,
        )
    else:
        onnx.save(copy, str(p))
    return p


def sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def digits_accuracy(model: str | os.PathLike) -> float:
    """models/build_digits.py's accuracy() on the 500 held-out digits (imported by path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_digits", MODELS / "build_digits.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return float(module.accuracy(model))


def folder_snapshot(folder: str | os.PathLike) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder`, hidden files included."""
    root = Path(folder)
    return {
        str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()
    }
