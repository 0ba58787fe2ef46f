"""The latency table and `--round-to auto`: a fake table (a formula) stands for the timing,
so nothing here times a kernel; one test checks the cache file is written and reused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import GraphBuilder, run, to_ir

from onnxprune.channels.groups import find_channel_groups
from onnxprune.channels.latency import LatencyTable, OpShape, cache_path
from onnxprune.channels.latency_counts import GroupCosts, candidate_counts, fastest_counts
from onnxprune.cli import main
from onnxprune.core.accounting import inference_flops, value_shapes
from onnxprune.core.weights import const_array
from onnxprune.errors import InputError
from onnxprune.prune.remove_neurons import RemoveNeuronsPass


def _f(c: int) -> int:
    """The fake kernels: a count that is a multiple of 4 runs at its size, others 3x slower."""
    return c if c % 4 == 0 else 3 * c


def fake_ms(op: OpShape) -> float:
    return _f(op.cin) * _f(op.cout) * float(np.prod(op.spatial)) * 1e-6


def _conv_net() -> onnx.ModelProto:
    """x [1, 3, 8, 8] -> Conv 16 -> Relu -> Conv 16 (stride 2) -> Relu -> GAP -> Gemm 5."""
    b = GraphBuilder(seed=3)
    x = b.input("x", [1, 3, 8, 8])
    h = b.op("Conv", [x, b.weight("c1.w", [16, 3, 3, 3]), b.weight("c1.b", [16])],
             name="c1", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    h = b.op("Relu", [h])
    h = b.op("Conv", [h, b.weight("c2.w", [16, 16, 3, 3]), b.weight("c2.b", [16])],
             name="c2", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
    h = b.op("Flatten", [b.op("GlobalAveragePool", [b.op("Relu", [h])])], axis=1)
    b.op("Gemm", [h, b.weight("fc.w", [5, 16]), b.weight("fc.b", [5])], transB=1, name="fc",
         output="y")
    return b.build(["y"])


def test_candidates_run_from_the_target_to_the_next_block() -> None:
    assert candidate_counts(17, 24) == [17, 20, 24]
    assert candidate_counts(45, 64) == [45, 48]
    assert candidate_counts(48, 64) == [48]
    assert candidate_counts(90, 128) == [90, 92, 96]
    assert candidate_counts(3, 5) == [3, 4, 5]


def test_depthwise_signature_keeps_its_group_with_the_channels() -> None:
    op = OpShape("Conv", 32, 32, (8, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), group=32)
    assert op.with_channels(cin=20).group == 20
    assert op.with_channels(cin=20).cout == 20
    assert OpShape("Gemm", 8, 4, (2,)).key() != OpShape("MatMul", 8, 4, (2,)).key()


def test_the_cache_file_is_written_once_and_reused(tmp_path: Path) -> None:
    calls: list[str] = []

    def timer(op: OpShape) -> float:
        calls.append(op.key())
        return 1.5

    path = tmp_path / "lat.json"
    table = LatencyTable(path, timer)
    op = OpShape("MatMul", 8, 4, (2,))
    assert table.ms(op) == table.ms(op) == 1.5
    assert len(calls) == 1 and not path.exists()  # written by save(), not per entry
    table.save()
    assert json.loads(path.read_text())["entries"] == {op.key(): 1.5}

    def never(op: OpShape) -> float:
        raise AssertionError("a cached entry was measured again")

    again = LatencyTable(path, never)
    assert again.ms(op) == 1.5 and again.measured == 0
    path.write_text("not json")  # a broken cache is measured again, not an error
    assert LatencyTable(path, timer).ms(op) == 1.5


def test_cache_path_follows_the_environment(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setenv("ONNXPRUNE_CACHE", str(tmp_path))
    p = cache_path()
    assert p.parent == tmp_path and p.name.startswith("latency-") and "ort" in p.name


def test_round_to_auto_picks_the_counts_the_table_says_are_fastest() -> None:
    table = LatencyTable(None, fake_ms)
    m = to_ir(_conv_net())
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    p = RemoveNeuronsPass(sparsity=0.4, round_to="auto", latency_table=table)
    p(m)
    kept = {d.group: d.channels_after for d in p.result.groups if d.reason is None}
    # 16 * 0.6 -> 10 asked; candidates 10, 12, 16: 12 is the fastest by the fake table
    assert sorted(kept.values()) == [12, 12]
    assert const_array(next(n for n in m.graph if n.name == "c2").inputs[1]).shape[:2] == (12, 12)
    assert run(m, {"x": x})[0].shape == (1, 5)
    keys = set(table.entries)
    assert "Conv|i3|o12|s8x8|k3x3|st1x1|p1x1x1x1|d1x1|g1" in keys
    assert any(k.startswith("Conv|i12|o12|s8x8|k3x3|st2x2") for k in keys)
    assert any(k.startswith("Gemm|i12|o5|s1") for k in keys)
    # round_to=1 keeps what the sparsity asks
    p1 = RemoveNeuronsPass(sparsity=0.4, round_to=1)
    p1(to_ir(_conv_net()))
    assert sorted(d.channels_after for d in p1.result.groups if d.reason is None) == [10, 10]


def test_auto_never_keeps_fewer_channels_than_asked_and_prefers_more_when_as_fast() -> None:
    m = to_ir(_conv_net())
    groups = [g for g in find_channel_groups(m) if g.prunable]
    flat = LatencyTable(None, lambda op: 1.0)  # every count as fast: keep the most
    assert fastest_counts(m, groups, [9, 9], flat) == [16, 16]
    fewer = LatencyTable(None, lambda op: op.cin * op.cout)  # fewer always faster
    assert fastest_counts(m, groups, [9, 11], fewer) == [9, 11]
    costs = GroupCosts(m, groups, LatencyTable(None, fake_ms))
    assert costs.total_ms([16, 16]) < costs.total_ms([15, 15])


def test_bad_round_to_values_are_one_line_errors(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_conv_net(), path)
    for bad in ("0", "-3", "fast", "1.5"):
        code = main([str(path), "-o", str(tmp_path / "o.onnx"), "--sparsity", "0.3",
                     "--round-to", bad])
        assert code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--round-to" in err[0] and bad in err[0]
    with pytest.raises(InputError, match="round-to"):
        RemoveNeuronsPass(sparsity=0.3, round_to="fast")


def test_cli_round_to_auto_uses_the_cached_table(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.setenv("ONNXPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("onnxprune.channels.latency.time_op", fake_ms)  # no timing here
    path = tmp_path / "m.onnx"
    onnx.save(_conv_net(), path)
    out = tmp_path / "o.onnx"
    assert main([str(path), "-o", str(out), "--sparsity", "0.4", "--round-to", "auto"]) == 0
    w = onnx.numpy_helper.to_array(next(i for i in onnx.load(out).graph.initializer
                                        if i.name == "c2.w"))
    assert w.shape[:2] == (12, 12)
    files = os.listdir(tmp_path / "cache")
    assert len(files) == 1 and files[0].startswith("latency-")


def test_flops_count_ops_after_a_reshape_shape_inference_cannot_follow() -> None:
    """A Gemm after a Reshape whose target is computed through float math (shape inference
    stops there) still counts its FLOPs, from one onnxruntime run."""
    b = GraphBuilder(seed=1)
    x = b.input("x", [2, 3, 4])
    shape = b.op("Cast", [b.op("Cast", [b.op("Shape", [x])], to=1)], to=7)
    flat = b.op("Reshape", [x, b.op("Concat", [b.op("Slice", [
        shape, b.const("s0", np.array([0], np.int64)), b.const("s1", np.array([1], np.int64))]),
        b.const("m1", np.array([-1], np.int64))], axis=0)])
    b.op("Gemm", [flat, b.weight("w", [12, 5])], output="y")
    m = to_ir(b.build(["y"]))
    assert inference_flops(m, {"x": [2, 3, 4]}) == 2 * 2 * 12 * 5
    assert value_shapes(m, {"x": [2, 3, 4]})[flat] == [2, 12]


def test_table_timer_runs_a_one_node_model_shape() -> None:
    """The one-node model the default timer builds is a valid model of the signature (built,
    not timed)."""
    from onnxprune.channels.latency import _model

    for op in (OpShape("Conv", 4, 8, (6, 6), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),
               OpShape("Conv", 8, 8, (6, 6), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 8),
               OpShape("Gemm", 8, 3, (2,)), OpShape("MatMul", 8, 3, (5,))):
        model = onnx.load_from_string(_model(op))
        onnx.checker.check_model(model)
        x = np.zeros([1, op.cin, *op.spatial] if op.op == "Conv" else [op.spatial[0], op.cin],
                     np.float32)
        y = run(ir.serde.deserialize_model(model), {"x": x})[0]
        assert y.shape[1] == op.cout


def test_sensitivity_allocation_with_the_table_shares_time_not_channels() -> None:
    from onnxprune.conv.sensitivity import GroupCurve, allocate_removals

    a = GroupCurve("a", 10, (5, 10), (0.5, 1.0))
    b = GroupCurve("b", 10, (5, 10), (0.5, 1.0))
    assert allocate_removals([a, b], 4) == {"a": 2, "b": 2}
    # b's channels cost 3x the time: the same error buys 3x the saving there; 8 ms to save
    assert allocate_removals([a, b], 4, {"a": 1.0, "b": 3.0}) == {"a": 0, "b": 3}


def test_ms_per_channel_reads_the_table_around_each_group() -> None:
    from onnxprune.channels.latency_counts import ms_per_channel

    m = to_ir(_conv_net())
    groups = [g for g in find_channel_groups(m) if g.prunable]
    ms = ms_per_channel(m, groups, LatencyTable(None, lambda op: op.cin * op.cout * 1e-3))
    # group c1: c1 (3 -> 16) and c2 (16 -> 16) at 8 channels: (48 + 256 - 24 - 128) / 8
    assert ms[groups[0].name] == pytest.approx((48 + 256 - 24 - 128) * 1e-3 / 8)


def test_table_latency_predicts_a_search_allocation_from_the_table() -> None:
    from helpers import residual_mlp_model
    from onnx_ir.passes.common import NameFixPass

    from onnxprune.search.latency_model import TableLatency
    from onnxprune.search.units import find_units

    m = to_ir(residual_mlp_model(8, 32, blocks=2, seed=1))
    NameFixPass()(m)
    units, _ = find_units(m)
    batch = {"x": np.zeros((4, 8), np.float32)}
    table = LatencyTable(None, lambda op: op.cin * op.cout * op.spatial[0] * 1e-3)
    pred = TableLatency.of(m, units, batch, table, dense_ms=10.0)
    assert pred is not None and pred.ratio({}) == pytest.approx(1.0)
    dense = pred.dense_table
    # each FFN: up 8 -> 32 and down 32 -> 8 at 4 rows; half the neurons of one: a quarter
    # of the table's time leaves, the rest (10 ms - table) stays
    half = pred.ratio({units[0].name: 16})
    assert half == pytest.approx((10.0 - dense / 4) / 10.0)
    assert pred.ratio({units[0].name: 16, units[1].name: 16}) < half


def test_round_to_auto_through_a_depthwise_conv_gives_a_model_that_runs() -> None:
    b = GraphBuilder(seed=5)
    x = b.input("x", [1, 3, 8, 8])
    h = b.op("Conv", [x, b.weight("c1.w", [16, 3, 1, 1])], name="c1", kernel_shape=[1, 1])
    h = b.op("Conv", [b.op("Relu", [h]), b.weight("dw.w", [16, 1, 3, 3])], name="dw",
             kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=16)
    h = b.op("Conv", [b.op("Relu", [h]), b.weight("c2.w", [8, 16, 1, 1])], name="c2",
             kernel_shape=[1, 1])
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h])], axis=1)
    b.op("Gemm", [h, b.weight("fc.w", [5, 8])], transB=1, name="fc", output="y")
    m = to_ir(b.build(["y"]))
    table = LatencyTable(None, fake_ms)
    RemoveNeuronsPass(sparsity=0.4, round_to="auto", latency_table=table)(m)
    w = const_array(next(n for n in m.graph if n.name == "c1").inputs[1])
    assert w.shape[0] in (12, 16)
    x0 = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert run(m, {"x": x0})[0].shape == (1, 5)
