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
import onnx_ir as ir
import onnxruntime as ort
import pytest
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
from onnxprune.io.files import check_writable
from onnxprune.io.models import load_model, save_model

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
    from onnxprune.io.models import save_model
    out = sys.argv[1]
    i = 0
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
                         opset_imports={{"": 17}}, name="g")
        save_model(ir.Model(graph, ir_version=8), out, external_data=True)
        if i == 0:
            print("ready", flush=True)  # an earlier output exists from here on
        i += 1
""")


def _kill_during_save(tmp_path: Path, tries: int, seed: int) -> int:
    """Kills (SIGKILL) a child that saves external-data models over out.onnx in a loop, at
    random instants after its first save; after each kill out.onnx must load in
    onnxruntime, whole, with one weight set (not the old model with the new data)."""
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
            child.wait(timeout=float(rng.uniform(0.0, 0.5)))
        except subprocess.TimeoutExpired:
            child.kill()
        child.wait()
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        y = sess.run(None, {"x": np.ones((1, 512), np.float32)})[0]
        assert len(set(np.unique(y).tolist())) == 1  # one whole weight set, not a mix
        onnx.checker.check_model(str(out), full_check=True)
        checked += 1
    return checked


def test_case02_kill_9_during_save_always_leaves_a_loadable_output(tmp_path: Path) -> None:
    assert _kill_during_save(tmp_path, tries=2, seed=0) == 2
    # The next save sweeps what the killed runs left: no temporary file remains.
    model = load_model(tmp_path / "out.onnx")
    save_model(model, tmp_path / "out.onnx", external_data=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.fuzz
def test_case02_kill_9_during_save_50_tries(tmp_path: Path) -> None:
    assert _kill_during_save(tmp_path, tries=50, seed=1) == 50


def test_case02_sigterm_during_save_leaves_no_temp_files(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(_KILL_CHILD.format(repo=str(REPO)).replace(
        "from onnxprune.io.models import save_model",
        "from onnxprune.io.models import save_model\nimport signal\n"
        "def stop(*a):\n    raise KeyboardInterrupt\nsignal.signal(signal.SIGTERM, stop)"))
    out = tmp_path / "out.onnx"
    for delay in (0.3,):
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

    import onnxprune.io.models as io_module

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
    assert default_budget() >= 2**26
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
    # Given directly, a FIFO is refused before it is opened (in process: no hang to fear).
    code = main(["quantize", "m.onnx", "--calibration", "fifo.npz", "-o", "q2.onnx"])
    assert code == 2 and not (tmp_path / "q2.onnx").exists()


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


# ------------------------------------------------------------------ crashes (10-22)


def _write(proto: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(proto.SerializeToString())
    return path


def _every_command_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model: Path, *words: str,
    commands: tuple[str, ...] = ("prune", "inspect", "quantize", "verify"),
) -> None:
    """Each command exits 2 with one line naming the defect, writes nothing, and leaves the
    input as it was; no message blames a rewritten model."""
    _calib(tmp_path / "calib.npz")
    before = folder_snapshot(tmp_path)
    argvs = {
        "prune": [model, "-o", "out.onnx", "--sparsity", "0.25", "--report", "r.json"],
        "inspect": ["inspect", model, "--report", "r.json"],
        "quantize": ["quantize", model, "-o", "out.onnx", "--calibration", "calib.npz"],
        "verify": ["verify", model, model, "--report", "r.json"],
    }
    for command in commands:
        code, err = cli(capsys, *argvs[command])
        assert code == 2, (command, err)
        assert "rewritten" not in err[0] and "internal error" not in err[0], err
        for word in words:
            assert word in err[0], (command, err)
        assert folder_snapshot(tmp_path) == before, command


def test_case10_initializer_bytes_that_do_not_match_their_dims(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str]
) -> None:
    mlp.graph.initializer[0].raw_data = mlp.graph.initializer[0].raw_data[:-4]
    _every_command_refuses(tmp_path, capsys, _write(mlp, tmp_path / "m.onnx"), "fc0.weight")


def test_case11_mangled_names_and_producer_strings(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str]
) -> None:
    data = mlp.SerializeToString().replace(b"fc0.weight", b"fc0.w\xffght")
    (tmp_path / "names.onnx").write_bytes(data)
    _every_command_refuses(tmp_path, capsys, tmp_path / "names.onnx", "names.onnx")
    proto = onnx.ModelProto()
    proto.CopyFrom(mlp)
    proto.producer_name = "x" * 10
    data = proto.SerializeToString().replace(b"x" * 10, b"\xfe\xff" * 5)
    (tmp_path / "producer.onnx").write_bytes(data)
    _every_command_refuses(tmp_path, capsys, tmp_path / "producer.onnx", "producer.onnx")


def test_case11_odd_but_valid_names_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Names with '<', spaces, newlines and non-ASCII are valid ONNX: they must work."""
    model = mlp_model([8, 16, 4], seed=3)
    renames = {"fc0.weight": "w<0> é\n", "fc0_out": "h <1>", "act0_out": "ü\tact"}
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
        node.name = node.name + " ☃"
    for t in model.graph.initializer:
        t.name = renames.get(t.name, t.name)
    model.producer_name = "ünïcode <producer>"
    onnx.checker.check_model(model, full_check=True)
    save(model, tmp_path / "m.onnx")
    code, _ = cli(capsys, "m.onnx", "-o", "o.onnx", "--sparsity", "0.25",
                      "--min-cosine", "0.5")  # a loose gate: validity is under test
    assert code == 0
    code, _ = cli(capsys, "inspect", "m.onnx")
    assert code == 0


def test_case12_attribute_of_the_wrong_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = mlp_model([8, 16, 4], gemm=True, trans_b=True, seed=3)
    for node in model.graph.node:
        if node.op_type == "Gemm":
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("transB", 1.0))
    _every_command_refuses(tmp_path, capsys, _write(model, tmp_path / "m.onnx"), "transB")


@pytest.mark.parametrize("where", ["input", "initializer"])
def test_case12_element_type_undefined(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    if where == "input":
        mlp.graph.input[0].type.tensor_type.elem_type = TensorProto.UNDEFINED
        name = "'x'"
    else:
        mlp.graph.initializer[1].data_type = TensorProto.UNDEFINED
        name = mlp.graph.initializer[1].name
    _every_command_refuses(tmp_path, capsys, _write(mlp, tmp_path / "m.onnx"), name)


def test_case13_initializer_named_like_a_graph_input(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str]
) -> None:
    """An initializer listed as a graph input is a default value (torch's
    keep_initializers_as_inputs): every command handles it, without an assertion. Its
    weight may be overridden at run time, so pruning declines it (here that leaves nothing
    prunable: a clear exit 2); inspect, verify and quantize work."""
    mlp.graph.input.append(helper.make_tensor_value_info("fc0.weight", TensorProto.FLOAT,
                                                         [8, 16]))
    save(mlp, tmp_path / "m.onnx")
    before = sha256(tmp_path / "m.onnx")
    _calib(tmp_path / "calib.npz")
    code, err = cli(capsys, "m.onnx", "-o", "o.onnx", "--sparsity", "0.25")
    assert code == 2 and "nothing prunable" in err[0]
    for argv in (["inspect", "m.onnx"], ["verify", "m.onnx", "m.onnx"],
                 ["quantize", "m.onnx", "-o", "q.onnx", "--calibration", "calib.npz"]):
        code, err = cli(capsys, *argv)
        assert code == 0, err
    assert sha256(tmp_path / "m.onnx") == before
    # A graph input that shadows an initializer of another shape is refused by the gate.
    mlp.graph.input[-1].type.tensor_type.shape.dim[0].dim_value = 3
    _every_command_refuses(tmp_path, capsys, _write(mlp, tmp_path / "bad.onnx"), "bad.onnx")


def test_case14_duplicate_attributes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = mlp_model([8, 16, 4], gemm=True, trans_b=True, seed=3)
    for node in model.graph.node:
        if node.op_type == "Gemm":
            node.attribute.append(helper.make_attribute("transB", 1))
    _every_command_refuses(tmp_path, capsys, _write(model, tmp_path / "m.onnx"), "transB")


def test_case14_internal_declines_do_not_escape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model with nothing prunable: a clear exit 2, not an internal decline error."""
    x = helper.make_node("Relu", ["x"], ["y"], name="relu")
    model = make_model([x], [value_info("x", ["b", 8])], [value_info("y", ["b", 8])])
    save(model, tmp_path / "m.onnx")
    code, err = cli(capsys, "m.onnx", "-o", "o.onnx", "--sparsity", "0.5")
    assert code == 2 and "nothing prunable" in err[0]
    code, err = cli(capsys, "m.onnx", "-o", "o.onnx", "--heads", "0.5")
    assert code == 2


def test_case15_batch_dimension_zero(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str]
) -> None:
    dim = mlp.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_param")
    dim.dim_value = 0
    _every_command_refuses(tmp_path, capsys, _write(mlp, tmp_path / "m.onnx"), "'x'",
                           "fixed at 0")


def test_case16_nan_weights_in_quantize(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str]
) -> None:
    w = numpy_helper.to_array(mlp.graph.initializer[0]).copy()
    w[0, 0] = np.nan
    mlp.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "fc0.weight"))
    save(mlp, tmp_path / "m.onnx")
    _calib(tmp_path / "calib.npz")
    for extra in ([], ["--weight-only"]):
        code, err = cli(capsys, "quantize", "m.onnx", "-o", "q.onnx", "--calibration",
                        "calib.npz", *extra)
        assert code == 2 and "fc0.weight" in err[0] and "NaN" in err[0]
        assert not (tmp_path / "q.onnx").exists()
    code, err = cli(capsys, "m.onnx", "-o", "p.onnx", "--sparsity", "0.25")
    assert code == 2 and not (tmp_path / "p.onnx").exists()


def test_case17_minus_one_dims_as_paddle2onnx_writes_them(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str]
) -> None:
    for vi in (mlp.graph.input[0], mlp.graph.output[0]):
        dim = vi.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_param")
        dim.dim_value = -1
    save(mlp, tmp_path / "m.onnx")
    _calib(tmp_path / "calib.npz")
    code, _ = cli(capsys, "m.onnx", "-o", "o.onnx", "--sparsity", "0.25",
                      "--min-cosine", "0.5")  # a loose gate: validity is under test
    assert code == 0
    code, _ = cli(capsys, "quantize", "m.onnx", "-o", "q.onnx", "--calibration", "calib.npz")
    assert code == 0
    for out in ("o.onnx", "q.onnx"):
        onnx.checker.check_model(str(tmp_path / out), full_check=True)
        assert _outputs(tmp_path / out).shape == (6, 4)


@pytest.mark.parametrize("value", [-7, 2**62])
def test_case17_negative_or_huge_declared_dims(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str], value: int
) -> None:
    dim = mlp.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_param")
    dim.dim_value = value
    _write(mlp, tmp_path / "m.onnx")
    for argv in (["m.onnx", "-o", "o.onnx", "--sparsity", "0.25", "--min-cosine", "0.5"],
                 ["inspect", "m.onnx"],
                 ["verify", "m.onnx", "m.onnx"]):
        code, err = cli(capsys, *argv)
        if value > 0 and argv[0] != "inspect":
            assert code == 2 and "generated inputs" in err[0]
        else:
            assert code == 0


def _external_variant(tmp_path: Path, mlp: onnx.ModelProto, **changes: str) -> Path:
    folder = tmp_path / "ext"
    folder.mkdir(exist_ok=True)
    path = save(mlp, folder / "m.onnx", external_data=True)
    proto = onnx.load(str(path), load_external_data=False)
    tensor = proto.graph.initializer[0]
    for entry in tensor.external_data:
        if entry.key in changes:
            entry.value = changes.pop(entry.key)
    for key, value in changes.items():
        tensor.external_data.append(onnx.StringStringEntryProto(key=key, value=value))
    return _write(proto, folder / "m.onnx")


@pytest.mark.parametrize("kind", ["nul", "long", "offset", "truncated", "hardlink"])
def test_case18_hostile_external_data(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    if kind == "nul":
        path = _external_variant(tmp_path, mlp, location="m.onnx\x00.data")
    elif kind == "long":
        path = _external_variant(tmp_path, mlp, location="d" * 300)
    elif kind == "offset":
        path = _external_variant(tmp_path, mlp, offset=str(10**9))
    elif kind == "truncated":
        path = _external_variant(tmp_path, mlp)
        data = path.with_name("m.onnx.data")
        data.write_bytes(data.read_bytes()[:100])
    else:
        path = _external_variant(tmp_path, mlp)
        os.link(path.with_name("m.onnx.data"), tmp_path / "elsewhere.data")
    before = folder_snapshot(tmp_path)
    for argv in (["ext/m.onnx", "-o", "o.onnx", "--sparsity", "0.25"],
                 ["inspect", "ext/m.onnx"], ["verify", "ext/m.onnx", "ext/m.onnx"]):
        code, err = cli(capsys, *argv)
        assert code == 2 and "fc0.weight" in err[0], err
    assert folder_snapshot(tmp_path) == before


def test_case19_npy_saved_under_an_npz_name(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str]
) -> None:
    save(mlp, tmp_path / "m.onnx")
    with open(tmp_path / "data.npz", "wb") as f:
        np.save(f, random_input([4, 8]))
    for argv in (["quantize", "m.onnx", "-o", "q.onnx", "--calibration", "data.npz"],
                 ["verify", "m.onnx", "m.onnx", "--data", "data.npz"]):
        code, err = cli(capsys, *argv)
        assert code == 2 and ".npy" in err[0] and "numpy.savez" in err[0]


@pytest.mark.parametrize("change", [
    {"calibration_split": 3}, {"neurons": {"fc0_out": [10**30]}}, {"summary": "text"},
    {"token_mask": 5}, {"repair": ["lstsq"]}, {"calibration_split": "rows:" + "9" * 40},
    "deep",
])
def test_case20_plans_with_wrong_field_types(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str],
    change: object,
) -> None:
    save(mlp, tmp_path / "m.onnx")
    plan = {"format": "onnxprune-plan/1", "repair": "none", "neurons": {}, "heads": {}}
    if change == "deep":
        (tmp_path / "p.json").write_text("[" * 100_000 + "]" * 100_000)
    else:
        plan.update(change)  # type: ignore[call-overload]
        (tmp_path / "p.json").write_text(json.dumps(plan))
    code, err = cli(capsys, "m.onnx", "-o", "o.onnx", "--plan", "p.json", "--no-verify")
    assert code == 2 and "p.json" in err[0]
    assert not (tmp_path / "o.onnx").exists()


def test_case21_output_to_proc_self_fd(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str]
) -> None:
    save(mlp, tmp_path / "m.onnx")
    code, err = cli(capsys, "m.onnx", "-o", "/proc/self/fd/1", "--sparsity", "0.25")
    assert code == 2


def test_case21_full_disk_gives_one_line_and_no_output(
    tmp_path: Path, mlp: onnx.ModelProto
) -> None:
    save(mlp, tmp_path / "m.onnx")
    code = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(REPO)!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))  # 'File too large'
        from onnxprune.cli import main
        sys.exit(main(["m.onnx", "-o", "o.onnx", "--sparsity", "0.25", "--no-verify"]))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "File too large" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_case22_gemm_bias_behind_identity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = mlp_model([8, 16, 4], gemm=True, trans_b=True, seed=3)
    for node in list(model.graph.node):
        if node.op_type == "Gemm" and len(node.input) == 3:
            bias = node.input[2]
            node.input[2] = bias + "_id"
            model.graph.node.insert(0, helper.make_node("Identity", [bias], [bias + "_id"],
                                                        name=bias + "_identity"))
    onnx.checker.check_model(model, full_check=True)
    save(model, tmp_path / "m.onnx")
    code, err = cli(capsys, "m.onnx", "-o", "o.onnx", "--sparsity", "0.25",
                      "--min-cosine", "0.5")  # a loose gate: validity is under test
    # The bias is read through its Identity (a constant), so the layer is pruned, and the
    # written model is valid and runs.
    assert code == 0, err
    out = onnx.load(str(tmp_path / "o.onnx"))
    onnx.checker.check_model(out, full_check=True)
    widths = [t.dims[0] for t in out.graph.initializer if t.name.startswith("fc0.bias")]
    assert widths and all(w == 12 for w in widths), widths
    ort.InferenceSession(str(tmp_path / "o.onnx"))
    assert main(["inspect", "m.onnx"]) == 0


# -------------------------------------------------------------- unclear messages (23-25)


def test_case23_failing_runs_print_one_stderr_line(
    tmp_path: Path, mlp: onnx.ModelProto
) -> None:
    """In a real process, with the libraries' own warnings and logging: one line."""
    mlp.graph.initializer[0].raw_data = mlp.graph.initializer[0].raw_data[:-4]
    _write(mlp, tmp_path / "bad.onnx")
    good = save(mlp_model([8, 16, 4], seed=3), tmp_path / "m.onnx")
    nan = tmp_path / "nan.npz"
    np.savez(nan, x=np.full((4, 8), np.nan, np.float32))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "always"}
    for argv in (["bad.onnx", "-o", "o.onnx", "--sparsity", "0.5"],
                 ["quantize", good.name, "-o", "q.onnx", "--calibration", nan.name]):
        done = subprocess.run([sys.executable, "-m", "onnxprune", *argv], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_case23_library_warnings_are_captured(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import logging
    import warnings

    from onnxprune.cli import commands

    def noisy(*args: object, **kwargs: object) -> int:
        logging.getLogger("onnx_ir").warning("a library warning")
        warnings.warn("a numpy-style warning", RuntimeWarning, stacklevel=1)
        np.log(np.zeros(1))
        raise InputError("the one line")

    monkeypatch.setitem(commands.COMMANDS, "inspect", noisy)
    code, err = cli(capsys, "inspect", "m.onnx")
    assert code == 2 and err == ["onnxprune: error: the one line"]


def _invalid_graph(kind: str) -> onnx.ModelProto:
    model = mlp_model([8, 16, 4], seed=3)
    nodes = list(model.graph.node)
    if kind == "cycle":
        nodes[0].input[0] = nodes[2].output[0]  # fc0 reads act0_out: a loop
    elif kind == "order":
        nodes[0], nodes[1] = nodes[1], nodes[0]
    elif kind == "dangling":
        nodes[1].input[1] = "nowhere"
    else:
        nodes[2].op_type = "NoSuchOp"
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


@pytest.mark.parametrize("kind", ["cycle", "order", "dangling", "unknown_op"])
def test_case24_invalid_input_is_blamed_on_the_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    path = _write(_invalid_graph(kind), tmp_path / "m.onnx")
    _every_command_refuses(tmp_path, capsys, path, "m.onnx", "invalid input model")


@pytest.mark.parametrize("data", ["nan", "inf", "empty"])
def test_case25_quantize_refuses_unusable_calibration_data(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str], data: str
) -> None:
    save(mlp, tmp_path / "m.onnx")
    arr = {"nan": np.full((4, 8), np.nan), "inf": np.full((4, 8), np.inf),
           "empty": np.zeros((0, 8))}[data].astype(np.float32)
    np.savez(tmp_path / "c.npz", x=arr)
    for argv in (["quantize", "m.onnx", "-o", "q.onnx", "--calibration", "c.npz"],
                 ["m.onnx", "-o", "q.onnx", "--sparsity", "0.25", "--calibration", "c.npz"]):
        code, err = cli(capsys, *argv)
        assert code == 2 and "c.npz" in err[0] and "'x'" in err[0]
        assert not (tmp_path / "q.onnx").exists()


# ------------------------------------------------------------------------ held promises


@pytest.mark.parametrize("location", ["/etc/passwd", "../outside.data", "link.data"])
def test_held_external_data_outside_the_folder_is_refused(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str], location: str
) -> None:
    (tmp_path / "outside.data").write_bytes(b"\0" * 4096)
    path = _external_variant(tmp_path, mlp, location=location)
    (path.parent / "link.data").symlink_to(tmp_path / "outside.data")
    before = folder_snapshot(tmp_path)
    for argv in (["ext/m.onnx", "-o", "o.onnx", "--sparsity", "0.25"],
                 ["inspect", "ext/m.onnx"], ["verify", "ext/m.onnx", "ext/m.onnx"]):
        code, err = cli(capsys, *argv)
        assert code == 2 and "fc0.weight" in err[0]
    assert folder_snapshot(tmp_path) == before


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch PWNED",))


def test_held_pickled_npz_never_runs(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str]
) -> None:
    save(mlp, tmp_path / "m.onnx")
    np.savez(tmp_path / "evil.npz", x=np.array([_Boom()], dtype=object))
    assert pickle.dumps(_Boom())  # the payload is real
    for argv in (["quantize", "m.onnx", "-o", "q.onnx", "--calibration", "evil.npz"],
                 ["verify", "m.onnx", "m.onnx", "--data", "evil.npz"]):
        code, err = cli(capsys, *argv)
        assert code == 2
    assert not (tmp_path / "PWNED").exists()


def test_held_writing_over_the_input_is_refused_by_every_spelling(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str]
) -> None:
    save(mlp, tmp_path / "m.onnx")
    (tmp_path / "sub").mkdir()
    os.link(tmp_path / "m.onnx", tmp_path / "hard.onnx")
    before = folder_snapshot(tmp_path)
    for out in ("m.onnx", "./m.onnx", "sub/../m.onnx", str(tmp_path / "m.onnx"),
                "hard.onnx"):
        code, err = cli(capsys, "m.onnx", "-o", out, "--sparsity", "0.25")
        assert code == 2, out
    assert folder_snapshot(tmp_path) == before


def test_held_api_prune_refuses_to_write_over_its_input(
    tmp_path: Path, mlp: onnx.ModelProto
) -> None:
    import onnxprune.api as api

    save(mlp, tmp_path / "m.onnx", external_data=True)
    before = folder_snapshot(tmp_path)
    for out in ("m.onnx", "m.onnx.data"):
        with pytest.raises(InputError):
            api.prune(str(tmp_path / "m.onnx"), output=tmp_path / out, sparsity=0.25)
    assert folder_snapshot(tmp_path) == before


def test_case13_bias_listed_as_graph_input_with_calibration(
    tmp_path: Path, mlp: onnx.ModelProto, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bias initializer listed as a graph input looks like a residual to the repair; the
    data does not feed it, so the calibrated run says so (exit 2), never a KeyError."""
    bias = next(t for t in mlp.graph.initializer if t.name.endswith(".bias") and
                t.name != "fc0.bias")
    mlp.graph.input.append(helper.make_tensor_value_info(bias.name, TensorProto.FLOAT,
                                                         list(bias.dims)))
    save(mlp, tmp_path / "m.onnx")
    before = sha256(tmp_path / "m.onnx")
    _calib(tmp_path / "calib.npz")
    code, err = cli(capsys, "m.onnx", "-o", "o.onnx", "--sparsity", "0.25",
                    "--calibration", "calib.npz")
    assert code in (0, 2), err
    if code == 2:
        assert len(err) == 1 and not (tmp_path / "o.onnx").exists()
    assert sha256(tmp_path / "m.onnx") == before
