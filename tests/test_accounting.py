"""FLOPs per run: what the report and inspect count for a model at given input shapes."""

from __future__ import annotations

import numpy as np
from helpers import to_ir
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from onnxprune.core.accounting import fixed_input_shapes, inference_flops


def _attention_like():
    """x [B, S, 8] @ W [8, 8] -> q; q @ k^T with k = x (an activation product) -> [B, S, S];
    then a Gemm on a flattened row and an LSTM-free Conv-free graph."""
    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "w")
    nodes = [h.make_node("MatMul", ["x", "w"], ["q"]),
             h.make_node("Transpose", ["x"], ["kt"], perm=[0, 2, 1]),
             h.make_node("MatMul", ["q", "kt"], ["scores"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["B", 5, 8])],
                         [h.make_tensor_value_info("scores", T.FLOAT, ["B", 5, 5])], [w])
    return to_ir(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))


def test_matmul_of_two_activations_counts_like_a_weight_matmul() -> None:
    model = _attention_like()
    weight = 2 * 3 * 5 * 8 * 8     # [3, 5, 8] @ [8, 8]
    scores = 2 * 3 * 5 * 5 * 8     # [3, 5, 8] @ [3, 8, 5]
    assert inference_flops(model, {"x": [3, 5, 8]}) == weight + scores
    assert inference_flops(model, {"x": [3, 5, 8]}, ops=("Conv",)) == 0


def test_fixed_input_shapes_count_a_free_batch_as_one_and_refuse_other_free_dims() -> None:
    assert fixed_input_shapes(_attention_like()) == {"x": [1, 5, 8]}
    graph = h.make_graph([h.make_node("Identity", ["x"], ["y"])], "g",
                         [h.make_tensor_value_info("x", T.FLOAT, ["B", "S"])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["B", "S"])])
    assert fixed_input_shapes(to_ir(h.make_model(graph))) is None
