"""Conv channel groups: random CNNs, channels whose outgoing weights are zero, removed exactly.

hypothesis draws a chain of blocks (plain/strided/dilated/padded Conv, BatchNorm, the usual
activations, depthwise and grouped Conv, residual blocks, Concat and Split along channels,
squeeze-and-excitation, pooling, Resize, Pad) ending in GlobalAveragePool -> Flatten -> Gemm
or Flatten -> Gemm directly. For every prunable group a random third of its channels gets
zero outgoing weights; removing them all at once must leave onnxruntime's output unchanged
(1e-5), the model must pass onnx.checker, and every Conv weight shrinks as the groups say.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import GraphBuilder, run, to_ir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto

from onnxprune.channels.groups import find_channel_groups
from onnxprune.channels.model import ChannelGroup
from onnxprune.channels.slicing import keep_many
from onnxprune.core.weights import const_array, set_const_array

H = W = 8
BLOCKS = ("conv", "conv_s2", "conv_dil", "bn", "relu", "relu6", "hardswish", "hardsigmoid",
          "silu", "prelu", "sigmoid", "depthwise", "grouped", "residual", "concat", "split",
          "se", "maxpool", "avgpool", "resize", "pad", "mul_const")


class Net:
    def __init__(self, seed: int, channels: int = 8) -> None:
        self.b = GraphBuilder(seed=seed)
        self.rng = np.random.default_rng(seed)
        self.x = self.b.input("x", [2, 3, H, W])
        self.c = 3
        self.hw = H
        self.x = self.conv(self.x, channels, 3, pad=1)

    def w(self, name: str, shape: tuple[int, ...]) -> str:
        fan = int(np.prod(shape[1:]))
        return self.b.const(name, (self.rng.standard_normal(shape) / np.sqrt(fan)).astype(
            np.float32))

    def vec(self, name: str, n: int, lo: float = -0.5, hi: float = 0.5) -> str:
        return self.b.const(name, self.rng.uniform(lo, hi, n).astype(np.float32))

    def conv(self, x: str, cout: int, k: int, *, stride: int = 1, dil: int = 1, pad: int = 0,
             group: int = 1, bias: bool = True, cin: int | None = None) -> str:
        cin = self.c if cin is None else cin
        name = self.b._fresh("conv")
        ins = [x, self.w(f"{name}.w", (cout, cin // group, k, k))]
        if bias:
            ins.append(self.vec(f"{name}.b", cout))
        out = self.b.op("Conv", ins, name=name, kernel_shape=[k, k], strides=[stride] * 2,
                        dilations=[dil] * 2, pads=[pad] * 4, group=group)
        self.hw = (self.hw + 2 * pad - dil * (k - 1) - 1) // stride + 1
        self.c = cout
        return out

    def bn(self, x: str) -> str:
        n = self.b._fresh("bn")
        c = self.c
        return self.b.op("BatchNormalization", [x, self.vec(f"{n}.s", c, 0.5, 1.5),
                                                self.vec(f"{n}.b", c), self.vec(f"{n}.m", c),
                                                self.vec(f"{n}.v", c, 0.5, 1.5)], name=n)

    def block(self, kind: str) -> None:
        b, x, c = self.b, self.x, self.c
        if kind == "conv":
            self.x = self.conv(x, int(self.rng.integers(4, 10)), 3, pad=1)
        elif kind == "conv_s2" and self.hw >= 4:
            self.x = self.conv(x, int(self.rng.integers(4, 10)), 3, stride=2, pad=1)
        elif kind == "conv_dil" and self.hw >= 5:
            self.x = self.conv(x, int(self.rng.integers(4, 10)), 3, dil=2, pad=2, bias=False)
        elif kind == "bn":
            self.x = self.bn(x)
        elif kind == "relu":
            self.x = b.op("Relu", [x])
        elif kind == "relu6":
            self.x = b.op("Clip", [x, b.const(b._fresh("lo"), np.float32(0)),
                                   b.const(b._fresh("hi"), np.float32(6))])
        elif kind == "hardswish":
            self.x = b.op("HardSwish", [x])
        elif kind == "hardsigmoid":
            self.x = b.op("HardSigmoid", [x])
        elif kind == "sigmoid":
            self.x = b.op("Sigmoid", [x])
        elif kind == "silu":
            self.x = b.op("Mul", [x, b.op("Sigmoid", [x])])
        elif kind == "prelu":
            self.x = b.op("PRelu", [x, b.const(b._fresh("slope"), self.rng.uniform(
                0, 0.3, (c, 1, 1)).astype(np.float32))])
        elif kind == "mul_const":
            self.x = b.op("Mul", [x, b.const(b._fresh("scale"), self.rng.uniform(
                0.5, 1.5, (1, c, 1, 1)).astype(np.float32))])
        elif kind == "depthwise":
            self.x = self.conv(x, c, 3, pad=1, group=c)
        elif kind == "grouped" and c % 2 == 0:
            self.x = self.conv(x, 2 * int(self.rng.integers(2, 5)), 3, pad=1, group=2)
        elif kind == "residual":
            h = b.op("Relu", [self.conv(x, int(self.rng.integers(4, 10)), 3, pad=1)])
            h = self.conv(h, c, 1)
            self.x = b.op("Add", [x, h])
        elif kind == "concat":
            left = self.conv(x, int(self.rng.integers(2, 6)), 1, cin=c)
            cl = self.c
            right = self.conv(x, int(self.rng.integers(2, 6)), 3, pad=1, cin=c)
            self.x = b.op("Concat", [left, right], axis=1)
            self.c = cl + self.c
        elif kind == "split" and c >= 4:
            half = c // 2
            sizes = b.const(b._fresh("sizes"), np.array([half, c - half], np.int64))
            p, q = b.op_multi("Split", [x, sizes], axis=1, outputs=2)
            self.x = b.op("Add", [b.op("Relu", [self.conv(p, 6, 1, cin=half)]),
                                  self.conv(q, 6, 3, pad=1, cin=c - half)])
        elif kind == "se":
            s = b.op("GlobalAveragePool", [x])
            s = b.op("Relu", [self.conv(s, max(2, c // 2), 1, cin=c)])
            s = b.op("HardSigmoid", [self.conv(s, c, 1)])
            self.x = b.op("Mul", [s, x])
        elif kind == "maxpool" and self.hw >= 4:
            self.x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
            self.hw //= 2
        elif kind == "avgpool":
            self.x = b.op("AveragePool", [x], kernel_shape=[3, 3], strides=[1, 1],
                          pads=[1, 1, 1, 1])
        elif kind == "resize" and self.hw <= 8:
            scales = b.const(b._fresh("scales"), np.array([1, 1, 2, 2], np.float32))
            self.x = b.op("Resize", [x, "", scales], mode="nearest")
            self.hw *= 2
        elif kind == "pad":
            pads = b.const(b._fresh("pads"), np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
            self.x = b.op("Pad", [x, pads])
            self.hw += 2

    def finish(self, head: str) -> onnx.ModelProto:
        b, x = self.b, self.x
        if head == "gap":
            x = b.op("GlobalAveragePool", [x])
            feats = self.c
        else:
            feats = self.c * self.hw * self.hw
        x = b.op("Flatten", [x], axis=1)
        b.op("Gemm", [x, self.w("fc.w", (5, feats)), self.vec("fc.b", 5)], transB=1,
             name="fc", output="y")
        return b.build(["y"], infer_shapes=head == "flat")


def zero_and_cut(m: ir.Model, rng: np.random.Generator) -> list[tuple[ChannelGroup, np.ndarray]]:
    plan = []
    for g in find_channel_groups(m):
        if not g.prunable or g.size < 2:
            continue
        drop = rng.choice(g.size, size=max(1, g.size // 3), replace=False)
        for use in g.consumers:
            w = const_array(use.weight).copy()  # type: ignore[union-attr]
            cls = g.channel_map(use, "in")
            np.moveaxis(w, use.reduce_axis, 0)[np.isin(cls, drop)] = 0
            set_const_array(use.weight, w)
        plan.append((g, np.setdiff1d(np.arange(g.size), drop)))
    return plan


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=7),
       head=st.sampled_from(["gap", "flat"]), seed=st.integers(0, 10_000))
def test_removing_zero_output_channels_of_random_cnns_is_exact(
        blocks: list[str], head: str, seed: int) -> None:
    net = Net(seed)
    for kind in blocks:
        net.block(kind)
    model = net.finish(head)
    m = to_ir(model)
    plan = zero_and_cut(m, np.random.default_rng(seed))
    groups = find_channel_groups(m)
    assert all(g.prunable for g in groups if g.name != "fc"), [
        (g.name, g.skip_reason) for g in groups if not g.prunable]
    feeds = {"x": np.random.default_rng(seed).standard_normal((2, 3, H, W)).astype(np.float32)}
    before = run(m, feeds)[0]
    sizes = {u.weight.name: const_array(u.weight).shape for g, _ in plan for u in g.producers}  # type: ignore[union-attr]
    keep_many(m.graph, plan)
    proto = ir.serde.serialize_model(m)
    onnx.checker.check_model(proto, full_check=True)
    after = run(proto, feeds)[0]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)
    if plan:
        shrunk = [n for n, s in sizes.items() if const_array(
            m.graph.initializers[n]).shape != s]  # type: ignore[union-attr]
        assert shrunk


def test_resnet_like_block_groups() -> None:
    """conv -> BN -> relu -> [conv -> BN] + identity: the residual couples both producers."""
    net = Net(0)
    net.block("bn")
    net.block("relu")
    net.block("residual")
    model = net.finish("gap")
    groups = {g.name: g for g in find_channel_groups(to_ir(model))}
    stem = groups["conv_1"]
    assert stem.prunable and sorted(u.node.name for u in stem.producers) == ["conv_1", "conv_6"]
    assert sorted(u.node.name for u in stem.consumers) == ["conv_4", "fc"]
    fc = stem.channel_map(next(u for u in stem.consumers if u.node.name == "fc"), "in")
    assert fc.tolist() == list(range(8))


def test_flatten_maps_each_channel_to_its_block_of_features() -> None:
    net = Net(1)
    model = net.finish("flat")
    g = next(g for g in find_channel_groups(to_ir(model)) if g.name == "conv_1")
    fc = next(u for u in g.consumers if u.node.name == "fc")
    assert g.channel_map(fc, "in").tolist() == np.repeat(np.arange(8), H * W).tolist()


def test_depthwise_conv_carries_channels_and_its_group_is_rewritten() -> None:
    net = Net(2)
    net.block("depthwise")
    m = to_ir(net.finish("gap"))
    g = next(g for g in find_channel_groups(m) if g.name == "conv_1")
    keep_many(m.graph, [(g, np.arange(5))])
    dw = next(n for n in m.graph if n.name == "conv_2")
    assert dw.attributes["group"].as_int() == 5
    assert const_array(dw.inputs[1]).shape == (5, 1, 3, 3)  # type: ignore[union-attr]


def test_grouped_conv_removes_the_same_index_from_every_group() -> None:
    net = Net(3)
    net.block("grouped")
    m = to_ir(net.finish("gap"))
    g = next(g for g in find_channel_groups(m) if g.name == "conv_1")
    assert g.size == 4  # 8 channels in two groups of 4: index i of both groups goes together
    cons = next(u for u in g.consumers if u.node.op_type == "Conv")
    assert g.channel_map(cons, "in").tolist() == [0, 1, 2, 3]
    assert g.maps[cons.node.inputs[0]].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_concat_gives_each_input_its_offset_range() -> None:
    net = Net(4)
    net.block("concat")
    m = to_ir(net.finish("gap"))
    groups = {g.name: g for g in find_channel_groups(m)}
    left, right = groups["conv_2"], groups["conv_3"]
    fc_left = left.channel_map(next(u for u in left.consumers if u.node.name == "fc"), "in")
    fc_right = right.channel_map(next(u for u in right.consumers if u.node.name == "fc"), "in")
    n = left.size
    assert (fc_left[:n] >= 0).all() and (fc_left[n:] == -1).all()
    assert (fc_right[:n] == -1).all() and (fc_right[n:] >= 0).all()


@pytest.mark.parametrize("bad", ["lrn", "reshape_rt", "graph_output"])
def test_declines_conv_graphs_it_does_not_understand_naming_the_node(bad: str) -> None:
    net = Net(5)
    b = net.b
    extra = []
    if bad == "lrn":
        net.x = b.op("LRN", [net.x], size=3, name="norm")
    elif bad == "reshape_rt":
        shape = b.op("Shape", [net.x], name="shape_of")
        net.x = b.op("Reshape", [net.x, shape], name="rt")
    else:
        extra = [net.x]
    model = net.finish("gap")
    if extra:
        model.graph.output.append(onnx.helper.make_tensor_value_info(extra[0], TensorProto.FLOAT,
                                                                     None))
    g = next(g for g in find_channel_groups(to_ir(model)) if g.name == "conv_1")
    assert not g.prunable
    want = {"lrn": "LRN 'norm'", "reshape_rt": "Shape 'shape_of'", "graph_output": "graph output"}
    assert want[bad] in (g.skip_reason or ""), g.skip_reason


def _calibrated_error(model: onnx.ModelProto, group: str, **options: object) -> float:
    from onnxprune.prune.remove_neurons import RemoveNeuronsPass

    rng = np.random.default_rng(1)
    test = [{"x": rng.standard_normal((2, 3, H, W)).astype(np.float32)} for _ in range(8)]
    ref = np.concatenate([run(model, t)[0] for t in test])
    m = to_ir(model)
    size = next(g.size for g in find_channel_groups(m) if g.name == group)
    RemoveNeuronsPass(keep={group: size // 2}, **options)(m)  # type: ignore[arg-type]
    proto = ir.serde.serialize_model(m)
    onnx.checker.check_model(proto, full_check=True)
    out = np.concatenate([run(proto, t)[0] for t in test])
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize(("group", "consumer"), [("conv_1", "Conv"), ("conv_3", "Gemm")])
def test_calibrated_repair_of_conv_and_gemm_consumers_beats_data_free(
        group: str, consumer: str) -> None:
    """Half of a group removed: the im2col refit of the next Conv (or of the Gemm after
    GlobalAveragePool + Flatten, whose bias C is not counted twice) cuts the error."""
    from onnxprune.calibration.calibration import Calibration

    net = Net(7, channels=16)
    for kind in ("relu", "conv", "relu"):
        net.block(kind)
    model = net.finish("gap")
    rng = np.random.default_rng(2)
    calib = Calibration([{"x": rng.standard_normal((2, 3, H, W)).astype(np.float32)}
                         for _ in range(24)])
    free = _calibrated_error(model, group, criterion="l1")
    for criterion in ("l1", "obs"):
        fitted = _calibrated_error(model, group, criterion=criterion, calibration=calib)
        assert fitted < 0.6 * free, (criterion, fitted, free)


def test_im2col_rows_match_onnxruntime_conv_and_subsampled_gram() -> None:
    """im2col @ W reproduces onnxruntime's Conv (strides, dilations, asymmetric pads); the
    gathered subsample equals those rows of the full matrix; ConvStats' per-fold float32
    Gram sums to the float64 Gram of the same rows."""
    from onnxprune.conv.repair import ConvStats, im2col

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 9, 11)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    geo = {"kernel": [3, 2], "strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2]}
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 1], pads=[1, 0, 2, 1],
                                 dilations=[1, 2])
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w, "w")])
    y = run(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)]),
            {"x": x})[0]
    cols = im2col(x, geo)
    expect = y.transpose(0, 2, 3, 1).reshape(-1, 4)
    np.testing.assert_allclose(cols @ w.reshape(4, -1).T, expect, atol=1e-4)
    pick = np.sort(rng.choice(cols.shape[0], 17, replace=False))
    np.testing.assert_array_equal(im2col(x, geo, pick), cols[pick])
    stats = ConvStats(cols.shape[1], 4, folds=3)
    for part in np.array_split(np.arange(cols.shape[0]), 5):
        stats.add(cols[part], expect[part])
    xa = np.hstack([cols, np.ones((cols.shape[0], 1))]).astype(np.float64)
    np.testing.assert_allclose(stats.gram, xa.T @ xa, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(stats.cross, xa.T @ expect, rtol=1e-4, atol=1e-3)
    assert len(stats.fold_gram) == 3 and stats.rows == cols.shape[0]


def _three_conv_net() -> tuple[onnx.ModelProto, object]:
    from onnxprune.calibration.calibration import Calibration

    net = Net(11, channels=12)
    for kind in ("relu", "conv", "relu", "conv", "relu"):
        net.block(kind)
    rng = np.random.default_rng(4)
    calib = Calibration([{"x": rng.standard_normal((2, 3, H, W)).astype(np.float32)}
                         for _ in range(12)])
    return net.finish("gap"), calib


def test_measured_sensitivity_equals_really_pruning_the_group_alone(monkeypatch) -> None:  # noqa: ANN001
    """The masked model the sensitivity scores computes what the sliced model computes:
    each measured error is the error of RemoveNeuronsPass keeping that many channels (without
    the final downstream refit, which the measurement leaves out)."""
    from onnx_ir.passes.common import NameFixPass

    from onnxprune.conv.repair import conv_repairable
    from onnxprune.prune import remove_neurons

    monkeypatch.setattr(remove_neurons, "sweep_candidates", lambda *a: [])
    from onnxprune.conv.sensitivity import _output_error, conv_sensitivity
    from onnxprune.prune.remove_neurons import RemoveNeuronsPass

    model, calib = _three_conv_net()
    m = to_ir(model)
    NameFixPass()(m)
    groups = [g for g in find_channel_groups(m) if g.prunable and conv_repairable(g)]
    assert len(groups) == 2
    before = ir.serde.serialize_model(m).SerializeToString()
    curves = conv_sensitivity(m, groups, calib, levels=(0.25, 0.5))  # type: ignore[arg-type]
    assert ir.serde.serialize_model(m).SerializeToString() == before  # model not changed
    evaluate = _output_error(to_ir(model), calib)  # type: ignore[arg-type]
    for c in curves:
        assert len(c.removed) == 2 and c.error[0] > 0
        for removed, err in zip(c.removed, c.error, strict=True):
            pruned = to_ir(model)
            RemoveNeuronsPass(keep={c.group: c.size - removed}, calibration=calib)(pruned)
            real = evaluate(make_session_of(pruned))
            assert abs(real - err) <= 1e-4 * max(err, 1e-3), (c.group, removed, real, err)


def make_session_of(m: ir.Model):  # noqa: ANN201
    from onnxprune.io.runtime import make_session

    return make_session(m, "cpu")


def test_allocation_follows_the_measured_curves_and_stops_at_the_last_level() -> None:
    from onnxprune.conv.sensitivity import GroupCurve, allocate_removals

    cheap = GroupCurve("cheap", 10, (4, 8), (0.01, 0.5))
    dear = GroupCurve("dear", 10, (4, 8), (0.2, 0.4))
    # 4 from 'cheap' (0.0025 each), then 'dear' (0.05 each) beats cheap's 0.1225 per channel.
    assert allocate_removals([cheap, dear], 8) == {"cheap": 4, "dear": 4}
    assert allocate_removals([cheap, dear], 100) == {"cheap": 8, "dear": 8}
    assert cheap.cost(9) == float("inf") and cheap.cost(2) == pytest.approx(0.005)


def test_global_calibrated_pruning_of_conv_groups_spends_the_budget_by_sensitivity() -> None:
    from onnxprune.prune.remove_neurons import RemoveNeuronsPass

    model, calib = _three_conv_net()
    m = to_ir(model)
    sizes = {g.name: g.size for g in find_channel_groups(m) if g.prunable}
    p = RemoveNeuronsPass(sparsity=0.4, global_ranking=True, max_group_sparsity=0.75,
                          calibration=calib)
    p(m)
    onnx.checker.check_model(ir.serde.serialize_model(m), full_check=True)
    assert p.result.removed == int(0.4 * sum(sizes.values()))
    after = {g.group: g.channels_after for g in p.result.groups}
    assert all(after[n] >= s - int(0.75 * s) for n, s in sizes.items())
    assert len({after[n] / s for n, s in sizes.items()}) > 1  # not a flat share


def test_report_and_inspect_count_conv_flops_per_run(tmp_path, capsys) -> None:  # noqa: ANN001
    """MatMul/Gemm FLOPs per row see only a CNN's classifier; the report and inspect also count
    every Conv at the graph's fixed input shape, and the count follows the pruned weights."""
    import json

    from onnxprune.cli import main
    from onnxprune.core.accounting import inference_flops

    model, _ = _three_conv_net()
    onnx.save(model, tmp_path / "cnn.onnx")
    assert main(["inspect", str(tmp_path / "cnn.onnx")]) == 0
    dense = inference_flops(to_ir(model), {"x": [2, 3, H, W]})
    shown = capsys.readouterr().out.replace("\n", "")
    assert f"{dense:,} FLOPs per run" in shown and "x 2x3x8x8" in shown
    assert main([str(tmp_path / "cnn.onnx"), "-o", str(tmp_path / "small.onnx"), "--sparsity",
                 "0.5", "--no-verify", "-q", "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    small = inference_flops(ir.load(tmp_path / "small.onnx"), {"x": [2, 3, H, W]})
    assert report["before"]["run_flops"] == dense
    assert report["after"]["run_flops"] == small < 0.6 * dense
    assert report["before"]["weight_flops_per_row"] < 0.05 * dense  # the classifier only
