"""int8 QDQ on the real all-MiniLM-L6-v2 exports (both torch exporters).

Needs build/minilm_{legacy,dynamo}.onnx, build/calib_256 and build/eval_batches (see
tests/e2e/test_minilm.py for how to make them); skipped when absent. About 15 s per export.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from onnxprune.calibration.data import input_specs, load_batches
from onnxprune.io.models import load_model, save_model
from onnxprune.io.runtime import make_session
from onnxprune.quant.config import QuantizeConfig
from onnxprune.quant.driver import quantize_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import ort_optimized_ops  # noqa: E402

BUILD = Path(__file__).resolve().parents[2] / "build"
pytestmark = pytest.mark.minilm


@pytest.fixture(params=["legacy", "dynamo"])
def minilm(request: pytest.FixtureRequest) -> Path:
    path = BUILD / f"minilm_{request.param}.onnx"
    for needed in (path, BUILD / "calib_256", BUILD / "eval_batches"):
        if not needed.exists():
            pytest.skip(f"{needed} not built (python benchmarks/export_minilm.py, textdata.py)")
    return path


def test_int8_qdq_keeps_embeddings_and_runs_integer_kernels(minilm: Path, tmp_path: Path) -> None:
    model = load_model(minilm)
    specs = input_specs(model)
    report = quantize_model(
        model, QuantizeConfig(token_mask="attention_mask"),
        load_batches(BUILD / "calib_256", specs),
    )
    out = save_model(model, tmp_path / "int8.onnx")
    assert out.stat().st_size <= 0.30 * minilm.stat().st_size
    assert not report.float_weights_kept
    weight_layers = [r for r in report.layers if r.op_type == "MatMul" and r.weight]
    assert len(weight_layers) == 36 and all(r.quantized and r.integer_kernel
                                            for r in weight_layers)
    # QK^T and attention x V stay float, each with its reason.
    assert sum("activations" in r.reason for r in report.layers) == 12
    ops = ort_optimized_ops(out)
    assert ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] == 36
    dense, int8 = make_session(minilm), make_session(out)
    files = sorted((BUILD / "eval_batches").glob("*.npz"))[:4]
    cosines = []
    for batch in load_batches(files[0].parent, specs):
        a = dense.run(None, batch)[0]
        b = int8.run(None, batch)[0]
        cosines.append(np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1)
                       / np.linalg.norm(b, axis=1))
        if len(cosines) == len(files):
            break
    assert float(np.concatenate(cosines).mean()) >= 0.995
