"""Concat in the channel groups: one producer read at different offsets by several Concats
(the YOLOv8 FPN/PAN neck), and Concats joining different producers, feeding Conv, Gemm and
MatMul consumers. Scoring, removal and the calibrated Conv repair all read the group's
per-consumer index map; a channel whose outgoing weights are zero everywhere goes without
changing the output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import GraphBuilder, run, to_ir

from onnxprune.channels.criteria import score_channels
from onnxprune.channels.groups import find_channel_groups, group_of
from onnxprune.channels.shapes import shape_hints
from onnxprune.channels.slicing import keep_channels
from onnxprune.cli import main
from onnxprune.conv.repair import channel_columns, conv_repairable
from onnxprune.core.weights import const_array, set_const_array
from onnxprune.prune.remove_neurons import group_weights

HW = 6


class Neck:
    """Conv producers joined by Concats; `dead` channels of each producer (its last half)
    have zero weight in every consumer, so removing them is exact."""

    def __init__(self, seed: int = 0) -> None:
        self.b = GraphBuilder(seed=seed)
        self.rng = np.random.default_rng(seed)
        self.x = self.b.input("x", ["batch", 3, HW, HW])
        self.width: dict[str, int] = {}

    def conv(self, x: str, cin: int, cout: int, name: str, k: int = 1) -> str:
        w = self.rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)
        ins = [x, self.b.const(f"{name}.w", w.astype(np.float32)),
               self.b.const(f"{name}.b", self.rng.uniform(-0.5, 0.5, cout).astype(np.float32))]
        out = self.b.op("Conv", ins, name=name, kernel_shape=[k, k], pads=[k // 2] * 4)
        self.width[out] = cout
        return out

    def relu(self, x: str) -> str:
        out = self.b.op("Relu", [x])
        self.width[out] = self.width[x]
        return out

    def cat(self, parts: list[str]) -> str:
        out = self.b.op("Concat", parts, axis=1)
        self.width[out] = sum(self.width[p] for p in parts)
        return out


def _kill_half(model: onnx.ModelProto) -> onnx.ModelProto:
    """Zeroes, in every consumer, the weights that read the last half of each group."""
    m = to_ir(model)
    for g in find_channel_groups(m):
        if not g.prunable:
            continue
        dead = np.arange(g.size // 2, g.size)
        for use in g.consumers:
            w = const_array(use.weight).copy()  # type: ignore[union-attr]
            np.moveaxis(w, use.reduce_axis, 0)[np.isin(g.channel_map(use, "in"), dead)] = 0
            set_const_array(use.weight, w)
    return ir.serde.serialize_model(m)


def two_into_one() -> onnx.ModelProto:
    """Conv(8) + Conv(4) -> Concat -> Conv: two producers at offsets 0 and 8."""
    n = Neck()
    a = n.relu(n.conv(n.x, 3, 8, "a"))
    c = n.relu(n.conv(n.x, 3, 4, "c"))
    y = n.conv(n.cat([a, c]), 12, 6, "d", k=3)
    n.b.op("GlobalAveragePool", [y], output="y")
    return n.b.build(["y"])


def yolo_neck() -> onnx.ModelProto:
    """p is read by two Concats at different offsets (128 of 256 and 0 of 384)."""
    n = Neck(1)
    p = n.relu(n.conv(n.x, 3, 128, "p"))
    q = n.relu(n.conv(n.x, 3, 128, "q"))
    r = n.relu(n.conv(n.x, 3, 256, "r"))
    h1 = n.conv(n.cat([q, p]), 256, 8, "h1", k=3)
    h2 = n.conv(n.cat([p, r]), 384, 8, "h2")
    n.b.op("Add", [n.b.op("GlobalAveragePool", [h1]), n.b.op("GlobalAveragePool", [h2])],
           output="y")
    return n.b.build(["y"])


def dense_concat() -> onnx.ModelProto:
    """Gemm(8) and MatMul(4) joined on the features, read by a MatMul and a Gemm; the Gemm
    producer is also read alone by a MatMul (offset 0 of 8 there, 0 of 12 in the Concat)."""
    b = GraphBuilder(seed=2)
    x = b.input("x", ["batch", 5])
    g = b.op("Relu", [b.op("Gemm", [x, b.weight("g.w", [5, 8]), b.weight("g.b", [8])],
                           name="g")])
    m = b.op("Relu", [b.op("MatMul", [x, b.weight("m.w", [5, 4])], name="m")])
    cat = b.op("Concat", [g, m], axis=-1)
    y1 = b.op("MatMul", [cat, b.weight("o1.w", [12, 3])], name="o1")
    y2 = b.op("Gemm", [cat, b.weight("o2.w", [3, 12])], name="o2", transB=1)
    y3 = b.op("MatMul", [g, b.weight("o3.w", [8, 3])], name="o3")
    b.op("Add", [b.op("Add", [y1, y2]), y3], output="y")
    return b.build(["y"])


def _feeds(model: onnx.ModelProto, n: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = [d.dim_value or n for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": rng.standard_normal(shape).astype(np.float32)}


def _params(path: Path) -> int:
    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)


# -- the two crash classes, at the unit they came from --------------------------------------

def test_scores_of_a_concat_group_have_one_row_per_channel() -> None:
    """The consumer reads 12 positions of which the group owns 8: the rows of the other
    producer must not be scored as this group's (was: 12 scores -> invalid indices)."""
    m = to_ir(two_into_one())
    groups = {g.name: g for g in find_channel_groups(m)}
    a, c = groups["a"], groups["c"]
    cw = group_weights(a)
    assert [w.shape[0] for w in cw.incoming + cw.outgoing] == [8, 8]
    d = const_array(a.consumers[0].weight)
    np.testing.assert_array_equal(cw.outgoing[0], d[:, :8].transpose(1, 0, 2, 3).reshape(8, -1))
    cw = group_weights(c)
    np.testing.assert_array_equal(cw.outgoing[0], d[:, 8:].transpose(1, 0, 2, 3).reshape(4, -1))


def test_a_producer_read_at_two_offsets_is_scored_from_both_consumers() -> None:
    """(was: operands could not be broadcast together with shapes (256,) (384,))"""
    m = to_ir(yolo_neck())
    p = next(g for g in find_channel_groups(m) if g.name == "p")
    assert p.prunable and p.size == 128
    cw = group_weights(p)
    assert [w.shape[0] for w in cw.outgoing] == [128, 128]
    h1 = const_array(next(u for u in p.consumers if u.node.name == "h1").weight)
    h2 = const_array(next(u for u in p.consumers if u.node.name == "h2").weight)
    want = np.abs(h1[:, 128:]).sum(axis=(0, 2, 3)) + np.abs(h2[:, :128]).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(score_channels("l1", cw), want, rtol=1e-6)


def test_slicing_keeps_shape_hints_of_a_shared_concat_current() -> None:
    """Pruning one input of a Concat changes the Concat's width; the next group found again
    (group_of, calibrated path) must see the new width (was: 'group changed while
    pruning')."""
    m = to_ir(two_into_one())
    hints = shape_hints(m)
    groups = {g.name: g for g in find_channel_groups(m, hints=hints)}
    cat = next(n for n in m.graph if n.op_type == "Concat").outputs[0]
    assert hints[cat.name or ""][1] == 12
    keep_channels(m.graph, groups["a"], np.arange(4), hints=hints)
    assert hints[cat.name or ""][1] == 8
    c = group_of(m, groups["c"].producers[0].node, hints)
    assert c is not None and c.prunable, c and c.skip_reason
    assert c.channel_map(c.consumers[0], "in").tolist() == [-1] * 4 + [0, 1, 2, 3]


def test_conv_repair_reads_the_group_columns_of_a_concat() -> None:
    m = to_ir(two_into_one())
    c = next(g for g in find_channel_groups(m) if g.name == "c")
    assert conv_repairable(c)
    cols = channel_columns(c, c.consumers[0], 12 * 9)
    assert cols.shape == (4, 9)
    assert cols[0].tolist() == list(range(8 * 9, 9 * 9))


# -- end to end through the CLI ----------------------------------------------------------

@pytest.mark.parametrize("build", [two_into_one, yolo_neck])
@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("ranking", ["flat", "global"])
def test_cli_removes_dead_concat_channels_exactly(tmp_path: Path, build, calibrated: bool,  # noqa: ANN001
                                                  ranking: str) -> None:
    if ranking == "global" and not calibrated and build is two_into_one:
        pytest.skip("covered by the flat case")
    model = _kill_half(build())
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    args = [str(src), "-o", str(out), "--sparsity", "0.5"]
    if ranking == "global":
        args += ["--global", "--max-group-sparsity", "0.5"]
    if calibrated:
        rng = np.random.default_rng(3)
        np.savez(tmp_path / "calib.npz",
                 x=rng.standard_normal((16, 3, HW, HW)).astype(np.float32))
        args += ["--calibration", str(tmp_path / "calib.npz")]
    assert main(args) == 0
    assert _params(out) < 0.6 * _params(src)
    feeds = _feeds(model)
    tol = 1e-4 if calibrated else 1e-5  # the refit solves for the same weights
    np.testing.assert_allclose(run(str(out), feeds)[0], run(model, feeds)[0], rtol=tol,
                               atol=tol)


@pytest.mark.parametrize("calibrated", [False, True])
def test_cli_prunes_gemm_and_matmul_producers_joined_by_a_concat(tmp_path: Path,
                                                                 calibrated: bool) -> None:
    model = _kill_half(dense_concat())
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    args = [str(src), "-o", str(out), "--sparsity", "0.5"]
    if calibrated:
        rng = np.random.default_rng(4)
        np.savez(tmp_path / "calib.npz", x=rng.standard_normal((64, 5)).astype(np.float32))
        args += ["--calibration", str(tmp_path / "calib.npz")]
    assert main(args) == 0
    pruned = {t.name: t.dims for t in onnx.load(str(out)).graph.initializer}
    assert list(pruned["o1.w"]) == [6, 3] and list(pruned["o3.w"]) == [4, 3]
    feeds = _feeds(model, n=7)
    np.testing.assert_allclose(run(str(out), feeds)[0], run(model, feeds)[0], rtol=1e-5,
                               atol=1e-5)
