"""Structured pruning: remove whole channels (neurons) of every prunable channel group.

The matrices really shrink, so the model is smaller and faster on any runtime. Which
channels go is decided by a registered criterion; how many by a per-group fraction or by
one global ranking with a per-group cap.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.errors import InputError
from onnxprune.graph.channels import ChannelGroup, find_channel_groups
from onnxprune.graph.slicing import keep_channels
from onnxprune.graph.weights import const_array
from onnxprune.scoring.criteria import CRITERIA, ChannelWeights, score_channels

__all__ = ["RemoveNeuronsPass", "GroupDecision", "RemoveNeuronsResult", "group_weights"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupDecision:
    group: str
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    channels_before: int
    channels_after: int
    reason: str | None = None

    def to_dict(self) -> dict[str, object]:
        return dict(vars(self))


@dataclass(frozen=True)
class RemoveNeuronsResult:
    criterion: str
    groups: tuple[GroupDecision, ...]

    @property
    def removed(self) -> int:
        return sum(g.channels_before - g.channels_after for g in self.groups)

    def to_dict(self) -> dict[str, object]:
        return {
            "criterion": self.criterion,
            "removed_channels": self.removed,
            "groups": [g.to_dict() for g in self.groups],
        }


def group_weights(group: ChannelGroup, *, seed: int = 0) -> ChannelWeights:
    """The group's weights, channel-first, for the scoring functions."""
    incoming = []
    seen: set[ir.Value] = set()
    for u in group.producers:
        if u.weight not in seen:
            seen.add(u.weight)
            incoming.append(np.moveaxis(const_array(u.weight), u.out_axis, 0))  # type: ignore[arg-type]
    outgoing = []
    for u in group.consumers:
        if u.weight not in seen:
            seen.add(u.weight)
            outgoing.append(np.moveaxis(const_array(u.weight), u.reduce_axis, 0))  # type: ignore[arg-type]
    return ChannelWeights(tuple(incoming), tuple(outgoing), seed=seed)


def _kept_count(size: int, remove: int, round_to: int) -> int:
    keep = max(size - remove, 1)
    if round_to > 1:
        keep = min(size, max(round_to, math.ceil(keep / round_to) * round_to))
    return keep


Scorer = Callable[[ChannelGroup], np.ndarray]


class RemoveNeuronsPass(ir.passes.InPlacePass):
    """Removes the least important channels of every prunable channel group."""

    def __init__(
        self,
        *,
        sparsity: float,
        criterion: str = "l1",
        global_ranking: bool = False,
        max_group_sparsity: float = 0.9,
        round_to: int = 1,
        ignore: Sequence[str] = (),
        seed: int = 0,
        scorer: Scorer | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= sparsity < 1:
            raise InputError(f"--sparsity must be in [0, 1), got {sparsity}")
        if not 0 < max_group_sparsity < 1:
            raise InputError(f"--max-group-sparsity must be in (0, 1), got {max_group_sparsity}")
        if round_to < 1:
            raise InputError(f"--round-to must be >= 1, got {round_to}")
        if scorer is None and criterion not in CRITERIA:
            raise InputError(
                f"unknown criterion '{criterion}'; choose from {', '.join(sorted(CRITERIA))}"
            )
        self.sparsity = sparsity
        self.criterion = criterion
        self.global_ranking = global_ranking
        self.max_group_sparsity = max_group_sparsity
        self.round_to = round_to
        self.ignore = tuple(ignore)
        self.seed = seed
        self.scorer = scorer
        self.result = RemoveNeuronsResult(criterion, ())

    def _score(self, group: ChannelGroup) -> np.ndarray:
        if self.scorer is not None:
            return np.asarray(self.scorer(group), dtype=np.float64)
        return score_channels(self.criterion, group_weights(group, seed=self.seed))

    def _keep_counts(self, groups: list[ChannelGroup], scores: list[np.ndarray]) -> list[int]:
        if not self.global_ranking:
            return [
                _kept_count(g.size, int(math.floor(self.sparsity * g.size)), self.round_to)
                for g in groups
            ]
        # One ranking across groups: scores are divided by their group's mean so that
        # groups of different scale compete fairly; each group keeps at least
        # (1 - max_group_sparsity) of its channels.
        total = sum(g.size for g in groups)
        budget = int(math.floor(self.sparsity * total))
        floors = [max(1, math.ceil((1 - self.max_group_sparsity) * g.size)) for g in groups]
        entries = []
        for gi, s in enumerate(scores):
            norm = s / max(float(np.mean(np.abs(s))), 1e-30)
            entries.extend((float(v), gi) for v in norm)
        entries.sort()
        removed = [0] * len(groups)
        for _, gi in entries:
            if budget == 0:
                break
            if groups[gi].size - removed[gi] > floors[gi]:
                removed[gi] += 1
                budget -= 1
        return [_kept_count(g.size, r, self.round_to) for g, r in zip(groups, removed)]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups = find_channel_groups(model, ignore=self.ignore)
        prunable = [g for g in groups if g.prunable]
        scores = [self._score(g) for g in prunable]
        counts = self._keep_counts(prunable, scores)
        decisions: list[GroupDecision] = []
        modified = False
        plan = dict(zip((id(g) for g in prunable), zip(scores, counts)))
        for g in groups:
            before = g.size
            names = (tuple(u.node.name for u in g.producers), tuple(u.node.name for u in g.consumers))
            if not g.prunable:
                decisions.append(GroupDecision(g.name, *names, before, before, g.skip_reason))
                continue
            s, count = plan[id(g)]
            if count < before:
                keep = np.sort(np.argsort(-s, kind="stable")[:count])
                keep_channels(model.graph, g, keep)
                modified = True
            decisions.append(GroupDecision(g.name, *names, before, count))
            logger.info("group %s: %d -> %d channels", g.name, before, count)
        self.result = RemoveNeuronsResult(self.criterion, tuple(decisions))
        return ir.passes.PassResult(model, modified=modified)
