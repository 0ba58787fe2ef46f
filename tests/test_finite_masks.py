"""±inf constants are judged by what reads them: a fill, bound, start value or logit mask is
accepted (and reported), NaN anywhere and ±inf in a weight or any other use are refused,
naming the tensor and the reader. The accepted ones go through prune (data-free and
calibrated) and quantize untouched, and never make a score or a refit NaN.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import GraphBuilder, run, to_ir
from onnx import numpy_helper

from onnxprune.channels.criteria import CRITERIA, score_channels
from onnxprune.channels.groups import find_channel_groups
from onnxprune.cli import main
from onnxprune.errors import InputError
from onnxprune.io.finite import accepted_non_finite, is_finite_const
from onnxprune.prune.remove_neurons import group_weights

NEG = np.float32(-np.inf)


def _model(kind: str) -> tuple[onnx.ModelProto, str]:
    """x -> MatMul(6x16) -> Relu -> h, then the pattern `kind`; returns (model, the tensor
    holding ±inf)."""
    b = GraphBuilder(seed=7)
    x = b.input("x", ["batch", 6])
    h = b.op("Relu", [b.op("MatMul", [x, b.weight("w0", [6, 16])], name="fc0")])
    opset = 17
    tensor = "mask"

    def logits() -> str:
        return b.op("MatMul", [h, b.weight("wa", [16, 8])], name="fca")

    def head(p: str, width: int = 8) -> None:
        b.op("MatMul", [p, b.weight("wo", [width, 4])], name="fco", output="y")

    if kind == "where":
        cond = b.const("keep", np.array([[1, 1, 0, 1, 1, 1, 0, 1]], dtype=bool))
        fill = b.const("mask", NEG)
        head(b.op("Softmax", [b.op("Where", [cond, logits(), fill], name="masked_fill")],
                  axis=-1))
    elif kind == "add_softmax":
        m = np.zeros((1, 8), np.float32)
        m[0, 3] = NEG
        head(b.op("Softmax", [b.op("Add", [logits(), b.const("mask", m)], name="add_mask")],
                  axis=-1))
    elif kind == "gather_bias":
        table = np.array([NEG, 0.1, -0.2, 0.3, 0.05], np.float32)  # row 0: padding
        idx = b.const("rel", np.array([1, 2, 3, 4, 0, 1, 2, 3], np.int64))
        bias = b.op("Gather", [b.const("mask", table), idx], name="bias_lookup")
        bias = b.op("Unsqueeze", [bias, b.const("ax0", np.array([0], np.int64))])
        head(b.op("Softmax", [b.op("Add", [logits(), bias], name="add_bias")], axis=-1))
    elif kind == "max_start":  # per-channel start value inside a channel group
        c = np.where(np.arange(16) % 2 == 0, NEG, np.float32(0.0)).astype(np.float32)
        head(b.op("Max", [h, b.const("mask", c)], name="running_max"), 16)
    elif kind == "clip":
        head(b.op("Clip", [h, b.const("mask", NEG), b.const("six", np.float32(6))],
                  name="relu6"), 16)
    elif kind == "scatter_max":
        opset = 18
        side_in = b.op("MatMul", [x, b.weight("wp", [6, 16])], name="fcp")
        pooled = b.op("ReduceMax", [side_in, b.const("ax", np.array([0], np.int64))],
                      keepdims=1)
        idx = b.const("slots", (np.arange(16) % 8).reshape(1, 16).astype(np.int64))
        start = b.const("mask", np.full((1, 8), NEG, np.float32))
        sc = b.op("ScatterElements", [start, idx, pooled], axis=1, reduction="max",
                  name="scatter_max")
        b.op("MatMul", [sc, b.weight("ws", [8, 4])], name="fcs", output="pooled_y")
        b.op("MatMul", [h, b.weight("wo", [16, 4])], name="fco", output="y")
        return b.build(["y", "pooled_y"], opset=18), tensor
    elif kind == "constant_of_shape":
        fill = b.op("ConstantOfShape", [b.const("shp", np.array([1, 8], np.int64))],
                    name="fill", value=numpy_helper.from_array(np.array([NEG]), "v"))
        cond = b.const("keep", np.array([[1, 0, 1, 1, 1, 1, 1, 1]], dtype=bool))
        head(b.op("Softmax", [b.op("Where", [cond, logits(), fill])], axis=-1))
        tensor = "fill_out"
    # refused
    elif kind == "inf_weight":
        w = b.rng.standard_normal((16, 4)).astype(np.float32)
        w[2, 1] = np.inf
        b.op("MatMul", [h, b.const("mask", w)], name="fco", output="y")
    elif kind == "nan_mask":
        m = np.zeros((1, 8), np.float32)
        m[0, 3] = np.nan
        head(b.op("Softmax", [b.op("Add", [logits(), b.const("mask", m)])], axis=-1))
    elif kind == "inf_mul":
        head(b.op("Mul", [h, b.const("mask", np.full(16, NEG))], name="scale"), 16)
    elif kind == "add_not_softmax":
        m = np.zeros((1, 8), np.float32)
        m[0, 3] = NEG
        head(b.op("Relu", [b.op("Add", [logits(), b.const("mask", m)], name="add_mask")]))
    else:
        raise AssertionError(kind)
    return b.build(["y"], opset=opset), tensor


ACCEPTED = {
    "where": ("Where 'masked_fill'", "-inf fill value"),
    "add_softmax": ("Add 'add_mask'", "-inf mask before Softmax"),
    "gather_bias": ("Add 'add_bias'", "-inf mask before Softmax"),
    "max_start": ("Max 'running_max'", "-inf start value"),
    "clip": ("Clip 'relu6'", "-inf clip bound"),
    "scatter_max": ("ScatterElements 'scatter_max'", "-inf scatter-max start value"),
    "constant_of_shape": ("ConstantOfShape 'fill'", "-inf fill value"),
}
REFUSED = {
    "inf_weight": "initializer 'mask' holds \\+inf and is read by MatMul 'fco'",
    "nan_mask": "initializer 'mask' holds NaN",
    "inf_mul": "initializer 'mask' holds -inf and is read by Mul 'scale'",
    "add_not_softmax": "initializer 'mask' holds -inf and is read by Add 'add_mask'",
}


def _feeds(n: int = 5) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((n, 6)).astype(np.float32)}


@pytest.mark.parametrize("kind", sorted(ACCEPTED))
def test_mask_constants_are_accepted_and_reported_with_their_reader(kind: str) -> None:
    model, tensor = _model(kind)
    assert np.all(np.isfinite(run(model, _feeds())[0]))
    found = accepted_non_finite(to_ir(model))
    reader, role = ACCEPTED[kind]
    assert [(f.tensor, f.reader, f.role) for f in found] == [(tensor, reader, role)]


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_nan_and_inf_outside_a_mask_use_are_refused_naming_tensor_and_reader(
        kind: str, tmp_path: Path) -> None:
    model, _ = _model(kind)
    with pytest.raises(InputError, match=REFUSED[kind]):
        accepted_non_finite(to_ir(model))
    onnx.save(model, tmp_path / "m.onnx")
    assert main([str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"),
                 "--sparsity", "0.25"]) == 2
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("kind", sorted(ACCEPTED))
def test_prune_accepts_mask_constants_and_leaves_them_alone(kind: str, calibrated: bool,
                                                            tmp_path: Path) -> None:
    if calibrated and kind in ("add_softmax", "gather_bias"):
        pytest.xfail("the distillation repair (repair/distill.py) captures the masked logits "
                     "as a block input and refuses their -inf (calibration/propagate.py)")
    model, tensor = _model(kind)
    onnx.save(model, tmp_path / "m.onnx")
    args = [str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--sparsity", "0.25",
            "--no-verify"]
    if calibrated:
        np.savez(tmp_path / "c.npz", x=np.random.default_rng(1).standard_normal(
            (64, 6)).astype(np.float32))
        args += ["--calibration", str(tmp_path / "c.npz")]
    assert main(args) == 0
    out = onnx.load(str(tmp_path / "o.onnx"))
    w0 = next(t for t in out.graph.initializer if t.name == "w0")
    assert list(w0.dims) == [6, 12]  # the trunk was pruned
    y = run(out, _feeds())[0]
    assert np.all(np.isfinite(y))
    # the mask survives with its -inf (sliced with the channels when it follows them)
    consts = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    if tensor in consts:
        assert np.any(np.isneginf(consts[tensor]))


def test_a_per_channel_inf_constant_in_a_group_gives_finite_scores() -> None:
    model, _ = _model("max_start")
    g = next(g for g in find_channel_groups(to_ir(model)) if g.name == "fc0")
    assert g.prunable and any(not is_finite_const(c.value) for c in g.constants)
    for name in CRITERIA:
        if name.startswith("activation"):
            continue
        assert np.all(np.isfinite(score_channels(name, group_weights(g))))


@pytest.mark.parametrize("kind", sorted(ACCEPTED))
def test_quantize_leaves_mask_constants_unquantized(kind: str, tmp_path: Path) -> None:
    model, tensor = _model(kind)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(1).standard_normal(
        (32, 6)).astype(np.float32))
    assert main(["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"),
                 "--calibration", str(tmp_path / "c.npz"), "--min-cosine", "0.5"]) == 0
    q = onnx.load(str(tmp_path / "q.onnx"))
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert tensor not in quantized
    assert np.all(np.isfinite(run(q, _feeds())[0]))
