"""Quality of optimized MiniLM models on text the settings were not chosen on, with labels.

Every figure the other MiniLM benchmarks print is measured on held-out pydoc sentences, but
the settings (ridge, step rates, budgets) were chosen on pydoc sentences too. This script
reports the same comparison on a second source nobody tuned on, and a labelled task:

* ``pydoc``: the benchmark's evaluation sentences (``textdata.evaluation_sentences()``);
* ``polarity``: the 200 movie-review sentences labelled ``__label__pos`` / ``__label__neg``
  that gensim's wheel ships (``gensim/test/test_data/pang_lee_polarity.cor``). The wheel is
  fetched with ``pip download --no-deps gensim`` into ``build/gensim`` at run time (or
  given with ``--gensim-wheel``) and read from the zip; nothing of it is committed.

Per model and source: mean and minimum cosine to the dense model's embeddings and the
Spearman correlation of the pairwise-similarity matrices; on ``polarity`` also a
leave-one-out nearest-centroid accuracy, paired against the dense model on the same rows
(with 200 rows one sentence is 0.5 points, the standard error about 3 points).

Usage::

    python benchmarks/heldout_quality.py --dense build/minilm_legacy.onnx \\
        --model p50=OUT/p50.onnx --model int8=OUT/int8.onnx [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metrics  # noqa: E402
import textdata  # noqa: E402

POLARITY = "gensim/test/test_data/pang_lee_polarity.cor"


def gensim_wheel(folder: Path) -> Path:
    """The gensim wheel in `folder`, downloaded there (no dependencies) when missing."""
    found = sorted(folder.glob("gensim-*.whl"))
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "gensim",
                        "-d", str(folder)], check=True)
        found = sorted(folder.glob("gensim-*.whl"))
    if not found:
        raise SystemExit(f"no gensim wheel in {folder}")
    return found[-1]


def polarity_sentences(wheel: Path) -> tuple[list[str], np.ndarray]:
    """The labelled sentences and their labels (1 positive, 0 negative), read from the zip."""
    with zipfile.ZipFile(wheel) as z:
        lines = z.read(POLARITY).decode("latin-1").splitlines()  # cp1252-era text
    texts, labels = [], []
    for line in lines:
        label, _, text = line.strip().partition(" ")
        if label in ("__label__pos", "__label__neg") and text:
            texts.append(text)
            labels.append(1 if label == "__label__pos" else 0)
    return texts, np.asarray(labels)


def loo_centroid(emb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per row: whether the nearest class centroid (cosine), computed without that row, is
    its own class (leave-one-out)."""
    x = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    right = np.zeros(len(x), dtype=bool)
    sums = {c: x[labels == c].sum(axis=0) for c in np.unique(labels)}
    counts = {c: int(np.sum(labels == c)) for c in sums}
    for i, (row, c) in enumerate(zip(x, labels, strict=True)):
        best, best_sim = None, -np.inf
        for k, total in sums.items():
            n = counts[k] - (k == c)
            centroid = (total - row * (k == c)) / max(n, 1)
            sim = float(row @ centroid / max(np.linalg.norm(centroid), 1e-12))
            if sim > best_sim:
                best, best_sim = k, sim
        right[i] = best == c
    return right


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", type=Path, required=True)
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--gensim-wheel", type=Path)
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args(argv)
    wheel = opts.gensim_wheel or gensim_wheel(Path("build/gensim"))
    polarity, labels = polarity_sentences(wheel)
    sources = {"pydoc": list(textdata.evaluation_sentences()), "polarity": polarity}
    dense = {name: metrics.embed(opts.dense, s) for name, s in sources.items()}
    dense_right = loo_centroid(dense["polarity"], labels)
    rows = [{"model": "dense", "polarity_acc": float(dense_right.mean())}]
    print(f"{len(sources['pydoc'])} pydoc and {len(polarity)} polarity sentences; dense "
          f"polarity LOO nearest-centroid accuracy {dense_right.mean():.3f}")
    header = ("model", "source", "cos mean", "cos min", "Spearman", "polarity acc",
              "dense-only right", "model-only right")
    print(" | ".join(header))
    for spec in opts.model:
        name, _, path = spec.partition("=")
        row: dict[str, object] = {"model": name}
        for source, sentences in sources.items():
            emb = metrics.embed(path, sentences)
            cmp = metrics.compare(dense[source], emb)
            row[source] = cmp
            extra = ("", "", "")
            if source == "polarity":
                right = loo_centroid(emb, labels)
                row["polarity_acc"] = float(right.mean())
                extra = (f"{right.mean():.3f}", str(int(np.sum(dense_right & ~right))),
                         str(int(np.sum(right & ~dense_right))))
            print(" | ".join((name, source, f"{cmp['mean_cosine']:.4f}",
                              f"{cmp['min_cosine']:.4f}", f"{cmp['spearman']:.4f}", *extra)))
        rows.append(row)
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
