"""Calibration: streaming statistics, least-squares solves, row masks, and bad data."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import (
    BATCH,
    GraphBuilder,
    mlp_model,
    random_input,
    save,
)

from onnxprune.api import PruneConfig, prune
from onnxprune.calibration.runner import row_mask
from onnxprune.calibration.stats import LayerStats
from onnxprune.cli import main
from onnxprune.errors import DataError
from onnxprune.repair.lstsq import obs_select, refit

# ----------------------------------------------------------------- LayerStats


def _augmented(x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((x.shape[0], 1))])


def test_streaming_stats_equal_one_shot_numpy_with_a_row_mask() -> None:
    """Batches of [batch, seq, C] with padding masks: sums equal numpy on the kept rows."""
    rng = np.random.default_rng(0)
    c, d = 5, 3
    stats = LayerStats(c, targets=d)
    xs, ys = [], []
    for i, (b, s) in enumerate([(2, 7), (3, 4), (1, 9), (4, 2)]):
        x = (rng.standard_normal((b, s, c)) * (1 + np.arange(c)) + i).astype(np.float32)
        y = rng.standard_normal((b, s, d)).astype(np.float32)
        lengths = rng.integers(1, s + 1, size=b)
        attention = (np.arange(s)[None, :] < lengths[:, None]).astype(np.int64)
        mask = row_mask({"attention_mask": attention}, "attention_mask", b * s, (b, s))
        assert mask is not None and mask.sum() == lengths.sum()
        stats.add(x, y, mask)
        xs.append(x.reshape(-1, c)[mask].astype(np.float64))
        ys.append(y.reshape(-1, d)[mask].astype(np.float64))
    x_all, y_all = np.concatenate(xs), np.concatenate(ys)
    xa = _augmented(x_all)
    assert stats.rows == x_all.shape[0]
    # Each batch's products are float32 (summed in float64): agreement to float32 precision.
    np.testing.assert_allclose(stats.gram, xa.T @ xa, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(stats.cross, xa.T @ y_all, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(stats.mean, x_all.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats.sq_mean, np.square(x_all).mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats.var, x_all.var(axis=0), rtol=1e-8)
    d_ = stats.as_dict()
    assert set(d_) >= {"mean", "sq_mean", "var", "entropy"}
    assert np.all(np.isfinite(d_["entropy"])) and np.all(d_["entropy"] >= 0)


def test_stats_without_targets_and_an_all_masked_batch() -> None:
    stats = LayerStats(3)
    x = random_input([4, 3])
    stats.add(x, mask=np.zeros(4, dtype=bool))  # nothing counted
    assert stats.rows == 0 and stats.cross is None
    stats.add(x)
    assert stats.rows == 4
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-6)


def test_entropy_ranks_a_constant_channel_lowest() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 4))
    x[:, 2] = 0.3  # carries no information
    stats = LayerStats(4)
    stats.add(x[:250])
    stats.add(x[250:])
    assert int(np.argmin(stats.entropy)) == 2


# ------------------------------------------------------------------ row masks


def test_row_mask_forms() -> None:
    attention = np.array([[1, 1, 0], [1, 0, 0]], np.int64)
    batch = {"attention_mask": attention}
    assert row_mask(batch, None, 6, (2, 3)) is None
    np.testing.assert_array_equal(
        row_mask(batch, "attention_mask", 6, (2, 3)), [True, True, False, True, False, False]
    )
    # a [batch] mask over [batch, seq] rows: whole sequences in or out
    per_row = row_mask({"keep": np.array([1, 0])}, "keep", 6, (2, 3))
    np.testing.assert_array_equal(per_row, [True] * 3 + [False] * 3)
    with pytest.raises(DataError, match="'attention_mask' has shape \\[2, 3\\]"):
        row_mask(batch, "attention_mask", 8, (2, 4))
    with pytest.raises(DataError, match="'token_mask' is not in the calibration batch"):
        row_mask(batch, "token_mask", 6, (2, 3))


# -------------------------------------------------------------- least squares


def _problem(seed: int = 0, n: int = 400, c: int = 16, d: int = 6):
    """X with correlated channels of unequal importance, Y = X W + noise; H and B."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c)) @ (rng.standard_normal((c, c)) * 0.5 + np.eye(c))
    w = rng.standard_normal((c, d)) * (rng.random(c)[:, None] ** 2)
    y = x @ w + 1.0 + 0.05 * rng.standard_normal((n, d))
    xa = _augmented(x)
    return x, y, xa.T @ xa, xa.T @ y


def _sse(x: np.ndarray, y: np.ndarray, keep: np.ndarray, w: np.ndarray) -> float:
    return float(np.sum(np.square(_augmented(x[:, keep]) @ w - y)))


def test_refit_without_ridge_is_numpy_lstsq() -> None:
    x, y, gram, cross = _problem()
    keep = np.array([0, 3, 4, 9, 15])
    w = refit(gram, cross, keep, ridge=0.0)
    expected = np.linalg.lstsq(_augmented(x[:, keep]), y, rcond=None)[0]
    assert w.shape == (len(keep) + 1, y.shape[1])
    np.testing.assert_allclose(w, expected, rtol=1e-7, atol=1e-9)


def test_refit_with_ridge_is_the_ridge_solution() -> None:
    """Ridge scaled by the mean channel power, on the channels only (not the bias)."""
    x, y, gram, cross = _problem(seed=1)
    keep = np.array([1, 2, 7, 8, 11, 12])
    ridge = 0.05
    lam = ridge * np.mean(np.square(x).sum(axis=0))
    a = _augmented(x[:, keep])
    penalty = lam * np.diag([1.0] * len(keep) + [0.0])
    expected = np.linalg.solve(a.T @ a + penalty, a.T @ y)
    np.testing.assert_allclose(refit(gram, cross, keep, ridge), expected, rtol=1e-8)


def test_refit_with_a_prior_pulls_towards_it() -> None:
    """With prior W0 the penalty is lam * ||w - W0||² on the kept channels."""
    if "prior" not in inspect.signature(refit).parameters:
        pytest.skip("refit takes no prior in this version")
    x, y, gram, cross = _problem(seed=6)
    keep = np.array([0, 2, 5, 6, 9])
    prior = np.random.default_rng(7).standard_normal((16, y.shape[1]))
    ridge = 0.2
    lam = ridge * np.mean(np.square(x).sum(axis=0))
    a = _augmented(x[:, keep])
    penalty = lam * np.diag([1.0] * len(keep) + [0.0])
    rhs = a.T @ y + penalty @ np.vstack([prior[keep], np.zeros((1, y.shape[1]))])
    expected = np.linalg.solve(a.T @ a + penalty, rhs)
    np.testing.assert_allclose(refit(gram, cross, keep, ridge, prior), expected, rtol=1e-8)
    # a huge ridge returns the prior itself
    w = refit(gram, cross, keep, 1e9, prior)
    np.testing.assert_allclose(w[:-1], prior[keep], atol=1e-4)


@pytest.mark.parametrize("n_keep", [4, 8, 12])
def test_obs_select_beats_random_subsets(n_keep: int) -> None:
    x, y, gram, cross = _problem(seed=2)
    keep, w = obs_select(gram, cross, n_keep, 1e-3)
    assert keep.dtype.kind == "i" and len(keep) == n_keep
    assert np.all(np.diff(keep) > 0) and keep[0] >= 0 and keep[-1] < 16
    np.testing.assert_allclose(w, refit(gram, cross, keep, 1e-3))
    err = _sse(x, y, keep, w)
    rng = np.random.default_rng(3)
    for _ in range(30):
        subset = np.sort(rng.choice(16, n_keep, replace=False))
        assert err <= _sse(x, y, subset, refit(gram, cross, subset, 1e-3))


def test_obs_select_keeping_everything_is_the_full_fit() -> None:
    x, y, gram, cross = _problem(seed=4, c=6)
    keep, w = obs_select(gram, cross, 6, 0.0)
    np.testing.assert_array_equal(keep, np.arange(6))
    np.testing.assert_allclose(w, np.linalg.lstsq(_augmented(x), y, rcond=None)[0], rtol=1e-6)


def test_singular_gram_solves_finitely_thanks_to_ridge() -> None:
    """A duplicated and an all-zero channel make H singular; the ridge keeps it solvable."""
    x, y, _, _ = _problem(seed=5, c=8)
    x[:, 3] = x[:, 1]
    x[:, 5] = 0.0
    xa = _augmented(x)
    gram, cross = xa.T @ xa, xa.T @ y
    assert np.linalg.matrix_rank(gram) < gram.shape[0]
    best = np.linalg.lstsq(xa, y, rcond=None)[0]
    floor = _sse(x, y, np.arange(8), best)
    for keep in (np.arange(8), np.array([1, 3, 5, 6])):
        w = refit(gram, cross, keep, 1e-3)
        assert np.all(np.isfinite(w))
    w = refit(gram, cross, np.arange(8), 1e-3)
    assert _sse(x, y, np.arange(8), w) <= floor * 1.01 + 1e-6
    keep, w = obs_select(gram, cross, 5, 1e-3)
    assert np.all(np.isfinite(w)) and len(keep) == 5
    assert 5 not in keep  # the dead channel goes first
    assert not {1, 3} <= set(keep.tolist())  # one of the twins suffices


# --------------------------------------------------------- bad calibration data


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    return save(mlp_model([8, 16, 4]), tmp_path / "mlp.onnx")


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"pixels": random_input([4, 8])}, "no array for model input 'x'"),
        ({"x": random_input([4, 8]), "extra": random_input([2])}, "array 'extra' matches no"),
        ({"x": random_input([4, 8]).astype(np.complex64)}, "input 'x' is complex64"),
        ({"x": random_input([4, 2, 8])}, "input 'x' has rank 3, the model expects 2"),
        ({"x": random_input([4, 7])}, "input 'x' has size 7 on axis 1"),
    ],
    ids=["name", "extra", "dtype", "rank", "size"],
)
def test_wrong_calibration_data_names_the_input(
    tmp_path: Path, mlp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    calib = _npz(tmp_path / "calib.npz", **arrays)
    out = tmp_path / "out.onnx"
    with pytest.raises(DataError, match=message):
        prune(mlp_path, PruneConfig(sparsity=0.5, calibration=calib), output=out)
    assert not out.exists()


def test_empty_calibration_folder(tmp_path: Path, mlp_path: Path) -> None:
    (tmp_path / "calib").mkdir()
    with pytest.raises(DataError, match="holds no .npz batches"):
        prune(mlp_path, PruneConfig(sparsity=0.5, calibration=tmp_path / "calib"),
              output=tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_calibration_folder_of_batches_is_used(tmp_path: Path, mlp_path: Path) -> None:
    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(3):
        _npz(folder / f"b{i}.npz", x=random_input([16, 8], seed=i))
    out = prune(mlp_path, PruneConfig(sparsity=0.5, calibration=folder),
                output=tmp_path / "out.onnx")
    w = {t.name: t.dims for t in onnx.load(str(out)).graph.initializer}
    assert list(w["fc1.weight"]) == [8, 4]


def _nan_model(kind: str) -> onnx.ModelProto:
    """x -> MatMul 'prod' -> Log (NaN for negatives) or Div by 0 (Inf) = 'h_bad' -> 'cons'."""
    b = GraphBuilder(seed=0)
    x = b.input("x", [BATCH, 8])
    h = b.op("MatMul", [x, b.weight("w1", [8, 16])], name="prod")
    if kind == "log":
        h = b.op("Log", [h], name="log", output="h_bad")
    else:
        h = b.op("Div", [h, b.const("zero", np.float32(0.0))], name="div", output="h_bad")
    b.op("MatMul", [h, b.weight("w2", [16, 4])], name="cons", output="y")
    return b.build(["y"])


@pytest.mark.parametrize("kind", ["log", "div_by_zero"])
def test_nan_activations_raise_data_error_naming_the_tensor(tmp_path: Path, kind: str) -> None:
    model = save(_nan_model(kind), tmp_path / "bad.onnx")
    calib = _npz(tmp_path / "calib.npz", x=random_input([32, 8]))
    with pytest.raises(DataError, match="tensor 'h_bad' holds NaN/Inf"):
        prune(model, PruneConfig(sparsity=0.5, calibration=calib), output=tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_nan_activations_fail_the_cli_without_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save(_nan_model("log"), tmp_path / "bad.onnx")
    calib = _npz(tmp_path / "calib.npz", x=random_input([32, 8]))
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    code = main([str(model), "-o", str(out), "--sparsity", "0.5", "--calibration", str(calib),
                 "--report", str(report)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("onnxprune: error:")
    assert "'h_bad'" in err
    assert not out.exists() and not report.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "calib.npz"]
