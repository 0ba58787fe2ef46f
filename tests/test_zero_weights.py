"""ZeroWeightsPass: threshold, per-layer sparsity and N:M zeroing of MatMul/Gemm weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import (
    mlp_forward,
    mlp_model,
    random_input,
    replace_weight,
    run,
    shared_weight_model,
    to_ir,
    weights,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxprune.errors import InputError
from onnxprune.prune.zero_weights import ZeroWeightsPass, nm_mask

X = random_input([6, 8], seed=11)
PROPERTY = settings(max_examples=30, deadline=None, derandomize=True)


def _apply(model: onnx.ModelProto, **options: object) -> tuple[ir.Model, ZeroWeightsPass, bool]:
    m = to_ir(model)
    p = ZeroWeightsPass(**options)  # type: ignore[arg-type]
    result = p(m)
    assert result.model is m  # in place
    return m, p, result.modified


def _nonzeros_per_group(w: np.ndarray, axis: int, m: int) -> np.ndarray:
    """Non-zero counts of every full group of m consecutive entries along `axis`."""
    moved = np.moveaxis(w, axis, -1)
    full = (moved.shape[-1] // m) * m
    groups = moved[..., :full].reshape(*moved.shape[:-1], full // m, m)
    return np.count_nonzero(groups, axis=-1)


# ------------------------------------------------------------------------ threshold


def test_threshold_zeroes_small_weights_only() -> None:
    model = mlp_model([8, 16, 4], seed=2)
    before = weights(model)
    m, p, modified = _apply(model, threshold=0.3)
    assert modified
    after = weights(m)
    for name in ("fc0.weight", "fc1.weight"):
        w = before[name]
        np.testing.assert_array_equal(after[name], np.where(np.abs(w) > 0.3, w, 0))
    for name in ("fc0.bias", "fc1.bias"):  # biases are not MatMul weights
        np.testing.assert_array_equal(after[name], before[name])
    np.testing.assert_allclose(run(m, {"x": X})[0], mlp_forward(after, X, 2), rtol=1e-5, atol=1e-5)
    layers = {layer.weight: layer for layer in p.result.layers}
    assert set(layers) == {"fc0.weight", "fc1.weight"}
    for name, layer in layers.items():
        w = before[name]
        assert layer.size == w.size
        assert layer.zeros_before == 0
        assert layer.zeros_after == int(np.sum(np.abs(w) <= 0.3))
        assert layer.sparsity == pytest.approx(layer.zeros_after / w.size)
        assert layer.skipped is None
    assert p.result.zeroed == sum(int(np.sum(np.abs(before[n]) <= 0.3)) for n in layers)


def test_threshold_above_every_weight_zeroes_everything() -> None:
    model = mlp_model([8, 16, 4], seed=2)
    m, p, modified = _apply(model, threshold=1e6)
    assert modified
    assert all(layer.sparsity == 1.0 for layer in p.result.layers)
    # Only the biases are left: y = relu(b0) @ 0 + b1 = b1.
    out = run(m, {"x": X})[0]
    np.testing.assert_array_equal(out, np.broadcast_to(weights(model)["fc1.bias"], out.shape))


@PROPERTY
@given(
    seed=st.integers(0, 2**16),
    zeros=st.integers(0, 20),
    gemm=st.booleans(),
    trans_b=st.booleans(),
)
def test_threshold_zero_changes_nothing(seed: int, zeros: int, gemm: bool, trans_b: bool) -> None:
    """tau = 0 zeroes only what is already zero: weights, outputs and `modified` unchanged."""
    model = mlp_model([8, 16, 4], gemm=gemm, trans_b=gemm and trans_b, seed=seed)
    w = weights(model)["fc0.weight"].copy()
    idx = np.random.default_rng(seed).choice(w.size, size=zeros, replace=False)
    w.reshape(-1)[idx] = 0.0
    w.reshape(-1)[idx[: zeros // 2]] = -0.0
    model = replace_weight(model, "fc0.weight", w)
    before = weights(model)
    m, p, modified = _apply(model, threshold=0.0)
    assert modified is False
    after = weights(m)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    np.testing.assert_array_equal(run(m, {"x": X})[0], run(model, {"x": X})[0])
    layer = next(layer for layer in p.result.layers if layer.weight == "fc0.weight")
    assert layer.zeros_before == layer.zeros_after == zeros
    assert p.result.zeroed == 0


# ------------------------------------------------------------------------ sparsity


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9])
def test_sparsity_is_exact_per_layer(sparsity: float) -> None:
    model = mlp_model([8, 16, 4, 3], gemm=True, trans_b=True, seed=4)
    before = weights(model)
    m, p, modified = _apply(model, sparsity=sparsity)
    assert modified is (sparsity > 0)
    after = weights(m)
    for layer in p.result.layers:
        w, z = before[layer.weight], after[layer.weight]
        k = int(round(sparsity * w.size))
        assert layer.size == w.size
        assert layer.zeros_after == k == w.size - np.count_nonzero(z)
        assert layer.sparsity == pytest.approx(k / w.size)
        # The zeroed entries are the smallest magnitudes; the kept ones are untouched.
        dropped, kept = np.abs(w[z == 0]), np.abs(w[z != 0])
        if dropped.size and kept.size:
            assert dropped.max() <= kept.min()
        np.testing.assert_array_equal(z[z != 0], w[z != 0])
    np.testing.assert_allclose(
        run(m, {"x": X})[0], mlp_forward(after, X, 3, trans_b=True), rtol=1e-5, atol=1e-5
    )
    assert p.result.to_dict()["zeroed"] == p.result.zeroed


def test_sparsity_counts_existing_zeros() -> None:
    model = mlp_model([8, 4], activation=None, seed=0)
    w = weights(model)["fc0.weight"].copy()
    w.reshape(-1)[:10] = 0.0
    m, p, _ = _apply(replace_weight(model, "fc0.weight", w), sparsity=0.5)
    (layer,) = p.result.layers
    assert (layer.zeros_before, layer.zeros_after, layer.size) == (10, 16, 32)
    assert p.result.zeroed == 6
    assert np.count_nonzero(weights(m)["fc0.weight"]) == 16


# ------------------------------------------------------------------------ N:M


@PROPERTY
@given(
    k=st.integers(1, 19),
    n_out=st.integers(1, 6),
    nm=st.sampled_from([(2, 4), (1, 4), (1, 2), (4, 8), (3, 4)]),
    seed=st.integers(0, 2**16),
)
def test_nm_matmul_reduces_over_axis_0(k: int, n_out: int, nm: tuple[int, int], seed: int) -> None:
    n, m_ = nm
    model = mlp_model([k, n_out], activation=None, seed=seed)  # MatMul weight [in, out]
    w = weights(model)["fc0.weight"]
    m, p, _ = _apply(model, nm=nm)
    z = weights(m)["fc0.weight"]
    assert z.shape == (k, n_out)
    assert np.all(_nonzeros_per_group(z, 0, m_) <= n)
    _check_nm_keeps_largest(w, z, axis=0, n=n, m=m_)
    x = random_input([3, k], seed=seed)
    np.testing.assert_allclose(run(m, {"x": x})[0], mlp_forward(weights(m), x, 1, relu=False),
                               rtol=1e-5, atol=1e-5)
    (layer,) = p.result.layers
    assert layer.zeros_after == z.size - np.count_nonzero(z)


@PROPERTY
@given(
    k=st.integers(1, 19),
    n_out=st.integers(1, 6),
    nm=st.sampled_from([(2, 4), (1, 4), (4, 8)]),
    seed=st.integers(0, 2**16),
)
def test_nm_gemm_trans_b_reduces_over_axis_1(
    k: int, n_out: int, nm: tuple[int, int], seed: int
) -> None:
    n, m_ = nm
    model = mlp_model([k, n_out], activation=None, gemm=True, trans_b=True, seed=seed)
    w = weights(model)["fc0.weight"]
    assert w.shape == (n_out, k)  # [out, in]
    m, _, _ = _apply(model, nm=nm)
    z = weights(m)["fc0.weight"]
    assert np.all(_nonzeros_per_group(z, 1, m_) <= n)
    _check_nm_keeps_largest(w, z, axis=1, n=n, m=m_)
    x = random_input([3, k], seed=seed)
    np.testing.assert_allclose(
        run(m, {"x": x})[0], mlp_forward(weights(m), x, 1, trans_b=True, relu=False),
        rtol=1e-5, atol=1e-5,
    )


def _check_nm_keeps_largest(w: np.ndarray, z: np.ndarray, *, axis: int, n: int, m: int) -> None:
    """Each full group keeps exactly its n largest magnitudes; a partial tail stays dense."""
    wm, zm = np.moveaxis(w, axis, -1), np.moveaxis(z, axis, -1)
    full = (wm.shape[-1] // m) * m
    np.testing.assert_array_equal(zm[..., full:], wm[..., full:])
    rows_w, rows_z = wm.reshape(-1, wm.shape[-1]), zm.reshape(-1, zm.shape[-1])
    for row_w, row_z in zip(rows_w, rows_z, strict=True):
        for start in range(0, full, m):
            gw, gz = row_w[start:start + m], row_z[start:start + m]
            kept = gz != 0
            assert kept.sum() == n  # random normals have no ties and no zeros
            np.testing.assert_array_equal(gz[kept], gw[kept])
            assert np.abs(gw[kept]).min() >= np.abs(gw[~kept]).max()


def test_nm_mask_function_matches_definition() -> None:
    w = np.array([[4.0, -1.0, 3.0, 0.5, 9.0, -8.0]], np.float32)  # reduce along axis 1
    keep = nm_mask(w, reduce_axis=1, n=2, m=4)
    # Group [4, -1, 3, 0.5] keeps 4 and 3; the tail [9, -8] is shorter than 4 and stays.
    np.testing.assert_array_equal(keep, [[True, False, True, False, True, True]])


def test_nm_on_digits_sized_layers() -> None:
    model = mlp_model([64, 32, 10], gemm=True, trans_b=True, seed=0)
    m, p, modified = _apply(model, nm=(2, 4))
    assert modified
    for layer in p.result.layers:
        assert layer.sparsity == pytest.approx(0.5)


# ------------------------------------------------------------------------ weight storage


@pytest.mark.parametrize("gemm,trans_b", [(False, False), (True, False), (True, True)])
def test_constant_node_weights_are_zeroed(gemm: bool, trans_b: bool) -> None:
    model = mlp_model([8, 16, 4], gemm=gemm, trans_b=trans_b, weights_as_constants=True, seed=6)
    assert not model.graph.initializer
    before = weights(model)
    m, p, modified = _apply(model, sparsity=0.5)
    assert modified
    proto = ir.serde.serialize_model(m)
    onnx.checker.check_model(proto, full_check=True)
    assert not proto.graph.initializer  # still Constant nodes
    after = weights(proto)
    for name in ("fc0.weight", "fc1.weight"):
        assert np.count_nonzero(after[name]) == before[name].size // 2
    for name in ("fc0.bias", "fc1.bias"):
        np.testing.assert_array_equal(after[name], before[name])
    np.testing.assert_allclose(
        run(proto, {"x": X})[0], mlp_forward(after, X, 2, trans_b=trans_b), rtol=1e-5, atol=1e-5
    )
    assert {layer.weight for layer in p.result.layers} == {"fc0.weight", "fc1.weight"}


def test_shared_weight_is_zeroed_once_and_consistently() -> None:
    model = shared_weight_model(8, 8, seed=3)
    w = weights(model)["w"]
    m, p, modified = _apply(model, sparsity=0.25)
    assert modified
    (layer,) = p.result.layers  # one entry for the one tensor
    assert set(layer.nodes) == {"mm_a", "mm_b"}
    assert (layer.size, layer.zeros_after) == (64, 16)
    z = weights(m)["w"]
    assert np.count_nonzero(z) == 48  # zeroed once: 25 %, not 25 % twice
    np.testing.assert_array_equal(z, np.where(np.abs(w) > np.sort(np.abs(w).ravel())[15], w, 0))
    x, y = random_input([4, 8], seed=1), random_input([4, 8], seed=2)
    expected = x.astype(np.float64) @ z + y.astype(np.float64) @ z
    np.testing.assert_allclose(run(m, {"x": x, "z": y})[0], expected, rtol=1e-5, atol=1e-5)


def test_weight_that_is_a_graph_input_is_left_alone() -> None:
    """An initializer listed as a graph input can be overridden at run time: not a constant."""
    model = mlp_model([8, 4], activation=None, seed=0)
    w = model.graph.initializer[0]
    model.graph.input.append(onnx.helper.make_tensor_value_info(w.name, w.data_type, w.dims))
    m, p, modified = _apply(model, sparsity=0.5)
    assert not modified and p.result.layers == ()
    np.testing.assert_array_equal(weights(m)["fc0.weight"], weights(model)["fc0.weight"])


# ------------------------------------------------------------------------ ignore, options


def test_ignore_glob_leaves_layers_alone() -> None:
    model = mlp_model([8, 16, 16, 4], seed=8)
    before = weights(model)
    m, p, _ = _apply(model, sparsity=0.5, ignore=["fc[02]"])
    after = weights(m)
    for name in ("fc0.weight", "fc2.weight"):
        np.testing.assert_array_equal(after[name], before[name])
    assert np.count_nonzero(after["fc1.weight"]) == 128
    skipped = {layer.weight: layer.skipped for layer in p.result.layers}
    assert skipped == {"fc0.weight": "matches --ignore", "fc1.weight": None,
                       "fc2.weight": "matches --ignore"}
    ignored = next(layer for layer in p.result.layers if layer.weight == "fc0.weight")
    assert ignored.zeros_after == ignored.zeros_before == 0


def test_ignore_everything_is_not_a_modification() -> None:
    model = mlp_model([8, 16, 4], seed=8)
    m, p, modified = _apply(model, threshold=0.5, ignore=["*"])
    assert modified is False
    assert all(layer.skipped for layer in p.result.layers)
    np.testing.assert_array_equal(run(m, {"x": X})[0], run(model, {"x": X})[0])


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"threshold": 0.1, "sparsity": 0.5},
        {"sparsity": 0.5, "nm": (2, 4)},
        {"threshold": -0.1},
        {"threshold": float("nan")},
        {"sparsity": 1.0},
        {"sparsity": -0.1},
        {"sparsity": float("nan")},
        {"nm": (2, 2)},
        {"nm": (0, 4)},
        {"nm": (4, 2)},
        {"nm": (-1, 4)},
    ],
)
def test_invalid_options(options: dict[str, object]) -> None:
    with pytest.raises(InputError):
        ZeroWeightsPass(**options)  # type: ignore[arg-type]


def test_result_dict() -> None:
    m, p, _ = _apply(mlp_model([8, 4], activation=None, seed=0), sparsity=0.25)
    data = p.result.to_dict()
    assert data == {
        "zeroed": 8,
        "layers": [
            {"weight": "fc0.weight", "nodes": ("fc0",), "size": 32, "zeros_before": 0,
             "zeros_after": 8, "skipped": None, "sparsity": 0.25}
        ],
    }
