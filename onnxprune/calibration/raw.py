"""Data in the forms people have it: text files and image folders, besides .npz batches.

A `DataSource` is a path that carries how to read it (tokenizer, batch size, max length,
text field, image preset, shapes, the model's folder where a tokenizer.json may sit). It is
`os.PathLike`, so everything that takes a data path takes it unchanged; the CLI builds one
from its options, a Python caller may build one by hand. `data_kind` tells which reader a
path needs; `raw_batches` reads text and images (the .npz reader stays in data.py, which
checks every batch the same way whatever its source).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from onnxprune.calibration.images import IMAGE_SUFFIXES, image_batches, image_input
from onnxprune.calibration.specs import InputSpec
from onnxprune.calibration.text import (
    TEXT_SUFFIXES,
    find_tokenizer,
    text_batches,
    token_problem,
    token_roles,
)
from onnxprune.errors import DataError

__all__ = ["DataSource", "DataKind", "data_kind", "raw_batches", "data_forms",
           "DEFAULT_BATCH_SIZE", "DEFAULT_MAX_LENGTH"]

DataKind = Literal["npz", "text", "images"]
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_LENGTH = 128


@dataclass(frozen=True)
class DataSource:
    """A data path and how to read it. For .npz data only `path` matters."""

    path: str
    tokenizer: str | None = None  # tokenizer.json, or a folder holding one
    model_dir: str | None = None  # where the model sits: its tokenizer.json is found there
    text_field: str | None = None  # .jsonl: the field holding the text (default "text")
    batch_size: int = DEFAULT_BATCH_SIZE  # examples per batch (text and images)
    max_length: int = DEFAULT_MAX_LENGTH  # tokens per example, longer ones are cut
    image_preset: str | None = None  # imagenet, none, minus1to1 (default by channels)
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()  # --shape: NAME -> dims

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path


def data_kind(path: str | os.PathLike[str]) -> DataKind:
    """Which reader a path needs: a .txt/.tsv/.jsonl file is text, a folder with images and no
    .npz is images, anything else is .npz (whose reader gives the errors for the rest)."""
    p = Path(os.fspath(path))
    try:
        if p.is_dir():
            names = [f.suffix.lower() for f in p.iterdir()]
            if ".npz" not in names and any(s in IMAGE_SUFFIXES for s in names):
                return "images"
            return "npz"
    except OSError:
        return "npz"
    return "text" if p.suffix.lower() in TEXT_SUFFIXES else "npz"


def raw_batches(path: str | os.PathLike[str], specs: Sequence[InputSpec]
                ) -> Iterator[dict[str, np.ndarray]]:
    """Batches read from a text file or an image folder (unchecked: data.py checks them)."""
    source = path if isinstance(path, DataSource) else DataSource(os.fspath(path))
    p = Path(source.path)
    if not p.exists():
        raise DataError(f"{p}: no such data file or folder")
    if data_kind(p) == "images":
        yield from image_batches(p, specs, shapes=dict(source.shapes),
                                 preset=source.image_preset, batch_size=source.batch_size)
        return
    if not p.is_file():
        raise DataError(f"{p}: not a regular file (a FIFO or device); give a text file")
    yield from text_batches(p, specs, tokenizer=source.tokenizer, model_dir=source.model_dir,
                            text_field=source.text_field, batch_size=source.batch_size,
                            max_length=source.max_length)


def data_forms(specs: Sequence[InputSpec], model_dir: str | None,
               shapes: dict[str, tuple[int, ...]] | None = None) -> list[str]:
    """The data forms that fit the model, one line each, for `onnxprune inspect`."""
    out = []
    if token_problem(specs) is None:
        names = "/".join(token_roles(specs))
        where = ("tokenizer.json found beside the model" if find_tokenizer(None, model_dir)
                 else "give --tokenizer")
        out.append(f"text: {names}, give --calibration sentences.txt ({where})")
    item = image_input(specs, shapes)
    if not isinstance(item, str):
        how = "give a folder of images"
        if item.height is None or item.width is None:
            name = item.spec.name
            c = item.channels
            how += f" with --shape {name}:" + (f"1,{c},H,W" if item.layout == "NCHW"
                                               else f"1,H,W,{c}")
        out.append(f"images: {item.describe()}, {how}")
    out.append(".npz keyed by: " + ", ".join(s.name for s in specs))
    return out

