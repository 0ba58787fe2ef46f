"""Lossless clean-up: channels that provably do nothing, and constants stored twice.

- A channel whose outgoing weights are all zero in every consumer is never read: it is
  sliced away (exact).
- A channel whose incoming weights are all zero in every producer outputs a constant (its
  bias through the per-channel ops that follow): it is sliced away and that constant, times
  its outgoing weights, is folded into the consumers' bias (exact up to float rounding). The
  constant is read from one run on generated inputs, which is exact for a constant.
- Initializers with identical dtype, shape and bytes are shared (onnx_ir's
  DeduplicateInitializersPass).

Nothing is decided from data: a channel is removed only when the weights prove it is dead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import DeduplicateInitializersPass, RemoveUnusedNodesPass

from onnxprune.calibration.calibration import Calibration
from onnxprune.calibration.data import Batch, input_specs, random_batches
from onnxprune.channels.groups import find_channel_groups
from onnxprune.channels.model import ChannelGroup
from onnxprune.core.passes import ReportingPass
from onnxprune.core.weights import const_array
from onnxprune.prune.remove_neurons import RemoveNeuronsPass
from onnxprune.quant.qdq_build import constant_bytes
from onnxprune.repair.reconstruct import shared_input

__all__ = ["CleanupPass", "CleanupResult", "dead_channels"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CleanupResult:
    unread: dict[str, int]  # group -> channels removed because nothing reads them
    constant: dict[str, int]  # group -> constant channels folded into the next bias
    shared_constants: int = 0  # initializers dropped as duplicates
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def removed(self) -> int:
        return sum(self.unread.values()) + sum(self.constant.values())

    def to_dict(self) -> dict[str, object]:
        return {"unread_channels": self.unread, "constant_channels": self.constant,
                "removed_channels": self.removed, "shared_constants": self.shared_constants,
                "constant_bytes_before": self.bytes_before,
                "constant_bytes_after": self.bytes_after}


def _all_zero_along(w: np.ndarray, axis: int, size: int) -> np.ndarray:
    """[size] bool: the slices of `w` at each index of `axis` that are all zero."""
    moved = np.moveaxis(w, axis, 0).reshape(size, -1)
    return ~np.any(moved != 0, axis=1)


def dead_channels(group: ChannelGroup) -> tuple[np.ndarray, np.ndarray]:
    """(unread, constant) channel indices of a prunable group, proven from its weights."""
    unread = np.ones(group.size, dtype=bool)
    for use in group.consumers:
        w = const_array(use.weight)
        if w is None or w.shape[use.reduce_axis] != group.size:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        unread &= _all_zero_along(w, use.reduce_axis, group.size)
    constant = np.ones(group.size, dtype=bool)
    for use in group.producers:
        w = const_array(use.weight)
        if w is None or w.shape[use.out_axis] != group.size:
            constant[:] = False
            break
        constant &= _all_zero_along(w, use.out_axis, group.size)
    if not group.producers:
        constant[:] = False
    constant &= ~unread
    return np.flatnonzero(unread), np.flatnonzero(constant)


class CleanupPass(ReportingPass):
    """Removes provably dead channels and shares duplicate constants; changes no output."""

    def __init__(self, *, batches: Sequence[Batch] | None = None,
                 ignore: Sequence[str] = ()) -> None:
        """`batches`: inputs to read constant channels' values on (default: generated)."""
        super().__init__()
        self.batches = batches
        self.ignore = tuple(ignore)
        self.result = CleanupResult({}, {})

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = constant_bytes(model.graph)
        keep: dict[str, np.ndarray] = {}
        unread_n: dict[str, int] = {}
        constant_n: dict[str, int] = {}
        for g in find_channel_groups(model, ignore=self.ignore):
            if not g.prunable:
                continue
            unread, constant = dead_channels(g)
            if len(constant) and shared_input(g) is None:
                constant = constant[:0]  # no single consumer input to fold the value from
            drop = np.union1d(unread, constant)
            if not len(drop) or len(drop) >= g.size:
                continue  # nothing dead, or everything: leave a whole group to other passes
            keep[g.name] = np.setdiff1d(np.arange(g.size), drop)
            if len(unread):
                unread_n[g.name] = len(unread)
            if len(constant):
                constant_n[g.name] = len(constant)
        modified = False
        if keep:
            calib = None
            if constant_n:
                batches = self.batches or random_batches(input_specs(model), count=1)
                calib = Calibration(list(batches)[:1], reconstruct="bias")
            RemoveNeuronsPass(keep=keep, criterion="l1", calibration=calib,
                              ignore=self.ignore)(model)
            modified = True
        count = len(model.graph.initializers)
        DeduplicateInitializersPass()(model)
        shared = count - len(model.graph.initializers)
        if modified or shared:
            RemoveUnusedNodesPass()(model)
        self.result = CleanupResult(unread_n, constant_n, shared, before,
                                    constant_bytes(model.graph))
        logger.info("clean-up: %d channels removed, %d duplicate constants shared",
                    self.result.removed, shared)
        return ir.passes.PassResult(model, modified=modified or shared > 0)
