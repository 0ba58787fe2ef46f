"""More training rows for the block repair from the same calibration sentences.

A pruned block has far more weights than a few hundred calibration sentences have tokens, so
fitting all of them learns the sentences rather than the block: on MiniLM the fitted rows'
loss fell 27 % while held-out rows gained 5 %. New text is not allowed (the calibration data
is the only training data), but every token's activation depends on the other tokens of its
sentence through attention, so the same sentences with a few tokens left out or exchanged
give new, realistic block inputs and, from the original model, their targets.

Two edits are made to each copy of a batch, position by position along the sequence axis of
every [batch, seq] input (ids, token types, the mask, position ids alike):

* **drop**: each token strictly between a sentence's first and last real token is left out
  with probability ``drop``; the rest move left and the padding grows;
* **swap**: each such token is replaced, in every [batch, seq] input, by a random inner token
  of another sentence of the same batch, with probability ``swap``.

The first and last real tokens (a classifier token and a separator, in BERT-like models)
always stay. Only models whose data carries a token mask (``--token-mask``) are augmented:
the mask says which positions are real.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onnxprune.calibration.data import Batch

__all__ = ["Augment", "augment_batch"]


@dataclass(frozen=True)
class Augment:
    """How many edited copies of every calibration batch to add, and how much to edit."""

    copies: int = 0
    drop: float = 0.15
    swap: float = 0.15
    seed: int = 0


def _seq_inputs(batch: Batch, mask: np.ndarray) -> list[str]:
    return [k for k, v in batch.items() if np.shape(v) == mask.shape]


def augment_batch(batch: Batch, token_mask: str, options: Augment,
                  rng: np.random.Generator) -> Batch | None:
    """One edited copy of `batch` (same number of sentences, in the same order), or None
    when the batch has no [batch, seq] token mask to edit by."""
    if token_mask not in batch:
        return None
    mask = np.asarray(batch[token_mask])
    if mask.ndim != 2 or mask.shape[1] < 3:
        return None
    names = _seq_inputs(batch, mask)
    real = mask != 0
    n, seq = mask.shape
    inner: list[np.ndarray] = []
    for i in range(n):
        pos = np.flatnonzero(real[i])
        inner.append(pos[1:-1] if pos.size > 2 else pos[:0])
    rows: list[dict[str, np.ndarray]] = []
    for i in range(n):
        pos = np.flatnonzero(real[i])
        if pos.size <= 2:
            rows.append({k: np.asarray(batch[k])[i, pos] for k in names})
            continue
        cols = {k: np.asarray(batch[k])[i].copy() for k in names}
        others = [j for j in range(n) if j != i and inner[j].size]
        if others and options.swap > 0:
            for p in inner[i][rng.random(inner[i].size) < options.swap]:
                j = others[int(rng.integers(len(others)))]
                q = inner[j][int(rng.integers(inner[j].size))]
                for k in names:
                    cols[k][p] = np.asarray(batch[k])[j, q]
        keep = np.ones(pos.size, dtype=bool)
        keep[1:-1] = rng.random(pos.size - 2) >= options.drop
        rows.append({k: cols[k][pos[keep]] for k in names})
    width = max(len(r[token_mask]) for r in rows)
    out: Batch = dict(batch)
    for k in names:
        src = np.asarray(batch[k])
        arr = np.zeros((n, width), dtype=src.dtype)
        for i, r in enumerate(rows):
            arr[i, : len(r[k])] = r[k]
        out[k] = arr
    return out


def augmented(batches: Sequence[Batch], token_mask: str | None, options: Augment
              ) -> list[tuple[Batch, int]]:
    """The edited copies, each with the index of the batch it was made from."""
    if token_mask is None or options.copies <= 0:
        return []
    rng = np.random.default_rng(options.seed)
    out: list[tuple[Batch, int]] = []
    for _ in range(options.copies):
        for b, batch in enumerate(batches):
            copy = augment_batch(batch, token_mask, options, rng)
            if copy is not None:
                out.append((copy, b))
    return out
