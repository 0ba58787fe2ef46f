"""Text as calibration or verification data: sentences tokenized into the model's feeds.

A `.txt` file holds one example per line (a tab splits a line into the two segments of a
pair model), a `.jsonl` file one JSON object per line with the text under a field (`text`
unless told). The model's own `tokenizer.json` (Hugging Face `tokenizers`, as Optimum and
transformers exports ship it) turns them into ids; each batch is padded to its own longest
example, as a serving system would, unless the graph fixes the sequence length. The arrays
are keyed to the graph's inputs by role (ids, mask, token types, positions) and take the
dtypes the graph declares, so the result is exactly what an .npz batch would hold.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxprune.calibration.input_roles import is_mask_name
from onnxprune.calibration.specs import InputSpec, whole_batches
from onnxprune.errors import DataError, InputError

__all__ = ["TEXT_SUFFIXES", "token_roles", "token_problem", "find_tokenizer", "read_examples",
           "text_batches", "load_tokenizer"]

TEXT_SUFFIXES = (".txt", ".tsv", ".jsonl")
logger = logging.getLogger(__name__)

Example = str | tuple[str, str]

_ROLES = (
    ("ids", re.compile(r"(^|_)input_ids$|^ids$|^token_ids$", re.IGNORECASE)),
    ("type", re.compile(r"token_type_ids$|segment_ids$|^type_ids$", re.IGNORECASE)),
    ("position", re.compile(r"position_ids$", re.IGNORECASE)),
)


def _role(spec: InputSpec) -> str | None:
    if is_mask_name(spec.name):
        return "mask"
    return next((role for role, pattern in _ROLES if pattern.search(spec.name)), None)


def token_roles(specs: Sequence[InputSpec]) -> dict[str, str]:
    """Input name -> role (ids, mask, type, position) for every input a tokenizer feeds."""
    return {s.name: role for s in specs if (role := _role(s)) is not None}


def token_problem(specs: Sequence[InputSpec]) -> str | None:
    """Why text cannot feed this model (None: it can): it needs integer token ids of rank 2
    and no input a tokenizer does not produce."""
    roles = token_roles(specs)
    ids = [n for n, r in roles.items() if r == "ids"]
    names = ", ".join(s.name for s in specs)
    if len(ids) != 1:
        return f"the model has no token ids input such as input_ids (inputs: {names})"
    others = [s.name for s in specs if s.name not in roles]
    if others:
        return f"input '{others[0]}' is not something a tokenizer produces (inputs: {names})"
    for s in specs:
        if roles[s.name] != "mask" and not np.issubdtype(s.dtype, np.integer):
            return f"input '{s.name}' is {s.dtype}, not integer token data"
        if s.dims is not None and len(s.dims) != 2:
            return f"input '{s.name}' has rank {len(s.dims)}, not [batch, sequence]"
    return None


def find_tokenizer(given: str | None, model_dir: str | None) -> Path | None:
    """The tokenizer.json to use: the one given (a file, or a folder holding one), else the
    one beside the model or in the folder above it (an export's onnx/ subfolder)."""
    if given is not None:
        p = Path(given)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise InputError(f"{given}: no tokenizer.json there; give --tokenizer a "
                             "tokenizer.json file or the folder holding it")
        return p
    if model_dir is None:
        return None
    here = Path(model_dir)
    return next((p for p in (here / "tokenizer.json", here.parent / "tokenizer.json")
                 if p.is_file()), None)


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise InputError("reading text needs the tokenizers package: pip install "
                         "'onnxprune[text]'") from None
    return tokenizers


def load_tokenizer(path: Path) -> Any:
    """A `tokenizers.Tokenizer` from a tokenizer.json (one-line DataError when it is not)."""
    tokenizers = _tokenizers()
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a plain Exception for any bad file
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: not a readable tokenizer.json ({first}); give the model's "
                        "own tokenizer with --tokenizer") from None


def _example(value: object, where: str) -> Example:
    if isinstance(value, str):
        return value
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, str) for v in value)):
        return value[0], value[1]
    raise DataError(f"{where}: the text is a {type(value).__name__}; give a string (or a "
                    "list of two strings for a pair)")


def read_examples(path: Path, text_field: str | None = None) -> list[Example]:
    """The examples of a .txt/.tsv (one a line; a tab makes a pair) or .jsonl file. Blank
    lines are skipped; an empty file is an error."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save the file as "
                        "UTF-8") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    out: list[Example] = []
    field = text_field or "text"
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            first, tab, second = line.partition("\t")
            out.append((first, second) if tab else line)
            continue
        where = f"{path}: line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not JSON ({e.msg}); write one object per line") \
                from None
        if not isinstance(record, dict) or field not in record:
            have = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{where}: no '{field}' field (has: {have}); name the text "
                            "field with --text-field")
        out.append(_example(record[field], where))
    if not out:
        raise DataError(f"{path}: holds no text; write one example per line")
    return out


def _configure(tok: Any, max_length: int, length: int | None) -> None:
    """Truncate at max_length; pad with the tokenizer's own pad token to the batch's longest
    example (or to the graph's fixed length)."""
    pad = dict(tok.padding or {})
    pad_token = pad.get("pad_token") or ("[PAD]" if tok.token_to_id("[PAD]") is not None
                                         else "<pad>")
    pad_id = pad.get("pad_id")
    if pad_id is None:
        pad_id = tok.token_to_id(pad_token) or 0
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=pad_id, pad_type_id=pad.get("pad_type_id", 0),
                       pad_token=pad_token, length=length)


def _fixed(spec: InputSpec, axis: int) -> int | None:
    if spec.dims is None or len(spec.dims) <= axis:
        return None
    d = spec.dims[axis]
    return d if isinstance(d, int) else None


def text_batches(path: Path, specs: Sequence[InputSpec], *, tokenizer: str | None,
                 model_dir: str | None, text_field: str | None, batch_size: int,
                 max_length: int) -> Iterator[dict[str, np.ndarray]]:
    """Tokenized batches of the text file at `path`, keyed by the model's input names."""
    problem = token_problem(specs)
    if problem is not None:
        raise DataError(f"{path}: text data needs a model that takes token ids, and {problem}; "
                        "give .npz batches keyed by input name instead")
    if batch_size < 1 or max_length < 1:
        raise InputError(f"{path}: --batch-size and --max-length must be >= 1")
    found = find_tokenizer(tokenizer, model_dir)
    if found is None:
        raise InputError(f"{path}: no tokenizer.json beside the model; give the model's "
                         "tokenizer with --tokenizer PATH")
    tok = load_tokenizer(found)
    examples = read_examples(path, text_field)
    roles = token_roles(specs)
    ids_spec = next(s for s in specs if roles[s.name] == "ids")
    length = _fixed(ids_spec, 1)
    _configure(tok, length or max_length, length)
    rows = _fixed(ids_spec, 0) or batch_size
    examples = whole_batches(examples, rows, _fixed(ids_spec, 0) is not None, path, "example")
    for start in range(0, len(examples), rows):
        encodings = tok.encode_batch(examples[start:start + rows])
        yield _feeds(encodings, specs, roles, path, found)


def _feeds(encodings: Sequence[Any], specs: Sequence[InputSpec], roles: dict[str, str],
           path: Path, tokenizer: Path) -> dict[str, np.ndarray]:
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    made = {
        "ids": ids,
        "mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "type": np.array([e.type_ids for e in encodings], dtype=np.int64),
        "position": np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape),
    }
    out = {}
    for s in specs:
        arr = made[roles[s.name]]
        if roles[s.name] == "ids" and s.index_bound is not None and ids.size \
                and int(ids.max()) >= s.index_bound:
            raise DataError(f"{path}: {tokenizer} gives token id {int(ids.max())}, past the "
                            f"{s.index_bound} rows of the table '{s.name}' indexes; give the "
                            "model's own tokenizer with --tokenizer")
        out[s.name] = np.ascontiguousarray(arr).astype(s.dtype)
    return out
