"""onnxprune.calibration.raw/text/images: text files and image folders as data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import DIGITS, make_model, passthrough_model, run, to_ir, value_info
from onnx import TensorProto, helper, numpy_helper

from onnxprune.calibration.calibration import as_calibration
from onnxprune.calibration.data import data_budget, input_specs, load_batches
from onnxprune.calibration.raw import DataSource, data_forms, data_kind
from onnxprune.cli import main
from onnxprune.errors import DataError, InputError

tokenizers = pytest.importorskip("tokenizers")
Image = pytest.importorskip("PIL.Image")

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran",
    "the quick brown fox jumps over the lazy dog today",
    "cats and dogs",
    "the end",
]
VOCAB = 40
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _tokenizer(path: Path) -> tokenizers.Tokenizer:
    """A WordLevel tokenizer trained on SENTENCES, BERT-style: [CLS] A [SEP] (B [SEP])."""
    from tokenizers import models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.save(str(path))
    return tok


def _bert(dims: tuple[int | str, int | str] = ("batch", "seq")) -> onnx.ModelProto:
    """input_ids/attention_mask/token_type_ids -> embedding Gathers -> masked sum [batch, 4]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, 4)).astype(np.float32), "emb"),
             numpy_helper.from_array(rng.standard_normal((2, 4)).astype(np.float32), "types"),
             numpy_helper.from_array(np.array([2], np.int64), "axis2"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
        helper.make_node("Gather", ["types", "token_type_ids"], ["t"]),
        helper.make_node("Add", ["e", "t"], ["h"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axis2"], ["m3"]),
        helper.make_node("Mul", ["h", "m3"], ["hm"]),
        helper.make_node("ReduceSum", ["hm", "axis1"], ["y"], keepdims=0),
    ]
    ins = [value_info(n, list(dims), TensorProto.INT64) for n in TOKEN_INPUTS]
    return make_model(nodes, ins, [value_info("y", [dims[0], 4])], inits)


@pytest.fixture
def text_model(tmp_path: Path) -> Path:
    """tiny BERT-like model with its tokenizer.json beside it, as an export folder has."""
    folder = tmp_path / "export"
    folder.mkdir()
    onnx.save(_bert(), folder / "model.onnx")
    _tokenizer(folder / "tokenizer.json")
    return folder / "model.onnx"


def _text_batches(model: Path, data: Path, **options: object) -> list[dict[str, np.ndarray]]:
    source = DataSource(str(data), model_dir=str(model.parent), **options)  # type: ignore[arg-type]
    return list(load_batches(source, input_specs(to_ir(onnx.load(model)))))


# ------------------------------------------------------------------------ text


def test_txt_is_tokenized_padded_per_batch_and_keyed(text_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "s.txt"
    data.write_text("\n".join(SENTENCES[:3]) + "\n\n" + "\n".join(SENTENCES[3:]) + "\n")
    batches = _text_batches(text_model, data, batch_size=2)
    tok = tokenizers.Tokenizer.from_file(str(text_model.parent / "tokenizer.json"))
    assert [b["input_ids"].shape for b in batches] == [(2, 8), (2, 12), (1, 4)]
    for b in batches:
        assert sorted(b) == sorted(TOKEN_INPUTS)
        assert all(a.dtype == np.int64 for a in b.values())
        np.testing.assert_array_equal(b["attention_mask"], b["input_ids"] != 0)  # [PAD] is 0
        assert not b["token_type_ids"].any()
        run(text_model, b)  # onnxruntime takes them as they are
    # "a dog ran" is padded to the first sentence's 8 tokens; blank lines are skipped
    assert batches[0]["input_ids"][1].tolist() == tok.encode("a dog ran").ids + [0] * 3
    assert batches[0]["attention_mask"].sum(axis=1).tolist() == [8, 5]
    assert batches[2]["input_ids"][0].tolist() == tok.encode("the end").ids


def test_max_length_cuts_and_tabs_make_pairs(text_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "pairs.txt"
    data.write_text("the cat sat\ta dog ran\nthe quick brown fox jumps over the lazy dog\n")
    (b,) = _text_batches(text_model, data, max_length=6)
    assert b["input_ids"].shape == (2, 6)
    # [CLS] A [SEP] B [SEP], both segments cut (longest first) to fit 6 tokens
    tok = tokenizers.Tokenizer.from_file(str(text_model.parent / "tokenizer.json"))
    tok.enable_truncation(max_length=6)
    pair = tok.encode("the cat sat", "a dog ran")
    assert b["input_ids"][0].tolist() == pair.ids
    assert b["token_type_ids"][0].tolist() == pair.type_ids == [0, 0, 0, 1, 1, 1]
    assert b["attention_mask"].tolist() == [[1] * 6, [1] * 6]


def test_jsonl_with_text_field(text_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "s.jsonl"
    data.write_text("".join(json.dumps({"id": i, "sentence": s}) + "\n"
                            for i, s in enumerate(SENTENCES)))
    batches = _text_batches(text_model, data, text_field="sentence")
    assert len(batches) == 1 and batches[0]["input_ids"].shape == (5, 12)
    with pytest.raises(DataError, match=r"line 1: no 'text' field \(has: id, sentence\); "
                       "name the text field with --text-field"):
        _text_batches(text_model, data)


def test_dtypes_positions_and_fixed_dims_follow_the_model(tmp_path: Path) -> None:
    model = passthrough_model({"input_ids": (TensorProto.INT32, [2, 10]),
                               "attention_mask": (TensorProto.BOOL, [2, 10]),
                               "position_ids": (TensorProto.INT64, [2, 10])})
    _tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "s.txt").write_text("\n".join(SENTENCES) + "\n")
    source = DataSource(str(tmp_path / "s.txt"), tokenizer=str(tmp_path), batch_size=16)
    batches = list(load_batches(source, input_specs(to_ir(model))))
    assert len(batches) == 2  # the model takes exactly 2 rows: the fifth sentence is left out
    b = batches[0]
    assert {k: (v.dtype.name, v.shape) for k, v in b.items()} == {
        "input_ids": ("int32", (2, 10)), "attention_mask": ("bool", (2, 10)),
        "position_ids": ("int64", (2, 10))}
    assert b["position_ids"][1].tolist() == list(range(10))
    assert b["attention_mask"].sum(axis=1).tolist() == [8, 5]  # padded to the fixed 10


def test_cli_reads_text_with_the_tokenizer_beside_the_model(
        text_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "s.txt"
    data.write_text("\n".join(SENTENCES) + "\n")
    assert main(["verify", str(text_model), str(text_model), "--data", str(data),
                 "--batch-size", "2", "--min-cosine", "0.999"]) == 0
    assert "3 batch(es)" in capsys.readouterr().out
    assert main(["inspect", str(text_model)]) == 0
    out = capsys.readouterr().out
    assert "input  input_ids: int64 [batch, seq]" in out
    assert "output y: float32 [batch, 4]" in out
    assert ("text: input_ids/attention_mask/token_type_ids, give --calibration sentences.txt "
            "(tokenizer.json found beside the model)") in out
    assert ".npz keyed by: input_ids, attention_mask, token_type_ids" in out


def test_no_tokenizer_found_names_the_option(tmp_path: Path) -> None:
    onnx.save(_bert(), tmp_path / "m.onnx")
    (tmp_path / "s.txt").write_text("a dog ran\n")
    with pytest.raises(InputError, match="no tokenizer.json beside the model; give the "
                       "model's tokenizer with --tokenizer PATH"):
        _text_batches(tmp_path / "m.onnx", tmp_path / "s.txt")
    assert data_forms(input_specs(to_ir(_bert())), str(tmp_path))[0].endswith(
        "(give --tokenizer)")


def test_missing_tokenizers_package_names_the_extra(
        text_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails
    (tmp_path / "s.txt").write_text("a dog ran\n")
    with pytest.raises(InputError) as info:
        _text_batches(text_model, tmp_path / "s.txt")
    assert str(info.value) == ("reading text needs the tokenizers package: pip install "
                               "'onnxprune[text]'")


def test_text_for_a_model_without_token_inputs(tmp_path: Path) -> None:
    (tmp_path / "s.txt").write_text("a dog ran\n")
    with pytest.raises(DataError, match=r"s.txt: text data needs a model that takes token "
                       r"ids, and the model has no token ids input such as input_ids "
                       r"\(inputs: pixels\)"):
        list(load_batches(tmp_path / "s.txt", input_specs(load_digits())))


def test_wrong_tokenizer_is_caught_by_the_table_size(text_model: Path, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.mkdir()
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {w: i for i, w in enumerate(["[PAD]", "[UNK]", *(f"w{i}" for i in range(98)), "dog"])},
        unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(big / "tokenizer.json"))
    (tmp_path / "s.txt").write_text("a dog\n")
    with pytest.raises(DataError, match="gives token id 100, past the 40 rows of the table "
                       "'input_ids' indexes"):
        _text_batches(text_model, tmp_path / "s.txt", tokenizer=str(big))


def load_digits():  # noqa: ANN201
    from onnxprune.io.models import load_model
    return load_model(DIGITS)


# ------------------------------------------------------------------------ images


def _conv(layout: str, channels: int = 3, size: tuple[int | str, int | str] = (6, 8)
          ) -> onnx.ModelProto:
    """x [N, C, H, W] (or [N, H, W, C]) -> 1x1 Conv to 2 channels."""
    h, w = size
    dims = ["n", channels, h, w] if layout == "NCHW" else ["n", h, w, channels]
    nodes = []
    src = "x"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]))
        src = "xt"
    nodes.append(helper.make_node("Conv", [src, "w"], ["y"]))
    weight = np.ones((2, channels, 1, 1), np.float32)
    return make_model(nodes, [value_info("x", dims)], [value_info("y", ["n", 2, h, w])],
                      [numpy_helper.from_array(weight, "w")])


def _images(folder: Path, colours: list[tuple[int, int, int]]) -> Path:
    folder.mkdir(exist_ok=True)
    for i, c in enumerate(colours):
        Image.new("RGB", (16, 12), c).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}",
                                             quality=100)
    return folder


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_image_folder_resized_scaled_and_laid_out(tmp_path: Path, layout: str) -> None:
    folder = _images(tmp_path / "imgs", [(255, 0, 0), (0, 128, 255), (10, 20, 30)])
    model = to_ir(_conv(layout))
    assert data_kind(folder) == "images"
    plain = list(load_batches(DataSource(str(folder), image_preset="none", batch_size=2),
                              input_specs(model)))
    shape = (2, 3, 6, 8) if layout == "NCHW" else (2, 6, 8, 3)
    assert [b["x"].shape for b in plain] == [shape, (1, *shape[1:])]
    assert plain[0]["x"].dtype == np.float32
    x = plain[0]["x"] if layout == "NCHW" else plain[0]["x"].transpose(0, 3, 1, 2)
    np.testing.assert_allclose(x[1, :, 3, 4], [0, 128 / 255, 1], atol=1e-6)  # the png
    np.testing.assert_allclose(x[0, :, 3, 4], [1, 0, 0], atol=0.02)  # the jpeg
    (imagenet, _) = list(load_batches(DataSource(str(folder), batch_size=2), input_specs(model)))
    x2 = imagenet["x"] if layout == "NCHW" else imagenet["x"].transpose(0, 3, 1, 2)
    np.testing.assert_allclose(x2[1, :, 3, 4], (np.array([0, 128 / 255, 1]) - [0.485, 0.456,
                               0.406]) / [0.229, 0.224, 0.225], atol=1e-5)
    run(model, plain[0])


def test_grayscale_minus1to1_and_shape_for_symbolic_dims(tmp_path: Path) -> None:
    folder = _images(tmp_path / "imgs", [(255, 255, 255), (0, 0, 0)])
    model = to_ir(_conv("NCHW", channels=1, size=("h", "w")))
    with pytest.raises(DataError, match="no fixed height and width; give them with --shape "
                       "x:1,1,H,W"):
        list(load_batches(folder, input_specs(model)))
    source = DataSource(str(folder), shapes=(("x", (1, 1, 5, 7)),), image_preset="minus1to1")
    (b,) = load_batches(source, input_specs(model))
    assert b["x"].shape == (2, 1, 5, 7)
    assert b["x"][0].min() == b["x"][0].max() == 1.0 and b["x"][1].max() == -1.0
    (b,) = load_batches(DataSource(str(folder), shapes=(("x", (1, 1, 5, 7)),)),
                        input_specs(model))
    assert b["x"][0].max() == 1.0 and b["x"][1].max() == 0.0  # default: none for 1 channel
    assert data_forms(input_specs(to_ir(_conv("NHWC"))), None) == [
        "images: NHWC 3x6x8, give a folder of images", ".npz keyed by: x"]


def test_empty_folder_and_unreadable_image(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    specs = input_specs(to_ir(_conv("NCHW")))
    with pytest.raises(DataError, match="empty: folder holds no .npz batches and no images"):
        list(load_batches(tmp_path / "empty", specs))
    folder = _images(tmp_path / "imgs", [(1, 2, 3)])
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        list(load_batches(folder, specs))


def test_images_for_a_text_model_and_budget(tmp_path: Path, text_model: Path) -> None:
    folder = _images(tmp_path / "imgs", [(1, 2, 3)] * 4)
    with pytest.raises(DataError, match="a folder of images needs a model with one image "
                       "input, and images feed a model with one input, this one has 3"):
        list(load_batches(folder, input_specs(to_ir(onnx.load(text_model)))))
    with data_budget(3 * 6 * 8 * 4 * 3), pytest.raises(DataError, match="over the memory "
                                                        "budget"):
        list(load_batches(DataSource(str(folder), batch_size=1),
                          input_specs(to_ir(_conv("NCHW")))))


def test_passes_take_a_data_source(text_model: Path, tmp_path: Path) -> None:
    (tmp_path / "s.txt").write_text("\n".join(SENTENCES) + "\n")
    pending = as_calibration(DataSource(str(tmp_path / "s.txt"), tokenizer=str(
        text_model.parent), batch_size=4))
    calib = pending.resolve(to_ir(onnx.load(text_model)))  # type: ignore[union-attr]
    assert [b["input_ids"].shape[0] for b in calib.batches] == [4, 1]
    assert calib.token_mask == "attention_mask"
