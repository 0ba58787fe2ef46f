"""The default recipe: no pruning option means lossless clean-up; --calibration alone means
as much removal as the quality budget allows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import DIGITS, DIGITS_CALIB, DIGITS_TEST, mlp_model, replace_weight, run, to_ir
from helpers import weights as weights_of

import onnxprune
from onnxprune.cli import main
from onnxprune.prune.cleanup import CleanupPass


def _dead_mlp() -> onnx.ModelProto:
    """MatMul+Add MLP 8 -> 16 -> 16 -> 4 with dead channels in both hidden layers:
    hidden0 channels 0-2 are never read (fc1 rows zero); hidden1 channels 5-7 get no input
    (fc1 columns zero) and so output relu(bias): constant, non-zero where the bias is > 0."""
    proto = mlp_model([8, 16, 16, 4], seed=4)
    w = weights_of(proto)
    w1 = w["fc1.weight"].copy()
    w1[0:3, :] = 0
    w1[:, 5:8] = 0
    proto = replace_weight(proto, "fc1.weight", w1)
    b1 = w["fc1.bias"].copy()
    b1[5:8] = [0.7, -0.2, 1.3]
    return replace_weight(proto, "fc1.bias", b1)


def test_cleanup_removes_dead_channels_exactly() -> None:
    proto = _dead_mlp()
    model = to_ir(proto)
    p = CleanupPass()
    res = p(model)
    assert res.modified and res.report is p.result
    assert p.result.unread == {"fc0": 3} and p.result.constant == {"fc1": 3}
    shapes = {v.name: tuple(v.shape) for v in model.graph.initializers.values()}
    assert shapes["fc0.weight"] == (8, 13) and shapes["fc2.weight"] == (13, 4)
    x = {"x": np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)}
    got = run(ir.serde.serialize_model(model), x)[0]
    np.testing.assert_allclose(got, run(proto, x)[0], rtol=1e-5, atol=1e-5)


def test_cleanup_shares_duplicate_constants_and_leaves_live_models_alone() -> None:
    proto = mlp_model([8, 8, 8, 4], seed=5)
    w = weights_of(proto)
    proto = replace_weight(proto, "fc1.bias", w["fc0.bias"])  # same bytes twice
    model = to_ir(proto)
    p = CleanupPass()
    assert p(model).modified
    assert p.result.shared_constants == 1 and p.result.removed == 0
    assert p.result.bytes_after == p.result.bytes_before - w["fc0.bias"].nbytes
    x = {"x": np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run(ir.serde.serialize_model(model), x)[0], run(proto, x)[0])
    live = to_ir(mlp_model([8, 8, 4], seed=6))
    assert not CleanupPass()(live).modified  # nothing dead, nothing shared: untouched


def test_cleanup_never_empties_a_group() -> None:
    proto = mlp_model([8, 4, 4], seed=7)
    w = weights_of(proto)["fc1.weight"].copy()
    w[:] = 0  # nothing reads hidden0 at all: a whole group is a question for other passes
    model = to_ir(replace_weight(proto, "fc1.weight", w))
    p = CleanupPass()
    p(model)
    assert p.result.removed == 0


def test_cli_default_recipe_on_digits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "small.onnx"
    assert main([str(DIGITS), "-o", str(out), "--report", str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    assert "default recipe (no pruning option): lossless clean-up" in text
    assert "--calibration DATA" in text  # what would do more
    assert out.stat().st_size <= DIGITS.stat().st_size
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verification"]["ok"] is True
    # A model with dead channels gets smaller, and still verifies.
    dead = tmp_path / "dead.onnx"
    onnx.save(_dead_mlp(), dead)
    out2 = tmp_path / "dead_small.onnx"
    assert main([str(dead), "-o", str(out2), "-q"]) == 0
    assert out2.stat().st_size < dead.stat().st_size
    assert onnxprune.verify(dead, out2, min_cosine=0.99999).ok


def test_cli_calibration_alone_meets_the_default_budget(tmp_path: Path) -> None:
    out, rep = tmp_path / "small.onnx", tmp_path / "r.json"
    code = main([str(DIGITS), "-o", str(out), "--calibration", str(DIGITS_CALIB),
                 "--data", str(DIGITS_TEST), "--report", str(rep), "-q"])
    assert code == 0
    r = json.loads(rep.read_text())
    assert r["search"]["reached"] and r["search"]["drop"] <= 0.01
    assert r["after"]["weight_flops_per_row"] < 0.8 * r["before"]["weight_flops_per_row"]
    assert any(n.startswith("default recipe with --calibration") for n in r["notes"])


def _embedding_model(tied: bool) -> onnx.ModelProto:
    from helpers import make_model, value_info
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    table = rng.standard_normal((500, 16)).astype(np.float32)
    w = rng.standard_normal((16, 4)).astype(np.float32)
    nodes = [h.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             h.make_node("MatMul", ["e", "tableT" if tied else "w"], ["y"], name="head")]
    if tied:  # the output projection reads the same table (GPT-2's lm_head)
        nodes.insert(0, h.make_node("Transpose", ["table"], ["tableT"], perm=[1, 0]))
    inits = [numpy_helper.from_array(table, "table")]
    if not tied:
        inits.append(numpy_helper.from_array(w, "w"))
    out = ["B", "S", 500 if tied else 4]
    return make_model(nodes, [value_info("ids", ["B", "S"], T.INT64)],
                      [value_info("y", out)], inits)


def test_default_recipe_stores_embedding_tables_in_int8(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_embedding_model(tied=False), src)
    assert main([str(src), "-o", str(out)]) == 0
    assert "embedding tables stored in int8" in capsys.readouterr().out
    assert out.stat().st_size < 0.4 * src.stat().st_size
    written = onnx.load(str(out))
    dtypes = {t.name: t.data_type for t in written.graph.initializer}
    assert onnx.TensorProto.INT8 in dtypes.values()  # the table, gathered then scaled
    assert dtypes["w"] == onnx.TensorProto.FLOAT  # the MatMul weight stays float
    assert onnxprune.verify(src, out)  # the defaults, on generated ids
    # A table also read by a MatMul (tied weights) would be stored twice: left alone.
    onnx.save(_embedding_model(tied=True), src)
    assert main([str(src), "-o", str(out)]) == 0
    assert "embedding tables stored in int8" not in capsys.readouterr().out
    assert out.read_bytes() == src.read_bytes()


def test_a_failing_default_step_is_skipped_and_reported(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default recipe's int8 embedding step is a trial: when it fails (here its pass
    raises as a broken rewrite would), the run goes on, exits 0, says why, and writes the
    input's bytes."""
    from onnxprune.quant.qdq_pass import QuantizeQDQPass

    def broken(self: QuantizeQDQPass, model: ir.Model) -> ir.passes.PassResult:
        raise RuntimeError("Type (tensor(int8)) of output arg (e) does not match")

    monkeypatch.setattr(QuantizeQDQPass, "call", broken)
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_embedding_model(tied=False), src)
    assert main([str(src), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "int8 embedding tables not kept: the trial failed (RuntimeError" in printed
    assert out.read_bytes() == src.read_bytes()


def test_the_default_step_is_checked_on_the_users_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """--data given: the trial is judged on it (ids the user gives), not on generated ids."""
    import onnxprune.recipe.run as run_mod
    from onnxprune.recipe.config import PruneConfig

    seen: list[list[dict[str, np.ndarray]]] = []
    real = run_mod.compare_models

    def spy(ref, cand, batches, **kw):  # type: ignore[no-untyped-def]
        seen.append(list(batches))
        return real(ref, cand, seen[-1], **kw)

    monkeypatch.setattr(run_mod, "compare_models", spy)
    mine = [{"ids": np.full((2, 3), 7, dtype=np.int64)}]
    run_mod.prune_model(to_ir(_embedding_model(tied=False)), PruneConfig(), check_batches=mine)
    assert seen and np.array_equal(seen[0][0]["ids"], mine[0]["ids"])


def test_the_default_command_never_writes_a_bigger_file(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the rewritten model would be larger than the input (recorded shapes outweigh
    what clean-up removed), the default command writes the input's bytes and says why."""
    import onnxprune.recipe.pipeline as pipeline

    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_dead_mlp(), src)
    real = pipeline.stored_bytes

    def grown(path):  # type: ignore[no-untyped-def]
        return real(path) + (10**6 if Path(path) == out else 0)

    monkeypatch.setattr(pipeline, "stored_bytes", grown)
    assert main([str(src), "-o", str(out)]) == 0
    assert "the input's bytes were written instead" in capsys.readouterr().out
    assert out.read_bytes() == src.read_bytes()
