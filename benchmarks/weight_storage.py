"""Is int8 weight storage safe enough for the no-option default recipe?

For each model, each int8 storage form is checked against the dense model with the default
verification tolerances (onnxprune.verify.compare, no tolerance given) on real data, and timed
against it on onnxruntime (CPU, 1 thread, interleaved, medians):

    python benchmarks/weight_storage.py [--repeats 20]

Forms: weight-only QDQ on every MatMul/Gemm and embedding table (`onnxprune quantize
--weight-only`), and embedding tables only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import metrics  # noqa: E402
import sources  # noqa: E402
import textdata  # noqa: E402

import onnxprune  # noqa: E402

BUILD = ROOT / "build"
FORMS = {"weight-only int8, all layers": ["--weight-only"],
         "int8 embedding tables only": ["--weight-only", "--exclude", "MatMul",
                                        "--exclude", "Gemm"]}


def _feeds(model: Path) -> tuple[object, dict[str, np.ndarray]]:
    """Verification data and one timing batch for `model`."""
    if "digits" in model.name:
        data = ROOT / "models" / "digits_test.npz"
        with np.load(data) as f:
            return data, {"pixels": np.repeat(f["pixels"][:64], 4, axis=0)}
    sentences = textdata.evaluation_sentences()[:256]
    batches = [textdata.encode_batch(sentences[i:i + 32]) for i in range(0, 256, 32)]
    return batches, metrics.latency_feeds(8, 128)


def _ratio(a: Path, b: Path, feeds: dict[str, np.ndarray], repeats: int) -> float:
    sessions = [metrics.make_session(a), metrics.make_session(b)]
    times: list[list[float]] = [[], []]
    for _ in range(3):
        for s in sessions:
            s.run(None, metrics._feeds_for(s, feeds))
    for _ in range(repeats):
        for k, s in enumerate(sessions):
            start = time.perf_counter()
            s.run(None, metrics._feeds_for(s, feeds))
            times[k].append(time.perf_counter() - start)
    return float(np.median(times[1]) / np.median(times[0]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--models", default="models/digits_mlp.onnx,build/minilm_legacy.onnx,"
                   "build/minilm_dynamo.onnx")
    args = p.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    print("| model | form | size | verify (defaults) | worst metric | pydoc cos / min | "
          "news cos / min | polarity acc (d/m) | latency vs dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in args.models.split(","):
        model = ROOT / m
        data, feeds = _feeds(model)
        # MiniLM: the sentence sources of benchmarks/sources.py too (tuned on pydoc, not news)
        ref = sources.Reference(model) if model.name.startswith("minilm") else None
        for form, extra in FORMS.items():
            out = BUILD / f"ws_{model.stem}.onnx"
            cmd = [sys.executable, "-m", "onnxprune", "quantize", str(model), "-o", str(out),
                   "--no-verify", "-q", *extra]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"| {model.name} | {form} | - | failed: {proc.stderr.strip()[:80]} | | |")
                continue
            r = onnxprune.verify(model, out, data)
            worst = min(r.outputs, key=lambda o: o.cosine_min)
            top1 = "" if worst.top1_agreement is None else f", top-1 {worst.top1_agreement:.4f}"
            ratio = _ratio(model, out, feeds, args.repeats)
            size = out.stat().st_size / model.stat().st_size
            text = "| - | - | - "
            if ref is not None:
                q = ref.quality(out)
                text = (f"| {q['mean_cosine']:.4f} / {q['min_cosine']:.4f} | {q['news_cosine']:.4f}"
                        f" / {q['news_min']:.4f} | {metrics.QUALITY_COLUMNS[-1][1](q)} ")
            print(f"| {model.name} | {form} | {size:.1%} | {'ok' if r else 'FAILED'} | "
                  f"{worst.name} cos min {worst.cosine_min:.5f}{top1} {text}| {ratio:.2f}x |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
