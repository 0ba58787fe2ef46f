"""Passes that compose: calibration in any form, checked when the pass is built; the report
on the PassResult; the token mask found from the graph; the Gemm-bias repair."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import make_model, mlp_model, replace_weight, run, to_ir, value_info, weights
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

import onnxprune
from onnxprune.calibration.mask import detect_token_mask, resolve_token_mask
from onnxprune.errors import DataError, InputError


def _batches(n: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((32, 8)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("form", ["list", "iterator", "path", "calibration"])
def test_calibration_in_every_form(form: str, tmp_path: Path) -> None:
    # trans_b: fc1.weight is [4, 16]; hidden channels 12.. are never read (columns 12..)
    dense = mlp_model([8, 16, 4], gemm=True, trans_b=True, seed=1)
    w = weights(dense)["fc1.weight"].copy()
    w[:, 12:] = 0
    proto = replace_weight(dense, "fc1.weight", w)
    batches = _batches()
    if form == "list":
        calib: object = batches
    elif form == "iterator":
        calib = iter(batches)
    elif form == "path":
        for i, b in enumerate(batches):
            np.savez(tmp_path / f"b{i}.npz", **b)
        calib = tmp_path
    else:
        calib = onnxprune.Calibration(batches)
    model = to_ir(proto)
    p = onnxprune.RemoveNeuronsPass(sparsity=0.25, calibration=calib)
    assert p.criterion == "obs"  # data: OBS, as on the command line
    res = p(model)
    # The PassResult carries the report.
    assert isinstance(res, onnxprune.ReportPassResult) and res.report is p.result
    assert res.report.removed == 4
    x = _batches(1, seed=7)[0]
    got = run(ir.serde.serialize_model(model), x)[0]
    want = run(proto, x)[0]
    # Removing never-read channels, with a Gemm consumer that has a bias C, is exact:
    # the repair fits the change of C, not C again.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad, match", [
    ({"x": np.zeros((2, 8), np.float32)}, "one batch"),
    (42, "int"),
    ([{"x": [1, 2]}], "batch 0"),
    ([], "no batches"),
])
def test_bad_calibration_fails_when_the_pass_is_built(bad: object, match: str) -> None:
    for make in (lambda: onnxprune.RemoveNeuronsPass(sparsity=0.5, calibration=bad),
                 lambda: onnxprune.RemoveHeadsPass(fraction=0.5, calibration=bad),
                 lambda: onnxprune.QuantizeQDQPass(calibration=bad)):
        with pytest.raises(InputError, match=match):
            make()


def test_missing_calibration_path_fails_when_the_pass_is_built(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such data"):
        onnxprune.RemoveNeuronsPass(sparsity=0.5, calibration=tmp_path / "nope.npz")


def test_calibrated_quantization_is_a_pass() -> None:
    proto = mlp_model([8, 16, 16, 4], seed=2)
    model = to_ir(proto)
    plain = onnxprune.QuantizeQDQPass()
    plain(to_ir(proto))
    # Without calibration no activation has a range: no layer is quantized, each says why.
    assert not any(layer.quantized for layer in plain.result.layers)
    assert all("no calibrated range" in (layer.reason or "") for layer in plain.result.layers)
    p = onnxprune.QuantizeQDQPass(calibration=_batches())
    res = ir.passes.PassManager([p])(model)
    assert res.modified and p.result.quantized == 3  # all three layers, ranges calibrated
    x = _batches(1, seed=5)[0]
    got = run(ir.serde.serialize_model(model), x)[0]
    want = run(proto, x)[0]
    cos = np.sum(got * want, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.99
    with pytest.raises(InputError, match="not both"):
        onnxprune.QuantizeQDQPass(activations={"x": None}, config=onnxprune.QuantizeConfig())


def _masked_model(mask_name: str = "attention_mask", mask_type: int = T.INT64,
                  rank: int = 2) -> onnx.ModelProto:
    """y = (x @ W) * cast(mask)[..., None]: padding rows are zero in the output."""
    rng = np.random.default_rng(0)
    dims = ["B", "S"] if rank == 2 else ["B", "S", 1]
    nodes = [
        h.make_node("MatMul", ["x", "w"], ["h"], name="fc0"),
        h.make_node("Relu", ["h"], ["r"], name="act0"),
        h.make_node("MatMul", ["r", "w2"], ["y0"], name="fc1"),
        h.make_node("Cast", [mask_name], ["m"], to=T.FLOAT),
        h.make_node("Unsqueeze", ["m", "ax"], ["m3"]) if rank == 2 else
        h.make_node("Identity", ["m"], ["m3"]),
        h.make_node("Mul", ["y0", "m3"], ["y"]),
    ]
    inits = [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([-1], np.int64), "ax")]
    return make_model(nodes, [value_info("x", ["B", "S", 8]),
                              value_info(mask_name, dims, mask_type)],
                      [value_info("y", ["B", "S", 8])], inits)


def test_token_mask_is_detected_from_the_graph() -> None:
    assert detect_token_mask(to_ir(_masked_model())) == "attention_mask"
    assert detect_token_mask(to_ir(_masked_model("pad_mask"))) == "pad_mask"
    assert detect_token_mask(to_ir(_masked_model("attention_mask", T.FLOAT))) is None
    assert detect_token_mask(to_ir(_masked_model("attention_mask", rank=3))) is None
    assert detect_token_mask(to_ir(_masked_model("masking"))) is None
    m = to_ir(_masked_model())
    name, note = resolve_token_mask(m, None)
    assert name == "attention_mask" and "--token-mask none" in note
    assert resolve_token_mask(m, "none") == (None, None)
    with pytest.raises(InputError, match="not a graph input"):
        resolve_token_mask(m, "mask")


def test_auto_token_mask_leaves_padding_out_and_says_so() -> None:
    """Padding rows carry garbage x; with the mask they do not shape the repair."""
    rng = np.random.default_rng(3)
    batches = []
    for _ in range(4):
        x = rng.standard_normal((4, 10, 8)).astype(np.float32)
        mask = np.ones((4, 10), np.int64)
        mask[:, 6:] = 0
        x[:, 6:] = 50.0 * rng.standard_normal((4, 4, 8))  # padding: far off-distribution
        batches.append({"x": x, "attention_mask": mask})
    reports = {}
    for given in (None, "attention_mask", "none"):
        model = to_ir(_masked_model())
        reports[given] = onnxprune.recipe.run.prune_model(
            model, onnxprune.PruneConfig(sparsity=0.5, calibration=batches, token_mask=given))
        reports[given].model = model
    assert reports[None].token_mask == "attention_mask" == reports["attention_mask"].token_mask
    assert reports["none"].token_mask is None
    assert any("detected" in n for n in reports[None].notes)
    assert not any("token mask" in n for n in reports["none"].notes)
    test = {"x": rng.standard_normal((4, 10, 8)).astype(np.float32),
            "attention_mask": np.ones((4, 10), np.int64)}
    want = run(_masked_model(), test)[0]

    def err(key: object) -> float:
        got = run(ir.serde.serialize_model(reports[key].model), test)[0]
        return float(np.mean((got - want) ** 2))

    assert err(None) == pytest.approx(err("attention_mask"), rel=1e-9)
    assert err(None) < err("none")
