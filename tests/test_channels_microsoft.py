"""FFN channel groups through onnxruntime's fused activations (transformer optimizer output)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import RemoveNeuronsPass, find_channel_groups


def _ffn(op: str, with_bias: bool, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    d, h = 8, 16
    w1 = rng.normal(size=(d, h)).astype(np.float32)
    w2 = rng.normal(size=(h, d)).astype(np.float32)
    w2[::4] = 0.0  # every fourth neuron has zero outgoing weights: removing it is exact
    b = rng.normal(size=(h,)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    act_inputs = ["h"]
    if with_bias:
        inits.append(numpy_helper.from_array(b, "b"))
        act_inputs.append("b")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node(op, act_inputs, ["a"], name="act", domain="com.microsoft"),
        helper.make_node("MatMul", ["a", "w2"], ["h2"], name="fc2"),
        helper.make_node("SkipLayerNormalization", ["h2", "x", "gamma", "beta"], ["y"],
                         name="skipln", domain="com.microsoft", epsilon=1e-5),
    ]
    inits += [numpy_helper.from_array(np.ones(d, np.float32), "gamma"),
              numpy_helper.from_array(np.zeros(d, np.float32), "beta")]
    graph = helper.make_graph(
        nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


@pytest.mark.parametrize(("op", "with_bias"), [("BiasGelu", True), ("FastGelu", True),
                                               ("FastGelu", False), ("Gelu", False),
                                               ("QuickGelu", False)])
def test_fused_activation_carries_channels_and_removal_is_exact(op: str, with_bias: bool
                                                                ) -> None:
    proto = _ffn(op, with_bias)
    x = np.random.default_rng(1).normal(size=(2, 5, 8)).astype(np.float32)
    before = _run(proto, x)
    model = ir.serde.deserialize_model(proto)
    groups = find_channel_groups(model)
    ffn = next(g for g in groups if g.size == 16)
    assert ffn.prunable, ffn.skip_reason
    residual = next(g for g in groups if g.size == 8)
    assert not residual.prunable and "SkipLayerNormalization" in (residual.skip_reason or "")
    RemoveNeuronsPass(sparsity=0.25, criterion="l1")(model)
    out = ir.serde.serialize_model(model)
    w2 = next(t for t in out.graph.initializer if t.name.startswith("w2"))
    assert list(w2.dims) == [12, 8]
    np.testing.assert_allclose(_run(out, x), before, atol=1e-5)
