"""Export all-MiniLM-L6-v2 to ONNX with both torch exporters, offline.

Users reach onnxprune with either exporter, and the two write the same network very
differently (legacy: decomposed erf-GELU, Constant nodes, run-time Reshape shapes; dynamo:
a ``Gelu`` op and initializers), so the benchmarks build both:

* ``minilm_legacy.onnx``: ``torch.onnx.export(dynamo=False)``, opset 17;
* ``minilm_dynamo.onnx``: ``torch.onnx.export(dynamo=True)``, opset 18, one self-contained file;
* ``minilm_dynamo_data.onnx`` (``--kind dynamo-data``): saved the way torch users save it,
  ``torch.onnx.export(model, args, path, dynamo=True)``, weights in ``minilm_dynamo_data.onnx.data``
  and every intermediate value's type recorded.

The exported graph takes ``input_ids``, ``attention_mask`` and ``token_type_ids`` (int64,
dynamic batch and sequence) and returns ``sentence_embedding``: the attention-masked mean of
the last hidden states, L2-normalised, as sentence-transformers computes it.  The output is
not called ``embedding`` because the dynamo exporter already uses that name inside the graph.

Usage: ``python benchmarks/export_minilm.py --out-dir build/ [--force]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import textdata  # noqa: E402

ExporterKind = Literal["legacy", "dynamo", "dynamo-data"]
OUTPUT_NAME = "sentence_embedding"
OPSET = {"legacy": 17, "dynamo": 18, "dynamo-data": 18}
FILE_NAME = {"legacy": "minilm_legacy.onnx", "dynamo": "minilm_dynamo.onnx",
             "dynamo-data": "minilm_dynamo_data.onnx"}


def file_name(kind: str, attention: str = "sdpa") -> str:
    """``minilm_legacy.onnx`` for the default attention, ``minilm_legacy_eager.onnx`` else."""
    return FILE_NAME[kind] if attention == "sdpa" else f"minilm_{kind}_{attention}.onnx"
CHECK_SENTENCES = (
    "The for statement is used to iterate over the elements of a sequence.",
    "Assignments to __debug__ are illegal.",
    "A pruned model should still embed sentences almost exactly like the dense one.",
)
# Shapes the export was not traced with: batch 1, a ragged batch, a batch truncated at 128.
CHECK_BATCHES = (
    CHECK_SENTENCES[1:2],
    CHECK_SENTENCES,
    (CHECK_SENTENCES[0], " ".join(CHECK_SENTENCES * 12)),
)


AttentionKind = Literal["sdpa", "eager"]


def load_torch_model(attention: AttentionKind = "sdpa"):  # -> SentenceEmbedder
    """The pretrained BERT from the installed package wrapped with mean pooling, in eval mode.

    ``attention`` is transformers' ``attn_implementation``: ``"sdpa"`` is its default and
    what users export (each exporter decomposes scaled_dot_product_attention its own way);
    ``"eager"`` writes attention as explicit MatMul/Softmax.  Both must prune alike.
    """
    import torch
    from transformers import BertModel

    class SentenceEmbedder(torch.nn.Module):
        """BERT + masked mean pooling + L2 normalisation (the sentence-transformers head)."""

        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            hidden = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    bert = BertModel.from_pretrained(
        str(textdata.model_dir()), attn_implementation=attention, local_files_only=True
    )
    return SentenceEmbedder(bert).eval()


def _sample_feeds() -> dict[str, np.ndarray]:
    """Two sentences of different length, so padding and the mask are exercised."""
    return textdata.encode_batch(list(CHECK_SENTENCES[:2]))


def export(kind: ExporterKind, out_path: str | Path, opset: int | None = None,
           attention: AttentionKind = "sdpa") -> Path:
    """Export the MiniLM sentence embedder with one exporter to a single .onnx file.

    ``opset`` defaults to 17 (legacy) / 18 (dynamo).  Note that at opset 18 the dynamo
    exporter writes GELU decomposed (Div/Erf/Add/Mul/Mul); a single ``Gelu`` op needs 20.
    """
    import torch

    opset = opset if opset is not None else OPSET[kind]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename at the end: a crashed export must not leave a
    # partial file that the next run would take as done.
    tmp = out.with_name(out.name + ".partial")
    model = load_torch_model(attention)
    feeds = _sample_feeds()
    args = tuple(torch.from_numpy(feeds[name]) for name in textdata.INPUT_NAMES)
    names = list(textdata.INPUT_NAMES)
    with torch.no_grad():
        if kind == "legacy":
            axes = {name: {0: "batch", 1: "sequence"} for name in names}
            axes[OUTPUT_NAME] = {0: "batch"}
            torch.onnx.export(
                model,
                args,
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=names,
                output_names=[OUTPUT_NAME],
                dynamic_axes=axes,
                do_constant_folding=True,
            )
        elif kind == "dynamo":
            dim = torch.export.Dim
            shapes = {name: {0: dim("batch"), 1: dim("sequence", max=512)} for name in names}
            program = torch.onnx.export(
                model,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=names,
                output_names=[OUTPUT_NAME],
                dynamic_shapes=shapes,
                optimize=True,
            )
            program.save(str(tmp), external_data=False)
        elif kind == "dynamo-data":  # as users call it: the path given, weights beside it
            dim = torch.export.Dim
            shapes = {name: {0: dim("batch"), 1: dim("sequence", max=512)} for name in names}
            torch.onnx.export(model, args, str(out), dynamo=True, opset_version=opset,
                              input_names=names, output_names=[OUTPUT_NAME],
                              dynamic_shapes=shapes)
            return out
        else:
            raise ValueError(f"unknown exporter kind {kind!r}")
    tmp.replace(out)
    return out


def torch_embed(sentences: Sequence[str], model=None) -> np.ndarray:
    """Reference embeddings from the torch model, for checking the exports."""
    import torch

    model = model if model is not None else load_torch_model()
    feeds = textdata.encode_batch(list(sentences))
    with torch.no_grad():
        out = model(*(torch.from_numpy(feeds[name]) for name in textdata.INPUT_NAMES))
    return out.numpy()


def check(path: str | Path, model=None) -> float:
    """Run the full ONNX checker, then return max |onnxruntime - torch| over ``CHECK_BATCHES``.

    The batches use shapes other than the traced one, so a dimension baked in as a
    constant by the exporter shows up as an error or a large difference here.
    """
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    model = model if model is not None else load_torch_model()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in CHECK_BATCHES:
        got = session.run([OUTPUT_NAME], textdata.encode_batch(list(batch)))[0]
        worst = max(worst, float(np.abs(got - torch_embed(batch, model)).max()))
    return worst


def ensure_inputs(calib_n: int, build: Path) -> Path:
    """Exports both models (default attention) and writes the calibration batches when they
    are missing."""
    import textdata

    build.mkdir(exist_ok=True)
    for kind in ("legacy", "dynamo"):
        path = build / f"minilm_{kind}.onnx"
        if not path.exists():
            export(kind, path)  # type: ignore[arg-type]
    calib = build / f"calib_{calib_n}"
    if not calib.exists():
        textdata.write_npz_batches(textdata.calibration_sentences(calib_n), calib, 16)
    return calib


def main(argv: list[str] | None = None) -> int:
    """Export both models (unless present), then check them against torch."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("build"))
    parser.add_argument("--force", action="store_true", help="re-export existing files")
    parser.add_argument(
        "--kind", choices=["legacy", "dynamo", "dynamo-data", "both"], default="both",
        help="which exporter (dynamo-data: saved with its .data file, as torch users do)"
    )
    parser.add_argument(
        "--dynamo-opset", type=int, default=OPSET["dynamo"], help="20 gives a Gelu op"
    )
    parser.add_argument(
        "--attention", choices=["sdpa", "eager"], default="sdpa",
        help="transformers attn_implementation (default sdpa, transformers' own default); "
        "eager files get an _eager suffix",
    )
    opts = parser.parse_args(argv)

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    kinds: list[ExporterKind] = ["legacy", "dynamo"] if opts.kind == "both" else [opts.kind]
    model = load_torch_model(opts.attention)
    failed = False
    for kind in kinds:
        path = opts.out_dir / file_name(kind, opts.attention)
        if path.exists() and not opts.force:
            print(f"{kind}: {path} exists, not re-exported (use --force)")
        else:
            start = time.perf_counter()
            opset = opts.dynamo_opset if kind.startswith("dynamo") else OPSET[kind]
            export(kind, path, opset=opset, attention=opts.attention)
            seconds = time.perf_counter() - start
            print(f"{kind}: exported {path} in {seconds:.1f} s (opset {opset})")
        diff = check(path, model)
        ok = diff < 1e-4
        failed |= not ok
        size_mb = path.stat().st_size / 1e6
        print(
            f"{kind}: check_model(full_check=True) ok, {size_mb:.1f} MB, "
            f"max |onnxruntime - torch| = {diff:.2e} over {len(CHECK_BATCHES)} batch shapes "
            f"-> {'OK' if ok else 'MISMATCH'}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
