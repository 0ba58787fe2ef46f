"""benchmarks/gpu_check.sh must exit clearly where there is no CUDA provider."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="a CUDA provider is present: the check would measure")
def test_gpu_check_without_cuda_exits_2_and_says_why(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("GPU_CHECK_DEVICE", None)
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env,
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "no CUDA provider" in r.stdout
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert record["status"] == "no-cuda"
    assert "CUDAExecutionProvider" not in record["available_providers"]
    assert record["onnxruntime"] == ort.__version__
