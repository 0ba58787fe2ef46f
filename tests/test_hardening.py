"""Hostile and careless input: one test per numbered case of the hardening issue.

Each `test_caseNN_*` reproduces case NN and checks what must hold instead: exit 0 or a
single stderr line with exit 2 (never 3), the input untouched, no half-written output, no
write through a link, no read outside the model's folder. `test_held_*` keep the promises
that already held.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import onnx_ir as ir
from helpers import (
    REPO,
    folder_snapshot,
    make_model,
    mlp_model,
    random_input,
    run,
    save,
    sha256,
    value_info,
    weights,
)
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main
from onnxprune.errors import InputError
from onnxprune.files import check_writable
from onnxprune.io import load_model, save_model

X = random_input([6, 8], seed=1)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, list[str]]:
    """Runs the CLI in process; returns the exit code and the stderr lines.

    Checks the promise every run keeps: a non-zero exit is 1 or 2 with exactly one line on
    stderr, and no traceback ever.
    """
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code in (0, 1, 2), (code, err)
    assert "Traceback" not in err
    if code:
        assert len(lines) == 1, err
    return code, lines


def _calib(path: Path, rows: int = 16, seed: int = 0) -> Path:
    np.savez(path, x=random_input([rows, 8], seed=seed))
    return path


def _outputs(path: Path) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": X})[0]


@pytest.fixture
def mlp() -> onnx.ModelProto:
    return mlp_model([8, 16, 4], seed=3)


# ------------------------------------------------------------------ data loss (1-3)


def test_case01_output_never_writes_over_the_inputs_data(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str]
) -> None:
    """a.onnx keeps its weights in b.onnx.data; -o b.onnx must leave that file alone."""
    onnx.save(mlp, str(tmp_path / "a.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="b.onnx.data", size_threshold=0)
    want = _outputs(tmp_path / "a.onnx")
    data_hash = sha256(tmp_path / "b.onnx.data")
    for _ in range(2):  # the second run replaces the first output
        code, _ = cli(capsys, "a.onnx", "-o", "b.onnx", "--sparsity", "0.25", "--no-verify")
        assert code == 0
        assert sha256(tmp_path / "b.onnx.data") == data_hash
        np.testing.assert_array_equal(_outputs(tmp_path / "a.onnx"), want)
        assert _outputs(tmp_path / "b.onnx").shape == want.shape
        onnx.checker.check_model(str(tmp_path / "b.onnx"), full_check=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_case01_external_save_over_a_name_the_input_uses(
    tmp_path: Path, mlp: onnx.ModelProto
) -> None:
    """The same through save_model with external data, b.onnx existing as an earlier output
    that also refers to b.onnx.data."""
    want = run(mlp, {"x": X})[0]
    onnx.save(mlp, str(tmp_path / "a.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="b.onnx.data", size_threshold=0)
    shutil.copy(tmp_path / "a.onnx", tmp_path / "b.onnx")
    data_hash = sha256(tmp_path / "b.onnx.data")
    model = load_model(tmp_path / "a.onnx")
    model.graph.initializers["fc0.weight"].const_value = ir.tensor(
        np.zeros((8, 16), np.float32), name="fc0.weight")
    save_model(model, tmp_path / "b.onnx", external_data=True, keep=[tmp_path / "a.onnx"])
    assert sha256(tmp_path / "b.onnx.data") == data_hash
    np.testing.assert_array_equal(_outputs(tmp_path / "a.onnx"), want)
    assert weights(onnx.load(str(tmp_path / "b.onnx")))["fc0.weight"].max() == 0


def test_case01_output_named_like_the_inputs_data_file_is_refused(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str]
) -> None:
    save(mlp, tmp_path / "m.onnx", external_data=True)
    before = folder_snapshot(tmp_path)
    code, err = cli(capsys, "m.onnx", "-o", "m.onnx.data", "--sparsity", "0.25")
    assert code == 2 and "data file of the input" in err[0]
    assert folder_snapshot(tmp_path) == before


def test_case02_overwriting_an_external_data_output_alternates_data_files(
    tmp_path: Path, mlp: onnx.ModelProto
) -> None:
    """The new data goes under a fresh name, the model is renamed last, the old data goes."""
    seen = []
    for value in (1.0, 2.0, 3.0):
        model = ir.serde.deserialize_model(mlp)
        model.graph.initializers["fc0.weight"].const_value = ir.tensor(
            np.full((8, 16), value, np.float32), name="fc0.weight")
        save_model(model, tmp_path / "out.onnx", external_data=True)
        proto = onnx.load(str(tmp_path / "out.onnx"), load_external_data=False)
        (location,) = {e.value for t in proto.graph.initializer for e in t.external_data
                       if e.key == "location"}
        seen.append(location)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", location]
        assert weights(onnx.load(str(tmp_path / "out.onnx")))["fc0.weight"].max() == value
    assert seen[0] != seen[1] and seen[1] != seen[2]  # never over the earlier output's data


_KILL_CHILD = textwrap.dedent("""
    import sys, numpy as np, onnx_ir as ir
    sys.path.insert(0, {repo!r})
    from onnxprune.io import save_model
    out = sys.argv[1]
    i = 0
    print("ready", flush=True)
    while True:
        w = np.full((512, 1024), float(i % 7 + 1), np.float32)
        x = ir.Input("x", shape=ir.Shape(["b", 512]), type=ir.TensorType(ir.DataType.FLOAT))
        wv = ir.Value(name="w", const_value=ir.tensor(w, name="w"),
                      shape=ir.Shape([512, 1024]), type=ir.TensorType(ir.DataType.FLOAT))
        node = ir.node("MatMul", [x, wv], num_outputs=1)
        node.outputs[0].name = "y"
        node.outputs[0].dtype = ir.DataType.FLOAT
        node.outputs[0].shape = ir.Shape(["b", 1024])
        graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[wv],
                         opset_imports={{"": 17}})
        save_model(ir.Model(graph, ir_version=8), out, external_data=True)
        i += 1
""")


def _kill_during_save(tmp_path: Path, tries: int, seed: int) -> int:
    """Kills (SIGKILL) a child that saves external-data models over out.onnx in a loop, at
    random instants; after each kill out.onnx must load in onnxruntime, whole."""
    script = tmp_path / "child.py"
    script.write_text(_KILL_CHILD.format(repo=str(REPO)))
    out = tmp_path / "out.onnx"
    rng = np.random.default_rng(seed)
    checked = 0
    for _ in range(tries):
        child = subprocess.Popen([sys.executable, str(script), str(out)],
                                 stdout=subprocess.PIPE, env={**os.environ,
                                                              "OMP_NUM_THREADS": "1"})
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"ready"
        try:
            child.wait(timeout=float(rng.uniform(0.05, 0.6)))
        except subprocess.TimeoutExpired:
            child.kill()
        child.wait()
        if out.exists():
            sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            y = sess.run(None, {"x": np.ones((1, 512), np.float32)})[0]
            assert len(set(np.unique(y).tolist())) == 1  # one whole weight set, not a mix
            checked += 1
    return checked


def test_case02_kill_9_during_save_always_leaves_a_loadable_output(tmp_path: Path) -> None:
    assert _kill_during_save(tmp_path, tries=6, seed=0) >= 3


@pytest.mark.fuzz
def test_case02_kill_9_during_save_50_tries(tmp_path: Path) -> None:
    assert _kill_during_save(tmp_path, tries=50, seed=1) >= 40


def test_case02_sigterm_during_save_leaves_no_temp_files(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(_KILL_CHILD.format(repo=str(REPO)).replace(
        "from onnxprune.io import save_model",
        "from onnxprune.io import save_model\nimport signal\n"
        "def stop(*a):\n    raise KeyboardInterrupt\nsignal.signal(signal.SIGTERM, stop)"))
    out = tmp_path / "out.onnx"
    for delay in (0.1, 0.3, 0.5):
        child = subprocess.Popen([sys.executable, str(script), str(out)],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
        try:
            child.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            child.terminate()
        child.wait()
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
        assert leftovers == []
        if out.exists():
            ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def test_case02_cli_turns_sigterm_into_a_clean_exit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    mlp: onnx.ModelProto,
) -> None:
    save(mlp, tmp_path / "m.onnx")
    import signal

    import onnxprune.io as io_module

    real = io_module.ir.save

    def slow_save(*args: object, **kwargs: object) -> None:
        real(*args, **kwargs)  # type: ignore[arg-type]
        os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-save, before the rename

    monkeypatch.setattr(io_module.ir, "save", slow_save)
    code = main(["m.onnx", "-o", "out.onnx", "--sparsity", "0.25", "--no-verify"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 143 and len(err) == 1 and "terminated" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_case03_report_equal_to_output_is_refused(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str]
) -> None:
    save(mlp, tmp_path / "m.onnx")
    for report in ("out.onnx", "./out.onnx", str(tmp_path / "sub" / ".." / "out.onnx")):
        (tmp_path / "sub").mkdir(exist_ok=True)
        code, err = cli(capsys, "m.onnx", "-o", "out.onnx", "--sparsity", "0.25",
                        "--report", report)
        assert code == 2 and "same file as -o" in err[0]
        assert not (tmp_path / "out.onnx").exists()
    code, err = cli(capsys, "m.onnx", "-o", "out.onnx", "--sparsity", "0.25",
                    "--report", "out.onnx.data")
    assert code == 2 and "data file" in err[0]


# --------------------------------------------------------- writes where it must not (4-5)


def test_case04_data_path_symlink_is_never_written_through(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str]
) -> None:
    save(mlp, tmp_path / "m.onnx", external_data=True)
    victim = tmp_path / "elsewhere" / "victim.bin"
    victim.parent.mkdir()
    victim.write_bytes(b"precious")
    (tmp_path / "out.onnx.data").symlink_to(victim)
    code, err = cli(capsys, "m.onnx", "-o", "out.onnx", "--sparsity", "0.25")
    assert code == 2 and "symbolic link" in err[0]
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "out.onnx").exists()


def test_case05_output_symlink_and_special_files_are_refused(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str]
) -> None:
    save(mlp, tmp_path / "m.onnx")
    target = tmp_path / "target.onnx"
    target.write_bytes(b"keep")
    (tmp_path / "link.onnx").symlink_to(target)
    os.mkfifo(tmp_path / "fifo.onnx")
    for out in ("link.onnx", "fifo.onnx"):
        code, err = cli(capsys, "m.onnx", "-o", out, "--sparsity", "0.25")
        assert code == 2, err
    assert (tmp_path / "link.onnx").is_symlink() and target.read_bytes() == b"keep"
    assert (tmp_path / "fifo.onnx").is_fifo()
    # Reports and plans are outputs too.
    code, err = cli(capsys, "m.onnx", "-o", "o.onnx", "--sparsity", "0.25", "--report",
                    "link.onnx")
    assert code == 2 and not (tmp_path / "o.onnx").exists()
    code, err = cli(capsys, "inspect", "m.onnx", "--report", "fifo.onnx")
    assert code == 2


def test_case05_dev_null_is_refused_without_writing() -> None:
    with pytest.raises(InputError, match="not a regular file"):
        check_writable(Path("/dev/null"))


# ------------------------------------------------------------ reads where it must not (6)


def _ext_model_elsewhere(tmp_path: Path, mlp: onnx.ModelProto) -> tuple[Path, Path]:
    models = tmp_path / "models"
    models.mkdir()
    save(mlp, models / "m.onnx", external_data=True)
    _calib(models / "calib.npz")
    return models, models / "m.onnx"


@pytest.mark.parametrize("command", ["quantize", "prune"])
def test_case06_external_data_is_read_from_the_models_folder(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, command: str,
) -> None:
    models, model = _ext_model_elsewhere(tmp_path, mlp)
    pre, post = (["quantize"], []) if command == "quantize" else ([], ["--sparsity", "0.25"])
    # From the model's own folder: the reference result.
    monkeypatch.chdir(models)
    code, _ = cli(capsys, *pre, "m.onnx", *post, "-o", str(tmp_path / "ref.onnx"),
                  "--calibration", "calib.npz", "--no-verify")
    assert code == 0
    # From a folder holding a decoy with the same data file name: the same result.
    decoy = tmp_path / "cwd"
    decoy.mkdir()
    shutil.copy(models / "m.onnx.data", decoy / "m.onnx.data")
    with open(decoy / "m.onnx.data", "r+b") as f:
        f.write(np.full(64, 7.0, np.float32).tobytes())
    monkeypatch.chdir(decoy)
    code, _ = cli(capsys, *pre, str(model), *post, "-o", str(tmp_path / "got.onnx"),
                  "--calibration", str(models / "calib.npz"), "--no-verify")
    assert code == 0
    np.testing.assert_array_equal(_outputs(tmp_path / "got.onnx"),
                                  _outputs(tmp_path / "ref.onnx"))
    # From an empty folder: works too.
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    code, _ = cli(capsys, *pre, str(model), *post, "-o", str(tmp_path / "e.onnx"),
                  "--calibration", str(models / "calib.npz"))
    assert code == 0


# ------------------------------------------------------------------- resources (7-9)


def _npz_with_header(path: Path, shape: tuple[int, ...], payload: bytes = b"") -> Path:
    """A .npz whose one member's .npy header claims `shape` but holds only `payload`."""
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", buf.getvalue() + payload)
    return path


def test_case07_npz_bomb_is_refused_from_its_headers(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    save(mlp, tmp_path / "m.onnx")
    np.savez_compressed(tmp_path / "bomb.npz", x=np.zeros((2**22, 8), np.float32))  # 128 MiB
    assert (tmp_path / "bomb.npz").stat().st_size < 2**20

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("decompressed before the size check")

    monkeypatch.setattr(np, "load", never)
    code, err = cli(capsys, "quantize", "m.onnx", "-o", "q.onnx", "--calibration", "bomb.npz",
                    "--max-calibration-bytes", str(64 * 2**20))
    assert code == 2 and "memory budget" in err[0] and "bomb.npz" in err[0]
    assert not (tmp_path / "q.onnx").exists()


def test_case07_header_claiming_1e12_rows_is_refused(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str]
) -> None:
    save(mlp, tmp_path / "m.onnx")
    _npz_with_header(tmp_path / "huge.npz", (10**12, 8), b"\0" * 64)
    code, err = cli(capsys, "quantize", "m.onnx", "-o", "q.onnx", "--calibration", "huge.npz")
    assert code == 2 and "huge.npz" in err[0]


def test_case07_default_budget_applies(tmp_path: Path, mlp: onnx.ModelProto,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from onnxprune.calibration.data import check_budget, default_budget

    _calib(tmp_path / "c.npz")
    assert 2**26 <= default_budget()
    assert check_budget([tmp_path / "c.npz"]) < 2**20
    with pytest.raises(InputError, match="memory budget"):
        check_budget([tmp_path / "c.npz"], budget=100)


def test_case08_fifo_in_calibration_folder_never_blocks(
    tmp_path: Path, mlp: onnx.ModelProto
) -> None:
    save(mlp, tmp_path / "m.onnx")
    data = tmp_path / "data"
    data.mkdir()
    _calib(data / "a.npz")
    os.mkfifo(data / "b.npz")
    os.mkfifo(tmp_path / "fifo.npz")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "onnxprune", "quantize", "m.onnx", "--calibration"]
    done = subprocess.run([*base, "data", "-o", "q.onnx"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([*base, "fifo.npz", "-o", "q2.onnx"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "regular file" in done.stderr


def test_case09_huge_fixed_batch_does_not_generate_gigabytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [value_info("x", [4_000_000, 8])], [value_info("y", [4_000_000, 4])],
                       [w])
    save(model, tmp_path / "m.onnx")
    save(model, tmp_path / "c.onnx")
    code, err = cli(capsys, "verify", "m.onnx", "c.onnx")
    assert code == 2 and "generated inputs would take" in err[0] and "--data" in err[0]
    code, err = cli(capsys, "m.onnx", "-o", "o.onnx", "--threshold", "0.1")
    assert code == 2 and not (tmp_path / "o.onnx").exists()
