"""Quantization leaves the reference model alone (issue 25) and never stores a shared weight
twice (issue 28)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import BATCH, GraphBuilder, random_input, run, save, shared_weight_model, to_ir

from onnxprune.cli import main
from onnxprune.errors import InputError
from onnxprune.quant.config import QuantizeConfig
from onnxprune.quant.driver import quantize_model
from onnxprune.quant.insert_qdq import ActivationQuant, InsertQDQPass

VOCAB, WIDTH, HIDDEN = 256, 16, 32  # ids the CLI generates stay below 256


# ------------------------------------------------------------------ issue 25: shared types


def _embedding_mlp() -> onnx.ModelProto:
    """ids -> Gather(table) -> MatMul -> Relu -> MatMul, with every intermediate's type and
    shape recorded as value_info, as the dynamo exporter leaves them."""
    rng = np.random.default_rng(0)
    b = GraphBuilder(seed=1)
    ids = b.input("ids", [BATCH, 5], onnx.TensorProto.INT64)
    table = rng.standard_normal((VOCAB, WIDTH)).astype(np.float32)
    emb = b.op("Gather", [b.const("table", table), ids], name="node_embedding",
               output="embedding")
    h = b.op("MatMul", [emb, b.weight("w1", [WIDTH, HIDDEN])], name="mm1")
    h = b.op("Relu", [h], name="relu")
    b.op("MatMul", [h, b.weight("w2", [HIDDEN, 4])], name="mm2", output="y")
    model = b.build(["y"], infer_shapes=True)
    recorded = {v.name for v in model.graph.value_info}
    assert {"embedding", "mm1_out", "relu_out"} <= recorded
    return model


def _fingerprint(model: ir.Model) -> list[tuple[str, str, str]]:
    """Every value's name, type and shape: what a shared type object would change."""
    values = [*model.graph.inputs, *model.graph.initializers.values(),
              *(v for n in model.graph for v in n.outputs)]
    return [(v.name or "", str(v.type), str(v.shape)) for v in values]


def _spy_cli_clones(monkeypatch: pytest.MonkeyPatch
                    ) -> list[tuple[ir.Model, list[tuple[str, str, str]]]]:
    """Records each copy the CLI (its pipeline) takes as its reference, with its fingerprint
    when taken."""
    taken: list[tuple[ir.Model, list[tuple[str, str, str]]]] = []
    clone: Callable[..., ir.Model] = ir.Model.clone

    def spy(self: ir.Model, *args: object, **kwargs: object) -> ir.Model:
        copy = clone(self, *args, **kwargs)
        if sys._getframe(1).f_globals.get("__name__", "").startswith(
                ("onnxprune.cli", "onnxprune.recipe.pipeline")):
            taken.append((copy, _fingerprint(copy)))
        return copy

    monkeypatch.setattr(ir.Model, "clone", spy)
    return taken


@pytest.mark.parametrize("command", ["default", "quantize", "prune-and-quantize"])
def test_cli_leaves_the_reference_of_a_typed_external_data_model_alone(
        command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _embedding_mlp()
    src = save(model, tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").exists()
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        np.savez(calib / f"b{i}.npz", ids=rng.integers(0, VOCAB, (8, 5)))
    out = tmp_path / "out.onnx"
    args = {
        "default": [str(src), "-o", str(out), "--data", str(calib)],
        "quantize": ["quantize", str(src), "-o", str(out), "--calibration", str(calib),
                     "--data", str(calib)],
        "prune-and-quantize": [str(src), "-o", str(out), "--sparsity", "0.5", "--calibration",
                               str(calib), "--quantize", "int8", "--data", str(calib),
                               "--min-cosine", "0"],
    }[command]
    taken = _spy_cli_clones(monkeypatch)
    assert main(args) == 0
    assert taken, "the CLI took no reference copy of an external-data model"
    for reference, before in taken:
        assert _fingerprint(reference) == before
        assert next(v for n in reference.graph for v in n.outputs
                    if v.name == "embedding").dtype == ir.DataType.FLOAT
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = {"ids": rng.integers(0, VOCAB, (3, 5))}
    got = session.run(None, feeds)[0]
    want = run(model, feeds)[0]
    assert got.shape == want.shape and np.all(np.isfinite(got))


@pytest.mark.parametrize("weight_only", [True, False])
def test_quantizing_a_clone_leaves_the_original_loadable(weight_only: bool) -> None:
    model = _embedding_mlp()
    original = to_ir(model)
    before = _fingerprint(original)
    work = original.clone()
    rng = np.random.default_rng(5)
    batches = [{"ids": rng.integers(0, VOCAB, (8, 5))} for _ in range(3)]
    report = quantize_model(work, QuantizeConfig(weight_only=weight_only), batches)
    assert report.quantized == 3
    assert _fingerprint(original) == before
    feeds = {"ids": rng.integers(0, VOCAB, (2, 5))}
    np.testing.assert_allclose(run(ir.serde.serialize_model(original), feeds)[0],
                               run(model, feeds)[0], rtol=1e-6)


# ------------------------------------------------------------------ issue 28: shared weights


D = 256  # weights dominate the file, as in a real model


def _int8_matrices(model: ir.Model) -> list[str]:
    return sorted(name for name, v in model.graph.initializers.items()
                  if v.const_value is not None and v.dtype == ir.DataType.INT8
                  and len(v.const_value.shape) == 2)


def _file_ratio(before: onnx.ModelProto, after: ir.Model, tmp_path: Path) -> float:
    a = save(before, tmp_path / "float.onnx")
    b = tmp_path / "int8.onnx"
    ir.save(after, b)
    return b.stat().st_size / a.stat().st_size


def _sqnr(reference: np.ndarray, got: np.ndarray) -> float:
    noise = float(np.sum((reference - got) ** 2))
    return 10 * np.log10(float(np.sum(reference ** 2)) / max(noise, 1e-30))


def _outlier_input(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Activations with a few outlier channels: the case SmoothQuant is chosen for."""
    x = random_input(shape, seed=seed)
    x[..., :4] *= 30.0
    return x


def _identity_shared(direct: bool) -> onnx.ModelProto:
    """y = relu(x @ W) @ W, both MatMuls reading W, directly or each through its Identity
    (the legacy exporter's de-duplication, ALBERT's shared layers)."""
    b = GraphBuilder(seed=2)
    x = b.input("x", [BATCH, D])
    w = b.weight("W", [D, D])
    w1 = w if direct else b.op("Identity", [w], name="id1")
    w2 = w if direct else b.op("Identity", [w], name="id2")
    h = b.op("Relu", [b.op("MatMul", [x, w1], name="mm1")], name="relu")
    b.op("MatMul", [h, w2], name="mm2", output="y")
    return b.build(["y"])


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("smooth", [None, "auto", 0.5])
def test_a_shared_weight_is_stored_once(direct: bool, smooth: float | str | None,
                                        tmp_path: Path) -> None:
    model = _identity_shared(direct)
    m = to_ir(model)
    batches = [{"x": _outlier_input((16, D), seed=i)} for i in range(4)]
    report = quantize_model(m, QuantizeConfig(smooth=smooth), batches)  # type: ignore[arg-type]
    assert report.quantized == 2
    assert _int8_matrices(m) == ["W_quantized"]
    assert [n for n in m.graph if n.op_type == "Identity"] == []
    assert len([n for n in m.graph if n.op_type == "DequantizeLinear"
                and n.inputs[0] is not None and n.inputs[0].name == "W_quantized"]) == 2
    assert report.float_weights_kept == ()
    assert report.constant_bytes_after < 0.27 * report.constant_bytes_before
    assert _file_ratio(model, m, tmp_path) < 0.3
    if smooth is not None:  # mm2's input is relu(x @ W): W cannot take its factor too
        mm2 = next(layer for layer in report.layers if layer.node == "mm2")
        assert not mm2.smoothed and mm2.smooth_declined is not None
        assert "'W'" in mm2.smooth_declined and "mm1" in mm2.smooth_declined
    feeds = {"x": _outlier_input((32, D), seed=9)}
    got = run(ir.serde.serialize_model(m), feeds)[0]
    assert _sqnr(run(model, feeds)[0], got) > 25


def _unrolled_rnn(steps: int = 4) -> onnx.ModelProto:
    """h_t = relu(x_t @ Wx + h_{t-1} @ Wh): an unrolled RNN, each weight read once per step."""
    b = GraphBuilder(seed=4)
    wx, wh = b.weight("Wx", [D, D]), b.weight("Wh", [D, D])
    h = None
    for t in range(steps):
        x = b.input(f"x{t}", [BATCH, D])
        a = b.op("MatMul", [x, wx], name=f"mx{t}")
        if h is not None:
            a = b.op("Add", [a, b.op("MatMul", [h, wh], name=f"mh{t}")], name=f"add{t}")
        h = b.op("Relu", [a], name=f"relu{t}")
    assert h is not None
    return b.build([h])


@pytest.mark.parametrize("smooth", ["auto", 0.5])
def test_smoothquant_does_not_copy_an_unrolled_rnn_weight_per_step(
        smooth: float | str, tmp_path: Path) -> None:
    model = _unrolled_rnn()
    m = to_ir(model)
    batches = [{f"x{t}": _outlier_input((16, D), seed=10 * i + t) for t in range(4)}
               for i in range(4)]
    report = quantize_model(m, QuantizeConfig(smooth=smooth), batches)  # type: ignore[arg-type]
    assert report.quantized == 7
    assert _int8_matrices(m) == ["Wh_quantized", "Wx_quantized"]
    assert all(not layer.smoothed and layer.smooth_declined for layer in report.layers)
    assert _file_ratio(model, m, tmp_path) < 0.3
    feeds = {f"x{t}": _outlier_input((8, D), seed=50 + t) for t in range(4)}
    got = run(ir.serde.serialize_model(m), feeds)[0]
    assert _sqnr(run(model, feeds)[0], got) > 20


def test_smoothing_is_not_folded_into_a_shared_producer_weight(tmp_path: Path) -> None:
    """r = relu(x @ W1) is smoothed for its own consumer (W2, read once); folding the factor
    into W1's columns would store a second W1, since z @ W1 reads it too."""
    b = GraphBuilder(seed=6)
    x, z = b.input("x", [BATCH, D]), b.input("z", [BATCH, D])
    w1, w2 = b.weight("W1", [D, D]), b.weight("W2", [D, D])
    r = b.op("Relu", [b.op("MatMul", [x, w1], name="mm1")], name="relu")
    b.op("MatMul", [r, w2], name="mm2", output="y")
    b.op("MatMul", [z, w1], name="mm3", output="y3")
    model = b.build(["y", "y3"])
    m = to_ir(model)
    rng = np.random.default_rng(0)
    batches = [{"x": random_input((16, D), seed=i), "z": random_input((16, D), seed=20 + i)}
               for i in range(4)]
    # The factor, as the driver would give it: the point is where it goes, not its size.
    smooth = rng.uniform(0.5, 2.0, D).astype(np.float32)
    acts = {name: ActivationQuant(0.05, 128, smooth if name == "relu_out" else None)
            for name in ("x", "z", "relu_out")}
    qdq = InsertQDQPass(activations=acts)
    qdq(m)
    assert "relu_out" not in qdq.result.smoothing_folded  # a Mul divides it instead
    assert any(n.op_type == "Mul" for n in m.graph)
    assert _int8_matrices(m) == ["W1_quantized", "W2_quantized"]
    assert _file_ratio(model, m, tmp_path) < 0.3
    del batches


def test_conflicting_smoothing_of_a_shared_weight_is_refused() -> None:
    m = to_ir(shared_weight_model(8, 8))
    acts = {"x": ActivationQuant(0.05, 128, np.full(8, 2.0, np.float32)),
            "z": ActivationQuant(0.05, 128, None)}
    with pytest.raises(InputError, match="weight 'w' is read by 'mm_a'.*'mm_b'"):
        InsertQDQPass(activations=acts)(m)


def test_a_tied_embedding_table_is_stored_once(tmp_path: Path) -> None:
    """Gather(table) and the output projection Gemm(h, table, transB=1) share one int8 table
    (per-row scales serve both)."""
    b = GraphBuilder(seed=8)
    ids = b.input("ids", [BATCH], onnx.TensorProto.INT64)
    table = b.weight("table", [512, 64])
    emb = b.op("Gather", [table, ids], name="emb")
    h = b.op("Relu", [b.op("MatMul", [emb, b.weight("w", [64, 64])], name="mm")], name="relu")
    b.op("Gemm", [h, table], name="lm_head", output="logits", transB=1)
    model = b.build(["logits"])
    m = to_ir(model)
    rng = np.random.default_rng(1)
    batches = [{"ids": rng.integers(0, 512, (16,))} for _ in range(4)]
    report = quantize_model(m, QuantizeConfig(), batches)
    assert report.quantized == 3
    assert _int8_matrices(m) == ["table_quantized", "w_quantized"]
    assert _file_ratio(model, m, tmp_path) < 0.3
    feeds = {"ids": rng.integers(0, 512, (32,))}
    assert _sqnr(run(model, feeds)[0], run(ir.serde.serialize_model(m), feeds)[0]) > 20


# ------------------------------------------------------------------ nothing quantized


def test_a_quantize_that_quantizes_nothing_says_why() -> None:
    m = to_ir(shared_weight_model(8, 8))
    batches = [{"x": random_input((4, 8), seed=i), "z": random_input((4, 8), seed=9 + i)}
               for i in range(2)]
    report = quantize_model(m, QuantizeConfig(exclude=("mm_*",)), batches)
    assert report.quantized == 0
    assert report.why_nothing() == (
        "nothing was quantized: matches --exclude (2 layer(s): 'mm_a', 'mm_b')")
    empty = quantize_model(to_ir(_relu_only()), QuantizeConfig(),
                           [{"x": random_input((4, 8), seed=0)}])
    assert empty.why_nothing().startswith("nothing was quantized: the model has no MatMul")


def _relu_only() -> onnx.ModelProto:
    b = GraphBuilder(seed=0)
    b.op("Relu", [b.input("x", [BATCH, 8])], name="relu", output="y")
    return b.build(["y"])
