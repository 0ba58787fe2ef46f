"""A position bias per head, computed once and added to the scores of every layer (T5's
relative attention bias): each block reads the kept heads of it through a Gather of its own,
so every layer can lose different heads while the bias stays whole for the others. Removing
heads whose output rows are zero changes nothing (1e-5 on onnxruntime)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import GraphBuilder, run, to_ir
from test_heads import ZERO, attention_model, check, zero_head
from test_heads import D as TD
from test_heads import H as TH

from onnxprune.attention.blocks import find_attention_blocks
from onnxprune.attention.remove_heads import RemoveHeadsPass
from onnxprune.attention.slicing import keep_heads
from onnxprune.core.weights import const_array, set_const_array

H, D, SEQ, BUCKETS = 4, 4, 5, 7
E = H * D
I64 = np.int64


def _model(*, kv_heads: int = H, bias_heads: int = H) -> onnx.ModelProto:
    b = GraphBuilder(seed=13)
    x = b.input("x", ["batch", SEQ, E])
    rel = np.clip(np.arange(SEQ)[None, :] - np.arange(SEQ)[:, None] + BUCKETS // 2, 0,
                  BUCKETS - 1).astype(I64)
    table = b.weight("rel_bias", [BUCKETS, bias_heads])
    bias = b.op("Gather", [table, b.const("buckets", rel)])  # [S, S, H], computed at run time
    bias = b.op("Unsqueeze", [b.op("Transpose", [bias], perm=[2, 0, 1]),
                              b.const("ax0", np.array([0], I64))])  # [1, H, S, S]
    if bias_heads != H:  # [1, 2, S, S] tiled to [1, H, S, S]: not one row per head
        bias = b.op("Tile", [bias, b.const("tile", np.array([1, H // bias_heads, 1, 1], I64))])
    h = x
    for layer in range(2):
        def heads(r: str, n: int, layer: int = layer, src: str = h) -> str:
            p = b.op("MatMul", [src, b.weight(f"l{layer}.{r}", [E, n * D])], name=f"l{layer}_{r}")
            p = b.op("Reshape", [p, b.const(f"l{layer}.{r}.t", np.array([0, 0, n, D], I64))])
            return b.op("Transpose", [p], perm=[0, 2, 1, 3])

        q, k, v = heads("q", H), heads("k", kv_heads), heads("v", kv_heads)
        if kv_heads != H:
            k, v = (b.op("Reshape", [b.op("Expand", [
                b.op("Unsqueeze", [t, b.const(f"l{layer}.{n}.u", np.array([2], I64))]),
                b.const(f"l{layer}.{n}.e", np.array([1, 1, H // kv_heads, 1, 1], I64))]),
                b.const(f"l{layer}.{n}.m", np.array([0, H, -1, D], I64))]) for n, t in
                (("k", k), ("v", v)))
        s = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])])
        s = b.op("Softmax", [b.op("Add", [s, bias])], axis=-1)
        c = b.op("Transpose", [b.op("MatMul", [s, v])], perm=[0, 2, 1, 3])
        c = b.op("Reshape", [c, b.const(f"l{layer}.merge", np.array([0, 0, E], I64))])
        o = b.op("MatMul", [c, b.weight(f"l{layer}.o", [E, E])], name=f"l{layer}_o")
        h = b.op("Add", [h, o])
    b.op("Identity", [h], output="y")
    return b.build(["y"], infer_shapes=True)


@pytest.mark.parametrize(("kv_heads", "bias_heads"), [(H, H), (2, H), (H, 2)])
def test_shared_per_head_bias_each_layer_keeps_its_own_heads(kv_heads: int, bias_heads: int
                                                             ) -> None:
    """Under grouped-query attention a unit is a K/V head with its query heads: the bias
    keeps the rows of those query heads. However the bias is computed (here also tiled from
    fewer rows), each block reads the rows of its kept heads."""
    model = to_ir(_model(kv_heads=kv_heads, bias_heads=bias_heads))
    group = H // kv_heads
    blocks = find_attention_blocks(model)
    assert [b.prunable for b in blocks] == [True, True], [b.skip_reason for b in blocks]
    drops = [1, 0]
    for block, drop in zip(blocks, drops, strict=True):
        assert block.output is not None and block.num_heads == kv_heads
        w = const_array(block.output.weight).copy()  # type: ignore[union-attr]
        w[drop * group * D:(drop + 1) * group * D] = 0
        set_const_array(block.output.weight, w)
    f = {"x": np.random.default_rng(0).standard_normal((2, SEQ, E)).astype(np.float32)}
    expected = run(model, f)[0]
    for block, drop in zip(blocks, drops, strict=True):
        keep_heads(model.graph, block, [h for h in range(kv_heads) if h != drop])
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    np.testing.assert_allclose(run(proto, f)[0], expected, rtol=1e-5, atol=1e-5)
    assert const_array(model.graph.initializers["rel_bias"]).shape == (BUCKETS, bias_heads)  # type: ignore[union-attr]
    gathers = [n for n in proto.graph.node if n.op_type == "Gather" and "kept_heads" in n.name]
    assert len(gathers) == 2


def test_per_head_mask_fed_as_an_input_is_read_through_a_gather() -> None:
    """A [batch, heads, seq, seq] mask the user feeds: the pruned model takes the same input
    and reads the rows of its kept heads."""
    model = to_ir(attention_model("dynamo", mask="per_head"))
    [block] = find_attention_blocks(model)
    assert block.prunable, block.skip_reason
    zero_head(model, 0, ZERO)
    rng = np.random.default_rng(0)
    f = {"x": rng.standard_normal((2, 5, TH * TD)).astype(np.float32),
         "mask": rng.standard_normal((2, TH, 5, 5)).astype(np.float32)}
    expected = run(model, f)[0]
    RemoveHeadsPass(fraction=1 / TH)(model)
    np.testing.assert_allclose(run(check(model), f)[0], expected, rtol=1e-5, atol=1e-5)
    assert [b.num_heads for b in find_attention_blocks(model)] == [TH - 1]
