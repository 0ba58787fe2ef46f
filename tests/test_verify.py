"""onnxprune.verify.compare and onnxprune.api.verify: comparing a candidate with its reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import (
    DIGITS,
    DIGITS_TEST,
    mlp_model,
    random_input,
    replace_weight,
    run,
    save,
    to_ir,
    weights,
)

from onnxprune import api
from onnxprune.errors import DataError, InputError, ProviderError
from onnxprune.verify.compare import Tolerances, compare_models

WIDTHS = [8, 16, 4]


@pytest.fixture
def reference() -> onnx.ModelProto:
    return mlp_model(WIDTHS, seed=0)


@pytest.fixture
def batches() -> list[dict[str, np.ndarray]]:
    return [{"x": random_input([16, 8], seed=s)} for s in range(3)]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _scaled(model: onnx.ModelProto, name: str, factor: float) -> onnx.ModelProto:
    return replace_weight(model, name, (weights(model)[name] * factor).astype(np.float32))


def _shifted(model: onnx.ModelProto, name: str, delta: float) -> onnx.ModelProto:
    return replace_weight(model, name, (weights(model)[name] + delta).astype(np.float32))


# ------------------------------------------------------------------------ identical models


def test_identical_copy_passes_exactly(reference: onnx.ModelProto, batches: list) -> None:
    tol = Tolerances(min_cosine=1.0, atol=0.0, rtol=0.0, min_sqnr_db=200.0, min_top1=1.0)
    result = api.verify(reference, _copy(reference), data=batches, tolerances=tol)
    assert result.ok, [o.failures for o in result.outputs]
    assert result.batches == 3 and not result.generated_inputs
    (o,) = result.outputs
    assert (o.name, o.provider) == ("y", "cpu")
    assert o.cosine_min == 1.0 and o.cosine_mean == 1.0
    assert o.sqnr_db == math.inf
    assert o.max_abs_diff == 0.0 and o.mean_abs_diff == 0.0
    assert o.top1_agreement == 1.0
    assert o.nonfinite == 0 and o.allclose_violations == 0 and o.failures == ()


def test_identical_copy_on_paths_with_npz_data(tmp_path: Path) -> None:
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(DIGITS.read_bytes())
    result = api.verify(DIGITS, copy, data=DIGITS_TEST, tolerances=Tolerances(min_cosine=1.0))
    assert result.ok
    (o,) = result.outputs
    assert o.name == "logits" and o.cosine_min == 1.0 and o.sqnr_db == math.inf
    assert o.top1_agreement == 1.0
    assert result.batches == 1 and not result.generated_inputs


def test_accepts_ir_models_and_generates_inputs(reference: onnx.ModelProto) -> None:
    result = api.verify(to_ir(reference), to_ir(_copy(reference)))
    assert result.ok and result.generated_inputs
    assert result.batches == 2  # random_batches' default count
    assert result.outputs[0].sqnr_db == math.inf


# ------------------------------------------------------------------------ broken models


def test_broken_model_fails_min_cosine(reference: onnx.ModelProto, batches: list) -> None:
    broken = _scaled(reference, "fc0.weight", -1.0)
    result = api.verify(reference, broken, data=batches, tolerances=Tolerances(min_cosine=0.99))
    assert not result.ok
    (o,) = result.outputs
    assert o.cosine_min < 0.99
    assert len(o.failures) == 1
    assert o.failures[0].startswith(f"cosine min {o.cosine_min:.6f} < 0.99")
    # The metrics are the ones numpy gives on the same outputs.
    ref = np.concatenate([run(reference, b)[0] for b in batches]).astype(np.float64)
    cand = np.concatenate([run(broken, b)[0] for b in batches]).astype(np.float64)
    cos = np.sum(ref * cand, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1))
    assert o.cosine_min == pytest.approx(cos.min(), abs=1e-9)
    assert o.cosine_mean == pytest.approx(cos.mean(), abs=1e-9)
    assert o.max_abs_diff == pytest.approx(np.abs(ref - cand).max(), rel=1e-9)
    assert o.mean_abs_diff == pytest.approx(np.abs(ref - cand).mean(), rel=1e-9)
    sqnr = 10 * np.log10(np.sum(ref**2) / np.sum((ref - cand) ** 2))
    assert o.sqnr_db == pytest.approx(sqnr, rel=1e-9)
    assert o.top1_agreement == pytest.approx(np.mean(ref.argmax(1) == cand.argmax(1)))


def test_without_tolerances_the_defaults_are_enforced(reference: onnx.ModelProto,
                                                      batches) -> None:
    broken = _scaled(reference, "fc0.weight", -1.0)
    result = api.verify(reference, broken, data=batches)
    assert not result and not result.ok  # bool(result) is the verdict
    (o,) = result.outputs
    assert o.kind == "scores"  # [16, 4] class scores: gated on top-1 agreement and KL
    assert o.kind_reason == "[batch, 4] from a linear head Add 'fc1_bias'"
    assert o.failures == (f"top-1 agreement {o.top1_agreement:.4f} < 0.99",
                          f"mean KL {o.kl_mean:.4g} > 0.05")
    # An explicit empty Tolerances() enforces only finite outputs.
    assert api.verify(reference, broken, data=batches, tolerances=Tolerances()).ok


def test_small_perturbation_passes_loose_fails_tight(reference: onnx.ModelProto, batches) -> None:
    rng = np.random.default_rng(5)
    w = weights(reference)["fc0.weight"]
    noisy = replace_weight(
        reference, "fc0.weight", (w + 1e-3 * rng.standard_normal(w.shape)).astype(np.float32)
    )
    loose = api.verify(reference, noisy, data=batches, tolerances=Tolerances(min_cosine=0.999))
    assert loose.ok and 0.999 < loose.outputs[0].cosine_min < 1.0
    tight = api.verify(reference, noisy, data=batches, tolerances=Tolerances(min_sqnr_db=120))
    assert not tight.ok
    assert tight.outputs[0].failures[0].startswith("SQNR ")
    assert "< 120 dB" in tight.outputs[0].failures[0]


def test_nan_output_is_a_failure(reference: onnx.ModelProto, batches: list) -> None:
    bias = weights(reference)["fc1.bias"].copy()
    bias[0] = np.nan
    nan_model = replace_weight(reference, "fc1.bias", bias)
    result = api.verify(reference, nan_model, data=batches)  # no tolerances at all
    assert not result.ok
    (o,) = result.outputs
    assert o.nonfinite == 3 * 16  # column 0 of every row of every batch
    assert o.failures[0] == "48 NaN/Inf values in the candidate's output"
    assert math.isnan(o.cosine_min) and math.isnan(o.cosine_mean)
    # A cosine tolerance must not be satisfied by NaN either.
    strict = api.verify(reference, nan_model, data=batches, tolerances=Tolerances(min_cosine=0.5))
    assert any(f.startswith("cosine min nan") for f in strict.outputs[0].failures)


def test_atol(reference: onnx.ModelProto, batches: list) -> None:
    shifted = _shifted(reference, "fc1.bias", 1e-3)  # every output moves by 1e-3
    ok = api.verify(reference, shifted, data=batches, tolerances=Tolerances(atol=2e-3))
    assert ok.ok
    assert ok.outputs[0].max_abs_diff == pytest.approx(1e-3, rel=1e-3)
    bad = api.verify(reference, shifted, data=batches, tolerances=Tolerances(atol=5e-4))
    assert not bad.ok
    (o,) = bad.outputs
    assert o.allclose_violations == 3 * 16 * 4
    expected = f"192 values outside atol=0.0005 rtol=0 (max abs diff {o.max_abs_diff:.3g})"
    assert o.failures == (expected,)


def test_rtol(batches: list) -> None:
    reference = mlp_model(WIDTHS, activation=None, bias=False, seed=1)
    scaled = _scaled(reference, "fc1.weight", 1.001)  # outputs scale by 1.001
    ok = api.verify(reference, scaled, data=batches, tolerances=Tolerances(atol=1e-5, rtol=2e-3))
    assert ok.ok
    bad = api.verify(reference, scaled, data=batches, tolerances=Tolerances(atol=1e-5, rtol=5e-4))
    assert not bad.ok
    (o,) = bad.outputs
    ref = np.concatenate([run(reference, b)[0] for b in batches])
    # Every value whose 0.1 % change exceeds 1e-5 + 5e-4 |r| is counted, with float slack.
    expected = int(np.sum(1e-3 * np.abs(ref) > 1e-5 + 5e-4 * np.abs(ref)))
    assert abs(o.allclose_violations - expected) <= 2
    assert "rtol=0.0005" in o.failures[0]


def test_top1_agreement_on_digits(tmp_path: Path) -> None:
    digits = onnx.load(str(DIGITS))
    w = weights(digits)["fc3.bias"].copy()
    w[3] += 12.0  # pushes many predictions to class 3
    candidate = save(replace_weight(digits, "fc3.bias", w), tmp_path / "c.onnx")
    with np.load(DIGITS_TEST) as f:
        pixels = f["pixels"]
    ref = run(DIGITS, {"pixels": pixels})[0]
    cand = run(candidate, {"pixels": pixels})[0]
    expected = float(np.mean(ref.argmax(1) == cand.argmax(1)))
    assert 0.2 < expected < 0.95
    result = api.verify(DIGITS, candidate, data=DIGITS_TEST,
                        tolerances=Tolerances(min_top1=0.99))
    (o,) = result.outputs
    assert o.top1_agreement == pytest.approx(expected)
    assert o.failures == (f"top-1 agreement {expected:.4f} < 0.99",)


def test_top1_not_reported_for_non_class_outputs(batches: list) -> None:
    reference = mlp_model([8, 16, 1], seed=0)  # a single score per row
    result = api.verify(reference, _copy(reference), data=batches,
                        tolerances=Tolerances(min_top1=1.0))
    assert result.outputs[0].top1_agreement is None
    assert result.ok


def test_report_dict_is_strict_json(reference: onnx.ModelProto, batches: list) -> None:
    result = api.verify(reference, _copy(reference), data=batches,
                        tolerances=Tolerances(min_cosine=0.9))
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["ok"] is True and data["batches"] == 3
    assert data["tolerances"]["min_cosine"] == 0.9
    assert data["outputs"][0]["sqnr_db"] == "inf"
    assert data["outputs"][0]["failures"] == []


# ------------------------------------------------------------------------ bad requests


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here"
)
def test_cuda_unavailable_raises(reference: onnx.ModelProto, batches: list) -> None:
    with pytest.raises(ProviderError, match="'cuda' is not available"):
        api.verify(reference, _copy(reference), data=batches, providers=("cuda",))


def test_unknown_provider_raises_input_error(reference: onnx.ModelProto, batches: list) -> None:
    with pytest.raises(InputError, match="unknown provider 'tpu'"):
        api.verify(reference, _copy(reference), data=batches, providers=("tpu",))  # type: ignore[arg-type]


def test_different_output_names_raise(reference: onnx.ModelProto, batches: list) -> None:
    renamed = _copy(reference)
    renamed.graph.output[0].name = "z"
    renamed.graph.node[-1].output[0] = "z"
    with pytest.raises(InputError, match="outputs differ"):
        api.verify(reference, renamed, data=batches)


def test_different_output_shapes_raise(batches: list) -> None:
    with pytest.raises(InputError, match="output 'y' has shape \\[16, 5\\]"):
        api.verify(mlp_model(WIDTHS), mlp_model([8, 16, 5]), data=batches)


def test_no_batches(reference: onnx.ModelProto) -> None:
    with pytest.raises(DataError, match="no batches"):
        compare_models(to_ir(reference), to_ir(_copy(reference)), [])


def test_batch_the_model_rejects(reference: onnx.ModelProto) -> None:
    with pytest.raises(DataError, match="reference model failed on batch 0"):
        compare_models(to_ir(reference), to_ir(_copy(reference)),
                       [{"x": np.zeros((2, 9), np.float32)}])
