"""onnxprune.io.models: refusing unusable model files, atomic saves, external data."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import (
    DIGITS,
    DIGITS_TEST,
    folder_snapshot,
    mlp_model,
    random_input,
    run,
    save,
    sha256,
    weights,
)

from onnxprune.errors import InputError
from onnxprune.io.models import check_output_path, load_model, save_model, uses_external_data

X = random_input([5, 8], seed=1)


@pytest.fixture
def model() -> onnx.ModelProto:
    return mlp_model([8, 16, 4], seed=3)


@pytest.fixture
def ext_dir(tmp_path: Path, model: onnx.ModelProto) -> Path:
    """A folder holding m.onnx whose tensors live in m.onnx.data."""
    folder = tmp_path / "ext"
    folder.mkdir()
    save(model, folder / "m.onnx", external_data=True)
    assert (folder / "m.onnx.data").is_file()
    return folder


def _with_location(src: Path, dst: Path, location: str) -> Path:
    """A copy of the external-data model `src` whose tensors all point at `location`."""
    proto = onnx.load(str(src), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, str(dst))
    return dst


def _assert_refused(path: Path, *words: str) -> InputError:
    with pytest.raises(InputError) as info:
        load_model(path)
    message = str(info.value)
    assert str(path) in message, message
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return info.value


# ------------------------------------------------------------------------ load errors


def test_load_valid_model_runs_like_the_original(tmp_path: Path, model: onnx.ModelProto) -> None:
    path = save(model, tmp_path / "m.onnx")
    loaded = load_model(path)
    assert isinstance(loaded, ir.Model)
    assert not uses_external_data(loaded)
    np.testing.assert_array_equal(run(loaded, {"x": X})[0], run(model, {"x": X})[0])


def test_load_missing_file(tmp_path: Path) -> None:
    _assert_refused(tmp_path / "nope.onnx", "no such file")


def test_load_directory(tmp_path: Path) -> None:
    _assert_refused(tmp_path, "folder")


def test_load_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.onnx"
    path.write_text("this is a text file, not a protobuf\n" * 20)
    _assert_refused(path, "not a readable ONNX model")


@pytest.mark.parametrize(
    "junk",
    [b"\0" * 1000, b"\xff" * 100, b'{"graph": 1}', np.random.default_rng(0).bytes(5000)],
    ids=["zeros", "ff", "json", "random"],
)
def test_load_junk_bytes(tmp_path: Path, junk: bytes) -> None:
    path = tmp_path / "junk.onnx"
    path.write_bytes(junk)
    _assert_refused(path, "not a readable ONNX model")


def test_load_npz_renamed(tmp_path: Path) -> None:
    path = tmp_path / "data.onnx"
    path.write_bytes(DIGITS_TEST.read_bytes())
    _assert_refused(path, "not a readable ONNX model")


def test_load_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    _assert_refused(path)


@pytest.mark.parametrize("fraction", [0.5, 0.25, 0.9])
def test_load_truncated_file(tmp_path: Path, fraction: float) -> None:
    data = DIGITS.read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: int(len(data) * fraction)])
    _assert_refused(path, "truncated")


def test_load_external_data_absolute_location(ext_dir: Path) -> None:
    path = _with_location(ext_dir / "m.onnx", ext_dir / "abs.onnx", str(ext_dir / "m.onnx.data"))
    _assert_refused(path, "absolute")


def test_load_external_data_dotdot_escape(ext_dir: Path) -> None:
    (ext_dir.parent / "m.onnx.data").write_bytes((ext_dir / "m.onnx.data").read_bytes())
    path = _with_location(ext_dir / "m.onnx", ext_dir / "up.onnx", "../m.onnx.data")
    _assert_refused(path, "escapes")


def test_load_external_data_symlink_outside(ext_dir: Path) -> None:
    outside = ext_dir.parent / "elsewhere.data"
    outside.write_bytes((ext_dir / "m.onnx.data").read_bytes())
    os.symlink(outside, ext_dir / "link.data")
    path = _with_location(ext_dir / "m.onnx", ext_dir / "link.onnx", "link.data")
    _assert_refused(path, "escapes")


def test_load_external_data_missing_file(ext_dir: Path) -> None:
    path = _with_location(ext_dir / "m.onnx", ext_dir / "gone.onnx", "gone.data")
    _assert_refused(path, "does not exist")


def test_load_external_data_subfolder_is_allowed(ext_dir: Path, model: onnx.ModelProto) -> None:
    (ext_dir / "weights").mkdir()
    os.replace(ext_dir / "m.onnx.data", ext_dir / "weights" / "w.data")
    path = _with_location(ext_dir / "m.onnx", ext_dir / "sub.onnx", "weights/w.data")
    loaded = load_model(path)
    np.testing.assert_array_equal(run(loaded, {"x": X})[0], run(model, {"x": X})[0])


def test_refusals_read_nothing_and_change_nothing(ext_dir: Path) -> None:
    path = _with_location(ext_dir / "m.onnx", ext_dir / "up.onnx", "../m.onnx.data")
    before = folder_snapshot(ext_dir.parent)
    with pytest.raises(InputError):
        load_model(path)
    assert folder_snapshot(ext_dir.parent) == before


# ------------------------------------------------------------------------ saving


def test_save_leaves_no_temp_files(tmp_path: Path, model: onnx.ModelProto) -> None:
    out = save_model(ir.serde.deserialize_model(model), tmp_path / "out.onnx")
    assert out == tmp_path / "out.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    onnx.checker.check_model(str(out), full_check=True)
    np.testing.assert_array_equal(run(out, {"x": X})[0], run(model, {"x": X})[0])


def test_save_uses_ordinary_file_permissions(tmp_path: Path, model: onnx.ModelProto) -> None:
    """The temp file behind the atomic save must not leave the model private (0600)."""
    old = os.umask(0o022)
    try:
        out = save_model(ir.serde.deserialize_model(model), tmp_path / "out.onnx")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_save_overwrite_keeps_existing_permissions(
    tmp_path: Path, model: onnx.ModelProto
) -> None:
    dest = save(mlp_model([8, 16, 4], seed=9), tmp_path / "out.onnx")
    os.chmod(dest, 0o640)
    save_model(ir.serde.deserialize_model(model), dest)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640
    np.testing.assert_array_equal(run(dest, {"x": X})[0], run(model, {"x": X})[0])


def test_save_failure_leaves_destination_unchanged(
    tmp_path: Path, model: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = save(mlp_model([8, 16, 4], seed=7), tmp_path / "out.onnx")
    before = folder_snapshot(tmp_path)

    def broken_save(*args: object, **kwargs: object) -> None:
        path = Path(args[1])  # type: ignore[arg-type]
        path.write_bytes(b"half a model")  # a partial write, then the failure
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ir, "save", broken_save)
    with pytest.raises(InputError, match="No space left"):
        save_model(ir.serde.deserialize_model(model), dest)
    assert folder_snapshot(tmp_path) == before  # no temp file, destination intact


def test_save_failure_on_new_destination_creates_nothing(
    tmp_path: Path, model: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_save(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ir, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_model(ir.serde.deserialize_model(model), tmp_path / "new.onnx")
    assert list(tmp_path.iterdir()) == []


def test_save_failure_at_rename_removes_temp(
    tmp_path: Path, model: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_replace(src: object, dst: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(InputError, match="Permission denied"):
        save_model(ir.serde.deserialize_model(model), tmp_path / "new.onnx")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ external data


def test_external_data_round_trip(tmp_path: Path, model: onnx.ModelProto) -> None:
    src = ir.serde.deserialize_model(model)
    out = save_model(src, tmp_path / "big.onnx", external_data=True)
    assert (tmp_path / "big.onnx.data").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    loaded = load_model(out)
    assert uses_external_data(loaded)
    got = {name: v.const_value.numpy() for name, v in loaded.graph.initializers.items()}
    want = weights(model)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    np.testing.assert_array_equal(run(out, {"x": X})[0], run(model, {"x": X})[0])


def test_save_keeps_external_data_when_input_had_it(
    ext_dir: Path, tmp_path: Path, model: onnx.ModelProto
) -> None:
    loaded = load_model(ext_dir / "m.onnx")
    assert uses_external_data(loaded)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = save_model(loaded, out_dir / "small.onnx")  # external_data=None: follow the input
    assert sorted(p.name for p in out_dir.iterdir()) == ["small.onnx", "small.onnx.data"]
    proto = onnx.load(str(out), load_external_data=False)
    locations = {
        e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"
    }
    assert locations == {"small.onnx.data"}
    np.testing.assert_array_equal(run(out, {"x": X})[0], run(model, {"x": X})[0])
    # The source folder is untouched by saving elsewhere.
    assert sorted(p.name for p in ext_dir.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_save_inline_when_asked(ext_dir: Path, tmp_path: Path, model: onnx.ModelProto) -> None:
    out = save_model(load_model(ext_dir / "m.onnx"), tmp_path / "inline.onnx",
                     external_data=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["inline.onnx"]
    np.testing.assert_array_equal(run(out, {"x": X})[0], run(model, {"x": X})[0])


def test_external_data_loaded_model_reads_modified_weights(
    ext_dir: Path, tmp_path: Path, model: onnx.ModelProto
) -> None:
    loaded = load_model(ext_dir / "m.onnx")
    w = loaded.graph.initializers["fc0.weight"]
    w.const_value = ir.tensor(np.zeros((8, 16), np.float32), name="fc0.weight")
    out = save_model(loaded, tmp_path / "z.onnx")
    saved = weights(onnx.load(str(out)))
    np.testing.assert_array_equal(saved["fc0.weight"], np.zeros((8, 16), np.float32))
    np.testing.assert_array_equal(saved["fc1.weight"], weights(model)["fc1.weight"])


# ------------------------------------------------------------------------ output paths


def test_check_output_path_refuses_the_input(tmp_path: Path, model: onnx.ModelProto) -> None:
    src = save(model, tmp_path / "m.onnx")
    with pytest.raises(InputError, match="is the input model") as info:
        check_output_path(src, [src])
    assert str(src) in str(info.value)
    # Another spelling of the same file is the same file.
    with pytest.raises(InputError):
        check_output_path(tmp_path / "." / "m.onnx", [src])
    assert check_output_path(src, [src], force=True) == src


def test_check_output_path_refuses_a_path_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"x")
    out = tmp_path / "m.onnx" / "sub" / "out.onnx"
    with pytest.raises(InputError, match="is not a folder|Not a directory") as info:
        check_output_path(out, [tmp_path / "m.onnx"])
    assert str(tmp_path / "m.onnx") in str(info.value)


def test_cli_creates_a_missing_output_folder_only_when_it_writes(tmp_path: Path) -> None:
    from helpers import DIGITS

    from onnxprune.cli import main

    out = tmp_path / "a" / "b" / "out.onnx"
    assert main([str(DIGITS), "-o", str(out), "--sparsity", "0.25", "--no-verify"]) == 0
    assert out.is_file()
    bad = tmp_path / "c" / "out.onnx"
    assert main([str(DIGITS), "-o", str(bad), "--sparsity", "2"]) == 2
    assert not (tmp_path / "c").exists()


def test_check_output_path_refuses_a_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="folder"):
        check_output_path(tmp_path, [tmp_path / "m.onnx"])


def test_check_output_path_accepts_new_file(tmp_path: Path, model: onnx.ModelProto) -> None:
    src = save(model, tmp_path / "m.onnx")
    before = sha256(src)
    assert check_output_path(tmp_path / "o.onnx", [src]) == tmp_path / "o.onnx"
    assert not (tmp_path / "o.onnx").exists()
    assert sha256(src) == before


# ------------------------------------------------------------------ hardened output paths


def test_check_output_path_refuses_links_and_special_files(
    tmp_path: Path, model: onnx.ModelProto
) -> None:
    src = save(model, tmp_path / "m.onnx")
    (tmp_path / "link.onnx").symlink_to(tmp_path / "elsewhere.onnx")
    os.mkfifo(tmp_path / "fifo.onnx")
    for name in ("link.onnx", "fifo.onnx"):
        with pytest.raises(InputError):
            check_output_path(tmp_path / name, [src])
    (tmp_path / "o.onnx.data").symlink_to(tmp_path / "victim")
    with pytest.raises(InputError, match="symbolic link"):
        check_output_path(tmp_path / "o.onnx", [src])


def test_save_never_reuses_a_data_file_the_model_reads(
    ext_dir: Path, model: onnx.ModelProto
) -> None:
    """Saving a loaded external-data model over its own path (--force) writes new data
    under a new name; the old data file stays, since the model in memory still reads it."""
    before = sha256(ext_dir / "m.onnx.data")
    loaded = load_model(ext_dir / "m.onnx")
    out = save_model(loaded, ext_dir / "m.onnx")
    proto = onnx.load(str(out), load_external_data=False)
    (location,) = {e.value for t in proto.graph.initializer for e in t.external_data
                   if e.key == "location"}
    assert location.startswith("m.onnx.") and location != "m.onnx.data"
    assert sha256(ext_dir / "m.onnx.data") == before
    np.testing.assert_array_equal(run(out, {"x": X})[0], run(model, {"x": X})[0])
    np.testing.assert_array_equal(run(loaded, {"x": X})[0], run(model, {"x": X})[0])


def test_sessions_never_read_the_working_directory(
    ext_dir: Path, tmp_path: Path, model: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnxprune.io.models import model_bytes
    from onnxprune.io.runtime import make_session

    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "m.onnx.data").write_bytes(b"\0" * (ext_dir / "m.onnx.data").stat().st_size)
    monkeypatch.chdir(decoy)
    loaded = load_model(ext_dir / "m.onnx")
    got = make_session(loaded).run(None, {"x": X})[0]
    np.testing.assert_array_equal(got, run(model, {"x": X})[0])
    data = model_bytes(loaded)
    assert data.base_dir == str(ext_dir.resolve())
    plain = onnx.load(str(ext_dir / "m.onnx"), load_external_data=False).SerializeToString()
    with pytest.raises(Exception, match="nonexistent"):  # plain bytes: never the cwd
        make_session(plain)
