"""Attention-head recognition and RemoveHeadsPass on small attention blocks built in memory.

Blocks are written the way each torch exporter writes them:
- legacy: weights and shape pieces as Constant nodes, the split target built at run time
  from Shape -> Gather -> Unsqueeze -> Concat per Reshape, no recorded shapes;
- dynamo: initializers, one Concat of Shape(start, end) slices shared by Q, K, V and every
  layer, Reshape(allowzero=1), one scale initializer for all layers, recorded shapes.
Exactness: a head whose output-projection rows are zero adds nothing, so removing it must
leave onnxruntime's output unchanged, whatever literal spelled the head count.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import BATCH, GraphBuilder, dense, run, to_ir
from onnx import TensorProto, helper, numpy_helper

from onnxprune.attention.blocks import AttentionBlock, find_attention_blocks
from onnxprune.attention.head_scores import obs_heads
from onnxprune.attention.remove_heads import RemoveHeadsPass
from onnxprune.attention.slicing import keep_heads
from onnxprune.calibration.calibration import Calibration
from onnxprune.core.weights import const_array, set_const_array
from onnxprune.errors import InputError

H, D, SEQ = 4, 8, 5
E = H * D
ZERO = 2  # the head whose output-projection rows are zeroed


# ------------------------------------------------------------------------- builders


class _Shapes:
    """The pieces of Reshape targets, as each exporter spells them."""

    def __init__(self, b: GraphBuilder, style: str, x: str) -> None:
        self.b, self.style, self.x = b, style, x
        self.shared: dict[str, str] = {}
        if style == "dynamo":
            self.batch = b.op("Shape", [x], name="shape_b", start=0, end=1)
            self.seq = b.op("Shape", [x], name="shape_s", start=1, end=2)

    def _piece(self, value: int) -> str:
        if self.style == "dynamo":  # one initializer per distinct literal, shared
            key = f"lit_{value}".replace("-", "m")
            if key not in self.shared:
                self.shared[key] = self.b.const(key, np.array([value], dtype=np.int64))
            return self.shared[key]
        return self.b.const(self.b._fresh("lit"), np.array([value], dtype=np.int64))

    def _lead(self, x: str) -> list[str]:
        if self.style == "dynamo":
            return [self.batch, self.seq]
        shape = self.b.op("Shape", [x])
        out = []
        for i in (0, 1):
            g = self.b.op("Gather", [shape, self.b.const(self.b._fresh("idx"), np.array(i))],
                          axis=0)
            out.append(self.b.op("Unsqueeze", [g, self.b.const(self.b._fresh("ax"),
                                                               np.array([0]))]))
        return out

    def target(self, x: str, tail: list[int], key: str) -> str:
        if self.style == "dynamo" and key in self.shared:
            return self.shared[key]
        out = self.b.op("Concat", [*self._lead(x), *(self._piece(v) for v in tail)], axis=0)
        if self.style == "dynamo":
            self.shared[key] = out
        return out


def attention_model(
    style: str = "legacy",
    *,
    layers: int = 1,
    literal_heads: bool = False,
    literal_width: bool = False,
    mask: str = "input",
    kv_heads: int = H,
    seed: int = 0,
    ffn: int = 0,
    parallel: bool = False,
) -> onnx.ModelProto:
    """x[batch, seq, E] (+ mask) -> `layers` x (attention + residual + LayerNorm) -> y.

    ffn > 0 adds an encoder layer's FFN after each LayerNorm: l{l}.fc1 (E -> ffn, ReLU),
    l{l}.fc2 (ffn -> E), residual, LayerNorm l{l}_ffn_ln. With `parallel` the FFN reads the
    layer's input beside the attention (GPT-J style) and both are added to the residual.

    Layer l's nodes are l{l}_q/_k/_v (MatMul, + Add bias), l{l}_softmax, l{l}_o (output
    projection, weight `l{l}.o.weight`). mask: 'input' (additive [batch, 1, 1, seq]),
    'runtime' (built from a [batch, seq] input, shape not recorded), 'per_head'
    ([batch, H, seq, seq]) or 'none'. kv_heads < H gives multi-query style K/V.
    """
    b = GraphBuilder(seed=seed, constants_as_nodes=style == "legacy")
    x = b.input("x", [BATCH, "seq", E])
    m = None
    if mask == "input":
        m = b.input("mask", [BATCH, 1, 1, "seq"])
    elif mask == "per_head":
        m = b.input("mask", [BATCH, H, "seq", "seq"])
    elif mask == "per_head_const":  # a learned per-head bias on the scores (ALiBi-like)
        m = b.const("head_bias", np.linspace(-1, 1, H * SEQ).reshape(1, H, 1, SEQ)
                    .astype(np.float32))
    elif mask == "runtime":
        a = b.input("attention_mask", [BATCH, "seq"])
        u = b.op("Unsqueeze", [a, b.const("mask_axes", np.array([1, 2]))])
        inv = b.op("Sub", [b.const("one", np.float32(1.0)), u])
        m = b.op("Mul", [inv, b.const("neg", np.float32(-10000.0))])
    shapes = _Shapes(b, style, x)
    scale = b.const("scale", np.float32(1 / math.sqrt(D))) if style == "dynamo" else ""
    allow = {"allowzero": 1} if style == "dynamo" else {}
    for layer in range(layers):
        p = f"l{layer}"
        heads = {"q": H, "k": kv_heads, "v": kv_heads}
        split = {}
        for r in "qkv":
            w = b.weight(f"{p}.{r}.weight", [E, heads[r] * D])
            bias = b.const(f"{p}.{r}.bias",
                           (b.rng.standard_normal(heads[r] * D) * 0.1).astype(np.float32))
            h = b.op("MatMul", [x, w], name=f"{p}_{r}")
            h = b.op("Add", [bias, h] if style == "legacy" else [h, bias], name=f"{p}_{r}_bias")
            tail = [heads[r] if literal_heads else -1, D]
            t = shapes.target(x, tail, f"split{heads[r]}")
            h = b.op("Reshape", [h, t], name=f"{p}_{r}_split", **allow)
            perm = [0, 2, 3, 1] if r == "k" else [0, 2, 1, 3]
            split[r] = b.op("Transpose", [h], name=f"{p}_{r}_heads", perm=perm)
        s = b.op("MatMul", [split["q"], split["k"]], name=f"{p}_scores")
        if style == "legacy":  # one Constant per layer; dynamo shares one initializer
            scale = b.const(f"{p}.scale", np.float32(1 / math.sqrt(D)))
        s = b.op("Mul", [s, scale], name=f"{p}_scale")
        if m is not None:
            s = b.op("Add", [s, m], name=f"{p}_mask")
        s = b.op("Softmax", [s], name=f"{p}_softmax", axis=-1)
        c = b.op("MatMul", [s, split["v"]], name=f"{p}_context")
        c = b.op("Transpose", [c], name=f"{p}_merge_t", perm=[0, 2, 1, 3])
        t = shapes.target(x, [E if literal_width else -1], "merge")
        c = b.op("Reshape", [c, t], name=f"{p}_merge", **allow)
        o = b.op("MatMul", [c, b.weight(f"{p}.o.weight", [E, E])], name=f"{p}_o")
        o = b.op("Add", [o, b.const(f"{p}.o.bias", np.zeros(E, np.float32) + 0.01)],
                 name=f"{p}_o_bias")
        def feed_forward(inp: str, p: str = p) -> str:
            h = b.op("Relu", [dense(b, inp, E, ffn, name=f"{p}.fc1")], name=f"{p}_relu")
            return dense(b, h, ffn, E, name=f"{p}.fc2")

        if ffn and parallel:
            o = b.op("Add", [o, feed_forward(x)], name=f"{p}_branches")
        r_ = b.op("Add", [o, x], name=f"{p}_residual")
        x = b.op("LayerNormalization", [r_, b.const(f"{p}.ln.w", np.ones(E, np.float32)),
                                        b.const(f"{p}.ln.b", np.zeros(E, np.float32))],
                 name=f"{p}_ln", axis=-1)
        if ffn and not parallel:
            r_ = b.op("Add", [feed_forward(x), x], name=f"{p}_ffn_res")
            x = b.op("LayerNormalization",
                     [r_, b.const(f"{p}.ffn_ln.w", np.ones(E, np.float32)),
                      b.const(f"{p}.ffn_ln.b", np.zeros(E, np.float32))],
                     name=f"{p}_ffn_ln", axis=-1)
    b.nodes[-1].output[0] = "y"
    model = b.build(["y"], name=f"attention_{style}")
    if style == "dynamo":  # the dynamo exporter records every intermediate shape
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    return model


def feeds(model: onnx.ModelProto, batch: int = 2, seq: int = SEQ, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for i in model.graph.input:
        if i.name == "x":
            out[i.name] = rng.standard_normal((batch, seq, E)).astype(np.float32)
        elif i.name == "attention_mask":
            a = np.ones((batch, seq), np.float32)
            a[0, -2:] = 0
            out[i.name] = a
        elif i.name == "mask":
            heads = i.type.tensor_type.shape.dim[1].dim_value
            a = np.zeros((batch, heads, 1 if heads == 1 else seq, seq), np.float32)
            a[0, ..., -2:] = -10000.0
            out[i.name] = a
    return out


def zero_head(model: ir.Model, layer: int, head: int, part: str = "o") -> None:
    """Silences head `head` of block `layer`, so that removing it must change nothing.

    part 'o': its Q, K, V columns and output-projection rows are zeroed (it adds nothing).
    part 'v': its Q, K, V weight columns are zeroed and its output rows scaled by 0.01, so
    it adds b_V W_O, the same for every token, which the pass folds into the output bias.
    Either way it has the smallest weight norm, so the data-free pass picks it.
    """
    block = find_attention_blocks(model)[layer]
    for p in block.projections:
        w = const_array(p.use.weight).copy()  # type: ignore[union-attr]
        start = p.offset + head * p.head_size
        w[:, start:start + p.head_size] = 0
        set_const_array(p.use.weight, w)
    assert block.output is not None
    w = const_array(block.output.weight).copy()  # type: ignore[union-attr]
    w[head * D:(head + 1) * D] *= 0.0 if part == "o" else 0.01
    set_const_array(block.output.weight, w)


def check(model: ir.Model) -> onnx.ModelProto:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def heads_of(model: ir.Model) -> list[int]:
    return [b.num_heads for b in find_attention_blocks(model)]


# ------------------------------------------------------------------------- recognition


@pytest.mark.parametrize("style", ["legacy", "dynamo"])
@pytest.mark.parametrize("literal_heads", [False, True])
@pytest.mark.parametrize("literal_width", [False, True])
def test_block_is_recognised(style: str, literal_heads: bool, literal_width: bool) -> None:
    model = to_ir(attention_model(style, literal_heads=literal_heads,
                                  literal_width=literal_width))
    [block] = find_attention_blocks(model)
    assert block.prunable, block.skip_reason
    assert (block.num_heads, block.v_head_size) == (H, D)
    assert {p.role: p.use.node.name for p in block.projections} == {
        "q": "l0_q", "k": "l0_k", "v": "l0_v"}
    assert block.output is not None and block.output.node.name == "l0_o"
    # one site per split Reshape with a literal head count, one for a literal width
    assert len(block.sites) == 3 * literal_heads + literal_width
    assert block.to_dict()["heads"] == H


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"kv_heads": 1}, "4 query heads read 1 key/value heads"),
    ],
)
def test_unsupported_layouts_are_declined(kwargs: dict, reason: str) -> None:
    model = to_ir(attention_model("dynamo", **kwargs))
    [block] = find_attention_blocks(model)
    assert not block.prunable
    assert reason in (block.skip_reason or "")
    before = check(model).SerializeToString()
    RemoveHeadsPass(fraction=0.5)(model)
    assert check(model).SerializeToString() == before


def test_head_count_that_does_not_divide_is_declined() -> None:
    proto = attention_model("dynamo", literal_heads=True)
    for init in proto.graph.initializer:
        if init.name == "lit_4":  # the head count literal: 4 -> 3, which does not divide 32
            init.CopyFrom(numpy_helper.from_array(np.array([3], dtype=np.int64), init.name))
    proto = onnx.shape_inference.infer_shapes(proto)  # stale 4s would decline first
    for v in proto.graph.value_info:
        v.type.tensor_type.ClearField("shape")
    [block] = find_attention_blocks(to_ir(proto))
    assert "do not make the Q width" in (block.skip_reason or "")


def _attend(b: GraphBuilder, heads: dict[str, str], merge: str) -> onnx.ModelProto:
    """Scores, softmax, context, head merge (Reshape target `merge`) and output projection
    over per-head Q, K, V ([batch, heads, seq, D]); output y."""
    k = b.op("Transpose", [heads["k"]], perm=[0, 1, 3, 2])
    s = b.op("Softmax", [b.op("MatMul", [heads["q"], k])], axis=-1)
    c = b.op("Transpose", [b.op("MatMul", [s, heads["v"]])], perm=[0, 2, 1, 3])
    c = b.op("Reshape", [c, b.const(merge, np.array([0, 0, E]))])
    b.op("MatMul", [c, b.weight("o.w", [E, E])], output="y")
    return b.build(["y"])


def _rotary(b: GraphBuilder, q: str, tag: str = "") -> str:
    """q * cos + rotate_half(q) * sin, as Llama-style models write it (tables shared)."""
    half = D // 2
    lo = b.op("Slice", [q, b.const(f"{tag}r0", np.array([0])),
                        b.const(f"{tag}r1", np.array([half])), b.const(f"{tag}ra", np.array([-1]))])
    hi = b.op("Slice", [q, b.const(f"{tag}r2", np.array([half])),
                        b.const(f"{tag}r3", np.array([D])), b.const(f"{tag}rb", np.array([-1]))])
    rot = b.op("Concat", [b.op("Neg", [hi]), lo], axis=-1)
    if not any(i.name == "cos" for i in b.inits):
        b.const("cos", np.cos(np.arange(SEQ * D).reshape(SEQ, D)).astype(np.float32))
        b.const("sin", np.sin(np.arange(SEQ * D).reshape(SEQ, D)).astype(np.float32))
    return b.op("Add", [b.op("Mul", [q, "cos"]), b.op("Mul", [rot, "sin"])])


def _rotary_model(per_head_cos: bool = False) -> onnx.ModelProto:
    b = GraphBuilder(seed=0)
    x = b.input("x", [BATCH, SEQ, E])
    target = b.const("t", np.array([0, 0, H, D]))
    heads = {}
    for r in "qkv":
        h = b.op("Reshape", [b.op("MatMul", [x, b.weight(f"{r}.w", [E, E])]), target])
        h = b.op("Transpose", [h], perm=[0, 2, 1, 3])
        heads[r] = _rotary(b, h, r) if r != "v" else h
    proto = _attend(b, heads, "t2")
    if per_head_cos:  # a table that differs per head: removing one would change the others
        for init in proto.graph.initializer:
            if init.name == "cos":
                init.CopyFrom(numpy_helper.from_array(np.cos(np.arange(H * SEQ * D).reshape(
                    H, SEQ, D)).astype(np.float32), "cos"))
    return proto


def _exact_after_silencing(model: ir.Model, block: AttentionBlock, unit: int) -> None:
    """Zero the output rows of `unit`, remove exactly it: the output must not change."""
    rows = block.v_head_size
    w = const_array(block.output.weight).copy()  # type: ignore[union-attr]
    w[unit * rows: (unit + 1) * rows] = 0
    set_const_array(block.output.weight, w)  # type: ignore[union-attr]
    feeds = {"x": np.random.default_rng(1).standard_normal((2, SEQ, E)).astype(np.float32)}
    zeroed = run(check(model), feeds)
    keep = [u for u in range(block.num_heads) if u != unit]
    p = RemoveHeadsPass(fraction=0.0, keep={block.name: keep})
    p(model)
    assert p.result.removed == 1
    np.testing.assert_allclose(run(check(model), feeds), zeroed, atol=1e-5)


def test_rotary_embedding_is_recognised_and_exact() -> None:
    """q*cos + rotate_half(q)*sin on Q and K: the tables are shared by all heads."""
    model = to_ir(_rotary_model())
    [block] = find_attention_blocks(model)
    assert block.prunable, block.skip_reason
    assert block.num_heads == H
    _exact_after_silencing(model, block, ZERO)


def test_rotary_table_per_head_is_declined() -> None:
    [block] = find_attention_blocks(to_ir(_rotary_model(per_head_cos=True)))
    assert "constant with a head axis" in (block.skip_reason or ""), block.skip_reason


def _gqa_model(kv: int = 2):
    """K and V have `kv` heads, repeated to H by Unsqueeze -> Expand -> Reshape (repeat_kv)."""
    b = GraphBuilder(seed=0)
    x = b.input("x", [BATCH, SEQ, E])
    heads = {}
    for r, n in (("q", H), ("k", kv), ("v", kv)):
        h = b.op("MatMul", [x, b.weight(f"{r}.w", [E, n * D])])
        h = b.op("Reshape", [h, b.const(f"{r}.t", np.array([0, 0, n, D]))])
        h = b.op("Transpose", [h], perm=[0, 2, 1, 3])
        if r != "q":
            h = b.op("Unsqueeze", [h, b.const(f"{r}.ax", np.array([2]))])
            h = b.op("Expand", [h, b.const(f"{r}.rep", np.array([1, kv, H // kv, 1, 1]))])
            h = b.op("Reshape", [h, b.const(f"{r}.t2", np.array([0, H, -1, D]))])
        heads[r] = h
    return _attend(b, heads, "t3")


def test_grouped_query_attention_removes_whole_kv_groups() -> None:
    """A unit is one K/V head with the query heads that read it; every literal follows."""
    model = to_ir(_gqa_model())
    [block] = find_attention_blocks(model)
    assert block.prunable, block.skip_reason
    assert (block.num_heads, block.group) == (2, H // 2)
    assert block.to_dict()["heads"] == H
    feeds = {"x": np.random.default_rng(1).standard_normal((2, SEQ, E)).astype(np.float32)}
    # zero the output rows of unit 0 (query heads 0 .. H/2-1), then remove exactly that unit
    w = const_array(block.output.weight)
    w = w.copy()
    w[: (H // 2) * D] = 0
    set_const_array(block.output.weight, w)
    zeroed = run(check(model), feeds)
    p = RemoveHeadsPass(fraction=0.0, keep={block.name: [1]})
    p(model)
    assert p.result.removed == 1
    pruned = check(model)
    np.testing.assert_allclose(run(pruned, feeds), zeroed, atol=1e-5)
    shapes = {i.name: numpy_helper.to_array(i).tolist() for i in pruned.graph.initializer
              if i.name.startswith(("k.", "v.", "q.")) and i.name.endswith((".t", ".rep", ".t2"))}
    assert shapes["k.rep"] == [1, 1, H // 2, 1, 1] and shapes["k.t2"] == [0, H // 2, -1, D]


def test_a_softmax_that_is_not_attention_is_not_listed() -> None:
    b = GraphBuilder(seed=0)
    x = b.input("x", [BATCH, E])
    b.op("Softmax", [b.op("MatMul", [x, b.weight("w", [E, 3])])], output="y")
    assert find_attention_blocks(to_ir(b.build(["y"]))) == []


# ------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("style", ["legacy", "dynamo"])
@pytest.mark.parametrize(("literal_heads", "literal_width"), [(False, False), (True, True)])
def test_removing_a_silent_head_changes_nothing(style: str, literal_heads: bool,
                                                literal_width: bool) -> None:
    proto = attention_model(style, literal_heads=literal_heads, literal_width=literal_width,
                            layers=2)
    model = to_ir(proto)
    for layer in (0, 1):
        zero_head(model, layer, ZERO)
    f = feeds(proto)
    expected = run(model, f)[0]
    p = RemoveHeadsPass(fraction=1 / H)
    result = p(model)
    assert result.modified
    assert [b.removed for b in p.result.blocks] == [(ZERO,), (ZERO,)]
    out = check(model)
    assert heads_of(model) == [H - 1, H - 1]
    np.testing.assert_allclose(run(out, f)[0], expected, rtol=1e-5, atol=1e-5)
    assert const_array(model.graph.initializers.get("l0.o.weight")
                       or _const(model, "l0.o.weight")).shape == (E - D, E)
    run(out, feeds(proto, batch=3, seq=7))  # other batch and sequence sizes still run


def _const(model: ir.Model, name: str) -> ir.Value:
    return next(n.outputs[0] for n in model.graph if n.outputs[0].name == name)


@pytest.mark.parametrize("style", ["legacy", "dynamo"])
def test_value_bias_of_a_removed_head_is_folded_exactly(style: str) -> None:
    proto = attention_model(style)
    model = to_ir(proto)
    zero_head(model, 0, ZERO, part="v")  # the head now adds b_v W_o to every token
    f = feeds(proto)
    expected = run(model, f)[0]
    RemoveHeadsPass(fraction=1 / H)(model)
    np.testing.assert_allclose(run(check(model), f)[0], expected, rtol=1e-5, atol=1e-5)


def test_shared_literals_are_copied_not_edited() -> None:
    """Dynamo shares one split Concat across layers: pruning layer 0 must not touch layer 1."""
    proto = attention_model("dynamo", layers=2, literal_heads=True, literal_width=True)
    model = to_ir(proto)
    zero_head(model, 0, ZERO)
    f = feeds(proto)
    expected = run(model, f)[0]
    p = RemoveHeadsPass(fraction=1 / H, ignore=["l1_*"])
    p(model)
    assert heads_of(model) == [H - 1, H]
    assert [b.reason for b in p.result.blocks][1].startswith("node 'l1_")
    out = check(model)
    np.testing.assert_allclose(run(out, f)[0], expected, rtol=1e-5, atol=1e-5)
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    assert inits["lit_4"].tolist() == [4] and inits["lit_32"].tolist() == [32]
    assert inits["scale"] == np.float32(1 / math.sqrt(D))


@pytest.mark.parametrize("literal", [True, False])
def test_recorded_shapes_follow(literal: bool) -> None:
    """Shapes recorded on values shrink with the heads, literal head counts or -1 alike."""
    recorded = to_ir(attention_model("dynamo", layers=2, literal_heads=True,
                                     literal_width=True))
    model = recorded if literal else to_ir(attention_model("dynamo", layers=2))
    if not literal:  # the exporter records [batch, seq, 4, 8] even where the target says -1
        shapes = {v.name: v.shape for n in recorded.graph for v in n.outputs}
        for n in model.graph:
            for v in n.outputs:
                if shapes.get(v.name) is not None and n.op_type != "Concat":
                    v.shape = shapes[v.name]
    softmax = next(n for n in model.graph if n.name == "l0_softmax").outputs[0]
    assert softmax.shape is not None and softmax.shape[1] == H
    RemoveHeadsPass(fraction=0.5)(model)
    assert softmax.shape[1] == H // 2
    q = next(n for n in model.graph if n.name == "l1_q").outputs[0]
    assert q.shape is not None and q.shape[-1] == E // 2
    check(model)


def test_per_head_constant_bias_is_sliced_with_the_heads() -> None:
    proto = attention_model("dynamo", mask="per_head_const", layers=2)
    model = to_ir(proto)
    assert all(len(b.head_constants) == 1 for b in find_attention_blocks(model))
    for layer in (0, 1):
        zero_head(model, layer, ZERO)
    f = feeds(proto)
    expected = run(model, f)[0]
    RemoveHeadsPass(fraction=1 / H, ignore=["l1_*"])(model)  # the shared bias gets a copy
    out = check(model)
    np.testing.assert_allclose(run(out, f)[0], expected, rtol=1e-5, atol=1e-5)
    shapes = sorted(tuple(i.dims) for i in out.graph.initializer if i.name.startswith("head_bias"))
    assert shapes == [(1, H - 1, 1, SEQ), (1, H, 1, SEQ)]


def test_runtime_mask_is_probed() -> None:
    """The legacy mask's shape is not recorded: one run settles it broadcasts over heads."""
    proto = attention_model("legacy", mask="runtime")
    model = to_ir(proto)
    [block] = find_attention_blocks(model)
    assert not block.prunable and "cannot tell" in (block.skip_reason or "")
    zero_head(model, 0, ZERO)
    f = feeds(proto)
    expected = run(model, f)[0]
    p = RemoveHeadsPass(fraction=1 / H)
    p(model)
    assert p.result.removed == 1
    np.testing.assert_allclose(run(check(model), f)[0], expected, rtol=1e-5, atol=1e-5)


def test_keep_heads_rejects_bad_indices() -> None:
    model = to_ir(attention_model("dynamo"))
    [block] = find_attention_blocks(model)
    for bad in ([], [H], [1, 1]):
        with pytest.raises(ValueError):
            keep_heads(model.graph, block, bad)


# ------------------------------------------------------------------------- fused ops


def _fused_model(kind: str) -> onnx.ModelProto:
    """com.microsoft Attention / MultiHeadAttention, or ONNX Attention-23 (3-D or 4-D)."""
    b = GraphBuilder(seed=3)
    x = b.input("x", [BATCH, SEQ, E])
    opset, extra = 17, [helper.make_opsetid("com.microsoft", 1)]
    if kind.startswith("ms_attention"):
        w = b.weight("qkv.weight", [E, 3 * E])
        bias = b.const("qkv.bias", (b.rng.standard_normal(3 * E) * 0.1).astype(np.float32))
        sizes = {"qkv_hidden_sizes": [E, E, E]} if kind.endswith("sizes") else {}
        c = b.op("Attention", [x, w, bias], name="attn", domain="com.microsoft", num_heads=H,
                 **sizes)
    else:
        proj = {}
        for r in "qkv":
            h = b.op("MatMul", [x, b.weight(f"{r}.weight", [E, E])], name=f"l0_{r}")
            proj[r] = b.op("Add", [h, b.const(f"{r}.bias", (b.rng.standard_normal(E) * 0.1)
                                              .astype(np.float32))])
        if kind == "ms_mha":
            c = b.op("MultiHeadAttention", [proj["q"], proj["k"], proj["v"]], name="attn",
                     domain="com.microsoft", num_heads=H)
        elif kind == "attention23":
            opset, extra = 23, []
            c = b.op("Attention", [proj["q"], proj["k"], proj["v"]], name="attn",
                     q_num_heads=H, kv_num_heads=H)
        else:  # attention23 with 4-D inputs
            opset, extra = 23, []
            t = b.const("t", np.array([0, 0, H, D]))
            four = [b.op("Transpose", [b.op("Reshape", [proj[r], t])], perm=[0, 2, 1, 3])
                    for r in "qkv"]
            c = b.op("Attention", four, name="attn")
            c = b.op("Transpose", [c], perm=[0, 2, 1, 3])
            c = b.op("Reshape", [c, b.const("t2", np.array([0, 0, E]))])
    b.op("MatMul", [c, b.weight("l0.o.weight", [E, E])], name="l0_o", output="y")
    nodes, inits = b.nodes, b.inits
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, SEQ, E])
    graph = helper.make_graph(nodes, "fused", b.inputs, [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra],
                              ir_version=10 if opset > 21 else 8)
    return model


@pytest.mark.parametrize(
    "kind", ["ms_attention", "ms_attention_sizes", "ms_mha", "attention23", "attention23_4d"])
def test_fused_attention_silent_head(kind: str) -> None:
    proto = _fused_model(kind)
    model = to_ir(proto)
    [block] = find_attention_blocks(model)
    assert block.prunable, block.skip_reason
    assert block.num_heads == H
    zero_head(model, 0, ZERO)
    f = {"x": np.random.default_rng(0).standard_normal((2, SEQ, E)).astype(np.float32)}
    expected = run(model, f)[0]
    RemoveHeadsPass(fraction=1 / H)(model)
    out = check(model)
    assert heads_of(model) == [H - 1]
    np.testing.assert_allclose(run(out, f)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["ms_attention", "ms_mha"])
def test_fused_value_bias_fold_on_a_graph_output(kind: str) -> None:
    """The output projection writes the graph output: the folded bias needs an Add there."""
    proto = _fused_model(kind)
    model = to_ir(proto)
    zero_head(model, 0, ZERO, part="v")
    f = {"x": np.random.default_rng(0).standard_normal((2, SEQ, E)).astype(np.float32)}
    expected = run(model, f)[0]
    RemoveHeadsPass(fraction=1 / H)(model)
    out = check(model)
    assert [o.name for o in out.graph.output] == ["y"]
    np.testing.assert_allclose(run(out, f)[0], expected, rtol=1e-5, atol=1e-5)


def test_obs_heads_drops_the_redundant_head() -> None:
    """y depends on heads 0, 1, 3 only: head-level OBS removes head 2 and refits exactly."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 8))
    w = rng.standard_normal((8, 3))
    w[4:6] = 0  # head 2 of 4 (size 2)
    y = x @ w + 0.5
    xa = np.hstack([x, np.ones((500, 1))])
    keep, fit = obs_heads(xa.T @ xa, xa.T @ y, heads=4, n_keep=3, ridge=1e-9)
    assert keep.tolist() == [0, 1, 3]
    np.testing.assert_allclose(fit[:-1], w[[0, 1, 2, 3, 6, 7]], atol=1e-6)
    np.testing.assert_allclose(fit[-1], 0.5, atol=1e-6)


# ------------------------------------------------------------------------- the pass


def test_counts_per_block_and_global() -> None:
    model = to_ir(attention_model("dynamo", layers=3))
    p = RemoveHeadsPass(fraction=0.5)
    p(model)
    assert heads_of(model) == [2, 2, 2]
    d = p.result.to_dict()
    assert d["removed_heads"] == 6 and d["blocks"][0]["heads_before"] == H
    model = to_ir(attention_model("dynamo", layers=3))
    p = RemoveHeadsPass(fraction=0.5, global_ranking=True, max_block_fraction=0.75)
    p(model)
    assert sum(heads_of(model)) == 6 and min(heads_of(model)) >= 1


def test_nothing_to_do_reports_unmodified() -> None:
    model = to_ir(attention_model("dynamo"))
    assert not RemoveHeadsPass(fraction=0.1)(model).modified  # floor(0.1 * 4) = 0


@pytest.mark.parametrize(
    "kwargs",
    [{"fraction": 1.0}, {"fraction": -0.1}, {"fraction": 0.5, "criterion": "contribution"},
     {"fraction": 0.5, "criterion": "bogus"}],
)
def test_bad_options(kwargs: dict) -> None:
    with pytest.raises(InputError):
        RemoveHeadsPass(**kwargs)


def _low_rank(proto: onnx.ModelProto, seed: int, rank: int = 4) -> dict:
    """Inputs on a `rank`-dimensional subspace, like real activations (not white noise)."""
    f = feeds(proto, batch=8, seq=6, seed=seed)
    basis = np.random.default_rng(100).standard_normal((rank, E)).astype(np.float32)
    z = np.random.default_rng(seed).standard_normal((8, 6, rank)).astype(np.float32)
    f["x"] = z @ basis
    return f


def _calibration(proto: onnx.ModelProto, reconstruct: str = "lstsq") -> Calibration:
    batches = [_low_rank(proto, seed) for seed in range(8)]
    return Calibration(batches, reconstruct=reconstruct)  # type: ignore[arg-type]


def test_heads_are_ranked_across_blocks_by_default_only_with_data() -> None:
    proto = attention_model("dynamo", layers=2, seed=4)
    assert not RemoveHeadsPass(fraction=0.5).global_ranking
    assert RemoveHeadsPass(fraction=0.5, calibration=_calibration(proto)).global_ranking
    assert not RemoveHeadsPass(fraction=0.5, calibration=_calibration(proto),
                               global_ranking=False).global_ranking


def _error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.mark.parametrize("criterion", ["contribution", "obs"])
def test_calibrated_removal_beats_data_free(criterion: str) -> None:
    proto = attention_model("dynamo", layers=2, seed=4)
    f = _low_rank(proto, seed=99)  # held out
    expected = run(proto, f)[0]
    free = to_ir(proto)
    RemoveHeadsPass(fraction=0.5)(free)
    calibrated = to_ir(proto)
    p = RemoveHeadsPass(fraction=0.5, criterion=criterion,  # type: ignore[arg-type]
                        calibration=_calibration(proto), global_ranking=False)
    p(calibrated)
    assert heads_of(calibrated) == [2, 2]
    e_free = _error(expected, run(check(free), f)[0])
    e_cal = _error(expected, run(check(calibrated), f)[0])
    assert e_cal < 0.8 * e_free, (e_cal, e_free)


@pytest.mark.parametrize("reconstruct", ["none", "bias", "lstsq"])
def test_calibrated_silent_head_is_exact(reconstruct: str) -> None:
    proto = attention_model("legacy", mask="runtime")
    model = to_ir(proto)
    zero_head(model, 0, ZERO)
    f = feeds(proto)
    expected = run(model, f)[0]
    criterion = "contribution" if reconstruct != "lstsq" else "obs"
    p = RemoveHeadsPass(fraction=1 / H, criterion=criterion,  # type: ignore[arg-type]
                        calibration=_calibration(proto, reconstruct))
    p(model)
    assert p.result.blocks[0].removed == (ZERO,)
    np.testing.assert_allclose(run(check(model), f)[0], expected, rtol=1e-4, atol=1e-4)


def test_block_dict_for_inspect() -> None:
    blocks = find_attention_blocks(to_ir(attention_model("legacy")), ignore=["l0_o"])
    d = blocks[0].to_dict()
    assert d["prunable"] is False and "matches --ignore" in str(d["reason"])
    assert isinstance(blocks[0], AttentionBlock)


# ------------------------------------------------------------- today's export spellings


def _packed_model(cut: str) -> onnx.ModelProto:
    """GPT-2 / Phi-3 style: one [E, 3E] projection (+ bias) cut into Q, K, V by Split or
    Slice on the last axis, with a NaN guard after Softmax as exporters now write it."""
    b = GraphBuilder(seed=0)
    x = b.input("x", [BATCH, SEQ, E])
    qkv = b.op("Add", [b.op("MatMul", [x, b.weight("qkv.w", [E, 3 * E])]),
                       b.weight("qkv.b", [3 * E])])
    if cut == "split":
        parts = b.op_multi("Split", [qkv, b.const("sizes", np.array([E, E, E]))], outputs=3,
                           axis=-1)
    else:
        parts = [b.op("Slice", [qkv, b.const(f"s{i}", np.array([i * E])),
                                b.const(f"e{i}", np.array([(i + 1) * E if i < 2 else 2**62])),
                                b.const(f"a{i}", np.array([-1]))]) for i in range(3)]
    heads = {}
    for r, part in zip("qkv", parts, strict=True):
        h = b.op("Reshape", [part, b.const(f"{r}.t", np.array([0, 0, H, D]))])
        heads[r] = b.op("Transpose", [h], perm=[0, 2, 1, 3])
    k = b.op("Transpose", [heads["k"]], perm=[0, 1, 3, 2])
    s = b.op("Softmax", [b.op("MatMul", [heads["q"], k])], axis=-1)
    guard = b.op("Where", [b.op("IsNaN", [s]), b.const("zero", np.array(0.0)), s])
    c = b.op("Transpose", [b.op("MatMul", [guard, heads["v"]])], perm=[0, 2, 1, 3])
    c = b.op("Reshape", [c, b.const("merge", np.array([0, 0, E]))])
    b.op("MatMul", [c, b.weight("o.w", [E, E])], output="y")
    return b.build(["y"])


@pytest.mark.parametrize("cut", ["split", "slice"])
def test_packed_qkv_is_recognised_and_exact(cut: str) -> None:
    model = to_ir(_packed_model(cut))
    [block] = find_attention_blocks(model)
    assert block.prunable, block.skip_reason
    assert sorted(p.offset for p in block.projections) == [0, E, 2 * E]
    _exact_after_silencing(model, block, ZERO)
    w = next(v for v in model.graph.initializers.values() if v.name == "qkv.w")
    assert const_array(w).shape == (E, 3 * (H - 1) * D)


def test_packed_split_with_a_foreign_part_is_declined() -> None:
    proto = _packed_model("split")
    rng = np.random.default_rng(0)
    new = {"sizes": np.array([E, E, E, 4]),  # a fourth part, 4 wide, that is not attention
           "qkv.w": rng.standard_normal((E, 3 * E + 4)).astype(np.float32),
           "qkv.b": rng.standard_normal(3 * E + 4).astype(np.float32)}
    for init in proto.graph.initializer:
        if init.name in new:
            init.CopyFrom(numpy_helper.from_array(new[init.name], init.name))
    for node in proto.graph.node:
        if node.op_type == "Split":
            node.output.append("extra")
    proto.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, None))
    [block] = find_attention_blocks(to_ir(proto))
    assert "output 3 of Split" in (block.skip_reason or ""), block.skip_reason
