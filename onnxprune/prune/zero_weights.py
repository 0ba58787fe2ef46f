"""Unstructured weight zeroing: threshold, per-layer sparsity or N:M.

Zeroing keeps every shape, so it makes a model smaller only after compression and faster
only on sparse kernels (N:M on recent GPUs); it is the cheapest pruning there is and a
baseline for the structured passes.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.core.passes import ReportingPass
from onnxprune.core.weights import WeightUse, const_array, set_const_array, weight_uses
from onnxprune.errors import InputError

__all__ = ["ZeroWeightsPass", "ZeroedLayer", "ZeroWeightsResult", "nm_mask"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZeroedLayer:
    weight: str
    nodes: tuple[str, ...]
    size: int
    zeros_before: int
    zeros_after: int
    skipped: str | None = None

    @property
    def sparsity(self) -> float:
        return self.zeros_after / self.size if self.size else 0.0


@dataclass(frozen=True)
class ZeroWeightsResult:
    layers: tuple[ZeroedLayer, ...]

    @property
    def zeroed(self) -> int:
        return sum(layer.zeros_after - layer.zeros_before for layer in self.layers)

    def to_dict(self) -> dict[str, object]:
        return {
            "zeroed": self.zeroed,
            "layers": [
                {**vars(layer), "sparsity": round(layer.sparsity, 6)} for layer in self.layers
            ],
        }


def nm_mask(weight: np.ndarray, reduce_axis: int, n: int, m: int) -> np.ndarray:
    """Keep-mask with the n largest magnitudes of every m consecutive entries on reduce_axis.

    A reduction length that is not a multiple of m leaves its last partial group dense,
    which is what sparse kernels expect of a padded tail.
    """
    w = np.moveaxis(np.abs(weight), reduce_axis, -1)
    k = w.shape[-1]
    full = (k // m) * m
    keep = np.ones_like(w, dtype=bool)
    if full:
        groups = w[..., :full].reshape(*w.shape[:-1], full // m, m)
        order = np.argsort(-groups, axis=-1, kind="stable")
        ranks = np.argsort(order, axis=-1, kind="stable")
        keep[..., :full] = (ranks < n).reshape(*w.shape[:-1], full)
    return np.moveaxis(keep, -1, reduce_axis)


class ZeroWeightsPass(ReportingPass):
    """Zeroes small MatMul/Gemm weights; each distinct weight tensor is treated once."""

    def __init__(
        self,
        *,
        threshold: float | None = None,
        sparsity: float | None = None,
        nm: tuple[int, int] | None = None,
        ignore: Sequence[str] = (),
    ) -> None:
        super().__init__()
        chosen = [x is not None for x in (threshold, sparsity, nm)]
        if sum(chosen) != 1:
            raise InputError("zeroing needs exactly one of threshold, sparsity or N:M")
        if threshold is not None and not threshold >= 0:
            raise InputError(f"threshold must be >= 0, got {threshold}")
        if sparsity is not None and not 0 <= sparsity < 1:
            raise InputError(f"sparsity must be in [0, 1), got {sparsity}")
        if nm is not None and not (0 < nm[0] < nm[1]):
            raise InputError(f"N:M needs 0 < N < M, got {nm[0]}:{nm[1]}")
        self.threshold = threshold
        self.sparsity = sparsity
        self.nm = nm
        self.ignore = tuple(ignore)
        self.result = ZeroWeightsResult(())

    def _mask(self, w: np.ndarray, reduce_axis: int) -> np.ndarray:
        a = np.abs(w)
        if self.threshold is not None:
            return a > self.threshold
        if self.sparsity is not None:
            k = int(round(self.sparsity * a.size))
            if k == 0:
                return np.ones_like(a, dtype=bool)
            order = np.argsort(a, axis=None, kind="stable")
            keep = np.ones(a.size, dtype=bool)
            keep[order[:k]] = False
            return keep.reshape(a.shape)
        assert self.nm is not None
        return nm_mask(w, reduce_axis, *self.nm)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        by_weight: dict[int, list[WeightUse]] = {}
        for use in weight_uses(model.graph):
            by_weight.setdefault(id(use.weight), []).append(use)
        layers = []
        modified = False
        for uses in by_weight.values():
            weight = uses[0].weight
            names = tuple(u.node.name or u.node.op_type for u in uses)
            w = const_array(weight)
            assert w is not None
            zeros = int(w.size - np.count_nonzero(w))
            skip = None
            if any(fnmatch.fnmatchcase(n, pat) for n in names for pat in self.ignore):
                skip = "matches --ignore"
            elif len({u.reduce_axis for u in uses}) > 1 and self.nm is not None:
                skip = "shared by nodes that reduce over different axes; N:M is ambiguous"
            if skip is not None:
                layers.append(ZeroedLayer(weight.name or "", names, w.size, zeros, zeros, skip))
                continue
            new = np.where(self._mask(w, uses[0].reduce_axis), w, np.zeros_like(w))
            after = int(new.size - np.count_nonzero(new))
            if after != zeros:
                set_const_array(weight, new.astype(w.dtype))
                modified = True
            layers.append(ZeroedLayer(weight.name or "", names, w.size, zeros, after))
            logger.debug("zeroed %s: %d -> %d zeros", weight.name, zeros, after)
        self.result = ZeroWeightsResult(tuple(layers))
        return ir.passes.PassResult(model, modified=modified)
