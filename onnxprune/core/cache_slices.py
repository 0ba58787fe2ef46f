"""Which slice of a key/value cache a pruned model reads and writes.

When heads go from a decoder exported with its cache, the cache inputs (past key/values) and
outputs (present) lose the same heads: the pruned model is fed a cache of the pruned width,
which it produces itself from then on. Comparing it with the original model needs the map
from original to kept positions, so head removal records it per graph input/output and the
written model carries it in its metadata (`onnxprune.cache_slices`, JSON
{name: [axis, [kept positions of the original]]}); `onnxprune verify` feeds the candidate
the kept slice of every such input and compares the kept slice of every such output.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

__all__ = ["KEY", "record", "to_metadata", "parse", "slice_arrays"]

KEY = "onnxprune.cache_slices"

Slices = dict[str, tuple[int, list[int]]]


def record(graph: ir.Graph, value: ir.Value, axis: int, kept: np.ndarray) -> None:
    """Notes that graph input/output `value` keeps positions `kept` (of its current width)
    along `axis`, composed with what earlier cuts in this run kept."""
    slices: Slices = graph.meta.setdefault(KEY, {})
    name = value.name or ""
    old = slices.get(name)
    idx = [int(k) for k in kept]
    if old is not None:
        idx = [old[1][k] for k in idx]
    slices[name] = (axis, idx)


def parse(text: str | None) -> Slices:
    """The slices a model's metadata records ({} when none or unreadable)."""
    if not text:
        return {}
    try:
        raw = json.loads(text)
        return {str(k): (int(v[0]), [int(i) for i in v[1]]) for k, v in raw.items()}
    except (ValueError, TypeError, IndexError, KeyError, AttributeError):
        return {}


def to_metadata(model: ir.Model) -> None:
    """Moves the slices recorded on the graph into the model's metadata, composed with a
    record an earlier run left there (positions always refer to the first model)."""
    fresh: Slices = model.graph.meta.pop(KEY, None) or {}
    if not fresh:
        return
    slices = parse(model.metadata_props.get(KEY))
    for name, (axis, idx) in fresh.items():
        old = slices.get(name)
        slices[name] = (axis, [old[1][k] for k in idx] if old is not None else idx)
    model.metadata_props[KEY] = json.dumps({k: [a, i] for k, (a, i) in sorted(slices.items())})


def slice_arrays(arrays: Mapping[str, np.ndarray], slices: Slices) -> dict[str, np.ndarray]:
    """Arrays of the original model's width cut to the kept positions; arrays already at the
    pruned width (or not named) are left as they are."""
    out = dict(arrays)
    for name, (axis, idx) in slices.items():
        arr = out.get(name)
        if arr is None or arr.ndim < -axis or arr.shape[axis] == len(idx) \
                or arr.shape[axis] <= max(idx, default=-1):
            continue
        out[name] = np.take(arr, idx, axis=axis)
    return out
