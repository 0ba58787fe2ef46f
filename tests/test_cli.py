"""The command line, in process: onnxprune.cli.main(argv) with captured output."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import (
    DIGITS,
    DIGITS_CALIB,
    DIGITS_TEST,
    digits_accuracy,
    folder_snapshot,
    mlp_model,
    replace_weight,
    run,
    save,
    sha256,
    single_matmul_model,
    weights,
)

from onnxprune.cli import main

DIGITS_PARAMETERS = 64 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A folder holding a copy of the digits model and its test batch."""
    shutil.copy(DIGITS, tmp_path / "digits.onnx")
    shutil.copy(DIGITS_TEST, tmp_path / "test.npz")
    return tmp_path


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths in argv resolve inside tmp_path


def _pixels() -> np.ndarray:
    with np.load(DIGITS_TEST) as f:
        return f["pixels"]


def _initializer_count(path: Path) -> int:
    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)


# ------------------------------------------------------------------------ main job


def test_prune_writes_a_valid_smaller_model_and_report(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Data-free 50 % changes ~16 % of the predictions: the user states that budget.
    code = main(["digits.onnx", "-o", "out.onnx", "--sparsity", "0.5", "--min-top1", "0.8",
                 "--data", "test.npz", "--report", "r.json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err == ""
    assert "wrote out.onnx" in out
    assert sorted(p.name for p in work.iterdir()) == ["digits.onnx", "out.onnx", "r.json",
                                                       "test.npz"]
    onnx.checker.check_model(str(work / "out.onnx"), full_check=True)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("out.onnx", "r.json"):  # ordinary files, not mkstemp's private 0600
        assert stat.S_IMODE((work / name).stat().st_mode) == 0o666 & ~umask

    report = json.loads((work / "r.json").read_text())
    assert report["modified"] is True
    assert report["before"]["parameters"] == DIGITS_PARAMETERS
    assert report["after"]["parameters"] == _initializer_count(work / "out.onnx")
    assert report["after"]["parameters"] < DIGITS_PARAMETERS * 0.5
    assert report["before"]["file_bytes"] == DIGITS.stat().st_size
    assert report["after"]["file_bytes"] == (work / "out.onnx").stat().st_size
    groups = {g["group"]: g for g in report["passes"]["RemoveNeuronsPass"]["groups"]}
    assert groups["fc1"]["channels_after"] == 128 and groups["fc2"]["channels_after"] == 64
    assert groups["fc3"]["reason"] and "logits" in groups["fc3"]["reason"]

    # The verification in the report is what onnxruntime says about the two models.
    pixels = _pixels()
    ref = run(DIGITS, {"pixels": pixels})[0]
    cand = run(work / "out.onnx", {"pixels": pixels})[0]
    (metrics,) = report["verification"]["outputs"]
    assert report["verification"]["ok"] is True and report["verification"]["batches"] == 1
    assert metrics["top1_agreement"] == pytest.approx(np.mean(ref.argmax(1) == cand.argmax(1)))
    assert metrics["max_abs_diff"] == pytest.approx(np.abs(ref - cand).max(), rel=1e-6)
    accuracy = digits_accuracy(work / "out.onnx")
    assert 0.5 < accuracy <= digits_accuracy(DIGITS) == 0.984


def test_prune_unstructured_and_nm(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["digits.onnx", "-o", "u.onnx", "--mode", "unstructured", "--sparsity", "0.5",
                 "--no-verify", "-q"]) == 0
    assert main(["digits.onnx", "-o", "nm.onnx", "--nm", "2:4", "--no-verify", "-q"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    before = weights(onnx.load(str(DIGITS)))
    for name in ("u.onnx", "nm.onnx"):
        w = weights(onnx.load(str(work / name)))
        assert w.keys() == before.keys()
        for key in ("fc1.weight", "fc2.weight", "fc3.weight"):
            assert np.count_nonzero(w[key]) == w[key].size // 2, (name, key)
        for key in ("fc1.bias", "fc2.bias", "fc3.bias"):
            np.testing.assert_array_equal(w[key], before[key])
    nm = weights(onnx.load(str(work / "nm.onnx")))
    # fc1 is Gemm(transB=1) [out, in]: groups of 4 along axis 1; fc2 MatMul [in, out]: axis 0.
    assert np.all(np.count_nonzero(nm["fc1.weight"].reshape(256, 16, 4), axis=2) == 2)
    assert np.all(np.count_nonzero(nm["fc2.weight"].reshape(64, 4, 128), axis=1) == 2)


def test_prune_force_overwrites_the_input(work: Path) -> None:
    src = work / "mlp.onnx"
    save(mlp_model([8, 16, 4], seed=0), src)
    before = sha256(src)
    assert main([str(src), "-o", str(src), "--threshold", "0.2", "--force", "-q",
                 "--no-verify"]) == 0
    assert sha256(src) != before
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == []


# ------------------------------------------------------------------------ verify, inspect


def test_verify_identical_copy_exits_0(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(work / "digits.onnx", work / "copy.onnx")
    code = main(["verify", "digits.onnx", "copy.onnx", "--data", "test.npz",
                 "--min-cosine", "1.0", "--report", "v.json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "verification passed" in out and err == ""
    report = json.loads((work / "v.json").read_text())
    assert report["ok"] is True
    assert report["outputs"][0]["cosine_min"] == 1.0
    assert report["outputs"][0]["sqnr_db"] == "inf"


def test_verify_broken_copy_exits_1(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    digits = onnx.load(str(DIGITS))
    w = weights(digits)["fc2.weight"]
    save(replace_weight(digits, "fc2.weight", (w * -1.0).astype(np.float32)), work / "bad.onnx")
    code = main(["verify", "digits.onnx", "bad.onnx", "--data", "test.npz"])
    out, err = capsys.readouterr()
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1
    # The default gate for class scores is top-1 agreement >= 0.99.
    assert lines[0].startswith("onnxprune: verification failed: logits [cpu]: top-1 agreement ")
    assert "< 0.99" in lines[0]
    assert "Traceback" not in out + err


def test_verify_without_data_generates_inputs(work: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(work / "digits.onnx", work / "copy.onnx")
    assert main(["verify", "digits.onnx", "copy.onnx", "--shape", "pixels:3,64"]) == 0
    out, _ = capsys.readouterr()
    assert "generated" in out


def test_inspect_exits_0(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "digits.onnx", "--report", "i.json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "2 of 3 channel groups prunable" in out
    assert "50,826 parameters" in out
    info = json.loads((work / "i.json").read_text())
    assert info["opset"] == 17
    assert info["stats"]["parameters"] == DIGITS_PARAMETERS
    assert [g["prunable"] for g in info["groups"]] == [True, True, False]


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "usage: onnxprune" in capsys.readouterr().out


# ------------------------------------------------------------------------ bad input


def _truncated(folder: Path) -> list[str]:
    data = DIGITS.read_bytes()
    (folder / "cut.onnx").write_bytes(data[: len(data) // 2])
    return ["cut.onnx", "-o", "out.onnx", "--sparsity", "0.5"]


def _text(folder: Path) -> list[str]:
    (folder / "notes.onnx").write_text("name,value\nsparsity,0.5\n")
    return ["notes.onnx", "-o", "out.onnx", "--sparsity", "0.5"]


def _escaping(folder: Path) -> list[str]:
    inner = folder / "model"
    inner.mkdir()
    save(mlp_model([8, 16, 4]), folder / "m.onnx", external_data=True)
    proto = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../m.onnx.data"
    onnx.save(proto, str(inner / "m.onnx"))
    (folder / "m.onnx").unlink()
    return ["model/m.onnx", "-o", "out.onnx", "--sparsity", "0.5"]


def _opset10(folder: Path) -> list[str]:
    model = mlp_model([8, 16, 4])
    model.opset_import[0].version = 10
    onnx.checker.check_model(model, full_check=True)
    save(model, folder / "old.onnx")
    return ["old.onnx", "-o", "out.onnx", "--sparsity", "0.5"]


def _nothing_prunable(folder: Path) -> list[str]:
    save(single_matmul_model(), folder / "mm.onnx")
    return ["mm.onnx", "-o", "out.onnx", "--sparsity", "0.5"]


BAD_INPUTS = {
    "missing file": lambda f: ["nope.onnx", "-o", "out.onnx", "--sparsity", "0.5"],
    "directory": lambda f: [".", "-o", "out.onnx", "--sparsity", "0.5"],
    "not onnx": _text,
    "truncated": _truncated,
    "external data escapes": _escaping,
    "opset 10": _opset10,
    "nothing prunable": _nothing_prunable,
    "output is input": lambda f: ["digits.onnx", "-o", "digits.onnx", "--sparsity", "0.5"],
    "output is input, other spelling": lambda f: ["digits.onnx", "-o", "./digits.onnx",
                                                  "--sparsity", "0.5"],
    "unknown provider": lambda f: ["digits.onnx", "-o", "out.onnx", "--sparsity", "0.5",
                                   "--providers", "tpu"],
    "sparsity out of range": lambda f: ["digits.onnx", "-o", "out.onnx", "--sparsity", "1.5"],
    "bad --nm": lambda f: ["digits.onnx", "-o", "out.onnx", "--nm", "4:2"],
    "bad --shape": lambda f: ["digits.onnx", "-o", "out.onnx", "--sparsity", "0.5",
                              "--shape", "pixels:3,x"],
    "output under a file": lambda f: ["digits.onnx", "-o", "digits.onnx/out.onnx",
                                      "--sparsity", "0.5"],
    "wrong data": lambda f: ["digits.onnx", "-o", "out.onnx", "--sparsity", "0.5",
                             "--data", "digits.onnx"],
    "verify missing candidate": lambda f: ["verify", "digits.onnx", "nope.onnx"],
    "verify unknown provider": lambda f: ["verify", "digits.onnx", "digits.onnx",
                                          "--providers", "tpu"],
    "inspect truncated": lambda f: ["inspect", _truncated(f)[0]],
}


KNOWN_BUGS: dict[str, str] = {}


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[c]))
        if c in KNOWN_BUGS else c
        for c in BAD_INPUTS
    ],
)
def test_bad_input_exits_2_and_writes_nothing(
    case: str, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = BAD_INPUTS[case](work)
    before = folder_snapshot(work)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("onnxprune: error: ")
    assert "Traceback" not in out + err
    # No output, no report, no hidden temp file; every input byte-identical.
    assert folder_snapshot(work) == before


def test_error_names_the_model_file(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (BAD_INPUTS["missing file"](work), BAD_INPUTS["truncated"](work),
                 BAD_INPUTS["external data escapes"](work)):
        assert main(argv) == 2
        assert argv[0] in capsys.readouterr().err


def test_opset_error_names_the_model_file(work: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    argv = _opset10(work)
    assert main(argv) == 2
    assert "old.onnx" in capsys.readouterr().err


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here"
)
def test_unavailable_provider_writes_nothing(work: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    before = folder_snapshot(work)
    code = main(["digits.onnx", "-o", "out.onnx", "--sparsity", "0.5", "--providers", "cuda"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("onnxprune: error: provider 'cuda' is not available")
    assert folder_snapshot(work) == before


@pytest.mark.parametrize("calibrated", [False, True])
def test_nothing_prunable_is_one_answer_with_or_without_data(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], calibrated: bool) -> None:
    """A model whose only layer feeds the graph output has nothing to remove: --sparsity
    says so (exit 2, the reason, nothing written) whether or not data is given; before, the
    calibrated run wrote an unchanged copy and exited 0."""
    model = mlp_model([8, 4], seed=1)
    onnx.save(model, tmp_path / "m.onnx")
    args = [str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--sparsity", "0.3"]
    if calibrated:
        np.savez(tmp_path / "c.npz", **{model.graph.input[0].name: np.random.default_rng(0)
                                        .standard_normal((16, 8)).astype(np.float32)})
        args += ["--calibration", str(tmp_path / "c.npz")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnxprune: error: nothing prunable in this model (")
    assert "onnxprune inspect" in err
    assert not (tmp_path / "o.onnx").exists()


def test_every_main_option_is_a_config_field_or_a_run_setting() -> None:
    """The CLI builds its config from the namespace (no hand copy): every option's dest
    names a PruneConfig or QuantizeConfig field, or one of the few run settings the pipeline
    reads itself. A new option with a dest that names neither would be silently dropped."""
    from dataclasses import fields

    from onnxprune.cli.options import main_parser, prune_config
    from onnxprune.quant.config import QuantizeConfig
    from onnxprune.recipe.config import PruneConfig

    run_settings = {"help", "model", "output", "force", "quiet", "no_verify", "copy_config",
                    "report", "save_plan", "data", "shape", "providers", "min_cosine", "atol",
                    "rtol", "min_sqnr", "min_top1", "min_top5", "max_kl", "min_exact", "top1",
                    "output_kinds", "outputs", "max_calibration_bytes",
                    # how text and images become batches (calibration.raw.DataSource)
                    "tokenizer", "text_field", "batch_size", "max_length", "image_preset"}
    config_fields = {f.name for f in fields(PruneConfig)} | {f.name for f in fields(QuantizeConfig)}
    parser = main_parser()
    dests = {a.dest for a in parser._actions}
    assert not dests - config_fields - run_settings, dests - config_fields - run_settings
    args = parser.parse_args(["m.onnx", "-o", "o.onnx", "--heads", "0.5", "--max-block-heads",
                              "0.5", "--quantize", "int8", "--calibration-method", "minmax"])
    config = prune_config(args)
    assert config.max_block_heads == 0.5 and config.quantize is not None
    assert config.quantize.method == "minmax"


def test_a_rewrite_that_breaks_the_model_exits_3_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exit 3 is ours: a model our rewriting broke (onnx.checker or onnxruntime refuses it)
    is never reported as bad input, and nothing is written."""
    import onnxprune.recipe.pipeline as pipeline

    def refuse(*args: object, **kwargs: object) -> None:
        raise ValueError("Field 'shape' of 'type' is required but missing")

    monkeypatch.setattr(pipeline, "check_detached", refuse)
    onnx.save(mlp_model([8, 16, 4], seed=1), tmp_path / "m.onnx")
    code = main([str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--sparsity", "0.5"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert err.startswith("onnxprune: internal error: the rewritten model fails onnx.checker")
    assert err.count("\n") == 1 and not (tmp_path / "o.onnx").exists()


def test_progress_is_plain_lines_in_a_log(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Output that is not a terminal gets plain progress lines (a bar would print nothing)."""
    code = main([str(DIGITS), "-o", str(tmp_path / "o.onnx"), "--sparsity", "0.5",
                 "--calibration", str(DIGITS_CALIB), "--no-verify"])
    assert code == 0
    assert "pruning (calibrating and refitting group by group): 0/" in capsys.readouterr().out
