"""A search allocation's latency, predicted from the latency table instead of timed.

`--target latency=F` looks for the FLOPs share whose pruned shapes run at F of the original
time. Timing a whole pruned model per probe costs a model build and a session each; the
table (channels/latency.py, one-node kernel times cached per machine) predicts it instead:

    ratio = (rest + table(kept counts)) / (rest + table(dense counts))

where `rest` is the dense model's measured time (one timing, once) less what the table
gives its timed ops: the time of ops pruning does not reach (activations, a classifier over
a fixed vocabulary, an LSTM) stays in numerator and denominator alike. The search still
times the model it finally returns.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxprune.calibration.data import Batch
from onnxprune.channels.groups import find_channel_groups
from onnxprune.channels.latency import LatencyTable
from onnxprune.channels.latency_counts import GroupCosts
from onnxprune.io.runtime import make_session
from onnxprune.search.units import Unit

__all__ = ["TableLatency", "model_ms"]

logger = logging.getLogger(__name__)


def model_ms(model: ir.Model, batch: Batch, repeats: int = 7) -> float:
    """Median ms per run of `model` on onnxruntime's CPU provider here."""
    s = make_session(model, "cpu")
    feeds = {i.name: batch[i.name] for i in s.get_inputs()}
    s.run(None, feeds)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        s.run(None, feeds)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


class TableLatency:
    """Predicted latency ratio of allocations over neuron units (None from `of` when some
    unit is not a channel group the table can cost: attention heads)."""

    def __init__(self, model: ir.Model, units: Sequence[Unit], costs: GroupCosts,
                 dense_ms: float) -> None:
        self.units = list(units)
        self.costs = costs
        self.sizes = [g.size for g in costs.groups]
        self.dense_table = costs.total_ms(self.sizes)
        self.rest = max(dense_ms - self.dense_table, 0.0)
        logger.info("latency table: %.3f ms of %.3f ms measured are in timed ops",
                    self.dense_table, dense_ms)

    @classmethod
    def of(cls, model: ir.Model, units: Sequence[Unit], batch: Batch,
           table: LatencyTable | None = None, dense_ms: float | None = None
           ) -> TableLatency | None:
        groups = {g.name: g for g in find_channel_groups(model) if g.prunable}
        if not units or any(u.kind != "neurons" or u.name not in groups for u in units):
            return None
        shapes = {k: list(np.shape(v)) for k, v in batch.items()}
        costs = GroupCosts(model, [groups[u.name] for u in units],
                           table or LatencyTable.default(), shapes)
        if not costs.ops:
            return None
        if dense_ms is None:
            dense_ms = model_ms(model, batch)
        out = cls(model, units, costs, dense_ms)
        costs.table.save()
        return out

    def ratio(self, removed: Mapping[str, int]) -> float:
        """Predicted time of the model with `removed` items per unit, over the original's."""
        counts = [size - removed.get(u.name, 0)
                  for u, size in zip(self.units, self.sizes, strict=True)]
        total = self.rest + self.costs.total_ms(counts)
        self.costs.table.save()
        return total / max(self.rest + self.dense_table, 1e-12)
