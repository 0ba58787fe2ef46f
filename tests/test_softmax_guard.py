"""The attention NaN guard (Softmax -> IsNaN -> Where) rewritten as one multiply: same bits."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import run, to_ir
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from onnxprune.attention.guard import softmax_guard_as_scale


def _guarded_attention(opset: int, layers: int = 2) -> onnx.ModelProto:
    """Two layers of masked attention as transformers exports it: the additive mask is
    Where(mask == 0, -inf, 0) [B, 1, 1, S], shared; each layer guards its probabilities."""
    inits = [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(-np.inf, np.float32), "ninf"),
             numpy_helper.from_array(np.array(0, np.int64), "izero"),
             numpy_helper.from_array(np.array(2.0, np.float32), "scale"),
             numpy_helper.from_array(np.array([1, 2], np.int64), "heads_axes")]
    nodes = [h.make_node("Equal", ["mask", "izero"], ["pad"]),
             h.make_node("Where", ["pad", "ninf", "zero"], ["add_mask2"]),
             h.make_node("Unsqueeze", ["add_mask2", "heads_axes"], ["add_mask"])]
    x = "x"
    for i in range(layers):
        nodes += [h.make_node("Transpose", [x], [f"kt{i}"], perm=[0, 1, 3, 2]),
                  h.make_node("MatMul", [x, f"kt{i}"], [f"qk{i}"]),
                  h.make_node("Div", [f"qk{i}", "scale"], [f"s{i}"]),
                  h.make_node("Add", [f"s{i}", "add_mask"], [f"m{i}"]),
                  h.make_node("Softmax", [f"m{i}"], [f"p{i}"], axis=-1),
                  h.make_node("IsNaN", [f"p{i}"], [f"nan{i}"]),
                  h.make_node("Where", [f"nan{i}", "zero", f"p{i}"], [f"g{i}"]),
                  h.make_node("MatMul", [f"g{i}", x], [f"y{i}"])]
        x = f"y{i}"
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["B", 2, 5, 4]),
                                      h.make_tensor_value_info("mask", T.INT64, ["B", 5])],
                         [h.make_tensor_value_info(x, T.FLOAT, ["B", 2, 5, 4])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("opset", [17, 18])
def test_guard_rewrite_is_bit_exact_with_an_all_padding_row(opset: int) -> None:
    model = _guarded_attention(opset)
    ir_model = to_ir(model)
    assert softmax_guard_as_scale(ir_model) == 2
    proto = ir.serde.serialize_model(ir_model)
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert "IsNaN" not in ops and ops.count("Max") == 1 and ops.count("ReduceMax") == 1
    rng = np.random.default_rng(0)
    mask = np.ones((3, 5), np.int64)
    mask[0] = 0            # every key of sentence 0 is padding: the guard's case
    mask[1, 3:] = 0
    feeds = {"x": rng.standard_normal((3, 2, 5, 4)).astype(np.float32), "mask": mask}
    before, after = run(model, feeds)[0], run(proto, feeds)[0]
    assert not np.isnan(before).any()
    assert np.array_equal(before, after)


def test_a_guard_it_does_not_recognise_is_left_alone() -> None:
    model = _guarded_attention(17, layers=1)
    where = next(n for n in model.graph.node if n.output == ["g0"])
    where.input[1] = "scale"  # NaN -> 2.0: not the guard
    ir_model = to_ir(model)
    assert softmax_guard_as_scale(ir_model) == 0


def test_an_additive_mask_given_as_a_graph_input_is_clamped_before_its_first_reader() -> None:
    model = _guarded_attention(17, layers=1)
    graph = model.graph
    for name in ("pad", "add_mask2", "add_mask"):  # the mask arrives ready-made
        graph.node.remove(next(n for n in graph.node if n.output == [name]))
    graph.input.append(h.make_tensor_value_info("add_mask", T.FLOAT, ["B", 1, 1, 5]))
    ir_model = to_ir(model)
    assert softmax_guard_as_scale(ir_model) == 1
    proto = ir.serde.serialize_model(ir_model)
    onnx.checker.check_model(proto, full_check=True)
    add_mask = np.zeros((2, 1, 1, 5), np.float32)
    add_mask[0] = -np.inf  # all keys masked
    add_mask[1, ..., 3:] = -np.inf
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 2, 5, 4)).astype(np.float32),
             "mask": np.ones((2, 5), np.int64), "add_mask": add_mask}
    assert np.array_equal(run(model, feeds)[0], run(proto, feeds)[0])
