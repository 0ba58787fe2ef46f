"""Quality and speed metrics of an optimised sentence-embedding model against the dense one.

Quality is measured on held-out sentences (``textdata.evaluation_sentences()``):

* cosine between dense and optimised embeddings of the same sentence (mean and minimum);
* Spearman correlation between the two models' pairwise cosine-similarity matrices (upper
  triangle): whether similarity *rankings*, which search users feel, survive;
* topic-probe accuracy: logistic regression on the embeddings, 5-fold stratified CV.

Speed is a ratio measured side by side (A B A B interleaved, medians, 1 intra-op thread),
never a lone absolute time: these machines are shared and noisy.

Usage: ``python benchmarks/metrics.py --build-dir build/`` reports the dense baseline
(legacy vs dynamo export).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import textdata  # noqa: E402

PROBE_SEED = 0
PROBE_FOLDS = 5


def make_session(model, threads: int = 1):  # -> onnxruntime.InferenceSession
    """A CPU session with a fixed thread count, or ``model`` itself if it already is one.

    One intra-op thread keeps timings comparable on a shared 2-core machine and keeps
    parallel benchmark jobs from fighting over cores.
    """
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        return model
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def _feeds_for(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Only the inputs the graph declares (an optimised graph may drop an unused one)."""
    return {i.name: feeds[i.name] for i in session.get_inputs()}


def embed(
    model,
    sentences: Sequence[textdata.Sentence | str],
    batch_size: int = 32,
    threads: int = 1,
) -> np.ndarray:
    """Embeddings (first graph output) of ``sentences`` in order, shape (n, dim), float32.

    ``model`` is a path or an ``onnxruntime.InferenceSession``.  Batches are padded to their
    own longest sentence, as in serving, so a model that mishandles padding shows it here.
    """
    session = make_session(model, threads)
    output = session.get_outputs()[0].name
    parts = [
        session.run([output], _feeds_for(session, feeds))[0]
        for feeds in textdata.iter_batches(sentences, batch_size)
    ]
    return np.concatenate(parts, axis=0).astype(np.float32)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def compare(dense_emb: np.ndarray, other_emb: np.ndarray) -> dict[str, float]:
    """Per-sentence cosine (mean, min) and Spearman rho of the pairwise-similarity matrices.

    Rows are re-normalised first, so a model whose output lost its L2 normalisation is judged
    on direction only, like any cosine-similarity search would judge it.
    """
    from scipy.stats import spearmanr

    if dense_emb.shape != other_emb.shape:
        raise ValueError(f"shape mismatch: {dense_emb.shape} vs {other_emb.shape}")
    a, b = _unit_rows(dense_emb), _unit_rows(other_emb)
    cosine = np.sum(a * b, axis=1)
    upper = np.triu_indices(a.shape[0], k=1)
    rho = spearmanr((a @ a.T)[upper], (b @ b.T)[upper]).statistic
    return {
        "mean_cosine": float(cosine.mean()),
        "min_cosine": float(cosine.min()),
        "spearman": float(rho),
    }


def probe_accuracy(
    emb: np.ndarray,
    labels: Sequence[str],
    topics: Sequence[str] | None = None,
    min_count: int = textdata.MIN_TOPIC_SENTENCES,
    folds: int = PROBE_FOLDS,
    seed: int = PROBE_SEED,
) -> float:
    """Mean 5-fold stratified CV accuracy of a logistic-regression topic probe.

    Only sentences whose topic is in ``topics`` count (default: topics with at least
    ``min_count`` sentences among ``labels``); pass ``textdata.labelled_topics()`` to use
    the corpus-wide definition.  Fixed folds and seed: two models are scored on the same
    splits, so a difference is the embeddings' doing.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    labels = np.asarray(labels)
    if topics is None:
        counts = Counter(labels.tolist())
        topics = [t for t, n in counts.items() if n >= min_count]
    keep = np.isin(labels, list(topics))
    x, y = _unit_rows(emb[keep]), labels[keep]
    probe = LogisticRegression(max_iter=5000, random_state=seed)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(probe, x, y, cv=cv).mean())


def latency_feeds(batch: int = 8, seq: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """A full (unpadded) batch of ``seq`` real-vocabulary tokens: [CLS] random ids [SEP]."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, size=(batch, seq), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS], [SEP] in the MiniLM vocabulary
    return {
        "input_ids": ids,
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
        "token_type_ids": np.zeros((batch, seq), dtype=np.int64),
    }


def interleaved_medians(sessions: Sequence, feeds: dict[str, np.ndarray], repeats: int = 30,
                        warmup: int = 3) -> list[float]:
    """Median seconds per run of every session, all run in one interleaved loop (A B C A B C
    ...), each fed the inputs it declares: background load hits every model alike."""
    prepared = [_feeds_for(s, feeds) for s in sessions]
    for _ in range(warmup):
        for session, f in zip(sessions, prepared, strict=True):
            session.run(None, f)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeats):
        for k, (session, f) in enumerate(zip(sessions, prepared, strict=True)):
            start = time.perf_counter()
            session.run(None, f)
            times[k].append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def latency_ratio(
    model_a,
    model_b,
    batch: int = 8,
    seq: int = 128,
    repeats: int = 30,
    warmup: int = 3,
    threads: int = 1,
) -> dict[str, float]:
    """CPU latency of B relative to A, measured interleaved (A B A B ...), medians.

    Returns ``ratio`` = median_b / median_a (below 1: B is faster), ``speedup`` = its inverse,
    and both medians in seconds.  Interleaving makes background load hit both models alike;
    only the ratio is meaningful on a shared machine.
    """
    sessions = [make_session(model_a, threads), make_session(model_b, threads)]
    median_a, median_b = interleaved_medians(sessions, latency_feeds(batch, seq), repeats,
                                             warmup)
    return {
        "ratio": median_b / median_a,
        "speedup": median_a / median_b,
        "median_a_s": median_a,
        "median_b_s": median_b,
        "repeats": float(repeats),
    }


def model_stats(path: str | Path) -> dict[str, float]:
    """Parameter count (numeric initializers and Constant tensors), file size, node count."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    tensors = list(model.graph.initializer) + [
        attr.t
        for node in model.graph.node
        if node.op_type == "Constant"
        for attr in node.attribute
        if attr.name == "value"
    ]
    # Every numeric tensor counts, so an int8 copy of a weight counts like the float one.
    params = sum(
        int(np.prod(t.dims)) for t in tensors if numpy_helper.to_array(t).dtype.kind in "fiu"
    )
    return {
        "parameters": float(params),
        "file_bytes": float(Path(path).stat().st_size),
        "nodes": float(len(model.graph.node)),
    }


def op_counts(path: str | Path) -> Counter:
    """How many nodes of each op type the graph holds (top-level graph only)."""
    import onnx

    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def main(argv: list[str] | None = None) -> int:
    """Dense baseline: probe accuracy of each export, legacy vs dynamo agreement and latency."""
    parser = argparse.ArgumentParser(description="dense MiniLM baseline metrics")
    parser.add_argument("--build-dir", type=Path, default=Path("build"))
    parser.add_argument("--repeats", type=int, default=30)
    opts = parser.parse_args(argv)

    legacy = opts.build_dir / "minilm_legacy.onnx"
    dynamo = opts.build_dir / "minilm_dynamo.onnx"
    for path in (legacy, dynamo):
        if not path.exists():
            print(
                f"{path} missing: run python benchmarks/export_minilm.py --out-dir {opts.build_dir}"
            )
            return 1
    sentences = textdata.evaluation_sentences()
    labels = [s.topic for s in sentences]
    topics = textdata.labelled_topics()
    n_probe = sum(t in topics for t in labels)
    print(
        f"{len(sentences)} evaluation sentences; probe on {n_probe} of them, {len(topics)} topics"
    )

    embeddings = {}
    for name, path in (("legacy", legacy), ("dynamo", dynamo)):
        start = time.perf_counter()
        embeddings[name] = embed(path, sentences)
        seconds = time.perf_counter() - start
        stats = model_stats(path)
        accuracy = probe_accuracy(embeddings[name], labels, topics=topics)
        print(
            f"{name}: embedded in {seconds:.1f} s, probe accuracy {accuracy:.3f}, "
            f"{stats['parameters'] / 1e6:.2f} M params, {stats['file_bytes'] / 1e6:.1f} MB, "
            f"{stats['nodes']:.0f} nodes"
        )
    agreement = compare(embeddings["legacy"], embeddings["dynamo"])
    print(
        "legacy vs dynamo: mean cosine {mean_cosine:.7f}, min cosine {min_cosine:.7f}, "
        "Spearman {spearman:.7f}".format(**agreement)
    )
    timing = latency_ratio(legacy, dynamo, repeats=opts.repeats)
    print(
        f"latency dynamo/legacy (batch 8 x 128, 1 thread, {opts.repeats} interleaved runs): "
        f"ratio {timing['ratio']:.3f} (medians {timing['median_a_s'] * 1e3:.1f} ms legacy, "
        f"{timing['median_b_s'] * 1e3:.1f} ms dynamo)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


Column = tuple[str, Callable[[dict[str, object]], str]]


def cell(key: str, spec: str = "", suffix: str = "", scale: float = 1.0):
    """A table cell formatter: the value of `key` formatted with `spec`, "-" when NaN/absent."""

    def render(r: dict[str, object]) -> str:
        v = r.get(key, float("nan"))
        if isinstance(v, float) and v != v:
            return "-"
        if isinstance(v, (int, float)) and spec:
            return format(v * scale, spec) + suffix
        return f"{v}{suffix}"

    return render


def markdown_row(r: dict[str, object], columns: Sequence[Column]) -> str:
    return "| " + " | ".join(render(r) for _, render in columns) + " |"


def markdown_table(results: Sequence[dict[str, object]], columns: Sequence[Column]) -> str:
    """One markdown table, the same for every benchmark script."""
    head = "| " + " | ".join(name for name, _ in columns) + " |"
    return "\n".join([head, "|" + "---|" * len(columns),
                      *(markdown_row(r, columns) for r in results)])


def _paired(r: dict[str, object]) -> str:
    if "polarity_acc" not in r:
        return "-"
    return f"{r['polarity_acc']:.3f} ({r['polarity_dense_only']}/{r['polarity_model_only']})"


# The embedding-quality columns every MiniLM table shows, in this order (benchmarks/sources.py
# computes them): pydoc (the text settings were chosen on), news (not), then the labelled
# movie-review probe: "polarity acc (d/m)" is the accuracy, then how many rows only the dense
# model / only this model gets right.
QUALITY_COLUMNS: list[Column] = [
    ("pydoc cos", cell("mean_cosine", ".4f")),
    ("pydoc min", cell("min_cosine", ".4f")),
    ("pydoc Spearman", cell("spearman", ".4f")),
    ("pydoc probe", cell("probe", ".3f")),
    ("news cos", cell("news_cosine", ".4f")),
    ("news min", cell("news_min", ".4f")),
    ("news Spearman", cell("news_spearman", ".4f")),
    ("polarity acc (d/m)", _paired),
]
