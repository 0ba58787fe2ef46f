"""RemoveNeuronsPass: exact removal, counts, ranking, criteria, and calibrated repair."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import (
    BATCH,
    DIGITS,
    DIGITS_CALIB,
    GraphBuilder,
    chain_model,
    digits_accuracy,
    mlp_model,
    random_input,
    residual_mlp_model,
    run,
    single_matmul_model,
    to_ir,
    weights,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import onnxprune.repair.reconstruct as reconstruct
from onnxprune.api import PruneConfig, prune
from onnxprune.calibration.calibration import Calibration
from onnxprune.calibration.stats import LayerStats
from onnxprune.channels.criteria import CRITERIA, DATA_AWARE, register_criterion, score_channels
from onnxprune.channels.groups import find_channel_groups
from onnxprune.core.weights import const_array, set_const_array
from onnxprune.errors import InputError
from onnxprune.prune.remove_neurons import RemoveNeuronsPass, group_weights
from onnxprune.repair.reconstruct import consumer_target

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True)
ACTS = ("Relu", "Tanh", "Sigmoid", "erf_gelu", "silu")


def _node(m: ir.Model, name: str) -> ir.Node:
    return next(n for n in m.graph if n.name == name)


def _weight(m: ir.Model, layer: str) -> np.ndarray:
    w = const_array(_node(m, layer).inputs[1])
    assert w is not None
    return w


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------- exactness


@st.composite
def chains(draw: st.DrawFn) -> dict[str, object]:
    layers = draw(st.integers(2, 4))
    widths = draw(st.lists(st.integers(2, 12), min_size=layers + 1, max_size=layers + 1))
    seq = draw(st.sampled_from([None, 3]))
    if seq is None:
        gemm = draw(st.lists(st.booleans(), min_size=layers, max_size=layers))
        trans_b = [g and draw(st.booleans()) for g in gemm]
    else:
        gemm = trans_b = [False] * layers
    hidden = widths[1:-1]
    target = draw(st.integers(0, len(hidden) - 1))
    removed = draw(st.integers(1, hidden[target] - 1))
    return {
        "widths": widths,
        "activations": draw(st.lists(st.sampled_from(ACTS), min_size=layers - 1,
                                     max_size=layers - 1)),
        "gemm": gemm,
        "trans_b": trans_b,
        "seq": seq,
        "bias": draw(st.booleans()),
        "constants_as_nodes": draw(st.booleans()),
        "infer_shapes": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
        # the fraction that removes exactly `removed` channels of group `target`
        "sparsity": (removed + 0.5) / hidden[target],
    }


@PROPERTY
@given(chains())
def test_removing_channels_with_zero_outgoing_weights_is_exact(case: dict) -> None:
    """Zeroed consumer rows give l1 scores of 0, so exactly those channels go: same outputs.

    Every hidden group loses floor(sparsity * width) channels; the drawn group `target` loses
    the drawn count. Weights are zeroed by name, independently of the analysis.
    """
    widths, gemm, trans_b = case["widths"], case["gemm"], case["trans_b"]
    sparsity = case["sparsity"]
    model = chain_model(
        widths, case["activations"], gemm=gemm, trans_b=trans_b, bias=case["bias"],
        seq=case["seq"], constants_as_nodes=case["constants_as_nodes"],
        infer_shapes=case["infer_shapes"], seed=case["seed"],
    )
    m = to_ir(model)
    rng = np.random.default_rng(case["seed"])
    hidden = widths[1:-1]
    removed = [math.floor(sparsity * w) for w in hidden]
    for i, (width, r) in enumerate(zip(hidden, removed, strict=True)):
        consumer = _node(m, f"fc{i + 1}")
        w = const_array(consumer.inputs[1]).copy()  # type: ignore[union-attr]
        drop = rng.choice(width, size=r, replace=False)
        np.moveaxis(w, 1 if trans_b[i + 1] else 0, 0)[drop] = 0
        set_const_array(consumer.inputs[1], w)  # type: ignore[arg-type]
    groups = find_channel_groups(m)
    assert sum(g.prunable for g in groups) == len(hidden), [g.to_dict() for g in groups]
    x = random_input([3, case["seq"], widths[0]] if case["seq"] else [3, widths[0]], seed=1)
    before = run(m, {"x": x})[0]

    p = RemoveNeuronsPass(sparsity=sparsity, criterion="l1")
    assert p(m).modified
    proto = ir.serde.serialize_model(m)
    onnx.checker.check_model(proto, full_check=True)
    after = run(proto, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    for i, (width, r) in enumerate(zip(hidden, removed, strict=True)):
        w = _weight(m, f"fc{i + 1}")
        assert w.shape[1 if trans_b[i + 1] else 0] == width - r
        assert not np.any(np.all(w == 0, axis=0 if trans_b[i + 1] else 1))  # zeroed ones left
    kept = {d.group: d.channels_after for d in p.result.groups if d.reason is None}
    assert sorted(kept.values()) == sorted(w - r for w, r in zip(hidden, removed, strict=True))


# ------------------------------------------------------------------------ counts


def test_exact_count_on_a_wide_layer() -> None:
    m = to_ir(mlp_model([16, 1536, 8], seed=3))
    p = RemoveNeuronsPass(sparsity=0.5)
    p(m)
    assert _weight(m, "fc0").shape == (16, 768)
    assert _weight(m, "fc1").shape == (768, 8)
    assert m.graph.initializers["fc0.bias"].const_value.numpy().shape == (768,)  # type: ignore[union-attr]
    (d,) = [d for d in p.result.groups if d.reason is None]
    assert (d.channels_before, d.channels_after) == (1536, 768)
    assert p.result.removed == 768
    x = random_input([4, 16])
    assert run(m, {"x": x})[0].shape == (4, 8)


def test_round_to_keeps_multiples() -> None:
    m = to_ir(mlp_model([8, 100, 37, 6, 4], seed=1))
    p = RemoveNeuronsPass(sparsity=0.3, round_to=8)
    p(m)
    kept = {d.group: (d.channels_before, d.channels_after) for d in p.result.groups}
    assert kept["fc0"] == (100, 72)  # 70 rounded up
    assert kept["fc1"] == (37, 32)  # 26 rounded up
    assert kept["fc2"] == (6, 6)  # narrower than 8: left alone
    assert _weight(m, "fc1").shape == (72, 32)
    m2 = to_ir(mlp_model([8, 20, 4], seed=1))
    p2 = RemoveNeuronsPass(sparsity=0.95, round_to=8)
    p2(m2)
    assert _weight(m2, "fc1").shape == (8, 4)  # never below one multiple


def _skewed_model() -> onnx.ModelProto:
    """[8, 20, 20, 4]: group fc0 has 2 strong and 18 weak channels, group fc1 flat ones."""
    model = mlp_model([8, 20, 20, 4], seed=2)
    w = weights(model)
    w1 = np.sign(w["fc1.weight"]) * 0.01
    w1[:2] *= 1000  # channels 0, 1 of group fc0 dominate
    w2 = np.sign(w["fc2.weight"]) * 0.5  # every channel of group fc1 scores the same
    for name, arr in (("fc1.weight", w1), ("fc2.weight", w2)):
        t = next(t for t in model.graph.initializer if t.name == name)
        t.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), name))
    return model


def test_global_ranking_respects_max_group_sparsity() -> None:
    m = to_ir(_skewed_model())
    p = RemoveNeuronsPass(sparsity=0.5, global_ranking=True, max_group_sparsity=0.75)
    p(m)
    kept = {d.group: d.channels_after for d in p.result.groups if d.reason is None}
    # 20 of 40 go: the 15 weak fc0 channels the cap allows (floor 5), then 5 flat ones of fc1
    assert kept == {"fc0": 5, "fc1": 15}
    assert p.result.removed == 20
    strong = np.abs(_weight(m, "fc1")).max(axis=1) > 1  # rows of the kept fc0 channels
    assert strong.sum() == 2


def test_global_ranking_cap_is_exact_for_decimal_fractions() -> None:
    m = to_ir(_skewed_model())
    p = RemoveNeuronsPass(sparsity=0.5, global_ranking=True, max_group_sparsity=0.7)
    p(m)
    kept = {d.group: d.channels_after for d in p.result.groups if d.reason is None}
    assert kept == {"fc0": 6, "fc1": 14}  # 70 % of fc0 may go: 14 of 20


def test_sparsity_count_is_exact_for_decimal_fractions() -> None:
    m = to_ir(mlp_model([8, 100, 4], seed=1))
    RemoveNeuronsPass(sparsity=0.57)(m)
    assert _weight(m, "fc1").shape == (43, 4)


def test_global_ranking_never_empties_a_group() -> None:
    m = to_ir(mlp_model([8, 3, 20, 4], seed=4))
    p = RemoveNeuronsPass(sparsity=0.9, global_ranking=True, max_group_sparsity=0.99)
    p(m)
    kept = [d.channels_after for d in p.result.groups if d.reason is None]
    assert all(k >= 1 for k in kept)
    assert p.result.removed == math.floor(0.9 * 23)
    assert run(m, {"x": random_input([2, 8])})[0].shape == (2, 4)


def test_ignore_glob_leaves_the_group_alone() -> None:
    m = to_ir(mlp_model([8, 16, 12, 4], seed=5))
    p = RemoveNeuronsPass(sparsity=0.5, ignore=["fc2*"])
    assert p(m).modified
    by_group = {d.group: d for d in p.result.groups}
    assert by_group["fc1"].reason is not None and "ignore" in by_group["fc1"].reason
    assert by_group["fc1"].channels_after == 12
    assert _weight(m, "fc2").shape == (12, 4)
    assert _weight(m, "fc1").shape == (8, 12)  # rows cut by group fc0, columns kept
    assert by_group["fc0"].channels_after == 8


def test_nothing_prunable_is_declined_not_modified() -> None:
    m = to_ir(single_matmul_model())
    p = RemoveNeuronsPass(sparsity=0.5)
    assert not p(m).modified
    (d,) = p.result.groups
    assert d.reason is not None and "graph output 'y'" in d.reason
    assert _weight(m, "mm").shape == (8, 4)


# ---------------------------------------------------------------------- criteria


def _calibration(n: int = 3, rows: int = 32, k: int = 8, **options: object) -> Calibration:
    batches = [{"x": random_input([rows, k], seed=10 + i)} for i in range(n)]
    return Calibration(batches, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_every_registered_criterion_scores_finitely(name: str) -> None:
    m = to_ir(mlp_model([8, 16, 4], activation="Tanh", seed=6))
    (g,) = [g for g in find_channel_groups(m) if g.prunable]
    stats = LayerStats(g.size)
    stats.add(np.tanh(random_input([64, 16], seed=3)))
    scores = score_channels(name, group_weights(g, stats=stats.as_dict()))
    assert scores.shape == (16,)
    assert np.all(np.isfinite(scores))


@pytest.mark.parametrize("name", sorted({*CRITERIA, "obs"}))
def test_every_criterion_runs_in_the_pass(name: str) -> None:
    model = mlp_model([8, 16, 12, 4], activation="Tanh", seed=6)
    m = to_ir(model)
    calib = _calibration() if name in DATA_AWARE else None
    p = RemoveNeuronsPass(sparsity=0.5, criterion=name, calibration=calib)
    assert p(m).modified
    assert _weight(m, "fc1").shape == (8, 6)
    out = run(m, {"x": random_input([5, 8])})[0]
    assert out.shape == (5, 4) and np.all(np.isfinite(out))


def test_user_registered_criterion_is_used() -> None:
    name = "test-keep-first"
    calls: list[int] = []

    @register_criterion(name)
    def keep_first(cw):  # type: ignore[no-untyped-def]
        calls.append(cw.size)
        return -np.arange(cw.size, dtype=np.float64)

    try:
        model = mlp_model([8, 10, 4], seed=7)
        w1 = weights(model)["fc1.weight"]
        m = to_ir(model)
        RemoveNeuronsPass(sparsity=0.4, criterion=name)(m)
        assert calls == [10]
        np.testing.assert_array_equal(_weight(m, "fc1"), w1[:6])
        out = prune(model, PruneConfig(sparsity=0.4, criterion=name))
        np.testing.assert_array_equal(weights(out)["fc1.weight"], w1[:6])
    finally:
        CRITERIA.pop(name, None)


@pytest.mark.parametrize("name", sorted(DATA_AWARE))
def test_data_aware_criterion_without_calibration_is_an_input_error(name: str) -> None:
    with pytest.raises(InputError, match="calibration"):
        RemoveNeuronsPass(sparsity=0.5, criterion=name)
    with pytest.raises(InputError, match="calibration"):
        prune(mlp_model([8, 16, 4]), PruneConfig(sparsity=0.5, criterion=name))


# ----------------------------------------------------------- calibrated: digits


def test_digits_half_pruned_with_calibration_keeps_accuracy(tmp_path: Path) -> None:
    base = digits_accuracy(DIGITS)
    assert base == pytest.approx(0.984)
    calibrated = digits_accuracy(
        prune(DIGITS, PruneConfig(sparsity=0.5, calibration=DIGITS_CALIB),
              output=tmp_path / "calibrated.onnx")
    )
    data_free = digits_accuracy(
        prune(DIGITS, PruneConfig(sparsity=0.5), output=tmp_path / "data_free.onnx")
    )
    assert base - calibrated <= 0.005  # 0.984 -> 0.980
    assert calibrated > data_free  # 0.84 data-free
    w = weights(tmp_path / "calibrated.onnx")
    assert w["fc1.weight"].shape == (128, 64) and w["fc2.weight"].shape == (128, 64)


# -------------------------------------------------------- calibrated: residual


def _residual_setup() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]], np.ndarray]:
    model = residual_mlp_model(stem="Identity")
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((64, 8)).astype(np.float32)} for _ in range(4)]
    test = rng.standard_normal((256, 8)).astype(np.float32)
    return model, calib, test


def test_consumer_followed_by_residual_add_gets_a_residual_target() -> None:
    model, _, _ = _residual_setup()
    m = to_ir(model)
    groups = {g.name: g for g in find_channel_groups(m)}
    assert groups["fc0a"].prunable and groups["fc1a"].prunable
    assert "graph input 'x'" in (groups["fc0b"].skip_reason or "")
    w = weights(model)
    for name, residual, total in (("fc0a", "s_in", "s0"), ("fc1a", "s0", "s1")):
        t = consumer_target(groups[name])
        assert t.reference == (total,)
        assert t.residual == residual
        np.testing.assert_allclose(t.bias, w[f"{name[:-1]}b.bias"])  # type: ignore[arg-type]


def test_plain_consumer_target_without_residual() -> None:
    (g,) = [g for g in find_channel_groups(to_ir(mlp_model([8, 16, 4]))) if g.prunable]
    t = consumer_target(g)
    assert t.reference == ("fc1_mm",) and t.residual is None and t.bias is None


def test_lstsq_repair_reduces_the_error_of_a_residual_mlp() -> None:
    model, calib, test = _residual_setup()
    ref = run(model, {"x": test})[0]

    def error(**options: object) -> float:
        pruned = prune(model, PruneConfig(sparsity=0.5, calibration=calib, **options))  # type: ignore[arg-type]
        return _rel_err(run(pruned, {"x": test})[0], ref)

    none = error(criterion="activation", reconstruct="none")
    bias = error(criterion="activation", reconstruct="bias")
    lstsq = error(criterion="activation", reconstruct="lstsq")
    obs = error(criterion="obs", reconstruct="lstsq")
    data_free = _rel_err(run(prune(model, PruneConfig(sparsity=0.5)), {"x": test})[0], ref)
    # measured: data-free 0.614, none 0.554, bias 0.505, lstsq 0.289, obs 0.299
    assert lstsq < 0.6 * none
    assert lstsq < bias < none < data_free
    assert obs < 0.6 * none
    assert lstsq < 0.33


def test_residual_target_beats_the_plain_target(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fitting the original residual sum also absorbs error earlier blocks left in s0."""
    model, calib, test = _residual_setup()
    ref = run(model, {"x": test})[0]
    cfg = PruneConfig(sparsity=0.5, calibration=calib, criterion="activation",
                      reconstruct="lstsq")
    residual_aware = _rel_err(run(prune(model, cfg), {"x": test})[0], ref)

    def plain(group):  # type: ignore[no-untyped-def]
        return reconstruct.Target(tuple(u.node.outputs[0].name for u in group.consumers))

    monkeypatch.setattr(reconstruct, "consumer_target", plain)
    plain_target = _rel_err(run(prune(model, cfg), {"x": test})[0], ref)
    # measured: 0.2891 residual-aware vs 0.2966 plain
    assert residual_aware < plain_target


def test_lstsq_repair_with_the_residual_stream_starting_at_a_graph_input() -> None:
    model = residual_mlp_model()  # s0 = x + fc0b(...)
    _, calib, test = _residual_setup()
    ref = run(model, {"x": test})[0]
    errors = {}
    for rec in ("none", "lstsq"):  # "none" needs no residual capture and works
        pruned = prune(model, PruneConfig(sparsity=0.5, calibration=calib,
                                          criterion="activation", reconstruct=rec))
        errors[rec] = _rel_err(run(pruned, {"x": test})[0], ref)
    assert errors["lstsq"] < 0.6 * errors["none"], errors


def test_reconstruct_none_keeps_the_consumer_rows_with_the_default_criterion() -> None:
    model = mlp_model([8, 16, 4], seed=9)
    original = weights(model)["fc1.weight"]
    pruned = prune(model, PruneConfig(sparsity=0.5, calibration=[{"x": random_input([64, 8])}],
                                      reconstruct="none"))
    rows = weights(pruned)["fc1.weight"]
    assert rows.shape == (8, 4)
    for row in rows:  # every kept row is an original row, untouched
        assert np.any(np.all(original == row, axis=1))


def test_lstsq_repair_of_a_group_with_two_consumers_and_transposed_weights() -> None:
    """h = Relu(x@w1) feeds Gemm(transB) 'cons_a' and MatMul 'cons_b': one joint refit."""
    b = GraphBuilder(seed=8)
    x = b.input("x", [BATCH, 8])
    h = b.op("Relu", [b.op("MatMul", [x, b.weight("w1", [8, 24])], name="prod")], name="relu")
    wa = b.const("wa", np.ascontiguousarray(b.rng.standard_normal((24, 5)).T.astype(np.float32)))
    ya = b.op("Gemm", [h, wa, b.const("ba", np.full(5, 0.1, np.float32))], name="cons_a",
              transB=1)
    yb = b.op("MatMul", [h, b.weight("wb", [24, 3])], name="cons_b")
    b.op("Concat", [ya, yb], name="cat", output="y", axis=-1)
    model = b.build(["y"])
    rng = np.random.default_rng(2)
    calib = [{"x": rng.standard_normal((64, 8)).astype(np.float32)} for _ in range(3)]
    test = rng.standard_normal((128, 8)).astype(np.float32)
    ref = run(model, {"x": test})[0]
    errors = {}
    for rec in ("none", "lstsq"):
        pruned = prune(model, PruneConfig(sparsity=0.5, calibration=calib,
                                          criterion="activation", reconstruct=rec))
        w = weights(pruned)
        assert w["wa"].shape == (5, 12) and w["wb"].shape == (12, 3)
        errors[rec] = _rel_err(run(pruned, {"x": test})[0], ref)
    assert errors["lstsq"] < 0.7 * errors["none"], errors


def test_a_singular_obs_block_does_not_end_the_run() -> None:
    """Exact copies make the OBS block singular; the pseudo-inverse takes over (it was a
    LinAlgError, exit 3, found by the fuzz suite)."""
    from onnxprune.repair.lstsq import inverse

    a = np.array([[1.0, 1.0], [1.0, 1.0]])
    assert np.allclose(inverse(a), np.linalg.pinv(a))
    b = np.array([[2.0, 0.0], [0.0, 4.0]])
    assert np.array_equal(inverse(b), np.linalg.inv(b))
