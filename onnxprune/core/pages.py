"""Handing the resident pages of memory-mapped weights back to the page cache.

onnx_ir maps an external-data file read-only for each weight it loads. A page read through
that map stays resident (and counts in RSS) while the map is open, so a command that reads
every weight of a big model, one layer at a time, would end up holding the whole model.
`madvise(MADV_DONTNEED)` on a read-only file map drops the pages from this process: the data
stays valid, and the next read fetches the unchanged file again, usually from the page cache.
Calibration releases after each section, slicing and quantization after each weight.
"""

from __future__ import annotations

import mmap
import weakref

import onnx_ir as ir

__all__ = ["release_pages", "release_tensor"]

# Every memory-mapped weight seen so far: a weight a pass has since replaced is no longer in
# the graph, but its map stays open while the original model (the reference) holds it.
_SEEN: weakref.WeakSet[ir.ExternalTensor] = weakref.WeakSet()
_PAGE = mmap.ALLOCATIONGRANULARITY


def release_tensor(t: object) -> int:
    """Drops the resident pages of one memory-mapped weight; returns the bytes advised.

    Anything but onnx_ir's read-only map of a data file is left alone: for an array a pass
    wrote, the advice would discard data.
    """
    if not isinstance(t, ir.ExternalTensor) or not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    _SEEN.add(t)
    raw = getattr(t, "raw", None)  # onnx_ir's map, made on first read (an internal slot)
    if not isinstance(raw, mmap.mmap) or raw.closed:
        return 0
    offset = t.offset or 0
    start = offset // _PAGE * _PAGE
    end = min(len(raw), offset + t.nbytes)
    if end <= start:
        return 0
    try:
        raw.madvise(mmap.MADV_DONTNEED, start, end - start)
    except (OSError, ValueError):
        return 0  # advice only: a map that refuses it stays resident
    return end - start


def release_pages(model: ir.Model | ir.Graph) -> int:
    """Drops the resident pages of the model's memory-mapped weights, and of every one seen
    by an earlier call that is still alive; returns the bytes advised."""
    graph = model.graph if isinstance(model, ir.Model) else model
    for value in graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            _SEEN.add(value.const_value)
    return sum(release_tensor(t) for t in list(_SEEN))
