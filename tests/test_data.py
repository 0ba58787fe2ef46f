"""onnxprune.calibration.data: reading .npz batches, checking them, generating inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from helpers import DIGITS, DIGITS_TEST, passthrough_model, run, to_ir
from onnx import TensorProto

from onnxprune.calibration.data import (
    InputSpec,
    batch_files,
    input_specs,
    load_batches,
    parse_shape_overrides,
    random_batches,
)
from onnxprune.errors import DataError, InputError
from onnxprune.io.models import load_model

TEXT_INPUTS = {
    "input_ids": (TensorProto.INT64, ["batch", "seq"]),
    "attention_mask": (TensorProto.INT64, ["batch", "seq"]),
    "token_type_ids": (TensorProto.INT64, ["batch", "seq"]),
}


@pytest.fixture
def text_specs() -> list[InputSpec]:
    return input_specs(to_ir(passthrough_model(TEXT_INPUTS)))


@pytest.fixture
def image_specs() -> list[InputSpec]:
    """x float32 [batch, 3, 4]: one symbolic and two fixed dims."""
    return input_specs(to_ir(passthrough_model({"x": (TensorProto.FLOAT, ["batch", 3, 4])})))


def _text_batch(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(0, 1000, size=(batch, seq), dtype=np.int64),
        "attention_mask": np.ones((batch, seq), np.int64),
        "token_type_ids": np.zeros((batch, seq), np.int64),
    }


def _expect_error(path: Path, specs: list[InputSpec], *words: str) -> str:
    with pytest.raises(DataError) as info:
        list(load_batches(path, specs))
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


# ------------------------------------------------------------------------ input specs


def test_input_specs_of_digits() -> None:
    (spec,) = input_specs(load_model(DIGITS))
    assert spec == InputSpec("pixels", np.dtype(np.float32), ("batch", 64))


def test_input_specs_skip_initializers_listed_as_inputs() -> None:
    model = to_ir(passthrough_model({"x": (TensorProto.FLOAT, ["n", 2])}))
    # An initializer that is also a graph input (an overridable default) is not data.
    value = ir.Value(name="w", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    value.const_value = ir.tensor(np.ones(2, np.float32), name="w")
    model.graph.initializers.add(value)
    model.graph.inputs.append(value)
    assert [s.name for s in input_specs(model)] == ["x"]


# ------------------------------------------------------------------------ loading


def test_single_npz_loads_and_runs() -> None:
    specs = input_specs(load_model(DIGITS))
    (batch,) = list(load_batches(DIGITS_TEST, specs))
    assert batch["pixels"].shape == (500, 64)
    assert batch["pixels"].dtype == np.float32
    with np.load(DIGITS_TEST) as f:
        np.testing.assert_array_equal(batch["pixels"], f["pixels"])
    (logits,) = run(DIGITS, batch)
    assert logits.shape == (500, 10)


def test_folder_loads_in_name_order_with_varying_lengths(
    tmp_path: Path, text_specs: list[InputSpec]
) -> None:
    lengths = {"b00.npz": 7, "b01.npz": 3, "b02.npz": 12, "b10.npz": 5}
    for i, (name, seq) in enumerate(sorted(lengths.items(), reverse=True)):
        np.savez(tmp_path / name, **_text_batch(2, seq, seed=i))
    (tmp_path / "README.txt").write_text("not a batch")
    (tmp_path / "labels.npy").write_bytes(b"ignored, not .npz")
    assert [f.name for f in batch_files(tmp_path)] == sorted(lengths)
    batches = list(load_batches(tmp_path, text_specs))
    assert [b["input_ids"].shape for b in batches] == [(2, lengths[n]) for n in sorted(lengths)]
    for b in batches:
        assert set(b) == set(TEXT_INPUTS)
        assert all(a.dtype == np.int64 for a in b.values())
    # The arrays are the ones written to that file.
    with np.load(tmp_path / "b02.npz") as f:
        np.testing.assert_array_equal(batches[2]["input_ids"], f["input_ids"])


def test_batches_are_generated_lazily(tmp_path: Path, text_specs: list[InputSpec]) -> None:
    np.savez(tmp_path / "a.npz", **_text_batch(1, 4, seed=0))
    bad = _text_batch(1, 4, seed=1)
    del bad["attention_mask"]
    np.savez(tmp_path / "b.npz", **bad)
    it = load_batches(tmp_path, text_specs)
    assert next(it)["input_ids"].shape == (1, 4)  # the good batch comes first ...
    with pytest.raises(DataError, match="b.npz"):  # ... and only the bad one fails
        next(it)


def test_safe_dtype_conversion(tmp_path: Path, image_specs: list[InputSpec]) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 4))  # float64
    np.savez(tmp_path / "d.npz", x=x)
    (batch,) = list(load_batches(tmp_path / "d.npz", image_specs))
    assert batch["x"].dtype == np.float32
    np.testing.assert_array_equal(batch["x"], x.astype(np.float32))


# ------------------------------------------------------------------------ bad data


def test_wrong_input_name(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, pixel=np.zeros((2, 64), np.float32))
    _expect_error(path, input_specs(load_model(DIGITS)), "'pixels'", str(path), "pixel")


def test_extra_array(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, pixels=np.zeros((2, 64), np.float32), labels=np.zeros(2, np.int64))
    _expect_error(path, input_specs(load_model(DIGITS)), "'labels'", "matches no model input")


def test_missing_input(tmp_path: Path, text_specs: list[InputSpec]) -> None:
    batch = _text_batch(2, 5, seed=0)
    del batch["token_type_ids"]
    path = tmp_path / "d.npz"
    np.savez(path, **batch)
    _expect_error(path, text_specs, "'token_type_ids'", str(path))


def test_wrong_rank(tmp_path: Path, image_specs: list[InputSpec]) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((3, 4), np.float32))
    _expect_error(path, image_specs, "'x'", "rank 2", "expects 3")


def test_wrong_fixed_dim(tmp_path: Path, image_specs: list[InputSpec]) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((2, 3, 5), np.float32))
    _expect_error(path, image_specs, "'x'", "size 5 on axis 2", "expects 4")


def test_symbolic_dim_accepts_any_size(tmp_path: Path, image_specs: list[InputSpec]) -> None:
    for n in (1, 17):
        np.savez(tmp_path / f"b{n:02d}.npz", x=np.zeros((n, 3, 4), np.float32))
    assert [b["x"].shape[0] for b in load_batches(tmp_path, image_specs)] == [1, 17]


def test_float_data_for_int64_input(tmp_path: Path, text_specs: list[InputSpec]) -> None:
    batch = _text_batch(2, 5, seed=0)
    batch["input_ids"] = batch["input_ids"].astype(np.float32)
    path = tmp_path / "d.npz"
    np.savez(path, **batch)
    _expect_error(path, text_specs, "'input_ids'", "float32", "int64")


def test_int_data_for_bool_input(tmp_path: Path) -> None:
    specs = input_specs(to_ir(passthrough_model({"m": (TensorProto.BOOL, ["n"])})))
    path = tmp_path / "d.npz"
    np.savez(path, m=np.ones(3, np.int64))
    _expect_error(path, specs, "'m'", "bool")


def test_empty_folder(tmp_path: Path, image_specs: list[InputSpec]) -> None:
    (tmp_path / "notes.txt").write_text("no batches here")
    _expect_error(tmp_path, image_specs, str(tmp_path), "no .npz")


def test_missing_data_path(tmp_path: Path, image_specs: list[InputSpec]) -> None:
    _expect_error(tmp_path / "nope.npz", image_specs, "nope.npz")


def test_not_npz_suffix(tmp_path: Path, image_specs: list[InputSpec]) -> None:
    path = tmp_path / "d.npy"
    np.save(path, np.zeros((2, 3, 4), np.float32))
    _expect_error(path, image_specs, str(path), ".npz")


def test_corrupt_npz(tmp_path: Path, image_specs: list[InputSpec]) -> None:
    path = tmp_path / "d.npz"
    path.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    _expect_error(path, image_specs, str(path), "not a readable .npz")


def test_pickled_npz_is_refused(tmp_path: Path, image_specs: list[InputSpec]) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    _expect_error(path, image_specs, str(path))


def test_data_error_is_an_input_error() -> None:
    assert issubclass(DataError, InputError)


# ------------------------------------------------------------------------ generated inputs


def test_random_batches_default_symbolic_dims(text_specs: list[InputSpec]) -> None:
    batches = random_batches(text_specs, count=3, default_dim=5, seed=0)
    assert len(batches) == 3
    for b in batches:
        assert {k: v.shape for k, v in b.items()} == {k: (5, 5) for k in TEXT_INPUTS}
        assert b["input_ids"].dtype == np.int64
        assert b["input_ids"].min() >= 0 and b["input_ids"].max() < 100
        mask = b["attention_mask"]  # valid: ones, then padding zeros; row 0 unpadded
        assert mask.dtype == np.int64 and set(np.unique(mask)) <= {0, 1}
        assert mask[0].all() and (mask.sum(1) >= 3).all()
        assert (np.diff(mask, axis=1) <= 0).all()  # zeros only trail
        np.testing.assert_array_equal(b["token_type_ids"], np.zeros((5, 5), np.int64))
    assert not np.array_equal(batches[0]["input_ids"], batches[1]["input_ids"])


def test_random_batches_are_seeded(image_specs: list[InputSpec]) -> None:
    a = random_batches(image_specs, seed=3)
    b = random_batches(image_specs, seed=3)
    c = random_batches(image_specs, seed=4)
    np.testing.assert_array_equal(a[0]["x"], b[0]["x"])
    assert not np.array_equal(a[0]["x"], c[0]["x"])
    assert a[0]["x"].shape == (4, 3, 4) and a[0]["x"].dtype == np.float32


def test_override_sets_shared_symbols(text_specs: list[InputSpec]) -> None:
    """--shape input_ids:2,9 gives every input that shares batch/seq the same shape."""
    overrides = parse_shape_overrides(["input_ids:2,9"])
    (b,) = random_batches(text_specs, overrides, count=1)
    assert {k: v.shape for k, v in b.items()} == {k: (2, 9) for k in TEXT_INPUTS}
    outs = run(passthrough_model(TEXT_INPUTS), b)
    assert [o.shape for o in outs] == [(2, 9)] * 3


def test_override_of_fixed_dims_must_match(image_specs: list[InputSpec]) -> None:
    (b,) = random_batches(image_specs, {"x": (6, 3, 4)}, count=1)
    assert b["x"].shape == (6, 3, 4)
    with pytest.raises(DataError, match="x: size 5 on axis 2.*fixed at 4"):
        random_batches(image_specs, {"x": (6, 3, 5)})


def test_override_wrong_rank(image_specs: list[InputSpec]) -> None:
    with pytest.raises(DataError, match="rank 3"):
        random_batches(image_specs, {"x": (6, 3)})


def test_override_unknown_input(image_specs: list[InputSpec]) -> None:
    with pytest.raises(DataError, match="'y'.*not a model input"):
        random_batches(image_specs, {"y": (1,)})


def test_unknown_rank_needs_override() -> None:
    specs = input_specs(to_ir(passthrough_model({"u": (TensorProto.FLOAT, None)})))
    assert specs[0].dims is None
    with pytest.raises(DataError, match="'u'.*--shape"):
        random_batches(specs)
    (b,) = random_batches(specs, {"u": (2, 7)}, count=1)
    assert b["u"].shape == (2, 7)


def test_random_batch_runs_on_digits() -> None:
    specs = input_specs(load_model(DIGITS))
    (b,) = random_batches(specs, parse_shape_overrides(["pixels:3,64"]), count=1)
    (logits,) = run(DIGITS, b)
    assert logits.shape == (3, 10) and np.all(np.isfinite(logits))


# ------------------------------------------------------------------------ --shape parsing


def test_parse_shape_overrides() -> None:
    assert parse_shape_overrides([]) == {}
    assert parse_shape_overrides(["input_ids:8,128", "x:3"]) == {
        "input_ids": (8, 128),
        "x": (3,),
    }
    # Input names may contain colons; the last one separates the dims.
    assert parse_shape_overrides(["encoder:input:1,2"]) == {"encoder:input": (1, 2)}


@pytest.mark.parametrize(
    "item", ["x", "x:", ":2,3", "x:2,a", "x:0,3", "x:-1", "x:2,,3", "x:2.5", "x=2,3"]
)
def test_parse_shape_overrides_errors(item: str) -> None:
    with pytest.raises(DataError) as info:
        parse_shape_overrides([item])
    message = str(info.value)
    assert f"'{item}'" in message and "NAME:D0,D1" in message


# ------------------------------------------------------------------ limits (header checks)


def test_npz_nbytes_reads_headers_only(tmp_path: Path) -> None:
    from onnxprune.calibration.data import npz_nbytes

    x = np.zeros((64, 3, 4), np.float32)
    np.savez_compressed(tmp_path / "a.npz", x=x, y=np.ones(5, np.int64))
    got = npz_nbytes(tmp_path / "a.npz")
    assert x.nbytes + 40 <= got <= x.nbytes + 40 + 2 * 256  # arrays plus two .npy headers


def test_data_budget_refuses_before_loading(
    tmp_path: Path, image_specs: list[InputSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnxprune.calibration.data import data_budget, memory_budget

    for i in range(3):
        np.savez(tmp_path / f"b{i}.npz", x=np.zeros((100, 3, 4), np.float32))
    loads = []
    real = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: loads.append(a) or real(*a, **k))
    with data_budget(10_000):
        assert memory_budget() == 10_000
        with pytest.raises(DataError, match="b2.npz.*memory budget of 10000"):
            list(load_batches(tmp_path, image_specs))
    assert loads == []  # refused from the headers, before any array was read
    assert memory_budget() != 10_000
    assert len(list(load_batches(tmp_path, image_specs))) == 3
    with pytest.raises(DataError, match="positive"), data_budget(0):
        pass


def test_fifo_in_a_folder_is_skipped_and_refused_alone(
    tmp_path: Path, image_specs: list[InputSpec]
) -> None:
    import os

    np.savez(tmp_path / "a.npz", x=np.zeros((2, 3, 4), np.float32))
    os.mkfifo(tmp_path / "b.npz")
    assert [f.name for f in batch_files(tmp_path)] == ["a.npz"]
    with pytest.raises(DataError, match="not a regular file"):
        batch_files(tmp_path / "b.npz")


def test_npy_under_npz_name_and_object_arrays(
    tmp_path: Path, image_specs: list[InputSpec]
) -> None:
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4), np.float32))
    (tmp_path / "a.npy").rename(tmp_path / "a.npz")
    with pytest.raises(DataError, match="plain .npy array"):
        list(load_batches(tmp_path / "a.npz", image_specs))
    np.savez(tmp_path / "o.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="Python objects"):
        list(load_batches(tmp_path / "o.npz", image_specs))


@pytest.mark.parametrize("arr,word", [
    (np.full((2, 3, 4), np.nan, np.float32), "NaN"),
    (np.full((2, 3, 4), np.inf, np.float32), "no finite value"),
    (np.zeros((0, 3, 4), np.float32), "no rows"),
])
def test_unusable_arrays_are_refused(
    tmp_path: Path, image_specs: list[InputSpec], arr: np.ndarray, word: str
) -> None:
    np.savez(tmp_path / "d.npz", x=arr)
    with pytest.raises(DataError, match=word):
        list(load_batches(tmp_path / "d.npz", image_specs))


def test_some_infinities_are_data(tmp_path: Path, image_specs: list[InputSpec]) -> None:
    """A float mask with -inf entries is real input: only all-non-finite is refused."""
    x = np.zeros((2, 3, 4), np.float32)
    x[0, 0, 0] = -np.inf
    np.savez(tmp_path / "d.npz", x=x)
    (batch,) = list(load_batches(tmp_path / "d.npz", image_specs))
    assert batch["x"][0, 0, 0] == -np.inf


def test_generated_inputs_are_capped() -> None:
    from onnxprune.calibration.data import MAX_GENERATED_BYTES

    spec = InputSpec("x", np.dtype(np.float32), (4_000_000, 8))
    with pytest.raises(DataError, match="over the cap"):
        random_batches([spec])
    small = InputSpec("x", np.dtype(np.float32), ("batch", 8))
    (batch, _) = random_batches([small])
    assert batch["x"].nbytes < MAX_GENERATED_BYTES
