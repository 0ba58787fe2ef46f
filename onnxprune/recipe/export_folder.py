"""Export folders (Optimum, transformers.onnx): the files beside the model go along.

An Optimum export folder holds model.onnx next to config.json and the tokenizer files;
`ORTModel.from_pretrained(folder)` needs all of them. After pruning, config.json's
`intermediate_size` and `num_attention_heads` describe the old model: they are updated
when every FFN / attention block was pruned to the same size, and otherwise the config is
marked as no longer describing the layer sizes (and the caller says so).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx_ir as ir

from onnxprune.attention.blocks import find_attention_blocks
from onnxprune.channels.groups import find_channel_groups
from onnxprune.errors import InputError
from onnxprune.io.files import atomic_path, check_writable

__all__ = ["check_copy_config", "copy_config", "layer_sizes"]

_MODEL_SUFFIXES = (".onnx", ".onnx_data", ".data", ".onnx.data")


def check_copy_config(model: str | Path, output: str | Path) -> Path:
    """The source folder's config.json; refuses before anything is written."""
    src, out = Path(model).resolve().parent, Path(output).resolve().parent
    config = src / "config.json"
    if not config.is_file():
        raise InputError(f"{config}: no config.json beside the model; --copy-config copies an "
                         "export folder's files (drop the option for a lone model)")
    if src == out:
        raise InputError(f"--copy-config: the output folder is the model's own folder {src}; "
                         "write to another folder")
    for name in ("config.json", *(f.name for f in _files_to_copy(src))):
        check_writable(out / name, "copied file")  # a link there is refused before pruning
    return config


def _files_to_copy(src: Path) -> list[Path]:
    """The export folder's files other than the model, its data and config.json."""
    return [f for f in sorted(src.iterdir()) if f.is_file()
            and not f.name.endswith(_MODEL_SUFFIXES) and f.name != "config.json"]


def layer_sizes(model: ir.Model) -> tuple[list[int], list[int]]:
    """(channels of every prunable FFN group, heads of every recognised attention block)."""
    ffn = [g.size for g in find_channel_groups(model) if g.prunable]
    heads = [b.num_heads for b in find_attention_blocks(model) if b.prunable]
    return ffn, heads


def copy_config(model: str | Path, output: str | Path,
                before: tuple[list[int], list[int]], after: tuple[list[int], list[int]]
                ) -> list[str]:
    """Copies the export folder's other files beside `output`; returns what it did."""
    src_config = check_copy_config(model, output)
    src, out = src_config.parent, Path(output).resolve().parent
    copied = []
    for f in _files_to_copy(src):
        # Through the same atomic, non-following path as every other write: a link or a
        # device already at the destination is refused, not written through.
        with atomic_path(out / f.name, "copied file") as tmp:
            shutil.copyfile(f, tmp)
        copied.append(f.name)
    try:
        config = json.loads(src_config.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{src_config}: not readable JSON ({e})") from e
    notes = [f"copied {len(copied) + 1} file(s) beside {output}: "
             f"{', '.join(['config.json', *copied])}"]
    notes += _update(config, before, after)
    with atomic_path(out / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return notes


def _update(config: dict[str, object], before: tuple[list[int], list[int]],
            after: tuple[list[int], list[int]]) -> list[str]:
    notes: list[str] = []
    stale: dict[str, object] = {}
    for key, old, new in (("intermediate_size", before[0], after[0]),
                          ("num_attention_heads", before[1], after[1])):
        if key not in config or old == new:
            continue
        if len(old) != len(new) or any(o != config[key] for o in old):
            stale[key] = new
            notes.append(f"config.json: {key} {config[key]} no longer describes the model "
                         f"(layer sizes found: {new})")
        elif len(set(new)) == 1:
            if key == "num_attention_heads" and "head_dim" not in config:
                hidden = config.get("hidden_size")
                if isinstance(hidden, int) and isinstance(config[key], int):
                    config["head_dim"] = hidden // config[key]  # unchanged by head removal
            notes.append(f"config.json: {key} {config[key]} -> {new[0]} (every layer alike)")
            config[key] = new[0]
        else:
            stale[key] = new
            notes.append(f"config.json: {key} {config[key]} no longer describes the model: "
                         f"layers differ ({new}); per-layer sizes are under 'onnxprune'")
    if stale:
        config["onnxprune"] = {"per_layer": stale, "note": "sizes after pruning; the keys "
                               "above describe the original model"}
    return notes
