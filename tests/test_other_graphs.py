"""Graphs that are not transformers: convolutions, recurrences, If/Loop subgraphs, opset 11-12.

What is prunable is pruned and the model still runs; what is not is reported with a reason;
a model with nothing prunable is refused without writing anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxprune.cli import main

RNG = np.random.default_rng(0)


def _init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return nh.from_array((RNG.standard_normal(shape) * 0.1).astype(np.float32), name)


def conv_if_loop_model(opset: int) -> onnx.ModelProto:
    """Conv -> Relu -> Flatten -> Gemm(transB) -> Relu -> Gemm -> If -> Loop (sums 3 times)."""
    then_g = h.make_graph(
        [h.make_node("Mul", ["z", "two"], ["t_out"])], "then", [],
        [h.make_tensor_value_info("t_out", T.FLOAT, ["N", 10])],
        [nh.from_array(np.array(2, np.float32), "two")],
    )
    else_g = h.make_graph(
        [h.make_node("Identity", ["z"], ["e_out"])], "else", [],
        [h.make_tensor_value_info("e_out", T.FLOAT, ["N", 10])],
    )
    body = h.make_graph(
        [h.make_node("Identity", ["cond_in"], ["cond_out"]),
         h.make_node("Add", ["acc_in", "y2"], ["acc_out"])],
        "body",
        [h.make_tensor_value_info("i", T.INT64, []),
         h.make_tensor_value_info("cond_in", T.BOOL, []),
         h.make_tensor_value_info("acc_in", T.FLOAT, ["N", 10])],
        [h.make_tensor_value_info("cond_out", T.BOOL, []),
         h.make_tensor_value_info("acc_out", T.FLOAT, ["N", 10])],
    )
    nodes = [
        h.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        h.make_node("Relu", ["c"], ["r"], name="relu0"),
        h.make_node("Flatten", ["r"], ["f"], name="flat"),
        h.make_node("Gemm", ["f", "w1", "b1"], ["g1"], transB=1, name="fc1"),
        h.make_node("Relu", ["g1"], ["y1"], name="relu1"),
        h.make_node("Gemm", ["y1", "w2", "b2"], ["z"], name="fc2"),
        h.make_node("If", ["flag"], ["y2"], then_branch=then_g, else_branch=else_g, name="if"),
        h.make_node("Mul", ["y2", "zero_f"], ["acc0"], name="zero_like"),
        h.make_node("Loop", ["trip", "", "acc0"], ["acc"], body=body, name="loop"),
    ]
    graph = h.make_graph(
        nodes, "convnet",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8]),
         h.make_tensor_value_info("flag", T.BOOL, [])],
        [h.make_tensor_value_info("acc", T.FLOAT, ["N", 10])],
        [_init("cw", (4, 3, 3, 3)), _init("cb", (4,)), _init("w1", (32, 256)), _init("b1", (32,)),
         _init("w2", (32, 10)), _init("b2", (10,)),
         nh.from_array(np.array(3, np.int64), "trip"),
         nh.from_array(np.array(0, np.float32), "zero_f")],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


def lstm_model() -> onnx.ModelProto:
    """LSTM over [seq, batch, 8] -> last hidden state -> Gemm -> Tanh -> Gemm (opset 12)."""
    hidden = 6
    nodes = [
        h.make_node("LSTM", ["x", "W", "R", "B"], ["", "h_n"], hidden_size=hidden, name="lstm"),
        h.make_node("Squeeze", ["h_n"], ["h"], axes=[0], name="squeeze"),
        h.make_node("Gemm", ["h", "w1", "b1"], ["g"], name="fc1"),
        h.make_node("Tanh", ["g"], ["t"], name="tanh"),
        h.make_node("Gemm", ["t", "w2"], ["y"], transB=1, name="fc2"),
    ]
    graph = h.make_graph(
        nodes, "lstm",
        [h.make_tensor_value_info("x", T.FLOAT, ["S", "N", 8])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 3])],
        [_init("W", (1, 4 * hidden, 8)), _init("R", (1, 4 * hidden, hidden)),
         _init("B", (1, 8 * hidden)), _init("w1", (hidden, 16)), _init("b1", (16,)),
         _init("w2", (3, 16))],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 12)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("opset", [11, 12, 13, 17])
def test_conv_with_subgraphs_prunes_what_it_can(opset: int, tmp_path: Path) -> None:
    src, out, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(conv_if_loop_model(opset), src)
    code = main([str(src), "-o", str(out), "--sparsity", "0.5", "--shape", "x:2,3,8,8",
                 "--min-cosine", "-1", "--report", str(rep), "-q"])
    assert code == 0
    groups = {g["group"]: g for g in json.loads(rep.read_text())["passes"]["RemoveNeuronsPass"]
              ["groups"]}
    assert (groups["fc1"]["channels_before"], groups["fc1"]["channels_after"]) == (32, 16)
    assert "subgraph" in groups["fc2"]["reason"]
    onnx.checker.check_model(str(out), full_check=True)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.ones((2, 3, 8, 8), np.float32), "flag": np.array(True)})[0]
    assert y.shape == (2, 10) and np.all(np.isfinite(y))


def test_recurrent_model_prunes_its_head(tmp_path: Path) -> None:
    src, out, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(lstm_model(), src)
    code = main([str(src), "-o", str(out), "--sparsity", "0.5", "--shape", "x:5,2,8",
                 "--report", str(rep), "-q"])
    assert code == 0
    groups = json.loads(rep.read_text())["passes"]["RemoveNeuronsPass"]["groups"]
    fc1 = next(g for g in groups if g["group"] == "fc1")
    assert (fc1["channels_before"], fc1["channels_after"]) == (16, 8)
    onnx.checker.check_model(str(out), full_check=True)


def test_conv_only_model_has_nothing_prunable(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                              ) -> None:
    graph = h.make_graph(
        [h.make_node("Conv", ["x", "cw"], ["y"], name="conv")], "c",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 4, 6, 6])],
        [_init("cw", (4, 3, 3, 3))],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 12)])
    model.ir_version = 7
    src = tmp_path / "conv.onnx"
    onnx.save(model, src)
    before = src.read_bytes()
    assert main([str(src), "-o", str(tmp_path / "o.onnx"), "--sparsity", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnxprune: error: nothing prunable") and len(err.splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists() and src.read_bytes() == before
