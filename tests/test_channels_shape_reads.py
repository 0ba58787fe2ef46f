"""Channel groups whose channel count is read at run time by a Shape op, the way the legacy
torch exporter writes GPT-2's Conv1D (`Reshape(x, Concat([-1], Shape(x)[-1:]))`) and Phi-3's
`chunk(2, dim=-1)` of the packed `gate_up_proj` (Slice bounds `Shape(x)[-1] // 2`). Each case
removes channels whose outgoing weights are zero and checks agreement to 1e-5 with onnxruntime
(at a batch size the model was not built for, so run-time shapes are really recomputed);
the declines show a channel count used where it would go wrong."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import GraphBuilder, remove_silent_channels, to_ir

from onnxprune.channels.groups import find_channel_groups
from onnxprune.channels.model import ChannelGroup
from onnxprune.core.shape_exprs import elements, fold
from onnxprune.core.weights import const_array

K, F, N = 6, 8, 5
I64 = np.int64


def _group(model: onnx.ModelProto, name: str) -> ChannelGroup:
    return next(g for g in find_channel_groups(to_ir(model)) if g.name == name)


def _exact(model: onnx.ModelProto, name: str) -> tuple[ChannelGroup, onnx.ModelProto]:
    feeds = [{"x": np.random.default_rng(s).standard_normal((b, 4, K)).astype(np.float32)}
             for s, b in ((0, 3), (1, 2))]
    g, proto = remove_silent_channels(model, name, feeds)
    return g, proto  # type: ignore[return-value]


def _last_dim(b: GraphBuilder, x: str, tag: str) -> str:
    """Shape(x)[-1:] as the legacy exporter spells it: Slice -> Squeeze -> Unsqueeze."""
    last = b.op("Slice", [b.op("Shape", [x], name=f"{tag}.shape_last"),
                          b.const(f"{tag}.m1", np.array([-1], I64), as_node=True),
                          b.const(f"{tag}.big", np.array([2**62], I64), as_node=True),
                          b.const(f"{tag}.a0", np.array([0], I64), as_node=True)])
    scalar = b.op("Squeeze", [last, b.const(f"{tag}.sq", np.array([0], I64))])
    return b.op("Unsqueeze", [scalar, b.const(f"{tag}.usq", np.array([0], I64))])


def _lead(b: GraphBuilder, x: str, tag: str, axis: int) -> str:
    g = b.op("Gather", [b.op("Shape", [x], name=f"{tag}.shape{axis}"),
                        b.const(f"{tag}.i{axis}", np.array(axis, I64), as_node=True)], axis=0)
    return b.op("Unsqueeze", [g, b.const(f"{tag}.u{axis}", np.array([0], I64))])


def _conv1d(b: GraphBuilder, x: str, k: int, n: int, name: str, *, count_of: str | None = None
            ) -> str:
    """GPT-2's Conv1D, legacy export: flatten with the input's own run-time channel count,
    Gemm, reshape back to [batch, seq, n] with the batch and sequence read at run time."""
    target = b.op("Concat", [b.const(f"{name}.flat_m1", np.array([-1], I64), as_node=True),
                             _last_dim(b, count_of or x, name)], axis=0)
    flat = b.op("Reshape", [x, target], name=f"{name}.flat")
    y = b.op("Gemm", [flat, b.weight(f"{name}.w", [k, n]),
                      b.const(f"{name}.b", np.linspace(-1, 1, n).astype(np.float32))], name=name)
    back = b.op("Concat", [_lead(b, x, name, 0), _lead(b, x, name, 1),
                           b.const(f"{name}.n", np.array([n], I64), as_node=True)], axis=0)
    return b.op("Reshape", [y, back], name=f"{name}.back")


def _gpt2_mlp(*, count_of_other: bool = False) -> onnx.ModelProto:
    b = GraphBuilder(seed=5)
    x = b.input("x", ["batch", 4, K])
    h = b.op("Tanh", [_conv1d(b, x, K, F, "c_fc")])
    other = b.op("Relu", [h]) if count_of_other else None
    out = _conv1d(b, h, F, N, "c_proj", count_of=other)
    outputs = ["y"]
    b.op("Identity", [out], output="y")
    if other is not None:
        b.op("Identity", [b.op("ReduceSum", [other, b.const("ax", np.array([-1], I64))],
                               keepdims=1)], output="z")
        outputs.append("z")
    return b.build(outputs)


def _phi3_mlp(*, expand: bool = False) -> onnx.ModelProto:
    """Phi-3's MLP, legacy export: the packed gate_up output is cut in two halves at
    Shape(h)[-1] // 2 (computed as (n + 1) / 2 at run time)."""
    b = GraphBuilder(seed=6)
    x = b.input("x", ["batch", 4, K])
    h = b.op("MatMul", [x, b.weight("gate_up", [K, 2 * F])], name="gate_up_proj")
    n = b.op("Gather", [b.op("Shape", [h], name="shape_h"),
                        b.const("m1", np.array([-1], I64), as_node=True)], axis=0)
    half = b.op("Div", [b.op("Add", [n, b.const("one", np.array([1], I64))]),
                        b.const("two", np.array([2], I64))])
    ax = b.const("axis", np.array([-1], I64))
    gate = b.op("Slice", [h, b.const("zero", np.array([0], I64)),
                          b.op("Mul", [half, b.const("k1", np.array([1], I64))]), ax], name="gate")
    up = b.op("Slice", [h, b.op("Mul", [half, b.const("k1b", np.array([1], I64))]),
                        b.op("Mul", [half, b.const("k2", np.array([2], I64))]), ax], name="up")
    act = b.op("Mul", [gate, b.op("Sigmoid", [gate])])
    y = b.op("MatMul", [b.op("Mul", [act, up]), b.weight("down", [F, N])], name="down_proj")
    if expand:  # the channel count also shapes a tensor the group does not own
        y = b.op("Add", [y, b.op("ReduceMean", [b.op("Expand", [
            b.const("zeros", np.zeros(1, np.float32)),
            b.op("Concat", [b.const("one4", np.array([1, 1], I64)), n], axis=0)])],
            keepdims=1, axes=[-1])])
    b.op("Identity", [y], output="y")
    return b.build(["y"])


def test_gpt2_conv1d_flattened_with_its_own_run_time_channel_count() -> None:
    g, proto = _exact(_gpt2_mlp(), "c_fc")
    assert [u.node.name for u in g.consumers] == ["c_proj"]
    assert g.size == F - 2
    # the reshape-back target of c_fc now spells the kept count
    counts = [int(numpy_value.reshape(-1)[0]) for numpy_value in
              (onnx.numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node
               if n.op_type == "Constant" and n.output[0].startswith("c_fc.n"))]
    assert counts == [F - 2]


def test_packed_gate_up_cut_at_half_of_its_run_time_width() -> None:
    g, proto = _exact(_phi3_mlp(), "gate_up_proj")
    assert g.size == F - 2
    assert g.channel_map(g.producers[0], "out").tolist() == list(range(F)) * 2
    # each Slice reads bounds of its own, written for the pruned width
    m = to_ir(proto)
    bounds = {n.name: [int(const_array(v).reshape(-1)[0]) for v in n.inputs[1:3]]  # type: ignore[union-attr]
              for n in m.graph if n.op_type == "Slice" and n.name in ("gate", "up")}
    assert bounds == {"gate": [0, F - 2], "up": [F - 2, 2 * (F - 2)]}


def test_channel_count_of_another_tensor_in_a_reshape_is_declined() -> None:
    g = _group(_gpt2_mlp(count_of_other=True), "c_fc")
    assert not g.prunable
    assert "c_proj.flat" in (g.skip_reason or "")


def test_channel_count_shaping_a_tensor_outside_the_group_is_declined() -> None:
    g = _group(_phi3_mlp(expand=True), "gate_up_proj")
    assert not g.prunable
    assert "shape_h" in (g.skip_reason or "")


@pytest.mark.parametrize("batch", ["batch", 3])
def test_elements_know_which_dimension_each_entry_reads(batch: str | int) -> None:
    m = to_ir(_gpt2_mlp())
    target = next(n for n in m.graph if n.name == "c_proj.back").inputs[1]
    h = next(n for n in m.graph if n.name == "c_proj.shape0").inputs[0]
    dims = {h.name: [None if batch == "batch" else batch, 4, F]}  # type: ignore[union-attr]

    def dims_of(v: ir.Value) -> list[int | None] | None:
        return dims.get(v.name or "")

    expr = elements(target, dims_of)
    assert expr is not None and expr.ndim == 1
    assert [e.value for e in expr.elems] == [None if batch == "batch" else 3, 4, N]
    assert [e.exact[1] if e.exact else None for e in expr.elems] == [0, 1, None]
    folded = fold(target, dims_of)
    assert (folded is None) == (batch == "batch")
