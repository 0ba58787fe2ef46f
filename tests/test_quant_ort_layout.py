"""int8 graphs shaped for onnxruntime's CPU kernels: operator format, no SkipLayerNorm."""

from __future__ import annotations

import numpy as np
from helpers import GraphBuilder, ort_optimized_ops, random_input, run, to_ir

from onnxprune.quant.config import QuantizeConfig
from onnxprune.quant.driver import quantize_model
from onnxprune.quant.qerror import sqnr_db


def _batches(shape: tuple[int, ...], n: int = 4) -> list[dict[str, np.ndarray]]:
    return [{"x": random_input(shape, seed=i)} for i in range(n)]


def _ffn(b: GraphBuilder, x: str, dims: list[int | str]) -> str:
    """MatMul + bias -> Relu -> MatMul + bias (graph output y)."""
    h = b.op("MatMul", [x, b.weight("w1", [16, 32])], name="mm1")
    h = b.op("Add", [b.const("b1", np.linspace(-1, 1, 32)), h], name="bias1")  # bias first
    h = b.op("Relu", [h], name="relu")
    h = b.op("MatMul", [h, b.weight("w2", [32, 16])], name="mm2")
    return b.op("Add", [h, b.const("b2", np.full(16, 0.5))], name="bias2", output="y")


def test_operator_format_folds_the_bias_into_matmul_integer_to_float() -> None:
    b = GraphBuilder(seed=1)
    _ffn(b, b.input("x", ["batch", 4, 16]), [2, 4, 16])
    model = b.build(["y"])
    qdq, op = to_ir(model), to_ir(model)
    quantize_model(qdq, QuantizeConfig(), _batches((3, 4, 16)))
    quantize_model(op, QuantizeConfig(quant_format="operator"), _batches((3, 4, 16)))
    fused = [n for n in op.graph if n.op_type == "MatMulIntegerToFloat"]
    assert len(fused) == 2 and all(n.domain == "com.microsoft" for n in fused)
    assert all(len(n.inputs) == 7 and n.inputs[6] is not None for n in fused)  # the bias
    assert not [n for n in op.graph if n.op_type in ("MatMul", "Add", "DequantizeLinear")]
    assert op.opset_imports["com.microsoft"] == 1
    assert [v.name for v in op.graph.outputs] == ["y"]  # the output keeps its name
    # Same arithmetic as the QDQ form onnxruntime fuses (bias added in another order).
    feeds = {"x": random_input([2, 4, 16], seed=9)}
    np.testing.assert_allclose(run(op, feeds)[0], run(qdq, feeds)[0], rtol=1e-4, atol=1e-4)
    assert sqnr_db(run(model, feeds)[0], run(op, feeds)[0]) > 25
    # onnxruntime leaves the QDQ form's bias Adds in float; the operator form has none.
    assert ort_optimized_ops(qdq)["Add"] == 2
    ops = ort_optimized_ops(op)
    assert ops["MatMulIntegerToFloat"] == 2 and ops["Add"] == 0 and ops["MatMul"] == 0


def test_operator_format_keeps_matmuls_without_bias_and_float_layers() -> None:
    b = GraphBuilder(seed=2)
    x = b.input("x", ["batch", 16])
    h = b.op("MatMul", [x, b.weight("w1", [16, 16])], name="mm1")
    h = b.op("Add", [h, x], name="residual")  # not a constant bias: stays an Add
    b.op("MatMul", [h, b.weight("w2", [16, 8])], name="mm2", output="y")
    m = to_ir(b.build(["y"]))
    quantize_model(m, QuantizeConfig(quant_format="operator", exclude=("mm2",)),
                   _batches((5, 16)))
    fused = [n for n in m.graph if n.op_type == "MatMulIntegerToFloat"]
    assert len(fused) == 1 and len(fused[0].inputs) == 6  # no bias input
    assert [n.name for n in m.graph if n.op_type == "MatMul"] == ["mm2"]  # excluded: float
    assert [n.name for n in m.graph if n.op_type == "Add"] == ["residual"]


def test_residual_layernorm_is_not_left_to_fuse_into_skip_layernorm() -> None:
    """onnxruntime fuses Add + LayerNormalization into SkipLayerNormalization (6x slower on
    CPU); the quantized graph writes the residual as Sum, which it does not fuse."""
    b = GraphBuilder(seed=3)
    x = b.input("x", ["batch", "seq", 16])
    h = b.op("MatMul", [x, b.weight("w1", [16, 16])], name="mm1")
    h = b.op("Add", [h, b.const("b1", np.zeros(16))], name="bias1")
    h = b.op("Add", [h, x], name="residual")
    h = b.op("LayerNormalization", [h, b.const("g", np.ones(16)), b.const("beta", np.zeros(16))],
             name="ln", axis=-1)
    b.op("MatMul", [h, b.weight("w2", [16, 8])], name="mm2", output="y")
    model = b.build(["y"], infer_shapes=True)
    assert ort_optimized_ops(model)["SkipLayerNormalization"] == 1  # the exporter's form
    for fmt in ("qdq", "operator"):
        m = to_ir(model)
        quantize_model(m, QuantizeConfig(quant_format=fmt), _batches((3, 5, 16)))  # type: ignore[arg-type]
        ops = ort_optimized_ops(m)
        assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] == 1, fmt
        assert [n.name for n in m.graph if n.op_type == "Sum"] == ["residual_Sum"]
        feeds = {"x": random_input([3, 5, 16], seed=4)}
        assert sqnr_db(run(model, feeds)[0], run(m, feeds)[0]) > 25
