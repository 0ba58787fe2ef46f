"""Sessions and checks on a model whose big weights travel apart from the graph.

The graph goes to onnxruntime and onnx.checker without its weights over DETACH_MIN_BYTES;
the weights are shared as arrays (memory-mapped from the data file, or the arrays passes
wrote). These tests pin what that must keep: the same outputs as the inline model, no copy
of a memory-mapped weight, a loud failure (never zeros) when a weight is not handed over,
and the checker still catching a broken graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import mlp_model, random_input, replace_weight, run, save

from onnxprune.errors import OnnxPruneError
from onnxprune.io.detached import DETACH_MIN_BYTES, PLACEHOLDER, check_detached
from onnxprune.io.models import load_model, model_bytes
from onnxprune.io.runtime import make_session
from onnxprune.recipe.pipeline import check_written

X = random_input([5, 32], seed=4)


@pytest.fixture
def model() -> onnx.ModelProto:
    return mlp_model([32, 64, 16], seed=7)  # weights of 8 KiB and 4 KiB, biases < 1 KiB


def _external(tmp_path: Path, model: onnx.ModelProto) -> ir.Model:
    folder = tmp_path / "ext"
    folder.mkdir()
    return load_model(save(model, folder / "m.onnx", external_data=True))


def test_big_weights_leave_the_message_and_small_ones_stay(model: onnx.ModelProto) -> None:
    m = ir.serde.deserialize_model(model)
    data = model_bytes(m)
    proto = onnx.ModelProto.FromString(data)
    big = {t.name for t in model.graph.initializer
           if np.prod(t.dims) * 4 >= DETACH_MIN_BYTES}
    assert big and set(data.weights) == big
    for t in proto.graph.initializer:
        if t.name in big:
            assert t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data
            assert {e.key: e.value for e in t.external_data}["location"] == PLACEHOLDER
        else:
            assert t.data_location == onnx.TensorProto.DEFAULT
    assert len(data) < model.ByteSize() - sum(a.nbytes for a in data.weights.values()) + 2048
    np.testing.assert_array_equal(make_session(m).run(None, {"x": X})[0],
                                  run(model, {"x": X})[0])
    for value in m.graph.initializers.values():  # the model is left as it was
        assert not isinstance(value.const_value, ir.ExternalTensor)


def test_memory_mapped_weights_are_shared_not_copied(tmp_path: Path,
                                                     model: onnx.ModelProto) -> None:
    m = _external(tmp_path, model)
    data = model_bytes(m)
    for name, arr in data.weights.items():
        mapped = m.graph.initializers[name].const_value
        assert isinstance(mapped, ir.ExternalTensor)
        assert np.shares_memory(arr, mapped.numpy()), name  # a view of onnx_ir's map
    session = make_session(m)
    np.testing.assert_array_equal(session.run(None, {"x": X})[0], run(model, {"x": X})[0])


def test_changed_weights_are_used_by_the_session(tmp_path: Path,
                                                 model: onnx.ModelProto) -> None:
    m = _external(tmp_path, model)
    name = next(n for n, v in m.graph.initializers.items() if v.const_value.nbytes >= 4096)
    new = np.zeros(m.graph.initializers[name].const_value.shape.numpy(), np.float32)
    m.graph.initializers[name].const_value = ir.tensor(new, name=name)
    expected = run(replace_weight(model, name, new), {"x": X})[0]
    got = make_session(m).run(None, {"x": X})[0]
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, run(model, {"x": X})[0])


def test_a_weight_not_handed_over_fails_loudly(model: onnx.ModelProto) -> None:
    data = model_bytes(ir.serde.deserialize_model(model))
    data.weights = dict(list(data.weights.items())[1:])  # one placeholder left unfilled
    with pytest.raises(OnnxPruneError, match="onnxruntime cannot load"):
        make_session(data)


def test_the_checker_still_sees_the_graph(model: onnx.ModelProto) -> None:
    m = ir.serde.deserialize_model(model)
    check_written(m)
    relu = next(n for n in m.graph if n.op_type == "Relu")
    relu.outputs[0].dtype = ir.DataType.INT64  # a type the checker's inference refutes
    with pytest.raises(OnnxPruneError, match="onnx.checker"):
        check_written(m)


def test_a_weight_whose_array_contradicts_its_dims_is_refused(model: onnx.ModelProto) -> None:
    data = model_bytes(ir.serde.deserialize_model(model))
    name = next(iter(data.weights))
    wrong = dict(data.weights)
    wrong[name] = wrong[name].reshape(-1)
    with pytest.raises(ValueError, match=name):
        check_detached(data, wrong)


def test_stored_bytes_count_the_external_data(tmp_path: Path, model: onnx.ModelProto) -> None:
    from onnxprune.io.models import stored_bytes

    _external(tmp_path, model)
    onnx_file, data_file = tmp_path / "ext" / "m.onnx", tmp_path / "ext" / "m.onnx.data"
    assert stored_bytes(onnx_file) == onnx_file.stat().st_size + data_file.stat().st_size
    inline = save(model, tmp_path / "inline.onnx")
    assert stored_bytes(inline) == inline.stat().st_size


def test_weights_an_optimizer_reads_are_copied_in_and_still_right(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """onnxruntime's Conv+BatchNormalization fusion reads the Conv weight from the graph:
    the shared attempt fails on the empty placeholder, the copy-in attempt gives the same
    outputs as the inline model."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)  # 4.6 KB: detached
    bn = [np.abs(rng.standard_normal(16)).astype(np.float32) + 0.5 for _ in range(4)]
    names = ["scale", "bias", "mean", "var"]
    inits = [numpy_helper.from_array(w, "w")] + [
        numpy_helper.from_array(a, n) for a, n in zip(bn, names, strict=True)]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", *names], ["y"])],
        "convbn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((1, 8, 6, 6)).astype(np.float32)
    m = ir.serde.deserialize_model(proto)
    assert set(model_bytes(m).weights) == {"w"}
    with caplog.at_level("DEBUG", logger="onnxprune.io.runtime"):
        session = make_session(m)
    assert "shared weights refused" in caplog.text  # the copy-in path was taken
    np.testing.assert_allclose(session.run(None, {"x": x})[0], run(proto, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)
