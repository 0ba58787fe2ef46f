"""Layer-wise calibration: sections of the graph give the same activations as whole-model runs,
the cut survives edits, and calibrated pruning decides exactly as the whole-model path did."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import GraphBuilder, dense, random_input, to_ir
from test_heads import _calibration as heads_calibration
from test_heads import attention_model

from onnxprune.attention.remove_heads import RemoveHeadsPass
from onnxprune.calibration.calibration import Calibration
from onnxprune.calibration.propagate import Propagator
from onnxprune.calibration.runner import capture
from onnxprune.calibration.targets import TargetStore
from onnxprune.channels.groups import find_channel_groups
from onnxprune.channels.slicing import keep_channels
from onnxprune.core.weights import const_array, set_const_array
from onnxprune.prune.remove_neurons import RemoveNeuronsPass

WIDTH, HIDDEN, LAYERS = 8, 16, 4


def residual_stack(layers: int = LAYERS, *, runtime_shape: bool = True) -> onnx.ModelProto:
    """x[B, S, W] -> `layers` x (x + fc2(relu(fc1(x))), LayerNorm) -> y.

    With `runtime_shape`, a Reshape shape is computed once at the top from Shape(x) (as the
    dynamo exporter does) and read by every layer, so the cut carries integer tensors too.
    """
    b = GraphBuilder(seed=3)
    x = b.input("x", ["B", "S", WIDTH])
    shape = None
    if runtime_shape:
        s = b.op("Shape", [x], name="shape")
        lead = b.op("Slice", [s, b.const("zero", np.array([0])), b.const("two", np.array([2]))],
                    name="lead")
        shape = b.op("Concat", [lead, b.const("width", np.array([WIDTH]))], name="shape3",
                     axis=0)
    h = x
    for i in range(layers):
        u = b.op("Relu", [dense(b, h, WIDTH, HIDDEN, name=f"l{i}.fc1")], name=f"l{i}.relu")
        d = dense(b, u, HIDDEN, WIDTH, name=f"l{i}.fc2")
        if shape is not None:
            d = b.op("Reshape", [d, shape], name=f"l{i}.reshape")
        s = b.op("Add", [h, d], name=f"l{i}.residual")
        h = b.op("LayerNormalization", [s, b.const(f"l{i}.g", np.ones(WIDTH)),
                                         b.const(f"l{i}.b", np.zeros(WIDTH))],
                 name=f"l{i}.ln", axis=-1)
    b.op("Identity", [h], name="out", output="y")
    return b.build(["y"])


def batches(n: int = 4) -> list[dict[str, np.ndarray]]:
    return [{"x": random_input([2, 5, WIDTH], seed=i)} for i in range(n)]


def whole(model: ir.Model, names: list[str], data: list) -> list[dict[str, np.ndarray]]:
    out: list[dict[str, np.ndarray]] = []
    capture(model, names, data, lambda arrays, batch: out.append(dict(arrays)))
    return out


def sectioned(prop: Propagator, names: list[str]) -> list[dict[str, np.ndarray]]:
    out: list[dict[str, np.ndarray]] = []
    prop.capture(names, lambda arrays, batch: out.append(dict(arrays)))
    return out


def node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


def assert_same(a: list[dict], b: list[dict], atol: float = 1e-6) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_allclose(x[k], y[k], atol=atol, rtol=1e-6)


def test_sections_match_whole_model_runs_at_every_cut() -> None:
    model = to_ir(residual_stack())
    data = batches()
    prop = Propagator(model, data)
    for i in range(LAYERS):
        prop.advance([node(model, f"l{i}.fc1")])
        names = [f"l{i}.relu_out", f"l{i}.fc1_bias_out", "shape3_out"]
        assert_same(sectioned(prop, names), whole(model, names, data))
    # Each cut holds the residual stream and the run-time shape, nothing of earlier layers.
    assert len(prop._cache[0]) == 2


def test_a_section_runs_only_the_nodes_after_the_cut() -> None:
    model = to_ir(residual_stack(6))
    prop = Propagator(model, batches(1))
    prop.advance([node(model, "l5.fc1")])
    from onnxprune.calibration.propagate import section

    cached = prop._cache[0]
    data, feeds = section(model, [node(model, "l5.relu").outputs[0]],
                          lambda v: 1 if v in cached else None)
    proto = onnx.load_from_string(bytes(data))
    assert sorted(n.name for n in proto.graph.node) == ["l5.fc1", "l5.fc1_bias", "l5.relu"]
    assert len(feeds) == 1


def test_pruned_groups_give_the_same_activations_as_the_pruned_model_run_whole() -> None:
    model = to_ir(residual_stack())
    data = batches()
    prop = Propagator(model, data)
    rng = np.random.default_rng(0)
    for i in range(LAYERS):
        group = next(g for g in find_channel_groups(model) if g.producers[0].node.name
                     == f"l{i}.fc1")
        prop.advance(u.node for u in group.producers)
        names = [f"l{i}.relu_out", f"l{i}.residual_out"]
        assert_same(sectioned(prop, names), whole(model, names, data))
        keep_channels(model.graph, group, np.sort(rng.choice(HIDDEN, HIDDEN // 2, replace=False)))
    assert_same(sectioned(prop, ["y"]), whole(model, ["y"], data))


def test_an_edit_before_the_cut_is_noticed_and_recomputed() -> None:
    """A constant that feeds a node the cut already passed changes: the cached values that
    depend on it are dropped, so the activations still match the edited model."""
    model = to_ir(residual_stack())
    data = batches()
    prop = Propagator(model, data)
    prop.advance([node(model, "l2.fc1")])
    weight = node(model, "l1.fc2").inputs[1]
    set_const_array(weight, const_array(weight) * 2.0)  # type: ignore[arg-type, operator]
    names = ["l2.relu_out", "y"]
    assert_same(sectioned(prop, names), whole(model, names, data))
    prop.advance([node(model, "l3.fc1")])
    assert_same(sectioned(prop, ["y"]), whole(model, ["y"], data))


def test_graph_inputs_can_be_captured() -> None:
    model = to_ir(residual_stack(1))
    data = batches(2)
    prop = Propagator(model, data)
    alone: list[np.ndarray] = []
    prop.capture(["x"], lambda arrays, _: alone.append(arrays["x"]))  # inputs only
    for a, batch in zip(alone, data, strict=True):
        np.testing.assert_array_equal(a, batch["x"])
    got = sectioned(prop, ["x", "l0.relu_out"])
    expected = whole(model, ["l0.relu_out"], data)
    for e, batch in zip(expected, data, strict=True):
        e["x"] = batch["x"]
    assert_same(got, expected)


@pytest.mark.parametrize(("budget", "whole_below"), [(2**30, 2**30), (0, 2**30), (2**30, 0)])
def test_target_store_in_memory_spilled_and_sectioned(budget: int, whole_below: int) -> None:
    """Whole-model capture or, for a model over `whole_below` bytes, one section per group."""
    model = to_ir(residual_stack(2))
    data = batches(3)
    names = ["l0.residual_out", "l1.ln_out"]
    wanted = [(["l0.fc1"], ["l0.residual_out"], ["l0.relu_out"]),
              (["l1.fc1"], ["l1.ln_out"], [])]
    store = TargetStore(model, wanted, data, budget=budget, whole_below=whole_below)
    assert store.spilled == (budget == 0)
    ref = whole(model, names, data)
    for i in range(3):
        got = store.get(names, i)
        for n, arr in zip(names, got, strict=True):
            np.testing.assert_array_equal(arr, ref[i][n])


def test_forward_target_store_captures_each_group_when_asked_and_holds_only_it() -> None:
    model = to_ir(residual_stack(2))
    data = batches(3)
    names = ["l0.residual_out", "l1.ln_out"]
    wanted = [(["l0.fc1"], ["l0.residual_out"], ["l0.relu_out"]),
              (["l1.fc1"], ["l1.ln_out"], [])]
    store = TargetStore(model, wanted, data, forward=True)
    assert not any(store._arrays)  # nothing is run before a group is asked for
    ref = whole(model, names, data)
    for name in names:  # in graph order, as the pruning asks
        for i in range(3):
            np.testing.assert_allclose(store.get([name], i)[0], ref[i][name], rtol=1e-6,
                                       atol=1e-6)
        assert set(store._arrays[0]) == {name}  # the group before was let go
    np.testing.assert_allclose(store.get([names[0]], 2)[0], ref[2][names[0]], rtol=1e-6,
                               atol=1e-6)  # going back recomputes


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {v.name: const_array(v) for v in model.graph.initializers.values()}  # type: ignore


def _compare(a: ir.Model, b: ir.Model) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].shape == wb[k].shape, k
        np.testing.assert_allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4, err_msg=k)


@pytest.mark.parametrize(("criterion", "ranked"), [("obs", False), ("activation", True)])
def test_calibrated_neurons_decide_as_whole_model_runs(criterion: str, ranked: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    proto = residual_stack()
    calib = Calibration(batches(6))
    layerwise = to_ir(proto)
    options = {"sparsity": 0.5, "criterion": criterion, "global_ranking": ranked}
    result = RemoveNeuronsPass(**options, calibration=calib)(layerwise)  # type: ignore[arg-type]
    assert result.modified
    with monkeypatch.context() as m:
        m.setattr(Propagator, "capture", lambda self, names, on_batch: capture(
            self.model, names, self.batches, on_batch))
        m.setattr(Propagator, "advance", lambda self, before: None)
        reference = to_ir(proto)
        RemoveNeuronsPass(**options, calibration=calib)(reference)  # type: ignore[arg-type]
    _compare(layerwise, reference)


@pytest.mark.parametrize("criterion", ["obs", "contribution"])
def test_calibrated_heads_decide_as_whole_model_runs(criterion: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    proto = attention_model("dynamo", layers=3, seed=4)
    calib = heads_calibration(proto)
    layerwise = to_ir(proto)
    RemoveHeadsPass(fraction=0.5, criterion=criterion, calibration=calib)(layerwise)  # type: ignore[arg-type]
    with monkeypatch.context() as m:
        m.setattr(Propagator, "capture", lambda self, names, on_batch: capture(
            self.model, names, self.batches, on_batch))
        m.setattr(Propagator, "advance", lambda self, before: None)
        reference = to_ir(proto)
        RemoveHeadsPass(fraction=0.5, criterion=criterion, calibration=calib)(reference)  # type: ignore[arg-type]
    _compare(layerwise, reference)


CUDA = "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers()


@pytest.mark.skipif(CUDA, reason="CUDA is available here")
def test_calibration_on_a_missing_provider_is_refused_before_any_run() -> None:
    from onnxprune.errors import ProviderError

    model = to_ir(residual_stack(1))
    with pytest.raises(ProviderError, match="'cuda' is not available"):
        RemoveNeuronsPass(sparsity=0.5, calibration=Calibration(batches(2), provider="cuda"))(
            model)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs onnxruntime's CUDA provider")
def test_calibration_on_cuda_decides_as_on_cpu() -> None:
    proto = residual_stack()
    on_cpu, on_cuda = to_ir(proto), to_ir(proto)
    RemoveNeuronsPass(sparsity=0.5, calibration=Calibration(batches(6)))(on_cpu)
    RemoveNeuronsPass(sparsity=0.5, calibration=Calibration(batches(6), provider="cuda"))(
        on_cuda)
    wa, wb = _weights(on_cpu), _weights(on_cuda)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].shape == wb[k].shape, k
        np.testing.assert_allclose(wa[k], wb[k], atol=1e-3, rtol=1e-3, err_msg=k)


@pytest.mark.parametrize("heads", [False, True])
def test_sectioned_reference_decides_as_one_pass(heads: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A model too big for one session gets its targets section by section: same result."""
    import onnxprune.repair.reconstruct as reconstruct

    proto = attention_model("dynamo", layers=3, seed=4) if heads else residual_stack()
    calib = heads_calibration(proto) if heads else Calibration(batches(6))

    def run(model: ir.Model) -> None:
        if heads:
            RemoveHeadsPass(fraction=0.5, calibration=calib)(model)
        else:
            RemoveNeuronsPass(sparsity=0.5, calibration=calib)(model)

    one_pass = to_ir(proto)
    run(one_pass)
    with monkeypatch.context() as m:
        m.setattr(reconstruct, "TargetStore", lambda *a, **k: TargetStore(*a, **k, whole_below=0))
        sectioned = to_ir(proto)
        run(sectioned)
    _compare(sectioned, one_pass)


def _ranges(model: ir.Model, names: list[str], data: list, sectioned: bool,
            monkeypatch: pytest.MonkeyPatch) -> dict:
    import onnxprune.quant.ranges as ranges

    with monkeypatch.context() as m:
        m.setattr(ranges, "SECTION_ABOVE_BYTES", 0 if sectioned else 1 << 62)
        out, count = ranges.collect_ranges(model, {n: -1 for n in names}, iter(data))
    assert count == len(data)
    return out


def test_sectioned_range_calibration_matches_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """A big model's quantization ranges are collected section by section: same statistics,
    and a tensor holding -Inf (an additive mask) is flagged, not refused, in both."""
    b = GraphBuilder(seed=5)
    x = b.input("x", ["B", "S", WIDTH])
    h = b.op("Relu", [dense(b, x, WIDTH, HIDDEN, name="fc1")], name="relu")
    masked = b.op("Add", [dense(b, h, HIDDEN, WIDTH, name="fc2"),
                          b.const("mask", np.where(np.arange(WIDTH) < 2, -np.inf, 0.0)
                                  .astype(np.float32))], name="mask_add")
    y = b.op("Relu", [masked], name="after_mask")
    b.op("Identity", [dense(b, y, WIDTH, WIDTH, name="fc3")], name="out", output="y")
    model = to_ir(b.build(["y"]))
    names = ["x", _output(model, "relu"), _output(model, "mask_add"),
             _output(model, "fc2"), _output(model, "out")]
    data = batches(3)
    one = _ranges(model, names, data, False, monkeypatch)
    sec = _ranges(model, names, data, True, monkeypatch)
    assert one.keys() == sec.keys()
    assert one[_output(model, "mask_add")].bad is not None
    for n in names:
        a, s = one[n], sec[n]
        assert a.bad == s.bad, n
        if a.bad is None:
            assert a.count == s.count > 0, n
            np.testing.assert_allclose([a.lo, a.hi], [s.lo, s.hi], rtol=1e-6, err_msg=n)
            np.testing.assert_array_equal(a.hist, s.hist, err_msg=n)
            np.testing.assert_allclose(a.sample, s.sample, rtol=1e-5, atol=1e-6, err_msg=n)


def _output(model: ir.Model, node_name: str) -> str:
    return node(model, node_name).outputs[0].name or ""


def test_released_pages_read_back_the_same_weights(tmp_path) -> None:
    """release_pages drops memory-mapped weights from RSS; reading them again gives the
    same values, and arrays a pass wrote are never touched."""
    from onnxprune.core.pages import release_pages

    proto = residual_stack(layers=2)
    path = tmp_path / "m.onnx"
    onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    model = ir.load(path)
    before = {k: np.array(v.const_value.numpy()) for k, v in model.graph.initializers.items()}
    written = next(v for v in model.graph.initializers.values()
                   if v.const_value is not None and v.const_value.size > 8)
    new = np.full(written.const_value.shape.numpy(), 7.0, np.float32)
    set_const_array(written, new)
    assert release_pages(model) > 0
    for k, v in model.graph.initializers.items():
        expect = new if v is written else before[k]
        np.testing.assert_array_equal(v.const_value.numpy(), expect, err_msg=k)


def test_big_reference_is_verified_section_by_section(monkeypatch: pytest.MonkeyPatch) -> None:
    """Verification of a big reference runs it in sections: the same metrics as one run."""
    import importlib

    verify = importlib.import_module("onnxprune.verify.compare")  # the package exports a verify()

    reference = to_ir(residual_stack())
    candidate = to_ir(residual_stack())
    RemoveNeuronsPass(sparsity=0.5)(candidate)
    data = batches(3)
    one = verify.compare_models(reference, candidate, data)
    calls: list[int] = []
    real = verify.sectioned_outputs

    def counted(model, batches, *a, **k):
        calls.append(1)
        return real(model, batches, *a, section_bytes=1, **k)  # a section per weighted node

    with monkeypatch.context() as m:
        m.setattr(verify, "SECTION_ABOVE_BYTES", 0)
        m.setattr(verify, "sectioned_outputs", counted)
        sec = verify.compare_models(reference, candidate, data)
    assert calls == [1]
    a, b = one.to_dict(), sec.to_dict()
    assert a["ok"] == b["ok"] and a["batches"] == b["batches"] == 3
    assert len(a["outputs"]) == len(b["outputs"]) > 0
    for oa, ob in zip(a["outputs"], b["outputs"], strict=True):
        assert oa.keys() == ob.keys()
        for key, value in oa.items():
            if isinstance(value, float):
                assert value == pytest.approx(ob[key], rel=1e-5, abs=1e-6), key
            else:
                assert value == ob[key], key


def _rss_file_kib() -> int | None:
    """File-backed resident KiB (RssFile, plus RssShmem for a tmpfs folder), or None."""
    try:
        with open("/proc/self/status") as f:
            parts = [int(line.split()[1]) for line in f
                     if line.startswith(("RssFile:", "RssShmem:"))]
    except OSError:
        return None
    return sum(parts) if parts else None


def test_released_pages_leave_the_resident_set(tmp_path) -> None:
    """After reading 32 MiB of memory-mapped weights, release_pages takes them out of this
    process's file-backed RSS (Linux; skipped where /proc has no RssFile)."""
    from onnxprune.core.pages import release_pages

    if _rss_file_kib() is None:
        pytest.skip("no RssFile in /proc/self/status on this system")
    b = GraphBuilder(seed=1)
    x = b.input("x", ["B", 2048])
    b.op("Identity", [dense(b, x, 2048, 4096, name="big")], name="out", output="y")
    path = tmp_path / "big.onnx"
    onnx.save_model(b.build(["y"]), path, save_as_external_data=True,
                    all_tensors_to_one_file=True, location="big.onnx.data", size_threshold=0)
    model = ir.load(path)
    before = _rss_file_kib()
    total = sum(float(np.asarray(v.const_value.numpy()).sum())  # touch every page
                for v in model.graph.initializers.values())
    read = _rss_file_kib()
    assert np.isfinite(total) and read - before > 24 * 1024  # ~32 MiB became resident
    release_pages(model)
    assert _rss_file_kib() - before < 8 * 1024
