"""Fuzzing the command line with mutated models (hypothesis).

Small valid models are mutated the ways careless tools and hostile files do it: structural
edits of the ModelProto (types, dims, initializer bytes, names, node order, op types,
attributes, opsets, external-data fields), then byte flips and truncations of the file.
Each case runs one command (prune, inspect, quantize or verify) in process and checks:

- the exit code is 0, 1 or 2 (3 is an internal error: a crash),
- exit 2 prints exactly one stderr line and writes no output, no report, no temp file,
- exit 1 (prune: verified but out of tolerance) writes a model that loads in onnxruntime,
- the input files are unchanged.

The default run holds a few hundred cases; `pytest -m fuzz tests/test_fuzz.py` runs
ONNXPRUNE_FUZZ_EXAMPLES (default 10,000) more. With ONNXPRUNE_FUZZ_LOG=FILE every case's
command and exit code are appended to FILE (JSON lines), for counting.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import folder_snapshot, mlp_model, random_input, save
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from onnxprune.cli import main

COMMANDS = ("prune", "inspect", "quantize", "verify")
OPS = ("Relu", "MatMul", "Add", "Gemm", "Identity", "Softmax", "Conv", "Reshape", "Transpose",
       "NoSuchOp", "", "Cast", "Mul")
WEIRD = ("", " ", "<", "x\ny", "ü", "a" * 300, "fc0.weight", "x", "y", "fc0_out", "\x00")
DIMS = (-(2**62), -7, -1, 0, 1, 2, 3, 8, 16, 4_000_000, 2**62)

_BASES: dict[str, onnx.ModelProto] = {}


def _base(kind: str) -> onnx.ModelProto:
    if kind not in _BASES:
        if kind == "matmul":
            _BASES[kind] = mlp_model([8, 16, 4], seed=3)
        elif kind == "gemm":
            _BASES[kind] = mlp_model([8, 16, 4], gemm=True, trans_b=True, seed=4)
        else:
            _BASES[kind] = mlp_model([8, 12, 12, 4], activation="Tanh", seed=5)
    copy = onnx.ModelProto()
    copy.CopyFrom(_BASES[kind])
    return copy


def _tensor_types() -> st.SearchStrategy[int]:
    return st.sampled_from([0, 1, 2, 3, 6, 7, 9, 10, 11, 16, 17, 21, 40, -3])


@st.composite
def structural_mutation(draw: st.DrawFn, model: onnx.ModelProto) -> str:
    """Applies one edit to `model` in place; returns its name (for the log), or "skip"
    when an earlier edit left nothing for this one to apply to."""
    try:
        return _mutate(draw, model)
    except (IndexError, ValueError, TypeError, KeyError):
        return "skip"


def _mutate(draw: st.DrawFn, model: onnx.ModelProto) -> str:
    g = model.graph
    kind = draw(st.sampled_from([
        "raw_bytes", "init_dims", "init_type", "input_type", "input_dim", "output_dim",
        "rename_input", "rename_output", "swap_nodes", "op_type", "attr_type", "attr_dup",
        "attr_drop", "drop_node", "drop_init", "dup_init", "init_as_input", "opset",
        "ir_version", "names", "domain", "nan_weight", "drop_output", "value_info",
        "typed_data",
    ]))
    nodes, inits = list(g.node), list(g.initializer)
    node = draw(st.sampled_from(nodes))
    init = draw(st.sampled_from(inits))
    if kind == "raw_bytes":
        cut = draw(st.integers(-8, 8))
        init.raw_data = init.raw_data[:cut] if cut < 0 else init.raw_data + b"\0" * cut
    elif kind == "init_dims":
        i = draw(st.integers(0, max(len(init.dims) - 1, 0)))
        if init.dims:
            init.dims[i] = draw(st.sampled_from(DIMS))
    elif kind == "init_type":
        init.data_type = draw(_tensor_types())
    elif kind == "input_type":
        g.input[0].type.tensor_type.elem_type = draw(_tensor_types())
    elif kind in ("input_dim", "output_dim"):
        vi = g.input[0] if kind == "input_dim" else g.output[0]
        dim = vi.type.tensor_type.shape.dim[draw(st.integers(0, 1))]
        dim.dim_value = draw(st.sampled_from(DIMS))
    elif kind == "rename_input":
        i = draw(st.integers(0, len(node.input) - 1))
        node.input[i] = draw(st.sampled_from(WEIRD + tuple(n.output[0] for n in nodes)))
    elif kind == "rename_output":
        node.output[0] = draw(st.sampled_from(WEIRD))
    elif kind == "swap_nodes":
        i, j = draw(st.integers(0, len(nodes) - 1)), draw(st.integers(0, len(nodes) - 1))
        nodes[i], nodes[j] = nodes[j], nodes[i]
        del g.node[:]
        g.node.extend(nodes)
    elif kind == "op_type":
        node.op_type = draw(st.sampled_from(OPS))
    elif kind == "attr_type":
        name = draw(st.sampled_from(["transB", "alpha", "axis", "perm", "to"]))
        value = draw(st.sampled_from([1, 1.5, "s", [1, 2], [0.5]]))
        node.attribute.append(helper.make_attribute(name, value))
    elif kind == "attr_dup":
        if node.attribute:
            node.attribute.append(node.attribute[0])
        else:
            node.attribute.extend([helper.make_attribute("axis", 1)] * 2)
    elif kind == "attr_drop":
        del node.attribute[:]
    elif kind == "drop_node":
        g.node.remove(node)
    elif kind == "drop_init":
        g.initializer.remove(init)
    elif kind == "dup_init":
        g.initializer.append(init)
    elif kind == "init_as_input":
        shape = draw(st.sampled_from([list(init.dims), [1], [3, 3]]))
        g.input.append(helper.make_tensor_value_info(init.name, init.data_type or 1, shape))
    elif kind == "opset":
        model.opset_import[0].version = draw(st.sampled_from([1, 7, 10, 11, 13, 17, 21, 99]))
    elif kind == "ir_version":
        model.ir_version = draw(st.sampled_from([0, 1, 3, 4, 7, 10, 99]))
    elif kind == "names":
        node.name = draw(st.sampled_from(WEIRD))
        model.producer_name = draw(st.sampled_from(WEIRD))
    elif kind == "domain":
        node.domain = draw(st.sampled_from(["com.microsoft", "x", "ai.onnx.ml", ""]))
    elif kind == "nan_weight":
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e38]))
        try:  # an earlier edit may have made the tensor unreadable or not float
            arr = onnx.numpy_helper.to_array(init).copy()
            if arr.size:
                arr.flat[0] = value
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
        except Exception:
            return "skip"
    elif kind == "drop_output":
        del g.output[:]
    elif kind == "value_info":
        g.value_info.append(helper.make_tensor_value_info(
            node.output[0], draw(_tensor_types()), draw(st.sampled_from([[1], [-1, 3], []]))))
    elif kind == "typed_data":
        count = draw(st.integers(0, 200))
        try:
            values = np.resize(onnx.numpy_helper.to_array(init).ravel(), count).astype(float)
        except Exception:
            return "skip"
        init.ClearField("raw_data")
        init.float_data.extend(values.tolist())
    return kind


def _byte_mutation(data: bytes, draw: st.DrawFn) -> tuple[bytes, str]:
    kind = draw(st.sampled_from(["flip", "truncate", "flips"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))], kind
    out = bytearray(data)
    for _ in range(1 if kind == "flip" else draw(st.integers(2, 8))):
        i = draw(st.integers(0, len(out) - 1))
        out[i] = draw(st.integers(0, 255))
    return bytes(out), kind


@st.composite
def fuzz_case(draw: st.DrawFn) -> dict[str, object]:
    model = _base(draw(st.sampled_from(["matmul", "gemm", "deep"])))
    external = draw(st.booleans())
    edits = [draw(structural_mutation(model)) for _ in range(draw(st.integers(0, 2)))]
    byte_level = draw(st.sampled_from([False, False, True]))
    return {"model": model, "external": external, "edits": edits,
            "byte_level": byte_level,
            "command": draw(st.sampled_from(COMMANDS)),
            "calibration": draw(st.booleans())}


def _write_case(case: dict[str, object], folder: Path, draw: st.DrawFn
                ) -> tuple[Path, list[str]]:
    model: onnx.ModelProto = case["model"]  # type: ignore[assignment]
    path = folder / "m.onnx"
    edits = list(case["edits"])  # type: ignore[call-overload]
    if case["external"]:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="m.onnx.data", size_threshold=0)
        if draw(st.booleans()):  # mutate the external references too
            proto = onnx.load(str(path), load_external_data=False)
            tensor = proto.graph.initializer[0]
            key = draw(st.sampled_from(["location", "offset", "length"]))
            value = draw(st.sampled_from(["../m.onnx.data", "/etc/hostname", "nope.data",
                                          "-4", "99999999", "3", "m.onnx", "", "abc"]))
            tensor.external_data.append(onnx.StringStringEntryProto(key=key, value=value))
            for e in list(tensor.external_data)[:-1]:
                if e.key == key:
                    tensor.external_data.remove(e)
            path.write_bytes(proto.SerializeToString())
            edits.append(f"external_{key}")
        if draw(st.booleans()):
            data = folder / "m.onnx.data"
            data.write_bytes(data.read_bytes()[: draw(st.integers(0, data.stat().st_size))])
            edits.append("external_truncate")
    else:
        path.write_bytes(model.SerializeToString())
    if case["byte_level"]:
        mutated, kind = _byte_mutation(path.read_bytes(), draw)
        path.write_bytes(mutated)
        edits.append(kind)
    return path, edits


def _argv(command: str, path: Path, folder: Path, calibration: bool) -> list[str]:
    calib = folder / "calib.npz"
    if command == "prune":
        # Robustness, not quality, is under test: a loose gate so clean runs exit 0.
        argv = [str(path), "-o", str(folder / "out" / "o.onnx"), "--sparsity", "0.25",
                "--min-cosine", "0.5", "--report", str(folder / "out" / "r.json")]
        return argv + (["--calibration", str(calib)] if calibration else [])
    if command == "inspect":
        return ["inspect", str(path), "--report", str(folder / "out" / "r.json")]
    if command == "quantize":
        argv = ["quantize", str(path), "-o", str(folder / "out" / "q.onnx")]
        return argv + (["--calibration", str(calib)] if calibration else ["--weight-only"])
    reference = folder / "ref.onnx"
    return ["verify", str(reference), str(path), "--report", str(folder / "out" / "r.json")]


def check_case(case: dict[str, object], draw: st.DrawFn) -> int:
    """Runs one case and checks the property; returns the exit code."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "out").mkdir()
        save(_base("matmul"), folder / "ref.onnx")
        np.savez(folder / "calib.npz", x=random_input([8, 8], seed=2))
        path, edits = _write_case(case, folder, draw)
        command = str(case["command"])
        argv = _argv(command, path, folder, bool(case["calibration"]))
        before = folder_snapshot(folder)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        where = f"{command} {edits}: exit {code}: {err.getvalue()!r}"
        if code == 3:
            where += _traceback(argv)
        _log(command, edits, code, lines)
        assert code in (0, 1, 2), where
        assert "Traceback" not in err.getvalue(), where
        after = folder_snapshot(folder)
        written = {k for k in after if k.startswith("out/")}
        assert {k: v for k, v in after.items() if not k.startswith("out/")} == before, where
        if code == 2:
            assert len(lines) == 1, where
            assert written == set(), where
        if code in (0, 1) and command in ("prune", "quantize"):
            out = next(folder / k for k in written if k.endswith(".onnx"))
            onnx.checker.check_model(str(out), full_check=True)
            ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        if code == 1 and command == "verify":
            assert len(lines) == 1, where
        return code


def _traceback(argv: list[str]) -> str:
    """The traceback of an internal error, for the failure message."""
    import traceback

    os.environ["ONNXPRUNE_DEBUG"] = "1"
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(
                io.StringIO()):
            main(argv)
    except Exception:
        return "\n" + "".join(traceback.format_exc()[-3000:])
    finally:
        del os.environ["ONNXPRUNE_DEBUG"]
    return ""


def _log(command: str, edits: list[str], code: int, lines: list[str]) -> None:
    target = os.environ.get("ONNXPRUNE_FUZZ_LOG")
    if target:
        with open(target, "a") as f:
            f.write(json.dumps({"command": command, "edits": edits, "code": code,
                                "stderr": lines[:1]}) + "\n")


_SETTINGS = dict(deadline=None, database=None, derandomize=True,
                 suppress_health_check=list(HealthCheck))


@settings(max_examples=250, **_SETTINGS)  # type: ignore[arg-type]
@given(case=fuzz_case(), data=st.data())
def test_fuzz_default(case: dict[str, object], data: st.DataObject) -> None:
    check_case(case, data.draw)


@pytest.mark.fuzz
@settings(max_examples=int(os.environ.get("ONNXPRUNE_FUZZ_EXAMPLES", "10000")),
          **{**_SETTINGS, "derandomize": False})  # type: ignore[arg-type]
@given(case=fuzz_case(), data=st.data())
def test_fuzz_many(case: dict[str, object], data: st.DataObject) -> None:
    check_case(case, data.draw)


def test_fuzz_property_holds_for_a_clean_and_a_truncated_model() -> None:
    """The harness is not vacuous: an unmutated model runs clean (exit 0, output loads)
    and a truncated one is refused (exit 2, nothing written)."""
    clean = {"model": _base("matmul"), "external": False, "edits": [],
             "byte_level": False, "command": "prune", "calibration": True}
    assert check_case(clean, _FixedDraw([])) == 0
    truncated = dict(clean, byte_level=True)
    assert check_case(truncated, _FixedDraw(["truncate", 10])) == 2


class _FixedDraw:
    """A stand-in for hypothesis' draw that replays fixed answers."""

    def __init__(self, answers: list[object]) -> None:
        self.answers = list(answers)

    def __call__(self, strategy: object) -> object:
        return self.answers.pop(0)


@st.composite
def data_case(draw: st.DrawFn) -> tuple[bytes, str]:
    """A calibration .npz with flipped or cut bytes, or a hostile header."""
    buf = io.BytesIO()
    np.savez(buf, x=random_input([8, 8], seed=2))
    data, kind = _byte_mutation(buf.getvalue(), draw)
    return data, kind


def check_data_case(data: bytes, command: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "out").mkdir()
        save(_base("matmul"), folder / "m.onnx")
        (folder / "calib.npz").write_bytes(data)
        if command == "quantize":
            argv = ["quantize", str(folder / "m.onnx"), "-o", str(folder / "out" / "q.onnx"),
                    "--calibration", str(folder / "calib.npz")]
        else:
            argv = ["verify", str(folder / "m.onnx"), str(folder / "m.onnx"), "--data",
                    str(folder / "calib.npz")]
        before = folder_snapshot(folder)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        where = f"{command}: exit {code}: {err.getvalue()!r}"
        if code == 3:
            where += _traceback(argv)
        _log(command + "-data", [], code, lines)
        assert code in (0, 1, 2), where
        after = folder_snapshot(folder)
        assert {k: v for k, v in after.items() if not k.startswith("out/")} == before, where
        if code:
            assert len(lines) == 1, where
        if code == 2:
            assert not any(k.startswith("out/") for k in after), where
        return code


@settings(max_examples=60, **_SETTINGS)  # type: ignore[arg-type]
@given(case=data_case(), command=st.sampled_from(["quantize", "verify"]))
def test_fuzz_calibration_files(case: tuple[bytes, str], command: str) -> None:
    check_data_case(case[0], command)


@pytest.mark.fuzz
@settings(max_examples=int(os.environ.get("ONNXPRUNE_FUZZ_DATA_EXAMPLES", "1000")),
          **{**_SETTINGS, "derandomize": False})  # type: ignore[arg-type]
@given(case=data_case(), command=st.sampled_from(["quantize", "verify"]))
def test_fuzz_calibration_files_many(case: tuple[bytes, str], command: str) -> None:
    check_data_case(case[0], command)


@pytest.mark.parametrize("command", ["prune", "verify"])
def test_fuzz_in_a_real_process(tmp_path: Path, command: str) -> None:
    """A few cases through `python -m onnxprune`: stderr is the real one there, with the
    libraries' own logging and warnings (PYTHONWARNINGS=always)."""
    import subprocess
    import sys

    from helpers import REPO

    model = _base("gemm")
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    (tmp_path / "out").mkdir()
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    save(_base("matmul"), tmp_path / "ref.onnx")
    np.savez(tmp_path / "calib.npz", x=random_input([8, 8], seed=2))
    before = folder_snapshot(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "always"}
    done = subprocess.run([sys.executable, "-m", "onnxprune",
                           *_argv(command, path, tmp_path, True)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "fc0.weight" in done.stderr
    assert folder_snapshot(tmp_path) == before
