"""find_channel_groups: which ops a channel group passes through, and why one is declined.

Every case is a small model `x -> producer 'prod' (weight w1) -> op(s) -> consumer 'cons'
(weight w2) -> y`. For a group that must be prunable the test checks what the analysis
found (size, producers, consumers, constants to slice) and then that it is *right*: with
the consumer rows of two channels zeroed, keep_channels on the others leaves onnxruntime's
output unchanged and the model passes onnx.checker (full_check).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import (
    BATCH,
    GraphBuilder,
    activation,
    run,
    to_ir,
)
from onnx import TensorProto, helper

from onnxprune.channels.groups import find_channel_groups
from onnxprune.channels.model import ChannelGroup
from onnxprune.channels.slicing import keep_channels
from onnxprune.core.weights import const_array, set_const_array

K, C, N = 6, 8, 5  # input features, channels of the group under test, output features
DROP = (1, 4)  # channels whose consumer rows are zeroed, then removed
Middle = Callable[[GraphBuilder, str], str]


# ------------------------------------------------------------------------- builders


def sandwich(
    middle: Middle,
    *,
    seq: int | None = None,
    producer: str = "matmul",
    consumer: str = "matmul",
    constants_as_nodes: bool = False,
    opset: int = 17,
    infer_shapes: bool = False,
    batch: int | str = BATCH,
    extra_outputs: Sequence[str] = (),
    output_types: dict[str, int] | None = None,
    extra_inputs: Sequence[tuple[str, Sequence[int | str], int]] = (),
    check: bool = True,
) -> onnx.ModelProto:
    """x -> producer 'prod' -> middle -> consumer 'cons' -> y.

    producer: matmul | gemm (bias b1) | gemm_tb (transB=1, w1 [C, K]) | gemm_ta (transA=1,
    x is [K, batch]). consumer: matmul | gemm (bias b2) | gemm_tb (w2 [N, C]) | gemm_ta
    (a Transpose, then Gemm transA=1).
    """
    b = GraphBuilder(seed=0, constants_as_nodes=constants_as_nodes)
    if producer == "gemm_ta":
        x = b.input("x", [K, batch])
    else:
        x = b.input("x", [batch, seq, K] if seq is not None else [batch, K])
    for name, dims, dtype in extra_inputs:
        b.input(name, dims, dtype)
    if producer == "matmul":
        h = b.op("MatMul", [x, b.weight("w1", [K, C])], name="prod")
    elif producer == "gemm":
        h = b.op("Gemm", [x, b.weight("w1", [K, C]), b.const("b1", _ramp(C))], name="prod")
    elif producer == "gemm_tb":
        h = b.op("Gemm", [x, b.weight("w1", [C, K])], name="prod", transB=1)
    elif producer == "gemm_ta":
        h = b.op("Gemm", [x, b.weight("w1", [K, C])], name="prod", transA=1)
    else:
        raise ValueError(producer)
    h = middle(b, h)
    if consumer == "matmul":
        b.op("MatMul", [h, b.weight("w2", [C, N])], name="cons", output="y")
    elif consumer == "gemm":
        b.op("Gemm", [h, b.weight("w2", [C, N]), b.const("b2", _ramp(N))], name="cons",
             output="y")
    elif consumer == "gemm_tb":
        b.op("Gemm", [h, b.weight("w2", [N, C])], name="cons", output="y", transB=1)
    elif consumer == "gemm_ta":
        t = b.op("Transpose", [h], name="to_cols", perm=[1, 0])
        b.op("Gemm", [t, b.weight("w2", [C, N])], name="cons", output="y", transA=1)
    else:
        raise ValueError(consumer)
    return b.build(["y", *extra_outputs], output_types=output_types, opset=opset,
                   infer_shapes=infer_shapes, check=check, name="sandwich")


def _ramp(n: int, start: float = 0.5) -> np.ndarray:
    """Distinct, non-zero per-channel values (so a wrong slice shows in the output)."""
    return (start + np.arange(n) / n).astype(np.float32)


def _feeds(model: onnx.ModelProto, batch: int = 3, seq: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    feeds = {}
    for inp in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch
                for d in inp.type.tensor_type.shape.dim]
        if inp.name == "x" and len(dims) == 3:
            dims[1] = dims[1] or seq
        feeds[inp.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def group_of(model: ir.Model, producer: str = "prod", **options: object) -> ChannelGroup:
    groups = find_channel_groups(model, **options)  # type: ignore[arg-type]
    found = [g for g in groups if producer in _names(g.producers)]
    assert len(found) == 1, [g.to_dict() for g in groups]
    return found[0]


def _names(uses: Sequence[object]) -> list[str]:
    return sorted(u.node.name for u in uses)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Expect:
    producers: tuple[str, ...] = ("prod",)
    consumers: tuple[str, ...] = ("cons",)
    constants: tuple[str, ...] = ()
    reshapes: tuple[str, ...] = ()
    size: int = C


def check_group(model: onnx.ModelProto, expect: Expect = Expect(), **options: object) -> ir.Model:
    """Asserts what the analysis finds, then prunes DROP exactly; returns the pruned model."""
    m = to_ir(model)
    g = group_of(m, expect.producers[0], **options)
    assert g.skip_reason is None, g.skip_reason
    assert g.prunable
    assert g.size == expect.size
    assert _names(g.producers) == sorted(expect.producers)
    assert _names(g.consumers) == sorted(expect.consumers)
    assert sorted(c.value.name for c in g.constants) == sorted(expect.constants)
    assert sorted(n.name for n in g.reshapes) == sorted(expect.reshapes)
    for use in g.consumers:  # zero the outgoing weights of DROP: they no longer matter
        w = const_array(use.weight).copy()  # type: ignore[union-attr]
        np.moveaxis(w, use.reduce_axis, 0)[list(DROP)] = 0
        set_const_array(use.weight, w)
    feeds = _feeds(model)
    before = run(m, feeds)
    keep = np.array([i for i in range(g.size) if i not in DROP])
    keep_channels(m.graph, g, keep)
    assert g.size == len(keep)
    proto = ir.serde.serialize_model(m)
    onnx.checker.check_model(proto, full_check=True)
    after = run(proto, feeds)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    for use in g.consumers:
        assert const_array(use.weight).shape[use.reduce_axis] == len(keep)  # type: ignore[union-attr]
    for use in g.producers:
        assert const_array(use.weight).shape[use.out_axis] == len(keep)  # type: ignore[union-attr]
    return m


def declined(model: onnx.ModelProto, producer: str = "prod", **options: object) -> str:
    """The skip reason of the group of `producer` (failing if it is prunable)."""
    g = group_of(to_ir(model), producer, **options)
    assert not g.prunable
    assert g.skip_reason
    return g.skip_reason


def unary(op: str, **attrs: object) -> Middle:
    return lambda b, h: b.op(op, [h], name="mid", **attrs)


def act(kind: str) -> Middle:
    return lambda b, h: activation(b, h, kind, name="act")


# ------------------------------------------------------------- pass-through ops


@pytest.mark.parametrize(
    "middle",
    [
        unary("Relu"),
        unary("LeakyRelu", alpha=0.1),
        unary("Sigmoid"),
        unary("Tanh"),
        unary("Identity"),
        unary("Cast", to=TensorProto.FLOAT),
        unary("Dropout"),
    ],
    ids=["Relu", "LeakyRelu", "Sigmoid", "Tanh", "Identity", "Cast", "Dropout"],
)
@pytest.mark.parametrize("seq", [None, 4], ids=["2d", "3d"])
def test_unary_ops_pass_channels_through(middle: Middle, seq: int | None) -> None:
    check_group(sandwich(middle, seq=seq))


def test_gelu_op_opset20() -> None:
    check_group(sandwich(unary("Gelu"), opset=20, seq=4))
    check_group(sandwich(unary("Gelu", approximate="tanh"), opset=20))


@pytest.mark.parametrize(
    "kind", ["erf_gelu", "erf_gelu_dynamo", "tanh_gelu_pow", "tanh_gelu_mul", "silu"]
)
@pytest.mark.parametrize("seq", [None, 4], ids=["2d", "3d"])
def test_decomposed_activations_are_one_group(kind: str, seq: int | None) -> None:
    """The inner ops fan out from h and rejoin; their scalar constants are not sliced."""
    check_group(sandwich(act(kind), seq=seq))


def test_decomposed_gelu_matches_the_op() -> None:
    """The builders' decompositions compute GELU (so the tests above test the real thing)."""
    feeds = _feeds(sandwich(unary("Relu")))
    ref = run(sandwich(unary("Gelu"), opset=20), feeds)[0]
    for kind in ("erf_gelu", "erf_gelu_dynamo"):
        np.testing.assert_allclose(run(sandwich(act(kind)), feeds)[0], ref, atol=1e-5)
    ref_tanh = run(sandwich(unary("Gelu", approximate="tanh"), opset=20), feeds)[0]
    for kind in ("tanh_gelu_pow", "tanh_gelu_mul"):
        np.testing.assert_allclose(run(sandwich(act(kind)), feeds)[0], ref_tanh, atol=1e-5)


def test_dropout_with_unused_mask_output() -> None:
    def middle(b: GraphBuilder, h: str) -> str:
        return b.op_multi("Dropout", [h], name="mid", outputs=2)[0]

    check_group(sandwich(middle))


def test_clip_with_scalar_min_max() -> None:
    def middle(b: GraphBuilder, h: str) -> str:
        lo, hi = b.const("lo", np.float32(-0.5)), b.const("hi", np.float32(0.75))
        return b.op("Clip", [h, lo, hi], name="clip")

    check_group(sandwich(middle, seq=4))


@pytest.mark.parametrize("op", ["Add", "Mul", "Sub", "Div"])
@pytest.mark.parametrize("scalar_first", [False, True])
def test_binary_op_with_scalar_constant(op: str, scalar_first: bool) -> None:
    def middle(b: GraphBuilder, h: str) -> str:
        s = b.const("s", np.float32(1.5))
        return b.op(op, [s, h] if scalar_first else [h, s], name="mid")

    check_group(sandwich(middle))


@pytest.mark.parametrize("op", ["Add", "Mul", "Sub", "Div"])
@pytest.mark.parametrize("shape", [(C,), (1, C), (1, 1, C)], ids=["C", "1xC", "1x1xC"])
def test_binary_op_with_per_channel_constant_is_sliced(op: str, shape: tuple[int, ...]) -> None:
    def middle(b: GraphBuilder, h: str) -> str:
        scale = b.const("scale", _ramp(C).reshape(shape))
        return b.op(op, [h, scale], name="mid")

    m = check_group(sandwich(middle, seq=4), Expect(constants=("scale",)))
    assert m.graph.initializers["scale"].const_value.numpy().shape == shape[:-1] + (C - 2,)  # type: ignore[union-attr]


def test_per_channel_constant_first_and_as_constant_node() -> None:
    def middle(b: GraphBuilder, h: str) -> str:
        scale = b.const("scale", _ramp(C), as_node=True)
        return b.op("Sub", [scale, h], name="mid")

    check_group(sandwich(middle), Expect(constants=("scale",)))


def test_per_channel_constant_shared_outside_the_group_gets_a_sliced_copy() -> None:
    """`scale` is also read by an Add on a graph input: that reader keeps all C values."""

    def middle(b: GraphBuilder, h: str) -> str:
        scale = b.const("scale", _ramp(C))
        b.op("Add", ["z", scale], name="other", output="z_out")
        return b.op("Mul", [h, scale], name="mid")

    model = sandwich(middle, extra_inputs=[("z", [BATCH, C], TensorProto.FLOAT)],
                     extra_outputs=["z_out"])
    m = check_group(model, Expect(constants=("scale",)))
    assert m.graph.initializers["scale"].const_value.numpy().shape == (C,)  # type: ignore[union-attr]
    mid = next(n for n in m.graph if n.name == "mid")
    assert mid.inputs[1].const_value.numpy().shape == (C - 2,)  # type: ignore[union-attr]


SHAPES = [True, False]  # with and without recorded shapes (the perm gives the rank)


@pytest.mark.parametrize("infer_shapes", SHAPES, ids=["value_info", "no_value_info"])
def test_transpose_pair(infer_shapes: bool) -> None:
    """[b, s, C] -> Transpose -> [b, C, s] -> Relu -> Transpose back: the axis is followed."""

    def middle(b: GraphBuilder, h: str) -> str:
        t = b.op("Transpose", [h], name="t1", perm=[0, 2, 1])
        r = b.op("Relu", [t], name="relu")
        return b.op("Transpose", [r], name="t2", perm=[0, 2, 1])

    check_group(sandwich(middle, seq=4, infer_shapes=infer_shapes))


@pytest.mark.parametrize(
    "target", [[-1, C], [0, -1, C], [0, 0, 0]], ids=["-1,C", "0,-1,C", "0,0,0"]
)
def test_reshape_keeping_channels_last(target: list[int]) -> None:
    def middle(b: GraphBuilder, h: str) -> str:
        return b.op("Reshape", [h, b.const("target", np.array(target, np.int64))], name="reshape")

    m = check_group(
        sandwich(middle, seq=4), Expect(reshapes=("reshape",) if target[-1] == C else ())
    )
    new_target = m.graph.initializers["target"].const_value.numpy()  # type: ignore[union-attr]
    assert list(new_target) == target[:-1] + ([C - 2] if target[-1] == C else [target[-1]])


@pytest.mark.parametrize("producer", ["matmul", "gemm", "gemm_tb", "gemm_ta"])
def test_gemm_producers(producer: str) -> None:
    expect = Expect(constants=("b1",) if producer == "gemm" else ())
    check_group(sandwich(unary("Relu"), producer=producer), expect)


@pytest.mark.parametrize("consumer", ["matmul", "gemm", "gemm_tb"])
def test_gemm_consumers(consumer: str) -> None:
    check_group(sandwich(unary("Relu"), consumer=consumer))


@pytest.mark.parametrize("infer_shapes", SHAPES, ids=["value_info", "no_value_info"])
def test_gemm_trans_a_consumer_after_transpose(infer_shapes: bool) -> None:
    check_group(sandwich(unary("Relu"), consumer="gemm_ta", infer_shapes=infer_shapes))


def test_gemm_trans_a_consumer_axes() -> None:
    g = group_of(to_ir(sandwich(unary("Relu"), producer="gemm_tb", consumer="gemm_tb",
                                infer_shapes=True)))
    (p,), (c,) = g.producers, g.consumers
    assert (p.out_axis, p.reduce_axis) == (0, 1)  # w1 [C, K]
    assert (c.out_axis, c.reduce_axis) == (0, 1)  # w2 [N, C]


@pytest.mark.parametrize("seq", [None, 4], ids=["2d", "3d"])
def test_weights_as_constant_nodes(seq: int | None) -> None:
    check_group(sandwich(act("erf_gelu"), seq=seq, constants_as_nodes=True))
    check_group(sandwich(unary("Relu"), producer="gemm", consumer="gemm_tb",
                         constants_as_nodes=True), Expect(constants=("b1",)))


def test_weight_shared_by_two_consumers_in_the_group() -> None:
    """y = Relu(h) @ w2 + h @ w2: both consumers in the group, w2 sliced once."""

    def build() -> onnx.ModelProto:
        b = GraphBuilder(seed=0)
        x = b.input("x", [BATCH, K])
        h = b.op("MatMul", [x, b.weight("w1", [K, C])], name="prod")
        r = b.op("Relu", [h], name="relu")
        w2 = b.weight("w2", [C, N])
        a1 = b.op("MatMul", [r, w2], name="cons_a")
        a2 = b.op("MatMul", [h, w2], name="cons_b")
        b.op("Add", [a1, a2], name="sum", output="y")
        return b.build(["y"])

    m = check_group(build(), Expect(consumers=("cons_a", "cons_b")))
    assert m.graph.initializers["w2"].const_value.numpy().shape == (C - 2, N)  # type: ignore[union-attr]


def test_two_producers_added_are_one_group() -> None:
    """Relu(x @ w1 + x @ w1b) @ w2: both producers lose the same channels."""

    def middle(b: GraphBuilder, h: str) -> str:
        h2 = b.op("MatMul", ["x", b.weight("w1b", [K, C])], name="prod_b")
        s = b.op("Add", [h, h2], name="join")
        return b.op("Relu", [s], name="relu")

    check_group(sandwich(middle, seq=4), Expect(producers=("prod", "prod_b")))


def test_prelu_with_per_channel_slope_is_sliced() -> None:
    def middle(b: GraphBuilder, h: str) -> str:
        return b.op("PRelu", [h, b.const("slope", _ramp(C, -0.5))], name="prelu")

    check_group(sandwich(middle, seq=4), Expect(constants=("slope",)))


def test_residual_stream_joins_producers_and_consumers() -> None:
    """r = x@win; s = r + fb(Relu(fa(r))); y = s@wout: one C group with two of each."""
    b = GraphBuilder(seed=0)
    x = b.input("x", [BATCH, K])
    r = b.op("MatMul", [x, b.weight("win", [K, C])], name="prod")
    a = b.op("MatMul", [r, b.weight("wa", [C, 12])], name="fa")
    a = b.op("Relu", [a], name="relu")
    f = b.op("MatMul", [a, b.weight("wb", [12, C])], name="fb")
    s = b.op("Add", [r, f], name="res")
    b.op("MatMul", [s, b.weight("wout", [C, N])], name="cons", output="y")
    model = b.build(["y"])
    check_group(model, Expect(producers=("fb", "prod"), consumers=("cons", "fa")))
    inner = group_of(to_ir(model), "fa")
    assert inner.prunable and inner.size == 12 and _names(inner.consumers) == ["fb"]


# ------------------------------------------------------------------ declined groups


def test_declines_a_group_reaching_a_graph_output() -> None:
    reason = declined(sandwich(unary("Relu"), extra_outputs=["mid_out"]))
    assert "graph output" in reason and "'mid_out'" in reason


def test_declines_a_group_read_by_shape() -> None:
    def middle(b: GraphBuilder, h: str) -> str:
        b.op("Shape", [h], name="shape_of_h", output="h_shape")
        return h

    model = sandwich(middle, extra_outputs=["h_shape"], output_types={"h_shape": TensorProto.INT64})
    reason = declined(model)
    assert "Shape 'shape_of_h'" in reason


def test_declines_a_reshape_with_a_run_time_shape() -> None:
    def middle(b: GraphBuilder, h: str) -> str:
        return b.op("Reshape", [h, "target"], name="reshape_rt")

    model = sandwich(middle, extra_inputs=[("target", [2], TensorProto.INT64)])
    reason = declined(model)
    assert "Reshape 'reshape_rt'" in reason and "run time" in reason


def test_declines_a_reshape_that_splits_the_channels() -> None:
    def middle(b: GraphBuilder, h: str) -> str:
        t = b.const("target", np.array([0, 0, 2, C // 2], np.int64))
        heads = b.op("Reshape", [h, t], name="split_heads")
        back = b.const("back", np.array([0, 0, C], np.int64))
        return b.op("Reshape", [heads, back], name="merge_heads")

    reason = declined(sandwich(middle, seq=4))
    assert "Reshape 'split_heads'" in reason


def _layernorm(b: GraphBuilder, h: str) -> str:
    return b.op("LayerNormalization", [h, b.const("ln.w", _ramp(C)), b.const("ln.b", _ramp(C))],
                name="ln", axis=-1)


def _softmax(b: GraphBuilder, h: str) -> str:
    return b.op("Softmax", [h], name="softmax", axis=-1)


def _reducesum(b: GraphBuilder, h: str) -> str:
    total = b.op("ReduceSum", [h, b.const("axes", np.array([-1], np.int64))], name="rsum",
                 keepdims=1)
    return b.op("Div", [h, total], name="normalize")


@pytest.mark.parametrize(
    ("middle", "label"),
    [(_layernorm, "LayerNormalization 'ln'"), (_softmax, "Softmax 'softmax'"),
     (_reducesum, "ReduceSum 'rsum'")],
    ids=["LayerNormalization", "Softmax", "ReduceSum"],
)
def test_declines_ops_that_mix_channels(middle: Middle, label: str) -> None:
    reason = declined(sandwich(middle, seq=4))
    assert label in reason and "mixes channels" in reason


def test_declines_coupling_to_a_graph_input() -> None:
    """y = (x + x @ w1) @ w2: the residual ties the channels to the input x."""
    b = GraphBuilder(seed=0)
    x = b.input("x", [BATCH, C])
    h = b.op("MatMul", [x, b.weight("w1", [C, C])], name="prod")
    s = b.op("Add", [x, h], name="res")
    b.op("MatMul", [s, b.weight("w2", [C, N])], name="cons", output="y")
    reason = declined(b.build(["y"]))
    assert "graph input 'x'" in reason


def test_declines_channels_used_inside_an_if_subgraph() -> None:
    def middle(b: GraphBuilder, h: str) -> str:
        then_g = helper.make_graph(
            [helper.make_node("Relu", [h], ["t_out"], name="then_relu")], "then", [],
            [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [BATCH, C])],
        )
        else_g = helper.make_graph(
            [helper.make_node("Neg", [h], ["e_out"], name="else_neg")], "else", [],
            [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [BATCH, C])],
        )
        b.op("If", ["cond"], name="branch", output="branched", then_branch=then_g,
             else_branch=else_g)
        return h

    model = sandwich(middle, extra_inputs=[("cond", [], TensorProto.BOOL)],
                     extra_outputs=["branched"])
    reason = declined(model)
    assert "subgraph" in reason
    assert "then_relu" in reason or "else_neg" in reason


def test_declines_a_weight_shared_with_a_node_outside_the_group() -> None:
    """w2 is the group's consumer weight and also read by MatMul 'other' on input z."""

    def middle(b: GraphBuilder, h: str) -> str:
        b.op("MatMul", ["z", "w2"], name="other", output="z_out")
        return b.op("Relu", [h], name="relu")

    model = sandwich(middle, extra_inputs=[("z", [BATCH, C], TensorProto.FLOAT)],
                     extra_outputs=["z_out"])
    reason = declined(model)
    assert "'w2'" in reason and "MatMul 'other'" in reason


def test_declines_a_consumer_reading_channels_on_a_non_reduced_axis() -> None:
    """Gemm(transA=1) on [3, C]: it reduces over the 3 rows, the channels become its M."""
    b = GraphBuilder(seed=0)
    x = b.input("x", [3, K])
    h = b.op("MatMul", [x, b.weight("w1", [K, C])], name="prod")
    h = b.op("Relu", [h], name="relu")
    b.op("Gemm", [h, b.weight("w2", [3, N])], name="cons", output="y", transA=1)
    reason = declined(b.build(["y"]))
    assert "Gemm 'cons'" in reason and "non-reduced axis" in reason


def test_declines_a_dropout_whose_mask_is_used() -> None:
    def middle(b: GraphBuilder, h: str) -> str:
        return b.op_multi("Dropout", [h], name="drop", outputs=["d_out", "d_mask"])[0]

    model = sandwich(middle, extra_outputs=["d_mask"], output_types={"d_mask": TensorProto.BOOL})
    assert "Dropout 'drop'" in declined(model)


def test_declines_a_clip_with_a_tensor_bound() -> None:
    def middle(b: GraphBuilder, h: str) -> str:
        return b.op("Clip", [h, b.const("lo", np.zeros(C, np.float32))], name="clip")

    # Clip's bounds must be scalars by the spec, so such a model fails onnx.checker; build it
    # unchecked to see that the analysis declines rather than trusts it.
    reason = declined(sandwich(middle, check=False))
    assert "Clip 'clip'" in reason and "'lo'" in reason


def test_ignore_glob_declines_the_group() -> None:
    model = sandwich(unary("Relu"))
    assert "ignore" in declined(model, ignore=["con*"])
    assert group_of(to_ir(model), ignore=["nothing*"]).prunable


def test_ignore_reason_names_the_node_and_glob() -> None:
    reason = declined(sandwich(unary("Relu")), ignore=["con*"])
    assert "cons" in reason and "con*" in reason


def test_a_declined_coupled_group_is_reported_once() -> None:
    """s = x@w1 + x@w1b is also a graph output: one declined group with both producers."""

    def middle(b: GraphBuilder, h: str) -> str:
        h2 = b.op("MatMul", ["x", b.weight("w1b", [K, C])], name="prod_b")
        return b.op("Add", [h, h2], name="join", output="s")

    groups = find_channel_groups(to_ir(sandwich(middle, extra_outputs=["s"])))
    coupled = [g for g in groups if {"prod", "prod_b"} & set(_names(g.producers))]
    assert len(coupled) == 1
    assert _names(coupled[0].producers) == ["prod", "prod_b"]
    assert "graph output 's'" in (coupled[0].skip_reason or "")


def test_every_group_is_reported_with_a_reason_or_prunable() -> None:
    """The last layer's group reaches y; the hidden one is prunable; nothing is lost."""
    model = sandwich(unary("Relu"))
    groups = find_channel_groups(to_ir(model))
    by_producer = {g.producers[0].node.name: g for g in groups}
    assert set(by_producer) == {"prod", "cons"}
    assert by_producer["prod"].prunable
    assert "graph output 'y'" in (by_producer["cons"].skip_reason or "")
    d = by_producer["prod"].to_dict()
    assert d == {"name": "prod", "channels": C, "producers": ["prod"], "consumers": ["cons"],
                 "prunable": True, "reason": None}
