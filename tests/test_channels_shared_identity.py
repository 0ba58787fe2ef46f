"""A weight shared between layers, directly and through Identity (the legacy exporter's
de-duplication, ALBERT's shared layers): declined with a reason, never copied or crashed."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import UnsupportedModelError, find_channel_groups, prune
from onnxprune.cli import main


def _shared(path_identity_first: bool) -> ir.Model:
    rng = np.random.default_rng(0)
    d, h = 8, 16
    inits = [numpy_helper.from_array(rng.normal(size=(d, h)).astype(np.float32), "w_up"),
             numpy_helper.from_array(rng.normal(size=(h, d)).astype(np.float32), "w_down")]
    nodes = []
    x = "x"
    for layer in range(2):
        up, down = "w_up", "w_down"
        if layer == 1 or path_identity_first:
            nodes += [helper.make_node("Identity", ["w_up"], [f"w_up_{layer}"],
                                       name=f"id_up{layer}"),
                      helper.make_node("Identity", ["w_down"], [f"w_down_{layer}"],
                                       name=f"id_down{layer}")]
            up, down = f"w_up_{layer}", f"w_down_{layer}"
        nodes += [helper.make_node("MatMul", [x, up], [f"h{layer}"], name=f"up{layer}"),
                  helper.make_node("Relu", [f"h{layer}"], [f"a{layer}"], name=f"relu{layer}"),
                  helper.make_node("MatMul", [f"a{layer}", down], [f"y{layer}"],
                                   name=f"down{layer}")]
        x = f"y{layer}"
    graph = helper.make_graph(
        nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", d])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(model)


@pytest.mark.parametrize("identity_first", [False, True])
def test_weight_shared_through_identity_is_declined_not_copied(identity_first: bool) -> None:
    model = _shared(identity_first)
    groups = [g for g in find_channel_groups(model) if g.size == 16]
    assert groups and all(not g.prunable for g in groups)
    assert all("shared" in (g.skip_reason or "") for g in groups), [g.skip_reason for g in groups]
    with pytest.raises(UnsupportedModelError, match="nothing prunable"):
        prune(model, sparsity=0.5)


def test_inspect_reports_the_shared_weight(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "m.onnx"
    ir.save(_shared(False), path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "shared" in out and "0 of" in out
