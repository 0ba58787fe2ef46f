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
from collections import Counter
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


# ----------------------------------------------------------------- graph builder


def ir_version_for(opset: int) -> int:
    """The lowest IR version that goes with a default-domain opset."""
    return 8 if opset <= 17 else 9 if opset <= 20 else 10


class GraphBuilder:
    """Builds a model node by node, for graphs the fixed builders above do not cover.

    `op()` returns the output name(s); node and output names are generated unless given.
    `const()` stores an initializer, or a Constant node when the builder (or the call) says
    so; `weight()` draws a He-scaled normal matrix from the builder's seeded generator.
    """

    def __init__(self, *, seed: int = 0, constants_as_nodes: bool = False) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.rng = np.random.default_rng(seed)
        self.constants_as_nodes = constants_as_nodes
        self._count = 0

    def _fresh(self, base: str) -> str:
        self._count += 1
        return f"{base}_{self._count}"

    def input(self, name: str, dims: Sequence[int | str], dtype: int = TensorProto.FLOAT) -> str:
        self.inputs.append(value_info(name, dims, dtype))
        return name

    def const(self, name: str, array: np.ndarray | float, *, as_node: bool | None = None) -> str:
        arr = np.asarray(array)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        if self.constants_as_nodes if as_node is None else as_node:
            self.nodes.append(const_node(name, arr))
        else:
            self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def weight(self, name: str, shape: Sequence[int], *, as_node: bool | None = None) -> str:
        fan_in = shape[0] if len(shape) > 1 else 1
        w = self.rng.standard_normal(tuple(shape)) * np.sqrt(2.0 / max(fan_in, 1))
        return self.const(name, w.astype(np.float32), as_node=as_node)

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        *,
        name: str | None = None,
        output: str | None = None,
        outputs: int = 1,
        domain: str = "",
        **attrs: object,
    ) -> str:
        """Adds a node and returns its (first) output name; see `op_multi` for several."""
        return self.op_multi(op_type, inputs, name=name, outputs=[output] if output else outputs,
                             domain=domain, **attrs)[0]

    def op_multi(
        self,
        op_type: str,
        inputs: Sequence[str],
        *,
        name: str | None = None,
        outputs: int | Sequence[str] = 1,
        domain: str = "",
        **attrs: object,
    ) -> list[str]:
        node_name = name or self._fresh(op_type.lower())
        if isinstance(outputs, int):
            outs = [f"{node_name}_out" if i == 0 else f"{node_name}_out{i}" for i in range(outputs)]
        else:
            outs = list(outputs)
        self.nodes.append(
            helper.make_node(op_type, list(inputs), outs, name=node_name, domain=domain or None,
                             **attrs)
        )
        return outs

    def build(
        self,
        outputs: Sequence[str],
        *,
        output_types: Mapping[str, int] | None = None,
        opset: int = OPSET,
        infer_shapes: bool = False,
        check: bool = True,
        name: str = "built",
    ) -> onnx.ModelProto:
        """The model with `outputs` (float32 unless `output_types` says otherwise).

        With `infer_shapes`, onnx shape inference records every intermediate shape as
        value_info, the way exporters leave them.
        """
        types = dict(output_types or {})
        outs = [helper.make_tensor_value_info(o, types.get(o, TensorProto.FLOAT), None)
                for o in outputs]
        model = make_model(self.nodes, self.inputs, outs, self.inits, opset=opset,
                           ir_version=ir_version_for(opset), name=name, check=False)
        # Graph outputs need a shape for the checker: take the inferred one.
        inferred = onnx.shape_inference.infer_shapes(model)
        known = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
        for out in model.graph.output:
            if out.name in known and known[out.name].type.tensor_type.HasField("shape"):
                out.type.CopyFrom(known[out.name].type)
        if check:
            onnx.checker.check_model(model, full_check=True)
        if infer_shapes:
            model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        return model


def dense(
    b: GraphBuilder,
    x: str,
    k: int,
    n: int,
    *,
    name: str,
    gemm: bool = False,
    trans_b: bool = False,
    bias: bool = True,
) -> str:
    """A layer `name` with weight `name.weight` ([k, n], or [n, k] with trans_b) and bias.

    MatMul (+ Add node `name_bias`) or Gemm (bias as C). Returns the layer output.
    """
    if trans_b and not gemm:
        raise ValueError("trans_b needs gemm=True")
    w = b.weight(f"{name}.weight", [k, n])
    if trans_b:  # same distribution, stored [out, in]
        w = b.const(f"{name}.weight", _transpose_last(b, w))
    bias_name = None
    if bias:
        bias_name = b.const(f"{name}.bias", (b.rng.standard_normal(n) * 0.1).astype(np.float32))
    if gemm:
        ins = [x, w] + ([bias_name] if bias_name else [])
        return b.op("Gemm", ins, name=name, transB=int(trans_b))
    out = b.op("MatMul", [x, w], name=name)
    if bias_name:
        out = b.op("Add", [out, bias_name], name=f"{name}_bias")
    return out


def _transpose_last(b: GraphBuilder, name: str) -> np.ndarray:
    """Removes the just-added constant `name` and returns its array transposed."""
    if b.inits and b.inits[-1].name == name:
        arr = numpy_helper.to_array(b.inits.pop())
    else:
        node = b.nodes.pop()
        arr = numpy_helper.to_array(node.attribute[0].t)
    return np.ascontiguousarray(arr.T)


ACTIVATIONS = (
    "Relu", "Tanh", "Sigmoid", "erf_gelu", "erf_gelu_dynamo", "tanh_gelu_pow", "tanh_gelu_mul",
    "silu",
)


def activation(b: GraphBuilder, x: str, kind: str, *, name: str) -> str:
    """An activation on `x`: an op type, or a decomposition the way exporters write it.

    - erf_gelu: the legacy torch exporter, Div(x, √2) -> Erf -> Add 1 -> Mul(x, .) -> Mul 0.5
    - erf_gelu_dynamo: the dynamo exporter, Mul(0.5, x) first, then times (1 + erf(x·1/√2))
    - tanh_gelu_pow / tanh_gelu_mul: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), the cube
      as Pow(x, 3) or as x·x·x
    - silu: x·Sigmoid(x)
    Node names start with `name`.
    """
    if kind == "erf_gelu":
        d = b.op("Div", [x, b.const(f"{name}.sqrt2", np.float32(np.sqrt(2.0)))], name=f"{name}_div")
        e = b.op("Erf", [d], name=f"{name}_erf")
        a = b.op("Add", [e, b.const(f"{name}.one", np.float32(1.0))], name=f"{name}_add")
        m = b.op("Mul", [x, a], name=f"{name}_mul")
        return b.op("Mul", [m, b.const(f"{name}.half", np.float32(0.5))], name=f"{name}_half")
    if kind == "erf_gelu_dynamo":
        h = b.op("Mul", [b.const(f"{name}.half", np.float32(0.5)), x], name=f"{name}_half")
        d = b.op("Mul", [x, b.const(f"{name}.rsqrt2", np.float32(1 / np.sqrt(2.0)))],
                 name=f"{name}_scale")
        e = b.op("Erf", [d], name=f"{name}_erf")
        a = b.op("Add", [e, b.const(f"{name}.one", np.float32(1.0))], name=f"{name}_add")
        return b.op("Mul", [h, a], name=f"{name}_mul")
    if kind in ("tanh_gelu_pow", "tanh_gelu_mul"):
        if kind == "tanh_gelu_pow":
            cube = b.op("Pow", [x, b.const(f"{name}.three", np.float32(3.0))], name=f"{name}_pow")
        else:
            sq = b.op("Mul", [x, x], name=f"{name}_sq")
            cube = b.op("Mul", [sq, x], name=f"{name}_cube")
        c = b.op("Mul", [cube, b.const(f"{name}.c", np.float32(0.044715))], name=f"{name}_c")
        s = b.op("Add", [x, c], name=f"{name}_inner")
        t = b.op("Mul", [s, b.const(f"{name}.k", np.float32(np.sqrt(2 / np.pi)))],
                 name=f"{name}_k")
        th = b.op("Tanh", [t], name=f"{name}_tanh")
        a = b.op("Add", [th, b.const(f"{name}.one", np.float32(1.0))], name=f"{name}_add")
        h = b.op("Mul", [x, b.const(f"{name}.half", np.float32(0.5))], name=f"{name}_half")
        return b.op("Mul", [h, a], name=f"{name}_mul")
    if kind == "silu":
        s = b.op("Sigmoid", [x], name=f"{name}_sigmoid")
        return b.op("Mul", [x, s], name=f"{name}_mul")
    return b.op(kind, [x], name=name)


def chain_model(
    widths: Sequence[int],
    activations: Sequence[str],
    *,
    gemm: Sequence[bool] | None = None,
    trans_b: Sequence[bool] | None = None,
    bias: bool = True,
    seq: int | None = None,
    constants_as_nodes: bool = False,
    infer_shapes: bool = False,
    seed: int = 0,
) -> onnx.ModelProto:
    """x[batch, (seq,) widths[0]] -> layer fc0 -> activations[0] -> fc1 -> ... -> y.

    Layer i is `dense(name=f"fc{i}")`; `gemm[i]` and `trans_b[i]` choose its op (Gemm needs
    2-D activations, so not with `seq`). Activation i (see `activation()`) is named `act{i}`.
    """
    layers = len(widths) - 1
    gemm = list(gemm or [False] * layers)
    trans_b = list(trans_b or [False] * layers)
    if len(activations) != layers - 1:
        raise ValueError("one activation between every two layers")
    if seq is not None and any(gemm):
        raise ValueError("Gemm needs 2-D activations")
    b = GraphBuilder(seed=seed, constants_as_nodes=constants_as_nodes)
    x = b.input("x", [BATCH, seq, widths[0]] if seq is not None else [BATCH, widths[0]])
    for i in range(layers):
        x = dense(b, x, widths[i], widths[i + 1], name=f"fc{i}", gemm=gemm[i],
                  trans_b=trans_b[i], bias=bias)
        if i < layers - 1:
            x = activation(b, x, activations[i], name=f"act{i}")
    b.nodes[-1].output[0] = "y"
    return b.build(["y"], infer_shapes=infer_shapes, name="chain")


def residual_mlp_model(
    dim: int = 8,
    hidden: int = 32,
    blocks: int = 2,
    out: int = 4,
    *,
    stem: str | None = None,
    seed: int = 0,
) -> onnx.ModelProto:
    """x[batch, dim] -> `blocks` x (s = s + fc{i}b(Relu(fc{i}a(s)))) -> head -> y[batch, out].

    Each block's hidden group (fc{i}a -> fc{i}b, `hidden` wide) is prunable; its consumer
    fc{i}b is followed by its bias Add and the residual Add (`res{i}`, output `s{i}`). The
    residual stream starts at x, or at `stem`(x) (an op type, node `stem`, output `s_in`);
    either way it is coupled to the graph input x, so it is not prunable.
    """
    b = GraphBuilder(seed=seed)
    s = b.input("x", [BATCH, dim])
    if stem is not None:
        s = b.op(stem, [s], name="stem", output="s_in")
    for i in range(blocks):
        h = dense(b, s, dim, hidden, name=f"fc{i}a")
        h = b.op("Relu", [h], name=f"relu{i}")
        f = dense(b, h, hidden, dim, name=f"fc{i}b")
        s = b.op("Add", [s, f], name=f"res{i}", output=f"s{i}")
    y = dense(b, s, dim, out, name="head", bias=False)
    b.nodes[-1].output[0] = "y"
    del y
    return b.build(["y"], name="residual_mlp")


def ort_optimized_ops(model: ModelArg) -> Counter:
    """Op-type counts of the graph onnxruntime's CPU provider actually runs (all optimizations).

    Written through SessionOptions.optimized_model_filepath, so a QDQ model that onnxruntime
    leaves as float MatMuls with extra steps shows up as such.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.optimized_model_filepath = str(out)
        data = to_proto(model).SerializeToString()
        ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        return Counter(node.op_type for node in onnx.load(str(out)).graph.node)


def remove_silent_channels(model: onnx.ModelProto, name: str,
                           feeds: Sequence[Mapping[str, np.ndarray]]
                           ) -> tuple[object, onnx.ModelProto]:
    """Zeroes the consumers' rows of two channels of group `name`, removes those channels,
    and checks the outputs on `feeds` agree to 1e-5 (the exactness test of a pattern).
    Returns the group and the pruned model (checked by the full checker)."""
    from onnxprune.channels.groups import find_channel_groups
    from onnxprune.channels.slicing import keep_many
    from onnxprune.core.weights import const_array, set_const_array

    m = to_ir(model)
    g = next(g for g in find_channel_groups(m) if g.name == name)
    assert g.prunable, g.skip_reason
    drop = np.array([1, g.size - 2])
    for use in g.consumers:
        w = const_array(use.weight).copy()  # type: ignore[union-attr]
        np.moveaxis(w, use.reduce_axis, 0)[np.isin(g.channel_map(use, "in"), drop)] = 0
        set_const_array(use.weight, w)
    before = [run(m, f) for f in feeds]
    keep_many(m.graph, [(g, np.setdiff1d(np.arange(g.size), drop))])
    proto = ir.serde.serialize_model(m)
    onnx.checker.check_model(proto, full_check=True)
    for f, ref in zip(feeds, before, strict=True):
        for a, b in zip(ref, run(proto, f), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    return g, proto
