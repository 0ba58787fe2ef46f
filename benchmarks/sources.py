"""Text the MiniLM settings were not chosen on, and real labels: one reference for every benchmark.

The settings (ridge, step rates, budgets, defaults) were chosen on pydoc sentences
(``textdata``). Every MiniLM quality figure is also reported on:

* ``news``: sentences of the 300 Australian news articles of the Lee corpus that gensim's wheel
  ships (``gensim/test/test_data/lee_background.cor``), cleaned like the pydoc ones and shuffled
  with a fixed seed: the first ``NEWS_EVAL`` are the evaluation set, the next ``NEWS_CALIB`` a
  disjoint calibration pool (``python benchmarks/textdata.py --source news --calib-dir D``), so a
  model can also be tuned on news and judged on both;
* ``polarity``: the 200 movie-review sentences labelled ``__label__pos`` / ``__label__neg`` of
  the same wheel (``pang_lee_polarity.cor``), with a leave-one-out nearest-centroid probe,
  paired against the dense model on the same rows (one sentence is 0.5 points; the standard
  error is about 3 points).

The wheel is fetched with ``pip download --no-deps gensim`` into ``build/gensim`` at run time (or
named by ``$GENSIM_WHEEL``) and read from the zip; nothing of it is committed.

    ref = sources.Reference("build/minilm_legacy.onnx")   # embeds every source once
    row.update(ref.quality("small.onnx"))                  # pydoc, news and probe keys

``quality`` keeps the pydoc keys the benchmarks always had (``mean_cosine``, ``min_cosine``,
``spearman``, ``probe``: the topic probe) and adds ``news_cosine``, ``news_min``,
``news_spearman``, ``polarity_acc``, ``polarity_dense_only`` and ``polarity_model_only``;
``metrics.QUALITY_COLUMNS`` prints them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metrics  # noqa: E402
import textdata  # noqa: E402

POLARITY = "gensim/test/test_data/pang_lee_polarity.cor"
NEWS = "gensim/test/test_data/lee_background.cor"
NEWS_EVAL = 512
NEWS_CALIB = 512
SEED = 1


WHEEL_DIR = Path(__file__).resolve().parents[1] / "build" / "gensim"


def gensim_wheel(folder: Path = WHEEL_DIR) -> Path:
    """The gensim wheel ($GENSIM_WHEEL, or in `folder`, downloaded there without dependencies)."""
    if os.environ.get("GENSIM_WHEEL"):
        return Path(os.environ["GENSIM_WHEEL"])
    found = sorted(folder.glob("gensim-*.whl"))
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "gensim",
                        "-d", str(folder)], check=True)
        found = sorted(folder.glob("gensim-*.whl"))
    if not found:
        raise SystemExit(f"no gensim wheel in {folder}")
    return found[-1]


def _read(member: str) -> str:
    with zipfile.ZipFile(gensim_wheel()) as z:
        return z.read(member).decode("latin-1")  # cp1252-era text


@lru_cache(maxsize=1)
def polarity_sentences() -> tuple[list[str], np.ndarray]:
    """The labelled sentences and their labels (1 positive, 0 negative), read from the zip."""
    texts, labels = [], []
    for line in _read(POLARITY).splitlines():
        label, _, text = line.strip().partition(" ")
        if label in ("__label__pos", "__label__neg") and text:
            texts.append(text)
            labels.append(1 if label == "__label__pos" else 0)
    return texts, np.asarray(labels)


@lru_cache(maxsize=1)
def news_sentences() -> tuple[str, ...]:
    """Every clean, unique news sentence, shuffled with ``SEED`` (pydoc's cleaning rules)."""
    seen: dict[str, None] = {}
    for article in _read(NEWS).splitlines():
        for sentence in textdata._SENTENCE_END.split(re.sub(r"\s+", " ", article).strip()):
            if textdata._is_clean(sentence.strip()):
                seen.setdefault(sentence.strip(), None)
    found = list(seen)
    order = np.random.default_rng(SEED).permutation(len(found))
    return tuple(found[i] for i in order)


def news_evaluation() -> list[str]:
    return list(news_sentences()[:NEWS_EVAL])


def news_calibration(n: int = NEWS_CALIB) -> list[str]:
    """The first ``n`` sentences of the news calibration pool (never overlaps evaluation)."""
    pool = news_sentences()[NEWS_EVAL:NEWS_EVAL + NEWS_CALIB]
    if not 0 < n <= len(pool):
        raise ValueError(f"n must be in 1..{len(pool)}, got {n}")
    return list(pool[:n])


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


class Reference:
    """The dense model's embeddings of every source, computed once, to judge candidates by."""

    def __init__(self, dense, pydoc: list | None = None) -> None:
        self.pydoc = list(textdata.evaluation_sentences()) if pydoc is None else pydoc
        self.news = news_evaluation()
        self.polarity, self.labels = polarity_sentences()
        self.dense = {name: metrics.embed(dense, texts) for name, texts in self._texts()}
        self.dense_right = loo_centroid(self.dense["polarity"], self.labels)

    def _texts(self):
        return (("pydoc", self.pydoc), ("news", self.news), ("polarity", self.polarity))

    def dense_row(self) -> dict[str, float]:
        """The dense model's own row: cosines 1 and its probe accuracy."""
        return self.quality_of(self.dense)

    def quality(self, model) -> dict[str, float]:
        """Cosine, Spearman on pydoc and news, paired probe accuracy on polarity."""
        return self.quality_of({name: metrics.embed(model, texts)
                                for name, texts in self._texts()})

    def quality_of(self, emb: dict[str, np.ndarray]) -> dict[str, float]:
        pydoc = metrics.compare(self.dense["pydoc"], emb["pydoc"])
        topics = [getattr(s, "topic", None) for s in self.pydoc]
        if all(topics):
            pydoc["probe"] = metrics.probe_accuracy(emb["pydoc"], topics,
                                                    textdata.labelled_topics())
        news = metrics.compare(self.dense["news"], emb["news"])
        right = loo_centroid(emb["polarity"], self.labels)
        return {
            **pydoc,
            "news_cosine": news["mean_cosine"], "news_min": news["min_cosine"],
            "news_spearman": news["spearman"],
            "polarity_acc": float(right.mean()),
            "polarity_dense_only": int(np.sum(self.dense_right & ~right)),
            "polarity_model_only": int(np.sum(right & ~self.dense_right)),
        }


COLUMNS = metrics.QUALITY_COLUMNS
