"""Calibrated Conv removal: residual refit targets and the final downstream refit sweep.

A small residual CNN (stem -> [3x3 expand -> Relu -> 1x1 project] + stream -> 3x3 -> Relu ->
depthwise 3x3 -> 1x1 -> Relu -> pool -> Gemm) built in memory; only the expand group is cut.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import make_model, run, to_ir, value_info
from onnx import helper, numpy_helper

from onnxprune.calibration.calibration import Calibration
from onnxprune.conv.refit import sweep_candidates
from onnxprune.core.weights import const_array, conv_use
from onnxprune.prune import remove_neurons
from onnxprune.prune.remove_neurons import RemoveNeuronsPass
from onnxprune.repair.reconstruct import conv_target

H = W = 8


def _net(seed: int = 3, const_add: bool = False, shared_tail: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def conv(name: str, x: str, cin: int, cout: int, k: int, group: int = 1) -> str:
        w = rng.standard_normal((cout, cin // group, k, k)).astype(np.float32)
        w /= np.sqrt(cin // group * k * k)
        inits.append(numpy_helper.from_array(w, f"{name}_w"))
        inits.append(numpy_helper.from_array(
            (0.1 * rng.standard_normal(cout)).astype(np.float32), f"{name}_b"))
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [name], name=name,
                                      pads=[k // 2] * 4, group=group))
        return name

    def relu(x: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [f"{x}_r"], name=f"{x}_relu"))
        return f"{x}_r"

    s = relu(conv("stem", "x", 3, 8, 3))
    p = conv("project", relu(conv("expand", s, 8, 24, 3)), 24, 8, 1)
    if const_add:  # a constant between the project Conv and the residual Add
        inits.append(numpy_helper.from_array(np.full((1, 8, 1, 1), 0.5, np.float32), "shift"))
        nodes.append(helper.make_node("Add", [p, "shift"], ["shifted"], name="shift_add"))
        p = "shifted"
    nodes.append(helper.make_node("Add", [s, p], ["stream"], name="residual"))
    t = relu(conv("mid", "stream", 8, 16, 3))
    t = conv("dw", t, 16, 16, 3, group=16)
    t = relu(conv("tail", t, 16, 16, 1))
    if shared_tail:  # a second Conv reading the same weight as 'tail'
        nodes.append(helper.make_node("Conv", [t, "tail_w", "tail_b"], ["tail2"], name="tail2",
                                      pads=[0] * 4))
        t = relu("tail2")
    nodes.append(helper.make_node("GlobalAveragePool", [t], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    inits.append(numpy_helper.from_array(
        (rng.standard_normal((16, 5)) / 4).astype(np.float32), "fc_w"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w"], ["y"], name="fc"))
    return make_model(nodes, [value_info("x", [2, 3, H, W])], [value_info("y", [2, 5])], inits)


def _calib(n: int = 24, seed: int = 5) -> Calibration:
    rng = np.random.default_rng(seed)
    return Calibration([{"x": rng.standard_normal((2, 3, H, W)).astype(np.float32)}
                        for _ in range(n)])


def _node(m: ir.Model, name: str) -> ir.Node:
    return next(n for n in m.graph if n.name == name)


def _out_error(model: onnx.ModelProto, pruned: ir.Model, feeds: list[dict]) -> float:
    err = power = 0.0
    for f in feeds:
        a, b = run(model, f)[0], run(pruned, f)[0]
        err += float(np.sum((a - b) ** 2))
        power += float(np.sum(a ** 2))
    return err / power


def test_project_conv_into_a_residual_add_fits_the_original_sum_minus_the_current_stream(
) -> None:
    m = to_ir(_net())
    project = conv_use(_node(m, "project"))
    mid = conv_use(_node(m, "mid"))
    assert project is not None and mid is not None
    t = conv_target(project)
    assert t.reference == ("stream",) and t.residual == "stem_r"
    assert conv_target(mid).reference == ("mid",) and conv_target(mid).residual is None
    # A constant added on the way to the Add: the plain target (its own output) is kept.
    shifted = conv_use(_node(to_ir(_net(const_add=True)), "project"))
    assert shifted is not None
    assert conv_target(shifted).reference == ("project",)
    assert conv_target(shifted).residual is None


def test_sweep_candidates_are_plain_convs_after_the_first_cut() -> None:
    m = to_ir(_net())
    names = [u.node.name for u in sweep_candidates(m, [_node(m, "expand")])]
    # The stem comes before the cut; the depthwise Conv is not a plain Conv.
    assert names == ["project", "mid", "tail"]
    assert sweep_candidates(m, []) == []


@pytest.mark.parametrize("keep", [12, 6])
def test_downstream_refit_lowers_the_output_error_and_leaves_the_rest_alone(
        monkeypatch: pytest.MonkeyPatch, keep: int) -> None:
    model = _net()
    calib = _calib()
    held_out = [dict(b) for b in _calib(8, seed=9).batches]

    kept = {}

    def prune(sweep: bool) -> ir.Model:
        with monkeypatch.context() as mp:
            if not sweep:
                mp.setattr(remove_neurons, "sweep_candidates", lambda *a: [])
            m = to_ir(model)
            p = RemoveNeuronsPass(keep={"expand": keep}, calibration=calib)
            p(m)
        kept[sweep] = p.kept["expand"]
        return m

    plain, swept = prune(False), prune(True)
    assert np.array_equal(kept[False], kept[True])  # the sweep changes weights, not channels
    for m in (plain, swept):
        onnx.checker.check_model(ir.serde.serialize_model(m), full_check=True)
        assert const_array(_node(m, "expand").inputs[1]).shape[0] == keep  # type: ignore[union-attr]
    before, after = _out_error(model, plain, held_out), _out_error(model, swept, held_out)
    assert np.isfinite(after) and after < 0.9 * before, (before, after)
    original = to_ir(model)
    for name in ("stem", "expand", "dw"):  # before the cut, the cut itself, not plain: as given
        rows = kept[True] if name == "expand" else slice(None)
        for i in (1, 2):
            assert np.array_equal(const_array(_node(swept, name).inputs[i]),
                                  const_array(_node(original, name).inputs[i])[rows]), name
    for name in ("mid", "tail"):  # read nothing cut directly, refit by the sweep only
        assert np.array_equal(const_array(_node(plain, name).inputs[1]),
                              const_array(_node(original, name).inputs[1]))
        assert not np.array_equal(const_array(_node(swept, name).inputs[1]),
                                  const_array(_node(original, name).inputs[1]))


def test_no_sweep_without_a_least_squares_repair() -> None:
    model = _net()
    m = to_ir(model)
    calib = Calibration(list(_calib().batches), reconstruct="bias")
    RemoveNeuronsPass(keep={"expand": 12}, calibration=calib)(m)
    original = to_ir(model)
    for name in ("mid", "tail"):
        assert np.array_equal(const_array(_node(m, name).inputs[1]),
                              const_array(_node(original, name).inputs[1]))


def test_a_conv_whose_weight_another_node_reads_is_not_refit() -> None:
    model = _net(shared_tail=True)
    m = to_ir(model)
    assert [u.node.name for u in sweep_candidates(m, [_node(m, "expand")])] == \
        ["project", "mid"]
    RemoveNeuronsPass(keep={"expand": 12}, calibration=_calib())(m)
    original = to_ir(model)
    for name in ("tail", "tail2"):
        assert np.array_equal(const_array(_node(m, name).inputs[1]),
                              const_array(_node(original, name).inputs[1]))
    assert not np.array_equal(const_array(_node(m, "mid").inputs[1]),
                              const_array(_node(original, "mid").inputs[1]))


def test_a_broadcast_residual_is_refit_against_its_broadcast() -> None:
    """A tensor added to a Conv output by broadcasting ([1, C, 1, 1] computed at run time, as
    a paddle2onnx classifier has) is subtracted as the Add broadcasts it, not refused."""
    import numpy as np

    from onnxprune.conv.repair import _residual

    r = np.arange(2, dtype=np.float32).reshape(1, 2, 1, 1)
    got = _residual({"r": r}, {}, "r", (4, 2, 1, 1))
    assert got.shape == (4, 2, 1, 1) and np.array_equal(got[3], r[0])
