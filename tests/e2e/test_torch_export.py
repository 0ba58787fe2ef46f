"""The passes run on ONNXProgram.model straight out of torch.onnx.export(dynamo=True).

Needs torch (pip install -e '.[bench]'); skipped without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnxprune

torch = pytest.importorskip("torch")


class _Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(8, 32)
        self.down = torch.nn.Linear(32, 4)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.down(torch.nn.functional.gelu(self.up(x)))


def test_remove_neurons_on_an_onnx_program(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = _Mlp().eval()
    with torch.no_grad():  # neurons 16.. are silent: removing them must change nothing
        module.down.weight[:, 16:] = 0
    x = torch.randn(5, 8)
    program = torch.onnx.export(module, (x,), dynamo=True, dynamic_shapes=({0: "batch"},))
    assert isinstance(program.model, ir.Model)
    result = ir.passes.PassManager([onnxprune.RemoveNeuronsPass(sparsity=0.5)])(program.model)
    assert result.modified
    path = tmp_path / "small.onnx"
    program.save(str(path))
    got = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        want = module(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    weights = [v.const_value.shape for v in program.model.graph.initializers.values()
               if v.const_value is not None and len(v.const_value.shape) == 2]
    assert sorted(tuple(s) for s in weights) == [(4, 16), (16, 8)] or sorted(
        tuple(s) for s in weights) == [(8, 16), (16, 4)]
