"""--copy-config: an export folder's config and tokenizer files follow the pruned model."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from helpers import mlp_model

from onnxprune.cli import main


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    src = tmp_path / "export"
    src.mkdir()
    onnx.save(mlp_model([8, 16, 16, 4], seed=3), src / "model.onnx")
    (src / "config.json").write_text(json.dumps({"model_type": "mlp", "hidden_size": 8,
                                                 "intermediate_size": 16}))
    (src / "tokenizer.json").write_text("{}")
    (src / "special_tokens_map.json").write_text("{}")
    (tmp_path / "out").mkdir()
    return src


def test_uniform_pruning_updates_the_config(folder: Path, capsys) -> None:
    out = folder.parent / "out" / "model.onnx"
    assert main([str(folder / "model.onnx"), "-o", str(out), "--sparsity", "0.5",
                 "--copy-config", "--min-cosine", "-1"]) == 0
    files = sorted(p.name for p in out.parent.iterdir())
    assert files == ["config.json", "model.onnx", "special_tokens_map.json", "tokenizer.json"]
    config = json.loads((out.parent / "config.json").read_text())
    assert config["intermediate_size"] == 8 and "onnxprune" not in config
    assert "intermediate_size 16 -> 8" in capsys.readouterr().out
    # The source folder is untouched.
    assert json.loads((folder / "config.json").read_text())["intermediate_size"] == 16


def test_uneven_pruning_says_the_config_is_stale(folder: Path, capsys) -> None:
    out = folder.parent / "out" / "model.onnx"
    assert main([str(folder / "model.onnx"), "-o", str(out), "--sparsity", "0.5",
                 "--ignore", "fc2", "--copy-config", "--min-cosine", "-1"]) == 0
    config = json.loads((out.parent / "config.json").read_text())
    assert config["intermediate_size"] == 16
    assert sorted(config["onnxprune"]["per_layer"]["intermediate_size"]) == [8, 16]
    assert "no longer describes the model" in capsys.readouterr().out


def test_copy_config_refusals(folder: Path, capsys) -> None:
    same = folder / "small.onnx"
    assert main([str(folder / "model.onnx"), "-o", str(same), "--copy-config"]) == 2
    assert "own folder" in capsys.readouterr().err and not same.exists()
    (folder / "config.json").unlink()
    out = folder.parent / "out" / "model.onnx"
    assert main([str(folder / "model.onnx"), "-o", str(out), "--copy-config"]) == 2
    assert "no config.json" in capsys.readouterr().err and not out.exists()


def test_copy_config_never_writes_through_a_link(folder: Path, capsys) -> None:
    """A link already at a destination of the copied files is refused before anything is
    written, and the file it points to is left alone."""
    target = folder.parent / "elsewhere.json"
    target.write_text("keep")
    (folder.parent / "out" / "tokenizer.json").symlink_to(target)
    out = folder.parent / "out" / "model.onnx"
    assert main([str(folder / "model.onnx"), "-o", str(out), "--sparsity", "0.5",
                 "--copy-config", "--min-cosine", "-1"]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert target.read_text() == "keep" and not out.exists()
