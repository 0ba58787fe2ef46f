"""verify fit for CI: truthiness, readable failures, shared defaults, output kinds, golden
files and the pytest helper."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import DIGITS, DIGITS_TEST, replace_weight, run, save, weights
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

import onnxprune
from onnxprune import api
from onnxprune.cli import main
from onnxprune.errors import DataError, InputError
from onnxprune.testing import assert_close
from onnxprune.verify.compare import Tolerances, output_kind


def _broken_digits(tmp_path: Path, factor: float = -1.0) -> Path:
    digits = onnx.load(str(DIGITS))
    w = weights(digits)["fc2.weight"]
    return save(replace_weight(digits, "fc2.weight", (w * factor).astype(np.float32)),
                tmp_path / "bad.onnx")


def _encoder(seed: int, noise: float = 0.0) -> onnx.ModelProto:
    """ids-free 'encoder': x [B, S, 8] -> hidden [B, S, 16] and a pooled, unit-norm [B, 16]."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    w += noise * np.random.default_rng(99).standard_normal(w.shape).astype(np.float32)
    nodes = [
        h.make_node("MatMul", ["x", "w"], ["last_hidden_state"]),
        h.make_node("ReduceMean", ["last_hidden_state", "axes"], ["pooled"], keepdims=0),
        h.make_node("LpNormalization", ["pooled"], ["sentence_embedding"], axis=-1, p=2),
    ]
    graph = h.make_graph(
        nodes, "enc", [h.make_tensor_value_info("x", T.FLOAT, ["B", "S", 8])],
        [h.make_tensor_value_info("last_hidden_state", T.FLOAT, ["B", "S", 16]),
         h.make_tensor_value_info("sentence_embedding", T.FLOAT, ["B", 16])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([1]), "axes")],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    model.ir_version = 8
    return model


# ------------------------------------------------------------------------ the result object


def test_assert_on_a_broken_model_fails_with_every_failure_listed(tmp_path: Path) -> None:
    bad = _broken_digits(tmp_path)
    result = onnxprune.verify(DIGITS, bad, DIGITS_TEST)  # data positional, as users write it
    assert not result
    with pytest.raises(AssertionError) as e:
        assert result, result
    assert "logits [cpu]: top-1 agreement" in str(e.value)  # readable, not a truncated repr
    with pytest.raises(AssertionError) as e:
        result.raise_for_failure()
    text = str(e.value)
    assert text.startswith("verification failed:\n  - logits [cpu]: top-1 agreement ")
    assert "FAILED" in result.summary() and "scores" in result.summary()
    good = onnxprune.verify(DIGITS, DIGITS, DIGITS_TEST)
    assert good and good.ok
    good.raise_for_failure()  # no exception
    assert good.summary().startswith("verification passed against the reference model on 1")


def test_tolerances_are_keywords_with_the_cli_defaults(tmp_path: Path) -> None:
    bad = _broken_digits(tmp_path, factor=1.3)  # a mild change: compare verdicts
    defaults = onnxprune.verify(DIGITS, bad, DIGITS_TEST)
    assert defaults.tolerances == Tolerances.defaults()
    for kw, flag in ((dict(min_cosine=0.99), ["--min-cosine", "0.99"]),
                     (dict(min_cosine=0.9999), ["--min-cosine", "0.9999"]),
                     (dict(min_sqnr_db=30.0), ["--min-sqnr", "30"]),
                     (dict(atol=0.5), ["--atol", "0.5"]),
                     ({}, [])):
        api_ok = onnxprune.verify(DIGITS, bad, DIGITS_TEST, **kw).ok
        cli = main(["verify", str(DIGITS), str(bad), "--data", str(DIGITS_TEST), "-q", *flag])
        assert cli == (0 if api_ok else 1), (kw, api_ok, cli)
    # both verdicts occur among these, so the comparison above can fail
    assert not onnxprune.verify(DIGITS, bad, DIGITS_TEST, min_sqnr_db=30.0).ok
    assert onnxprune.verify(DIGITS, bad, DIGITS_TEST, atol=100.0).ok
    with pytest.raises(InputError, match="not both"):
        onnxprune.verify(DIGITS, bad, DIGITS_TEST, tolerances=Tolerances(), min_cosine=0.9)
    with pytest.raises(InputError, match="finite number"):
        onnxprune.verify(DIGITS, bad, DIGITS_TEST, min_cosine=float("nan"))


def test_top1_is_for_class_scores_only() -> None:
    ref, cand = _encoder(0), _encoder(0, noise=0.3)
    batches = [{"x": np.random.default_rng(s).standard_normal((4, 6, 8)).astype(np.float32)}
               for s in range(2)]
    result = onnxprune.verify(ref, cand, batches)
    kinds = {o.name: (o.kind, o.top1_agreement) for o in result.outputs}
    assert kinds == {"last_hidden_state": ("hidden", None),
                     "sentence_embedding": ("embedding", None)}
    # Gated on cosine: the noisy weights fail it on both outputs.
    assert {f.split(":")[0] for f in result.failures} == {"last_hidden_state [cpu]",
                                                           "sentence_embedding [cpu]"}
    assert all(any("cosine min" in f for f in o.failures) for o in result.outputs)
    asked = onnxprune.verify(ref, cand, batches, top1=True)
    assert all(o.top1_agreement is not None for o in asked.outputs)
    x = run(ref, batches[0])[0]
    assert output_kind("logits", x) == "scores"  # named so: scores even when 3-D
    assert output_kind("y", np.ones((4, 10), np.float32)) == "scores"
    assert output_kind("y", np.ones((4, 1), np.float32)) == "scalar"


# ------------------------------------------------------------------------ golden outputs


def test_golden_round_trip_on_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "digits.onnx"
    shutil.copy(DIGITS, model)
    golden = tmp_path / "golden.npz"
    assert main(["verify", str(model), "--save-golden", str(golden),
                 "--data", str(DIGITS_TEST), "-q"]) == 0
    assert golden.stat().st_size < DIGITS.stat().st_size  # smaller than the model here
    assert main(["verify", str(model), "--golden", str(golden), "-q"]) == 0
    bad = _broken_digits(tmp_path)
    capsys.readouterr()
    assert main(["verify", str(bad), "--golden", str(golden)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("onnxprune: verification failed: logits [cpu]: top-1 agreement")
    # The same metrics as against the reference model.
    by_ref = onnxprune.verify(model, bad, DIGITS_TEST)
    by_golden = api.verify_golden(bad, golden)
    assert by_ref.outputs[0].cosine_min == pytest.approx(by_golden.outputs[0].cosine_min)
    assert by_ref.outputs[0].top1_agreement == by_golden.outputs[0].top1_agreement
    # Usage errors: exit 2, one line.
    assert main(["verify", str(model), "--golden", str(DIGITS_TEST)]) == 2
    assert "not a golden-output file" in capsys.readouterr().err
    assert main(["verify", str(model), "--golden", str(golden), "--data", "x.npz"]) == 2
    assert main(["verify", str(model)]) == 2
    assert main(["verify", str(model), str(bad), "--save-golden", str(golden)]) == 2


def test_assert_close_helper(tmp_path: Path) -> None:
    golden = tmp_path / "g.npz"
    api.save_golden(DIGITS, golden, DIGITS_TEST)
    assert assert_close(DIGITS, golden).ok
    assert assert_close(DIGITS, reference=DIGITS, data=DIGITS_TEST, min_cosine=1.0).ok
    bad = _broken_digits(tmp_path)
    with pytest.raises(AssertionError, match="top-1 agreement"):
        assert_close(bad, golden)
    with pytest.raises(AssertionError, match="cosine min"):
        assert_close(bad, reference=DIGITS, data=DIGITS_TEST, min_cosine=0.99)
    with pytest.raises(InputError):
        assert_close(bad)
    with pytest.raises(DataError):
        assert_close(bad, tmp_path / "missing.npz")
