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


class _OnnxscriptOptimizer(ir.passes.InPlacePass):
    """onnxscript's optimizer (constant folding, rewrite rules, clean-up) as one pass."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import onnxscript.optimizer

        onnxscript.optimizer.optimize_ir(model)
        return ir.passes.PassResult(model, modified=True)


class _Ffn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(16, 64)
        self.mid = torch.nn.Linear(64, 64)
        self.down = torch.nn.Linear(64, 6)

    def forward(self, x):  # type: ignore[no-untyped-def]
        h = torch.nn.functional.gelu(self.up(x))
        return self.down(torch.relu(self.mid(h)))


def test_prune_quantize_optimize_in_one_pass_manager(tmp_path: Path) -> None:
    """Calibrated pruning, onnxscript's optimizer and calibrated int8 QDQ in one
    PassManager on an ONNXProgram's model, then ONNXProgram.save(). The optimizer runs
    before quantizing: constant folding would turn DequantizeLinear(int8) back into float."""
    torch.manual_seed(0)
    module = _Ffn().eval()
    with torch.no_grad():  # a quarter of each hidden layer does nothing: pruning is lossless
        module.mid.weight[:, 48:] = 0  # 'up' neurons 48.. are never read
        module.down.weight[:, 48:] = 0  # 'mid' neurons 48.. are never read either
    program = torch.onnx.export(module, (torch.randn(4, 16),), dynamo=True,
                                dynamic_shapes=({0: "batch"},))
    dense = tmp_path / "dense.onnx"
    ir.save(program.model, dense)
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((64, 16)).astype(np.float32)} for _ in range(8)]
    test = rng.standard_normal((64, 16)).astype(np.float32)
    prune = onnxprune.RemoveNeuronsPass(sparsity=0.25, calibration=calib)
    quant = onnxprune.QuantizeQDQPass(calibration=iter(calib))  # an iterator works too
    manager = ir.passes.PassManager([prune, _OnnxscriptOptimizer(), quant])
    assert manager(program.model).modified
    # The pass's PassResult carries its report (here read from the pass after the run).
    assert prune.result.removed == 32 and quant.result.quantized == 3
    path = tmp_path / "small.onnx"
    program.save(str(path))
    ops = [n.op_type for n in program.model.graph]
    assert ops.count("DequantizeLinear") >= 3 and ops.count("MatMul") + ops.count("Gemm") == 3
    got = ort.InferenceSession(str(path)).run(None, {"x": test})[0]
    with torch.no_grad():
        want = module(torch.from_numpy(test)).numpy()
    cos = np.sum(got * want, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() > 0.99, cos.min()  # what int8 costs; the pruning itself is exact
    result = onnxprune.verify(dense, path, [{"x": test}], min_cosine=0.99)
    assert result and result.outputs[0].cosine_min == pytest.approx(float(cos.min()), abs=1e-4)

