"""FoldBatchNormPass: Conv + BatchNormalization -> Conv, exact to 1e-5, and what it leaves."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from helpers import GraphBuilder, run, to_ir

from onnxprune.conv.fold_batchnorm import FoldBatchNormPass


def _model(*, bias: bool, shared_weight: bool = False, bn_out_is_output: bool = False,
           extra_reader: bool = False) -> onnx.ModelProto:
    b = GraphBuilder(seed=3)
    rng = np.random.default_rng(3)
    x = b.input("x", [2, 4, 6, 6])
    w = b.const("w", rng.standard_normal((5, 4, 3, 3)).astype(np.float32))
    ins = [x, w] + ([b.const("b", rng.standard_normal(5).astype(np.float32))] if bias else [])
    c = b.op("Conv", ins, name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    vec = [b.const(n, rng.uniform(lo, hi, 5).astype(np.float32))
           for n, lo, hi in (("g", 0.5, 2), ("beta", -1, 1), ("mu", -1, 1), ("var", 0.1, 2))]
    y = b.op("BatchNormalization", [c, *vec], name="bn", epsilon=1e-3,
             output="y" if bn_out_is_output else None)
    outs = [y] if bn_out_is_output else [b.op("Relu", [y], output="y")]
    if shared_weight:
        outs.append(b.op("Conv", [x, w], name="other", kernel_shape=[3, 3], output="z"))
    if extra_reader:
        outs.append(b.op("Sigmoid", [c], output="z"))
    return b.build(outs)


def _check(model: onnx.ModelProto, folded: bool) -> ir.Model:
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(np.float32)}
    before = run(model, feeds)
    m = to_ir(model)
    p = FoldBatchNormPass()
    result = p(m)
    assert result.modified == folded
    proto = ir.serde.serialize_model(m)
    onnx.checker.check_model(proto, full_check=True)
    after = run(proto, feeds)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    ops = [n.op_type for n in m.graph]
    assert ("BatchNormalization" in ops) != folded
    return m


def test_folds_with_and_without_conv_bias() -> None:
    _check(_model(bias=True), True)
    _check(_model(bias=False), True)


def test_folds_when_the_bn_output_is_the_graph_output() -> None:
    m = _check(_model(bias=True, bn_out_is_output=True), True)
    assert [o.name for o in m.graph.outputs] == ["y"]


def test_a_weight_shared_with_another_conv_is_copied_not_changed() -> None:
    m = _check(_model(bias=True, shared_weight=True), True)
    other = next(n for n in m.graph if n.name == "other")
    assert other.inputs[1].name == "w"


def test_declines_a_conv_output_read_elsewhere() -> None:
    m = to_ir(_model(bias=True, extra_reader=True))
    p = FoldBatchNormPass()
    assert not p(m).modified
    assert p.result.skipped == (("bn", "the Conv output is also read elsewhere"),)
