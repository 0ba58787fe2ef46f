"""Attention with a key/value cache, as decoders export it: the past K/V come in as graph
inputs [batch, kv_heads, past, size], are joined with the new K/V along the sequence, and the
joined tensors are returned as the present cache. Removing a head (a K/V head with its query
heads under grouped-query attention) rewrites the cache inputs and outputs to the pruned
width: fed the kept heads' slice of the cache, the pruned model agrees to 1e-5."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import GraphBuilder, run, to_ir
from onnx import TensorProto, helper

from onnxprune.attention.blocks import find_attention_blocks
from onnxprune.attention.remove_heads import RemoveHeadsPass, recognise_blocks
from onnxprune.attention.slicing import keep_heads
from onnxprune.core import cache_slices
from onnxprune.core.weights import const_array, set_const_array
from onnxprune.verify.compare import Tolerances, compare_models

D, SEQ, PAST, E = 4, 3, 2, 16
I64 = np.int64


def _model(heads: int, kv_heads: int, *, cache_out: bool = True, other_past: bool = False,
           mask: bool = False) -> onnx.ModelProto:
    b = GraphBuilder(seed=12)
    x = b.input("x", ["batch", "sequence" if mask else SEQ, E])
    group = heads // kv_heads

    def split(r: str, n: int) -> str:
        h = b.op("MatMul", [x, b.weight(f"{r}.weight", [E, n * D])], name=f"{r}_proj")
        h = b.op("Reshape", [h, b.const(f"{r}.t", np.array([0, 0, n, D], I64))])
        return b.op("Transpose", [h], perm=[0, 2, 1, 3])

    q = split("q", heads)
    joined = {}
    for r in "kv":
        past = b.input(f"past.{r}", ["batch", kv_heads, "past" if mask else PAST, D])
        if other_past and r == "k":
            past = b.op("Relu", [past])  # not the cache as fed: something computed from it
        joined[r] = b.op("Concat", [past, split(r, kv_heads)], axis=2,
                         output=f"present.{r}" if cache_out else None)
        if group > 1:  # transformers' repeat_kv
            u = b.op("Unsqueeze", [joined[r], b.const(f"{r}.ax", np.array([2], I64))])
            e = b.op("Expand", [u, b.const(f"{r}.rep", np.array([1, 1, group, 1, 1], I64))])
            joined[r] = b.op("Reshape", [e, b.const(f"{r}.m", np.array([0, heads, -1, D],
                                                                        I64))])
    s = b.op("MatMul", [q, b.op("Transpose", [joined["k"]], perm=[0, 1, 3, 2])])
    s = b.op("Div", [s, b.const("scale", np.array(2.0, np.float32))])
    if mask:  # [batch, past + new] padding mask, its shape unrecorded past the input
        m = b.input("attention_mask", ["batch", "total"], TensorProto.INT64)
        m = b.op("Unsqueeze", [m, b.const("m.ax", np.array([1, 2], I64))])
        m = b.op("Mul", [b.op("Sub", [b.const("one", np.array(1.0, np.float32)),
                                      b.op("Cast", [m], to=TensorProto.FLOAT)]),
                         b.const("neg", np.array(-1e4, np.float32))])
        s = b.op("Add", [s, m])
    s = b.op("Softmax", [s], axis=-1)
    c = b.op("Transpose", [b.op("MatMul", [s, joined["v"]])], perm=[0, 2, 1, 3])
    c = b.op("Reshape", [c, b.const("merge", np.array([0, 0, heads * D], I64))])
    b.op("MatMul", [c, b.weight("o.weight", [heads * D, E])], name="o_proj", output="y")
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                          ["batch", "sequence" if mask else SEQ, E])]
    if cache_out:
        outs += [helper.make_tensor_value_info(f"present.{r}", TensorProto.FLOAT,
                                               ["batch", kv_heads, "total", D]) for r in "kv"]
    graph = helper.make_graph(b.nodes, "cache", b.inputs, outs, b.inits)
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(kv_heads: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((2, SEQ, E)).astype(np.float32),
            "past.k": rng.standard_normal((2, kv_heads, PAST, D)).astype(np.float32),
            "past.v": rng.standard_normal((2, kv_heads, PAST, D)).astype(np.float32)}


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2)])
def test_heads_with_a_kv_cache_are_removed_with_their_cache_slices(heads: int, kv_heads: int
                                                                  ) -> None:
    model = to_ir(_model(heads, kv_heads))
    [block] = find_attention_blocks(model)
    assert block.prunable, block.skip_reason
    assert "cache" in block.kind and block.num_heads == kv_heads
    group = heads // kv_heads
    drop = 1
    assert block.output is not None
    w = const_array(block.output.weight).copy()  # type: ignore[union-attr]
    w[drop * group * D:(drop + 1) * group * D] = 0
    set_const_array(block.output.weight, w)
    f = _feeds(kv_heads)
    expected = run(model, f)
    keep = [u for u in range(kv_heads) if u != drop]
    keep_heads(model.graph, block, keep)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    dims = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in [*proto.graph.input, *proto.graph.output]}
    assert dims["past.k"] == ["batch", kv_heads - 1, PAST, D]
    assert dims["present.v"] == ["batch", kv_heads - 1, "total", D]
    small = {**f, "past.k": f["past.k"][:, keep], "past.v": f["past.v"][:, keep]}
    got = run(proto, small)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-5)
    for r in (1, 2):  # the present cache is the kept heads' slice of the original one
        np.testing.assert_allclose(got[r], expected[r][:, keep], rtol=1e-5, atol=1e-5)


def test_a_cache_input_read_through_another_op_is_declined() -> None:
    [block] = find_attention_blocks(to_ir(_model(4, 4, other_past=True)))
    assert not block.prunable
    assert "joins the K heads with other values" in (block.skip_reason or "")


def test_pruned_model_records_its_cache_slices_and_verify_feeds_them() -> None:
    """The written model says which heads of the original cache it keeps; verification feeds
    it that slice of an original-width cache and compares the kept slice of the present."""
    model = to_ir(_model(4, 2))
    [block] = find_attention_blocks(model)
    assert block.output is not None
    w = const_array(block.output.weight).copy()  # type: ignore[union-attr]
    w[:2 * D] = 0  # K/V head 0 and its two query heads add nothing: the smallest score
    set_const_array(block.output.weight, w)
    reference = ir.serde.serialize_model(model).SerializeToString()
    p = RemoveHeadsPass(fraction=0.5)
    p(model)
    assert p.result.removed == 1
    slices = cache_slices.parse(model.metadata_props.get(cache_slices.KEY))
    assert slices == {n: (-3, [1]) for n in ("past.k", "past.v", "present.k", "present.v")}
    candidate = ir.serde.serialize_model(model).SerializeToString()
    result = compare_models(reference, candidate, [_feeds(2)],
                            tolerances=Tolerances(atol=1e-5, rtol=1e-5))
    assert result.ok, result
    # a second removal composes: positions still refer to the first model
    [block] = find_attention_blocks(model)
    keep_heads(model.graph, block, [0])
    cache_slices.to_metadata(model)
    assert cache_slices.parse(model.metadata_props[cache_slices.KEY])["past.v"] == (-3, [1])


def test_slice_arrays_leaves_arrays_at_the_pruned_width() -> None:
    slices = {"past": (-3, [0, 2])}
    full = np.zeros((1, 3, 5, 4))
    assert cache_slices.slice_arrays({"past": full}, slices)["past"].shape == (1, 2, 5, 4)
    small = np.zeros((1, 2, 5, 4))
    assert cache_slices.slice_arrays({"past": small}, slices)["past"] is small


def test_unrecorded_mask_is_probed_with_an_empty_cache() -> None:
    """Generated inputs give every symbolic length one size, which a decoder with a cache
    rejects (its mask spans past + new positions); the probe then feeds an empty cache."""
    model = to_ir(_model(4, 2, mask=True))
    [block] = find_attention_blocks(model)
    assert not block.prunable and "cannot tell" in (block.skip_reason or "")
    [block] = recognise_blocks(model)
    assert block.prunable, block.skip_reason
