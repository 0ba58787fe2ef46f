"""int8 for CNNs: opset 11/12 models are converted, Conv biases behind Identity are read as
constants, BatchNormalization is folded, and onnxruntime fuses the result into QLinearConv."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import GraphBuilder, run, to_ir

from onnxprune.quant.config import QuantizeConfig
from onnxprune.quant.driver import quantize_model


def _cnn(opset: int) -> onnx.ModelProto:
    """conv(bias via Identity) -> BN -> relu -> conv(bias via the same Identity'd tensor)
    -> 1x1 conv."""
    b = GraphBuilder(seed=1)
    rng = np.random.default_rng(1)
    x = b.input("x", [1, 3, 12, 12])
    bias = b.const("shared_bias", rng.uniform(-0.2, 0.2, 8).astype(np.float32))
    b1 = b.op("Identity", [bias], name="id1")
    b2 = b.op("Identity", [bias], name="id2")
    h = b.op("Conv", [x, b.const("w1", (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(
        np.float32)), b1], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    vec = [b.const(n, rng.uniform(lo, hi, 8).astype(np.float32))
           for n, lo, hi in (("g", 0.5, 1.5), ("be", -0.3, 0.3), ("mu", -0.3, 0.3),
                             ("va", 0.5, 1.5))]
    h = b.op("Relu", [b.op("BatchNormalization", [h, *vec], name="bn")])
    h = b.op("Conv", [h, b.const("w2", (rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(
        np.float32)), b2], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    # The last Conv writes the float output, so onnxruntime leaves it DQ -> Conv.
    b.op("Conv", [h, b.const("w3", (rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(
        np.float32))], name="conv3", kernel_shape=[1, 1], output="y")
    return b.build(["y"], opset=opset)


def _optimized_ops(proto: onnx.ModelProto) -> Counter:
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.optimized_model_filepath = os.path.join(d, "opt.onnx")
        ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def test_opset_12_cnn_with_identity_biases_quantizes_to_qlinearconv() -> None:
    model = _cnn(12)
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(8)]
    m = to_ir(model)
    report = quantize_model(m, QuantizeConfig(), batches)
    assert report.quantized == 3 and report.kept_float == 0, report.to_dict()["layers"]
    assert m.opset_imports[""] == 13
    proto = ir.serde.serialize_model(m)
    onnx.checker.check_model(proto, full_check=True)
    ops = _optimized_ops(proto)
    assert ops["QLinearConv"] == 2, ops
    feeds = {"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)}
    ref, out = run(model, feeds)[0], run(proto, feeds)[0]
    cos = float((ref * out).sum() / np.linalg.norm(ref) / np.linalg.norm(out))
    assert cos > 0.99, cos


def test_opset_12_model_with_external_data_quantizes_from_another_folder(
    tmp_path, monkeypatch  # type: ignore[no-untyped-def]
) -> None:
    """The opset conversion keeps external weights pointing at the model's folder: run from
    elsewhere (cwd without the data file), quantize succeeds and the output loads."""
    from onnxprune.cli import main

    folder = tmp_path / "model"
    folder.mkdir()
    ir.save(to_ir(_cnn(12)), folder / "m.onnx", external_data="m.onnx.data")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((1, 3, 12, 12)).astype(np.float32))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["quantize", str(folder / "m.onnx"), "-o", str(tmp_path / "q.onnx"),
                 "--calibration", str(tmp_path / "calib.npz"), "--min-cosine", "0.9"]) == 0
    ort.InferenceSession(str(tmp_path / "q.onnx"))


def test_a_flops_target_on_a_cnn_is_refused_with_what_to_use(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--target flops= prices MatMul/Gemm FLOPs only; on a model whose cost is convolutions
    it would aim at the wrong quantity, so it is refused (exit 2) with the alternatives."""
    from onnxprune.cli import main

    src = tmp_path / "cnn.onnx"
    onnx.save(_cnn(13), src)
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(4):
        np.savez(calib / f"c{i}.npz", x=rng.standard_normal((1, 3, 12, 12)).astype(np.float32))
    code = main([str(src), "-o", str(tmp_path / "o.onnx"), "--target", "flops=0.75",
                 "--calibration", str(calib)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--target flops counts MatMul/Gemm FLOPs" in err and "--target params=F" in err
    assert not (tmp_path / "o.onnx").exists()
