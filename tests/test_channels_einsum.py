"""Einsum where it is a plain matrix product ("bsh,hd->bsd", "...i,ij->...j", "ij,jk->ik", a
transposed weight "bsh,dh->bsd") is a producer and a consumer of channel groups like MatMul.
Channels whose outgoing weights are zero are removed and the model agrees with the original to
1e-5 on onnxruntime; an Einsum that is not a matrix product stops the group."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import GraphBuilder, run, to_ir

from onnxprune.channels.groups import find_channel_groups
from onnxprune.channels.model import ChannelGroup
from onnxprune.channels.slicing import keep_many
from onnxprune.core.weights import const_array, einsum_matrix, set_const_array

K, F, N = 6, 8, 5


def _model(first: str, second: str, x_shape: list[int | str], *, transposed: bool = False
           ) -> onnx.ModelProto:
    b = GraphBuilder(seed=7)
    x = b.input("x", x_shape)
    w1 = b.weight("w1", [F, K] if transposed else [K, F])
    h = b.op("Einsum", [x, w1], equation=first, name="up")
    h = b.op("Add", [h, b.const("bias", np.linspace(-1, 1, F).astype(np.float32))])
    h = b.op("Relu", [h])
    b.op("Einsum", [h, b.weight("w2", [F, N])], equation=second, name="down", output="y")
    return b.build(["y"])


def _exact(model: onnx.ModelProto, x_shape: tuple[int, ...]) -> ChannelGroup:
    m = to_ir(model)
    g = next(g for g in find_channel_groups(m) if g.name == "up")
    assert g.prunable, g.skip_reason
    assert [u.node.name for u in g.consumers] == ["down"]
    drop = np.array([0, 3, g.size - 1])
    for use in g.consumers:
        w = const_array(use.weight).copy()  # type: ignore[union-attr]
        np.moveaxis(w, use.reduce_axis, 0)[np.isin(g.channel_map(use, "in"), drop)] = 0
        set_const_array(use.weight, w)
    feeds = {"x": np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)}
    before = run(m, feeds)
    keep_many(m.graph, [(g, np.setdiff1d(np.arange(g.size), drop))])
    proto = ir.serde.serialize_model(m)
    onnx.checker.check_model(proto, full_check=True)
    after = run(proto, feeds)
    np.testing.assert_allclose(after[0], before[0], rtol=1e-5, atol=1e-5)
    assert after[0].shape == before[0].shape
    assert const_array(m.graph.initializers["w2"]).shape == (F - 3, N)  # type: ignore[union-attr]
    return g


@pytest.mark.parametrize(("first", "second", "shape"), [
    ("bsh,hd->bsd", "bsd,dk->bsk", ("batch", 4, K)),
    ("...i,ij->...j", "...j,jk->...k", ("batch", 4, K)),
    ("ij,jk->ik", "ij,jk", ("batch", K)),
])
def test_einsum_matrix_products_are_producers_and_consumers(first: str, second: str,
                                                            shape: tuple) -> None:
    concrete = tuple(3 if d == "batch" else d for d in shape)
    g = _exact(_model(first, second, list(shape)), concrete)
    assert g.size == F - 3


def test_einsum_with_a_transposed_weight() -> None:
    g = _exact(_model("bsh,dh->bsd", "bsd,dk->bsk", ["batch", 4, K], transposed=True), (3, 4, K))
    assert const_array(g.producers[0].weight).shape == (F - 3, K)  # type: ignore[union-attr]


def test_einsum_that_is_not_a_matrix_product_stops_the_group() -> None:
    b = GraphBuilder(seed=8)
    x = b.input("x", ["batch", 4, K])
    h = b.op("MatMul", [x, b.weight("w1", [K, F])], name="up")
    # contracts the sequence axis, not the channels: mixes positions of every channel
    y = b.op("Einsum", [b.op("Relu", [h]), b.weight("w2", [4, N])], equation="bsh,sk->bhk",
             name="mix")
    b.op("Identity", [y], output="y")
    g = next(g for g in find_channel_groups(to_ir(b.build(["y"]))) if g.name == "up")
    assert not g.prunable
    assert "mix" in (g.skip_reason or "")


@pytest.mark.parametrize(("equation", "axes"), [
    ("bsh,hd->bsd", (0, 1)), ("bsh,dh->bsd", (1, 0)), ("...i,ij->...j", (0, 1)),
    ("ij,jk", (0, 1)), (" b s h , h d -> b s d ", (0, 1)),
    ("bhqd,bhkd->bhqk", None), ("hd,bsh->bsd", None), ("bsh,hd->bds", None),
    ("bsh,hh->bsh", None), ("bsh,hd->bsdh", None), ("bsh,sd->bhd", None),
])
def test_einsum_matrix_reads_the_equation(equation: str, axes: tuple[int, int] | None) -> None:
    node = ir.Node("", "Einsum", [ir.Value(name="a"), ir.Value(name="b")],
                   attributes=[ir.AttrString("equation", equation)])
    assert einsum_matrix(node) == axes
