"""Channel groups through what exporters write around plain projections: packed projections
cut by Split/Slice, a Gemm on a flattened input reshaped back at run time (GPT-2's Conv1D),
constants behind Identity (de-duplicated by the legacy exporter), and one weight shared by
several layers (ALBERT). Each case removes channels whose outgoing weights are zero and
checks agreement to 1e-5 with onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
from helpers import GraphBuilder, remove_silent_channels, to_ir

from onnxprune.channels.groups import find_channel_groups
from onnxprune.channels.model import ChannelGroup
from onnxprune.channels.slicing import keep_many
from onnxprune.core.weights import const_array

K, F, N = 6, 8, 5


def _exact(model: onnx.ModelProto, name: str, feeds: dict[str, np.ndarray]) -> ChannelGroup:
    return remove_silent_channels(model, name, [feeds])[0]  # type: ignore[return-value]


def _feeds(shape: tuple[int, ...] = (3, 4, K)) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def _packed(cut: str) -> onnx.ModelProto:
    """x @ w_gate_up [K, 2F] -> cut in two -> silu(gate) * up -> @ w_down (Phi-3's MLP)."""
    b = GraphBuilder(seed=1)
    x = b.input("x", [3, 4, K])
    h = b.op("MatMul", [x, b.weight("gate_up", [K, 2 * F])], name="gate_up_proj")
    if cut == "split":
        gate, up = b.op_multi("Split", [h, b.const("sizes", np.array([F, F], np.int64))],
                              axis=-1, outputs=2, name="chunk")
    else:
        ax = b.const("ax", np.array([-1], np.int64))
        gate = b.op("Slice", [h, b.const("s0", np.array([0], np.int64)),
                              b.const("e0", np.array([F], np.int64)), ax], name="gate_slice")
        up = b.op("Slice", [h, b.const("s1", np.array([F], np.int64)),
                            b.const("e1", np.array([2**62], np.int64)), ax], name="up_slice")
    act = b.op("Mul", [gate, b.op("Sigmoid", [gate])])
    b.op("MatMul", [b.op("Mul", [act, up]), b.weight("down", [F, N])], name="down_proj",
         output="y")
    return b.build(["y"])


def test_packed_projection_cut_by_split_pairs_gate_and_up_channels() -> None:
    g = next(g for g in find_channel_groups(to_ir(_packed("split"))) if g.name == "gate_up_proj")
    assert g.size == F
    assert g.channel_map(g.producers[0], "out").tolist() == list(range(F)) * 2
    assert _exact(_packed("split"), "gate_up_proj", _feeds()).size == F - 2


def test_packed_projection_cut_by_slice() -> None:
    g = _exact(_packed("slice"), "gate_up_proj", _feeds())
    assert g.size == F - 2


def test_gemm_on_a_flattened_input_reshaped_back_at_run_time() -> None:
    """GPT-2 Conv1D (dynamo): Reshape(x, [-1, K]) -> Gemm -> Reshape(Concat(shape[:2], [F]))."""
    b = GraphBuilder(seed=2)
    x = b.input("x", [3, 4, K])
    lead = b.op("Slice", [b.op("Shape", [x], name="shape_x"),
                          b.const("z", np.array([0], np.int64)),
                          b.const("two", np.array([2], np.int64))], name="lead")

    def conv1d(inp: str, k: int, n: int, name: str) -> str:
        flat = b.op("Reshape", [inp, b.const(f"{name}.flat", np.array([-1, k], np.int64))])
        y = b.op("Gemm", [flat, b.weight(f"{name}.w", [k, n]),
                          b.const(f"{name}.b", np.linspace(-1, 1, n).astype(np.float32))],
                 name=name)
        target = b.op("Concat", [lead, b.const(f"{name}.n", np.array([n], np.int64))], axis=0)
        return b.op("Reshape", [y, target], name=f"{name}.back")

    h = b.op("Relu", [conv1d(x, K, F, "c_fc")])
    out = conv1d(h, F, N, "c_proj")
    b.op("Identity", [out], output="y")
    g = _exact(b.build(["y"]), "c_fc", _feeds())
    assert [u.node.name for u in g.consumers] == ["c_proj"]


def test_gemm_bias_behind_identity_gets_a_sliced_copy() -> None:
    """The legacy exporter de-duplicates equal biases: two Gemms read one tensor through
    Identity nodes; the pruned one gets its own copy, the other keeps the full width."""
    b = GraphBuilder(seed=3)
    x = b.input("x", [3, K])
    shared = b.const("bias", np.linspace(-1, 1, F).astype(np.float32))
    h = b.op("Gemm", [x, b.weight("w1", [K, F]), b.op("Identity", [shared], name="id_a")],
             name="fc1")
    y1 = b.op("MatMul", [b.op("Relu", [h]), b.weight("w2", [F, N])], name="fc2")
    other = b.op("Gemm", [x, b.weight("w3", [K, F]), b.op("Identity", [shared], name="id_b")],
                 name="other")
    b.op("Add", [y1, b.op("MatMul", [other, b.weight("w4", [F, N])], name="fc4")], output="y")
    model = b.build(["y"])
    _exact(model, "fc1", _feeds((3, K)))
    m = to_ir(model)
    g = next(g for g in find_channel_groups(m) if g.name == "fc1")
    keep_many(m.graph, [(g, np.arange(F - 2))])
    assert const_array(m.graph.initializers["bias"]).shape == (F,)  # type: ignore[union-attr]


def test_weight_shared_by_two_layers_is_pruned_for_both() -> None:
    """ALBERT: the same FFN weights in every layer; one group, consistent for all uses."""
    b = GraphBuilder(seed=4)
    x = b.input("x", [3, K])
    w_in, w_out = b.weight("ffn_in", [K, F]), b.weight("ffn_out", [F, K])
    h = x
    for layer in range(2):
        a = b.op("Relu", [b.op("MatMul", [h, w_in], name=f"in_{layer}")])
        h = b.op("LayerNormalization", [b.op("Add", [h, b.op("MatMul", [a, w_out],
                                                              name=f"out_{layer}")]),
                                        b.const(f"ln{layer}.g", np.ones(K, np.float32))],
                 axis=-1)
    b.op("Identity", [h], output="y")
    g = _exact(b.build(["y"]), "in_0", _feeds((3, K)))
    assert sorted(u.node.name for u in g.producers) == ["in_0", "in_1"]
    assert sorted(u.node.name for u in g.consumers) == ["out_0", "out_1"]


def test_run_time_shape_shared_by_several_layers_gets_a_copy_per_reshape() -> None:
    """The dynamo exporter builds one Concat shape and reads it in every layer's Reshape:
    pruning one layer gives its Reshape its own Concat, the other layers keep theirs."""
    b = GraphBuilder(seed=3)
    x = b.input("x", [3, 4, K])
    lead = b.op("Slice", [b.op("Shape", [x], name="shape_x"),
                          b.const("z", np.array([0], np.int64)),
                          b.const("two", np.array([2], np.int64))], name="lead")
    wide = b.op("Concat", [lead, b.const("f", np.array([F], np.int64))], axis=0, name="wide")
    narrow = b.op("Concat", [lead, b.const("k", np.array([K], np.int64))], axis=0,
                  name="narrow")
    h = x
    for layer in range(2):
        flat = b.op("Reshape", [h, b.const(f"flat{layer}", np.array([-1, K], np.int64))])
        up = b.op("Gemm", [flat, b.weight(f"up{layer}.w", [K, F])], name=f"up{layer}")
        act = b.op("Relu", [b.op("Reshape", [up, wide], name=f"up{layer}.back")])
        flat2 = b.op("Reshape", [act, b.const(f"flat2{layer}", np.array([-1, F], np.int64))])
        down = b.op("Gemm", [flat2, b.weight(f"down{layer}.w", [F, K])], name=f"down{layer}")
        h = b.op("Reshape", [down, narrow], name=f"down{layer}.back")
    b.op("Identity", [h], output="y")
    model = b.build(["y"])
    g = _exact(model, "up0", _feeds())
    assert g.size == F - 2
    # Both layers' FFNs are prunable, each with its own shape once cut.
    names = {g.name: g.prunable for g in find_channel_groups(to_ir(model))}
    assert names.get("up0") and names.get("up1"), names
