"""onnxruntime's fused com.microsoft GroupQueryAttention: one removable unit is a K/V head
with the query heads that read it. A unit whose output-projection rows are zero is removed
and the model, run on onnxruntime's CPU kernel, agrees to 1e-5; num_heads and kv_num_heads
are rewritten. What the op does not let us change safely (a past cache, a packed QKV input,
a used present output) is declined with the reason."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import GraphBuilder, run, to_ir
from onnx import TensorProto, helper

from onnxprune.attention.blocks import find_attention_blocks
from onnxprune.attention.remove_heads import RemoveHeadsPass
from onnxprune.attention.slicing import keep_heads
from onnxprune.core.weights import const_array, set_const_array

H, KV, D, SEQ, E = 4, 2, 16, 5, 24  # the CPU kernel rotates heads of a multiple of 16
GROUP = H // KV


def _model(*, rotary: bool = False, past: bool = False, present_out: bool = False,
           packed: bool = False, past_computed: bool = False, present_read: bool = False
           ) -> onnx.ModelProto:
    b = GraphBuilder(seed=11)
    x = b.input("x", ["batch", SEQ, E])
    seqlens = b.input("seqlens_k", ["batch"], TensorProto.INT32)
    total = b.input("total_len", [], TensorProto.INT32)
    proj = {}
    for r, width in (("q", H * D), ("k", KV * D), ("v", KV * D)):
        h = b.op("MatMul", [x, b.weight(f"{r}.weight", [E, width])], name=f"{r}_proj")
        proj[r] = b.op("Add", [h, b.const(f"{r}.bias", (b.rng.standard_normal(width) * 0.1)
                                          .astype(np.float32))])
    ins = [proj["q"], proj["k"], proj["v"], "", "", seqlens, total]
    attrs: dict[str, object] = {}
    if packed:
        ins[:3] = [b.op("Concat", [proj["q"], proj["k"], proj["v"]], axis=-1), "", ""]
    if past:
        ins[3] = b.input("past_key", ["batch", KV, "past", D])
        ins[4] = b.input("past_value", ["batch", KV, "past", D])
        if past_computed:  # not the cache as fed
            ins[3] = b.op("Neg", [ins[3]])
    if rotary:
        angles = np.arange(16)[:, None] / 10000 ** (np.arange(D // 2)[None, :] / (D // 2))
        ins += [b.const("cos", np.cos(angles).astype(np.float32)),
                b.const("sin", np.sin(angles).astype(np.float32))]
        attrs["do_rotary"] = 1
    outs = ["ctx", "present_key", "present_value"]
    b.op_multi("GroupQueryAttention", ins, name="gqa", domain="com.microsoft", outputs=outs,
               num_heads=H, kv_num_heads=KV, **attrs)
    ctx = "ctx"
    if present_read:  # something else in the graph reads the present key
        ctx = b.op("Add", [ctx, b.op("ReduceMean", ["present_key"], keepdims=0, axes=[0, 1, 2, 3],
                                     name="mean_key")])
        ctx = b.op("Sub", [ctx, b.op("ReduceMean", ["present_key"], keepdims=0,
                                     axes=[0, 1, 2, 3])])
    b.op("MatMul", [ctx, b.weight("o.weight", [H * D, E])], name="o_proj", output="y")
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", SEQ, E])]
    if present_out:
        outputs += [helper.make_tensor_value_info(f"present_{r}", TensorProto.FLOAT,
                                                  ["batch", KV, "total", D])
                    for r in ("key", "value")]
    graph = helper.make_graph(b.nodes, "gqa", b.inputs, outputs, b.inits)
    return helper.make_model(graph, ir_version=8, opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _feeds(batch: int = 2, past: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, SEQ, E)).astype(np.float32)
    feeds = {"x": x, "seqlens_k": np.full(batch, past + SEQ - 1, np.int32),
             "total_len": np.array(past + SEQ, np.int32)}
    if past:
        for r in ("key", "value"):
            feeds[f"past_{r}"] = rng.standard_normal((batch, KV, past, D)).astype(np.float32)
    return feeds


def _silence(model: ir.Model, unit: int) -> None:
    """Zeroes the output-projection rows of the query heads of K/V head `unit`."""
    [block] = find_attention_blocks(model)
    assert block.output is not None
    w = const_array(block.output.weight).copy()  # type: ignore[union-attr]
    w[unit * GROUP * D:(unit + 1) * GROUP * D] = 0
    set_const_array(block.output.weight, w)


@pytest.mark.parametrize("rotary", [False, True])
def test_group_query_attention_removes_a_kv_head_with_its_query_heads(rotary: bool) -> None:
    model = to_ir(_model(rotary=rotary))
    [block] = find_attention_blocks(model)
    assert block.prunable, block.skip_reason
    assert (block.num_heads, block.group) == (KV, GROUP)
    _silence(model, 1)
    f = _feeds()
    expected = run(model, f)[0]
    keep_heads(model.graph, block, [0])
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    np.testing.assert_allclose(run(proto, f)[0], expected, rtol=1e-5, atol=1e-5)
    node = next(n for n in proto.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: a.i for a in node.attribute}
    assert (attrs["num_heads"], attrs["kv_num_heads"]) == (GROUP, 1)
    shapes = {i.name: list(numpy_shape(i)) for i in proto.graph.initializer}
    assert shapes["q.weight"] == [E, GROUP * D] and shapes["k.weight"] == [E, D]
    assert shapes["o.weight"] == [GROUP * D, E]


def numpy_shape(t: onnx.TensorProto) -> tuple[int, ...]:
    return tuple(t.dims)


def test_remove_heads_pass_on_group_query_attention() -> None:
    model = to_ir(_model())
    _silence(model, 0)
    f = _feeds(3)
    expected = run(model, f)[0]
    p = RemoveHeadsPass(fraction=0.5)
    p(model)
    assert p.result.removed == 1
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    np.testing.assert_allclose(run(proto, f)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"packed": True}, "packed QKV"),
    ({"past": True, "past_computed": True}, "past key/value cache computed in the graph"),
    ({"present_read": True}, "(the present cache) is read in the graph"),
])
def test_group_query_attention_declines(kwargs: dict[str, bool], reason: str) -> None:
    model = to_ir(_model(**kwargs))
    [block] = find_attention_blocks(model)
    assert not block.prunable
    assert reason in (block.skip_reason or "")
    before = ir.serde.serialize_model(model).SerializeToString()
    RemoveHeadsPass(fraction=0.5)(model)
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_group_query_attention_with_a_kv_cache_keeps_the_kept_heads_cache() -> None:
    """Past key/value fed as graph inputs, present returned: the pruned model is fed the kept
    K/V head's slice of the cache and returns that slice of the present cache."""
    model = to_ir(_model(past=True, present_out=True))
    [block] = find_attention_blocks(model)
    assert block.prunable, block.skip_reason
    _silence(model, 0)
    f = _feeds(1, past=3)  # the CPU kernel takes a prompt after a cache for batch 1 only
    expected = run(model, f)
    keep_heads(model.graph, block, [1])
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    small = {**f, **{k: f[k][:, [1]] for k in ("past_key", "past_value")}}
    got = run(proto, small)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-5)
    for r in (1, 2):
        np.testing.assert_allclose(got[r], expected[r][:, [1]], rtol=1e-5, atol=1e-5)


# -- thinning the query heads of every K/V group (issue 27) -----------------------------------
H8 = 8  # 8 query heads over KV = 2 K/V heads: groups of 4


def _model8(**kwargs: bool) -> onnx.ModelProto:
    global H, GROUP
    saved = H, GROUP
    H, GROUP = H8, H8 // KV
    try:
        return _model(**kwargs)
    finally:
        H, GROUP = saved


def _zero_query_heads(model: ir.Model, heads: list[int]) -> None:
    """Zeroes the output rows and Q columns of query `heads`: removed exactly, and the
    lowest on weight norms."""
    [block] = find_attention_blocks(model)
    w = const_array(block.output.weight).copy()  # type: ignore[union-attr]
    q = block.projection("q").use.weight
    wq = const_array(q).copy()  # type: ignore[union-attr]
    for h in heads:
        w[h * D:(h + 1) * D] = 0
        wq[:, h * D:(h + 1) * D] = 0
    set_const_array(block.output.weight, w)  # type: ignore[union-attr]
    set_const_array(q, wq)


@pytest.mark.parametrize("past", [False, True])
def test_group_query_attention_thins_query_heads_in_every_group(past: bool) -> None:
    """--heads 0.25 of 8 query / 2 K/V heads: 25 % of 2 groups rounds to 0, so one query
    head per group goes (8 -> 6, num_heads rewritten, kv_num_heads kept); heads whose
    output rows were zero leave the outputs (and the present cache) unchanged."""
    model = to_ir(_model8(past=past, present_out=past))
    _zero_query_heads(model, [1, 6])
    f = _feeds(1, past=3) if past else _feeds(2)
    expected = run(model, f)
    p = RemoveHeadsPass(fraction=0.25)
    assert p(model).modified
    [d] = p.result.blocks
    assert (d.granularity, d.query_heads, d.kv_heads) == ("query-heads", (8, 6), (2, 2))
    assert d.removed == (1, 6)
    assert "rounds to 0; query heads thinned instead: 2 of 8 (25 %)" in (d.note or "")
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    node = next(n for n in proto.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: a.i for a in node.attribute}
    assert (attrs["num_heads"], attrs["kv_num_heads"]) == (6, 2)
    got = run(proto, f)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_group_query_attention_half_removes_a_whole_group() -> None:
    """0.5 reaches 50 % with either unit; whole K/V groups win the tie (K, V and the cache
    shrink too)."""
    model = to_ir(_model8())
    p = RemoveHeadsPass(fraction=0.5)
    p(model)
    [d] = p.result.blocks
    assert (d.granularity, d.query_heads, d.kv_heads) == ("kv-groups", (8, 4), (2, 1))
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    run(proto, _feeds(2))


def test_a_fraction_that_removes_nothing_says_why() -> None:
    model = to_ir(_model8())
    p = RemoveHeadsPass(fraction=0.1)
    assert not p(model).modified
    [d] = p.result.blocks
    assert d.reason is None and d.heads_after == d.heads_before
    assert d.note == ("10 % of 2 K/V groups rounds to 0 and 10 % of the 4 query heads per "
                      "group to 0; reachable: 25 %, 50 %, 75 %")
    assert p.result.to_dict()["notes"] == [f"gqa: {d.note}"]


def test_calibrated_thinning_drops_the_silent_query_heads_and_says_which_granularity() -> None:
    """With calibration data the query heads are scored on activations: heads whose Q
    columns and output rows are zero contribute nothing, so they are the ones dropped (one
    per group), the outputs stay as they were, and the decision records the granularity."""
    model = to_ir(_model8())
    _zero_query_heads(model, [2, 5])
    batches = [_feeds(2)] + [{**_feeds(2), "x": np.random.default_rng(i).standard_normal(
        (2, SEQ, E)).astype(np.float32)} for i in range(1, 6)]
    expected = run(model, batches[0])
    p = RemoveHeadsPass(fraction=0.25, calibration=batches)
    assert p(model).modified
    [d] = p.result.blocks
    assert (d.granularity, d.query_heads, d.kv_heads) == ("query-heads", (8, 6), (2, 2))
    assert d.removed == (2, 5)
    assert "query heads thinned instead" in (d.note or "")
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    for a, b in zip(run(proto, batches[0]), expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
