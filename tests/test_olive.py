"""onnxprune as Olive passes: a small workflow, offline (skipped without olive-ai)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from helpers import DIGITS, DIGITS_CALIB, digits_accuracy

olive_workflows = pytest.importorskip("olive.workflows")

from onnxprune.olive import PACKAGE_CONFIG  # noqa: E402


def test_prune_then_quantize_in_an_olive_workflow(tmp_path: Path) -> None:
    config = {
        "input_model": {"type": "ONNXModel", "model_path": str(DIGITS)},
        "systems": {"local": {"type": "LocalSystem",
                              "accelerators": [{"device": "cpu",
                                                "execution_providers": ["CPUExecutionProvider"]}]}},
        "passes": {
            "prune": {"type": "OnnxPrune", "sparsity": 0.5, "calibration": str(DIGITS_CALIB)},
            "quantize": {"type": "OnnxPruneQuantize", "calibration": str(DIGITS_CALIB)},
        },
        "host": "local",
        "target": "local",
        "cache_dir": str(tmp_path / "cache"),
        "output_dir": str(tmp_path / "out"),
        "log_severity_level": 3,
    }
    olive_workflows.run(config, package_config=PACKAGE_CONFIG)
    written = sorted((tmp_path / "out").rglob("*.onnx"))
    assert written, sorted(p.name for p in (tmp_path / "out").rglob("*"))
    model = onnx.load(str(written[0]))
    ops = [n.op_type for n in model.graph.node]
    assert "DequantizeLinear" in ops  # quantized
    dims = sorted(tuple(t.dims) for t in model.graph.initializer if len(t.dims) == 2)
    assert (64, 128) in dims or (128, 64) in dims  # fc2 halved by the pruning pass
    assert digits_accuracy(written[0]) > 0.9
