"""8-bit QDQ quantization: scales, axes, calibration, refusals, and onnxruntime's kernels."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import (
    BATCH,
    DIGITS,
    DIGITS_CALIB,
    GraphBuilder,
    chain_model,
    digits_accuracy,
    make_model,
    mlp_model,
    ort_optimized_ops,
    random_input,
    run,
    save,
    single_matmul_model,
    to_ir,
    value_info,
)
from onnx import TensorProto, helper, numpy_helper
from onnx_ir.passes import PreconditionError

from onnxprune.errors import InputError, UnsupportedModelError
from onnxprune.io.models import load_model
from onnxprune.quant.canonical_gelu import CanonicalGeluPass
from onnxprune.quant.config import QuantizeConfig
from onnxprune.quant.driver import quantize_model
from onnxprune.quant.layers import find_layers
from onnxprune.quant.qdq_pass import QuantizeQDQPass
from onnxprune.quant.qerror import (
    activation_qparams,
    fake_quant,
    quantize_weight,
    sqnr_db,
)
from onnxprune.quant.ranges import RangeCollector, kl_threshold

PLAIN = QuantizeConfig(method="minmax", smooth=None, search_clip=False)


def _batches(shape: tuple[int, ...], n: int = 4, *, name: str = "x", seed: int = 0,
             scale: np.ndarray | float = 1.0) -> list[dict[str, np.ndarray]]:
    return [{name: random_input(shape, seed=seed + i) * np.float32(scale)} for i in range(n)]


def _nodes(model: ir.Model, op: str) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == op]


def _init(model: ir.Model, name: str) -> np.ndarray:
    value = model.graph.initializers[name]
    assert value.const_value is not None
    return value.const_value.numpy()


def _weight_dq(model: ir.Model, weight: str) -> ir.Node:
    """The DequantizeLinear reading `weight`'s int8 copy."""
    for node in _nodes(model, "DequantizeLinear"):
        if node.inputs[0] is not None and node.inputs[0].name == f"{weight}_quantized":
            return node
    raise AssertionError(f"no DequantizeLinear for {weight}")


def _sqnr_vs_float(original: onnx.ModelProto, quantized: ir.Model, feeds: dict) -> float:
    return sqnr_db(run(original, feeds)[0], run(quantized, feeds)[0])


# ------------------------------------------------------------------ arithmetic


def test_weight_scales_are_symmetric_per_output_channel() -> None:
    w = np.array([[1.0, -0.5], [-2.54, 0.25], [0.0, 0.1]], np.float32)  # [in, out]
    q, scale = quantize_weight(w, axis=1)
    np.testing.assert_allclose(scale, [2.54 / 127, 0.5 / 127], rtol=1e-6)
    assert q.dtype == np.int8 and q[1, 0] == -127 and q[0, 1] == -127
    q0, scale0 = quantize_weight(w, axis=0)
    np.testing.assert_allclose(scale0, [1 / 127, 2.54 / 127, 0.1 / 127], rtol=1e-6)
    assert q0.shape == w.shape
    _, zero = quantize_weight(np.zeros((2, 3), np.float32), axis=1)
    assert np.all(zero == 1.0)  # an all-zero channel gets a harmless scale, not 0/0


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_activation_zero_point_maps_zero_exactly(dtype: str) -> None:
    scale, zp = activation_qparams(-0.17, 3.0, dtype)  # type: ignore[arg-type]
    assert scale == pytest.approx(3.17 / 255, rel=1e-6)
    qmin = 0 if dtype == "uint8" else -128
    assert zp == qmin + round(0.17 / scale)
    x = np.array([0.0, -0.17, 3.0, 10.0], np.float32)
    y = fake_quant(x, scale, zp, dtype)  # type: ignore[arg-type]
    assert y[0] == 0.0 and y[3] == pytest.approx(3.0, abs=scale)  # clipped at the top
    # A range that does not hold 0 is widened to hold it.
    assert activation_qparams(1.0, 2.0, "uint8") == (pytest.approx(2 / 255), 0)


# ------------------------------------------------------------------ ranges


def test_streaming_histogram_percentiles_match_numpy_on_ragged_batches() -> None:
    rng = np.random.default_rng(0)
    collector = RangeCollector("t", sample_rows=64)
    parts = []
    for i, seq in enumerate([3, 90, 5, 400]):  # the range grows, the histogram rebins
        x = (rng.standard_normal((2, seq, 8)) * (1 + 3 * i)).astype(np.float32)
        collector.add(x)
        parts.append(x.reshape(-1, 8))
    data = np.concatenate(parts)
    assert collector.minmax() == (float(data.min()), float(data.max()))
    assert collector.hist.sum() == data.size
    lo, hi = collector.percentile(99.0)
    width = 2 * collector.half_width / collector.hist.size
    # Bin edges, outward: within a bin of the empirical quantiles' neighbourhood.
    assert np.percentile(data, 98.9) - width <= hi <= np.percentile(data, 99.1) + width
    assert np.percentile(data, 0.9) - width <= lo <= np.percentile(data, 1.1) + width
    assert collector.sample.shape == (64, 8)
    np.testing.assert_array_equal(collector.channel_max, data.max(axis=0))


def test_entropy_threshold_clips_rare_outliers_but_not_a_uniform_range() -> None:
    rng = np.random.default_rng(1)
    x = np.abs(np.concatenate([rng.standard_normal(200_000), np.full(20, 50.0)]))
    hist, _ = np.histogram(x, bins=2048, range=(0, 50))
    assert 3.0 < kl_threshold(hist, 50.0) < 6.0  # the 20 outliers at 50 do not set the range
    flat, _ = np.histogram(rng.uniform(0, 1, 200_000), bins=2048, range=(0, 1))
    assert kl_threshold(flat, 1.0) > 0.9


@pytest.mark.parametrize(
    "value, why", [(-np.inf, "infinite"), (np.float32(-3.4e38), "mask constants"),
                   (-10000.0, "repeated large negative constant")],
)
def test_mask_values_never_define_a_range(value: float, why: str) -> None:
    collector = RangeCollector("scores")
    x = random_input([4, 6])
    x[:, -2:] = value
    collector.add(x)
    assert collector.bad is not None and why in collector.bad
    assert not collector.seen


# ------------------------------------------------------------------ per-channel axes


@pytest.mark.parametrize("gemm, trans_b, axis", [(False, False, 1), (True, False, 1),
                                                 (True, True, 0)])
def test_weight_axis_follows_the_output_channels(gemm: bool, trans_b: bool, axis: int) -> None:
    model = mlp_model([32, 24, 8], gemm=gemm, trans_b=trans_b, seed=3)
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    m = to_ir(model)
    report = quantize_model(m, PLAIN, _batches((8, 32)))
    for i in range(2):
        name = f"fc{i}.weight"
        dq = _weight_dq(m, name)
        assert dq.attributes["axis"].as_int() == axis
        q = _init(m, f"{name}_quantized")
        scale = _init(m, f"{name}_scale")
        assert q.dtype == np.int8
        np.testing.assert_allclose(scale, np.abs(original[name]).max(axis=1 - axis) / 127,
                                   rtol=1e-6)
        assert name not in m.graph.initializers  # no float copy left behind
    assert report.quantized == 2
    assert report.constant_bytes_after < 0.5 * report.constant_bytes_before
    assert _sqnr_vs_float(model, m, {"x": random_input([16, 32], seed=9)}) > 30


def test_activation_scale_and_zero_point_come_from_calibration() -> None:
    model = single_matmul_model(8, 4)
    batches = [{"x": np.linspace(-1.0, 3.0, 64, dtype=np.float32).reshape(8, 8)}]
    m = to_ir(model)
    report = quantize_model(m, PLAIN, batches)
    (q,) = _nodes(m, "QuantizeLinear")
    scale = float(q.inputs[1].const_value.numpy())  # type: ignore[union-attr]
    zp = int(q.inputs[2].const_value.numpy())  # type: ignore[union-attr]
    assert scale == pytest.approx(4.0 / 255, rel=1e-6) and zp == round(1.0 / scale)
    assert q.inputs[2].const_value.dtype == ir.DataType.UINT8  # type: ignore[union-attr]
    (layer,) = [r for r in report.layers if r.quantized]
    assert layer.activation_range == (-1.0, 3.0) and layer.range_choice == "minmax"


def test_conv_is_quantized_per_output_channel_with_a_quantized_output() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    model = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"], name="relu")],
        [value_info("x", [BATCH, 3, 6, 6])], [value_info("y", [BATCH, 4, 6, 6])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    m = to_ir(model)
    report = quantize_model(m, PLAIN, _batches((2, 3, 6, 6)))
    assert _weight_dq(m, "w").attributes["axis"].as_int() == 0
    bias = _init(m, "b_quantized")
    assert bias.dtype == np.int32  # QLinearConv wants an int32 bias at scale s_x * s_w
    assert len(_nodes(m, "QuantizeLinear")) == 2  # input and output
    assert report.layers[0].integer_kernel
    assert _sqnr_vs_float(model, m, {"x": random_input([2, 3, 6, 6], seed=7)}) > 25
    assert ort_optimized_ops(m)["QLinearConv"] == 1


# ------------------------------------------------------------------ onnxruntime kernels


def test_onnxruntime_turns_the_qdq_model_into_integer_kernels() -> None:
    """MatMul -> MatMulIntegerToFloat (or QLinearMatMul when a Quantize follows its Relu),
    Gemm with an int32 bias -> QGemm; no float MatMul/Gemm left."""
    b = GraphBuilder(seed=0)
    x = b.input("x", [BATCH, 4, 16])
    h = b.op("MatMul", [x, b.weight("w1", [16, 32])], name="mm1")
    h = b.op("Relu", [h], name="relu")
    h = b.op("MatMul", [h, b.weight("w2", [32, 8])], name="mm2")
    flat = b.op("Reshape", [h, b.const("shape", np.array([-1, 8], np.int64))], name="flat")
    w3 = b.weight("w3", [8, 8])
    b.op("Gemm", [flat, w3, b.const("b3", np.ones(8, np.float32))], name="gemm",
         output="y", transB=1)
    model = b.build(["y"])
    m = to_ir(model)
    report = quantize_model(m, QuantizeConfig(smooth=0.5), _batches((3, 4, 16)))
    # The smoothing of Relu's output is folded into mm1's columns: a Mul between Relu and
    # the Quantize would cost mm1 its integer kernel.
    assert "relu_out" in report.smoothing_folded
    ops = ort_optimized_ops(m)
    assert ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] == 2 and ops["QGemm"] == 1
    assert ops["MatMul"] == 0 and ops["Gemm"] == 0 and ops["FusedMatMul"] == 0


def test_weight_only_runs_float_matmuls_on_int8_storage() -> None:
    model = mlp_model([8, 16, 4], seed=1)
    m = to_ir(model)
    report = quantize_model(m, QuantizeConfig(weight_only=True), None)
    assert not _nodes(m, "QuantizeLinear")
    assert len(_nodes(m, "DequantizeLinear")) == 2
    assert report.quantized == 2 and all(r.activation is None for r in report.layers)
    assert _sqnr_vs_float(model, m, {"x": random_input([32, 8])}) > 35
    with pytest.raises(InputError, match="calibration data"):
        quantize_model(to_ir(model), QuantizeConfig(), None)


# ------------------------------------------------------------------ accuracy


def test_deep_mlp_output_stays_close_to_float() -> None:
    model = chain_model([16, 64, 64, 64, 8], ["Relu", "erf_gelu", "Tanh"], seq=5, seed=2)
    m = to_ir(model)
    quantize_model(m, QuantizeConfig(), _batches((4, 5, 16), n=6))
    assert _sqnr_vs_float(model, m, {"x": random_input([4, 5, 16], seed=99)}) > 25


def test_digits_accuracy_within_half_a_point(tmp_path) -> None:
    m = load_model(DIGITS)
    with np.load(DIGITS_CALIB) as f:
        batches = [{"pixels": f["pixels"]}]
    report = quantize_model(m, QuantizeConfig(), batches)
    out = tmp_path / "digits_int8.onnx"
    ir.save(m, out)
    assert report.quantized == 3 and all(r.integer_kernel for r in report.layers)
    assert abs(digits_accuracy(out) - digits_accuracy(DIGITS)) <= 0.005
    assert out.stat().st_size < 0.35 * DIGITS.stat().st_size
    json.dumps(report.to_dict())


def test_smoothing_moves_outlier_channels_into_the_weights() -> None:
    """Two input channels 50x larger than the rest: per-tensor 8 bits drown the others."""
    model = chain_model([16, 32, 8], ["Relu"], seed=4)
    scale = np.ones(16, np.float32)
    scale[[3, 11]] = 50.0
    batches = _batches((64, 16), scale=scale)
    feeds = {"x": random_input([64, 16], seed=50) * scale}
    plain, smooth = to_ir(model), to_ir(model)
    quantize_model(plain, QuantizeConfig(smooth=None), batches)
    report = quantize_model(smooth, QuantizeConfig(smooth="auto"), batches)
    assert report.layers[0].smoothed
    assert _sqnr_vs_float(model, smooth, feeds) > _sqnr_vs_float(model, plain, feeds) + 6


def test_smoothing_folds_into_a_layernorm_that_feeds_only_the_quantized_layers() -> None:
    b = GraphBuilder(seed=5)
    x = b.input("x", [BATCH, 16])
    gamma = np.ones(16, np.float32)
    gamma[[2, 9]] = 40.0
    ln = b.op("LayerNormalization", [x, b.const("gamma", gamma),
                                     b.const("beta", np.zeros(16, np.float32))], name="ln")
    q = b.op("MatMul", [ln, b.weight("wq", [16, 8])], name="q")
    k = b.op("MatMul", [ln, b.weight("wk", [16, 8])], name="k")
    b.op("Add", [q, k], name="sum", output="y")
    model = b.build(["y"])
    m = to_ir(model)
    report = quantize_model(m, QuantizeConfig(), _batches((32, 16)))
    assert report.smoothing_folded == ("ln_out",)
    assert not _nodes(m, "Mul")  # the division cost nothing at run time
    assert len(_nodes(m, "QuantizeLinear")) == 1  # Q, K share one quantizer
    assert _sqnr_vs_float(model, m, {"x": random_input([32, 16], seed=3)}) > 30


# ------------------------------------------------------------------ what stays float


def test_attention_style_activation_matmuls_stay_float_by_default() -> None:
    b = GraphBuilder(seed=0)
    x = b.input("x", [BATCH, 4, 8])
    q = b.op("MatMul", [x, b.weight("wq", [8, 8])], name="q")
    kt = b.op("Transpose", [x], name="kt", perm=[0, 2, 1])
    b.op("MatMul", [q, kt], name="scores", output="y")
    model = b.build(["y"])
    m = to_ir(model)
    report = quantize_model(m, QuantizeConfig(), _batches((2, 4, 8)))
    by_name = {r.node: r for r in report.layers}
    assert by_name["q"].quantized
    assert not by_name["scores"].quantized and "activations" in by_name["scores"].reason


@pytest.mark.parametrize("mask_value", [-np.inf, -3.4028235e38, -10000.0])
def test_tensors_with_mask_values_stay_float_and_are_reported(mask_value: float) -> None:
    b = GraphBuilder(seed=0)
    x = b.input("x", [BATCH, 8])
    keep = b.input("keep", [BATCH, 8], TensorProto.BOOL)
    masked = b.op("Where", [keep, x, b.const("neg", np.float32(mask_value))], name="mask")
    b.op("MatMul", [masked, b.weight("w", [8, 4])], name="mm", output="y")
    b.op("MatMul", [x, b.weight("w2", [8, 4])], name="mm2", output="z")
    m = to_ir(b.build(["y", "z"]))
    keep_arr = np.ones((6, 8), bool)
    keep_arr[:, 6:] = False
    batches = [{"x": random_input([6, 8], seed=i), "keep": keep_arr} for i in range(3)]
    report = quantize_model(m, QuantizeConfig(), batches)
    by_name = {r.node: r for r in report.layers}
    assert not by_name["mm"].quantized and "mask_out" in by_name["mm"].reason
    assert by_name["mm2"].quantized
    assert "mask_out" in dict(report.float_tensors)
    assert "w" in m.graph.initializers  # the float layer keeps its float weight


def test_float16_weights_are_declined_per_layer() -> None:
    b = GraphBuilder(seed=0)
    x = b.input("x", [BATCH, 8], TensorProto.FLOAT16)
    b.op("MatMul", [x, b.const("w", np.ones((8, 4), np.float16))], name="mm", output="y")
    m = to_ir(b.build(["y"], output_types={"y": TensorProto.FLOAT16}))
    layers, declined = find_layers(m)
    assert not layers and "float16" in declined[0].reason and declined[0].node == "mm"


def test_exclude_globs_and_the_float_budget() -> None:
    model = mlp_model([8, 16, 16, 4], seed=2)
    m = to_ir(model)
    report = quantize_model(m, QuantizeConfig(exclude=("fc0",)), _batches((16, 8)))
    assert {r.node: r.reason for r in report.layers}["fc0"] == "matches --exclude"
    m = to_ir(model)
    cfg = QuantizeConfig(max_float_layers=1, min_sqnr_db=200.0)
    report = quantize_model(m, cfg, _batches((16, 8)))
    kept = [r for r in report.layers if not r.quantized]
    assert len(kept) == 1 and "sensitive" in kept[0].reason
    # The worst measured layer is the one kept.
    sqnr = {r.node: r.layer_sqnr_db for r in report.layers}
    assert sqnr[kept[0].node] == min(v for v in sqnr.values() if v is not None)


# ------------------------------------------------------------------ refusals and options


@pytest.mark.parametrize("op, domain", [("QuantizeLinear", ""), ("MatMulInteger", ""),
                                        ("MatMulNBits", "com.microsoft")])
def test_already_quantized_models_are_refused(op: str, domain: str) -> None:
    node = helper.make_node(op, ["x"], ["y"], name="already", domain=domain or None)
    graph = helper.make_graph([node], "g", [value_info("x", [2])], [value_info("y", [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(UnsupportedModelError, match="'already'.*already quantized"):
        quantize_model(to_ir(model), QuantizeConfig(weight_only=True), None)


def test_quantizing_twice_is_refused() -> None:
    m = to_ir(mlp_model([4, 4]))
    quantize_model(m, QuantizeConfig(), _batches((4, 4)))
    with pytest.raises(UnsupportedModelError, match="already quantized"):
        quantize_model(m, QuantizeConfig(), _batches((4, 4)))


@pytest.mark.parametrize("options, match", [
    ({"method": "kl"}, "calibration method"), ({"activation_dtype": "int4"}, "dtype"),
    ({"ops": ("Softmax",)}, "Softmax"), ({"smooth": 2.0}, "alpha"),
    ({"max_float_layers": -1}, "max_float_layers"), ({"percentile": 20.0}, "percentile"),
])
def test_bad_options_fail_with_the_option_named(options: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        QuantizeConfig(**options)


def test_token_mask_must_be_a_graph_input() -> None:
    with pytest.raises(InputError, match="token mask 'mask'"):
        quantize_model(to_ir(mlp_model([4, 4])), QuantizeConfig(token_mask="mask"),
                       _batches((4, 4)))


# ------------------------------------------------------------------ embeddings and GELU


@pytest.mark.parametrize("layout", ["gather-first", "dequantize-first"])
def test_embedding_tables_are_stored_int8(layout: str) -> None:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 8)).astype(np.float32) * rng.uniform(0.1, 3, (50, 1))
    b = GraphBuilder(seed=0)
    ids = b.input("ids", [BATCH, 3], TensorProto.INT64)
    emb = b.op("Gather", [b.const("table", table.astype(np.float32)), ids], name="emb")
    b.op("MatMul", [emb, b.weight("w", [8, 4])], name="mm", output="y")
    model = b.build(["y"])
    m = to_ir(model)
    batches = [{"ids": rng.integers(0, 50, (4, 3))} for _ in range(3)]
    quantize_model(m, QuantizeConfig(embedding_layout=layout), batches)  # type: ignore[arg-type]
    assert "table" not in m.graph.initializers
    assert _init(m, "table_quantized").dtype == np.int8
    feeds = {"ids": rng.integers(0, 50, (6, 3))}
    assert _sqnr_vs_float(model, m, feeds) > 25


def test_dynamo_gelu_is_reordered_into_the_form_onnxruntime_fuses() -> None:
    """torch.onnx dynamo: x * (0.5 * (1 + erf(x / sqrt2))), which onnxruntime leaves unfused."""
    b = GraphBuilder(seed=0)
    x = b.input("x", [BATCH, 16])
    h = b.op("MatMul", [x, b.weight("w", [16, 16])], name="mm")
    h = b.op("Add", [h, b.const("bias", np.zeros(16, np.float32))], name="bias")
    d = b.op("Div", [h, b.const("sqrt2", np.float32(np.sqrt(2.0)))], name="div")
    e = b.op("Erf", [d], name="erf")
    a = b.op("Add", [e, b.const("one", np.float32(1.0))], name="add")
    half = b.op("Mul", [b.const("half", np.float32(0.5)), a], name="half")
    b.op("Mul", [h, half], name="gelu", output="y")
    model = b.build(["y"])
    m = to_ir(model)
    assert ort_optimized_ops(m)["Erf"] == 1  # not fused as exported
    gelu = CanonicalGeluPass()
    assert gelu(m).modified and gelu.result.rewritten == ("gelu",)
    feeds = {"x": random_input([8, 16])}
    np.testing.assert_allclose(run(m, feeds)[0], run(model, feeds)[0], rtol=1e-6, atol=1e-6)
    ops = ort_optimized_ops(m)
    assert ops["Erf"] == 0 and ops["BiasGelu"] + ops["Gelu"] == 1
    assert not CanonicalGeluPass()(m).modified  # the legacy form is left as it is


def test_the_pass_alone_needs_opset_13_and_quantize_model_converts() -> None:
    model = mlp_model([4, 4])
    model.opset_import[0].version = 12
    with pytest.raises(PreconditionError) as info:
        QuantizeQDQPass(weight_only=True)(to_ir(model))
    assert isinstance(info.value.__cause__, UnsupportedModelError)
    assert "opset 12" in str(info.value.__cause__)
    # quantize_model converts the model with onnx's version converter instead of refusing.
    m = to_ir(model)
    report = quantize_model(m, QuantizeConfig(weight_only=True), None)
    assert m.opset_imports[""] == 13 and report.quantized == 1 and report.kept_float == 0


def test_report_is_json_and_names_every_candidate(tmp_path) -> None:
    path = save(mlp_model([4, 8, 2], seed=0), tmp_path / "m.onnx")
    m = load_model(path)
    report = quantize_model(m, QuantizeConfig(), _batches((4, 4)))
    d = json.loads(json.dumps(report.to_dict()))
    assert d["quantized_layers"] == 2 and d["calibration_batches"] == 4
    layer = d["layers"][0]
    assert {"weight_scale", "activation_scale", "layer_sqnr_db", "range_choice"} <= set(layer)


def test_activation_matmuls_can_be_quantized_on_request() -> None:
    b = GraphBuilder(seed=0)
    x = b.input("x", [BATCH, 4, 8])
    kt = b.op("Transpose", [x], name="kt", perm=[0, 2, 1])
    b.op("MatMul", [x, kt], name="scores", output="y")
    model = b.build(["y"])
    m = to_ir(model)
    report = quantize_model(m, QuantizeConfig(activation_matmuls=True), _batches((2, 4, 8)))
    (layer,) = report.layers
    assert layer.quantized and layer.weight is None
    assert len(_nodes(m, "QuantizeLinear")) == 2  # x and its transpose
    assert ort_optimized_ops(m)["MatMul"] == 0
    assert _sqnr_vs_float(model, m, {"x": random_input([2, 4, 8], seed=5)}) > 25


def test_weight_only_ignores_mask_tensors_and_measures_sqnr_with_data() -> None:
    b = GraphBuilder(seed=0)
    x = b.input("x", [BATCH, 8])
    keep = b.input("keep", [BATCH, 8], TensorProto.BOOL)
    masked = b.op("Where", [keep, x, b.const("neg", np.float32(-np.inf))], name="mask")
    b.op("MatMul", [masked, b.weight("w", [8, 4])], name="mm", output="y")
    m = to_ir(b.build(["y"]))
    keep_arr = np.ones((6, 8), bool)
    keep_arr[:, 6:] = False
    report = quantize_model(m, QuantizeConfig(weight_only=True),
                            [{"x": random_input([6, 8]), "keep": keep_arr}])
    assert report.layers[0].quantized  # float activations: the mask does no harm
    m2 = to_ir(mlp_model([8, 16, 4], seed=1))
    report = quantize_model(m2, QuantizeConfig(weight_only=True), _batches((8, 8)))
    assert all(r.layer_sqnr_db is not None and r.layer_sqnr_db > 30 for r in report.layers)
