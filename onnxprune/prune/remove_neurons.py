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
from onnx_ir.passes.common import NameFixPass

from onnxprune.calibration.calibration import Calibration, CalibrationLike, as_calibration
from onnxprune.calibration.propagate import Propagator
from onnxprune.channels.criteria import CRITERIA, DATA_AWARE, ChannelWeights, score_channels
from onnxprune.channels.groups import find_channel_groups, group_of
from onnxprune.channels.keep import KeepSpec, fixed_indices, keep_counts
from onnxprune.channels.latency import LatencyTable
from onnxprune.channels.latency_counts import fastest_counts, ms_per_channel
from onnxprune.channels.model import ChannelGroup
from onnxprune.channels.shapes import shape_hints
from onnxprune.channels.slicing import keep_channels, keep_many
from onnxprune.conv.refit import conv_sweep_targets, refit_convs, sweep_candidates
from onnxprune.conv.repair import conv_repairable, prune_conv_group
from onnxprune.conv.sensitivity import DEFAULT_LEVELS, allocate_removals, conv_sensitivity
from onnxprune.core.pages import release_pages
from onnxprune.core.passes import ReportingPass
from onnxprune.core.weights import const_array
from onnxprune.errors import InputError, InternalError
from onnxprune.repair.reconstruct import (
    Sweep,
    apply_fit,
    collect_stats,
    fit_group,
    reference_targets,
    shared_input,
)

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

    @classmethod
    def of(cls, group: ChannelGroup, after: int, reason: str | None = None) -> GroupDecision:
        return cls(
            group.name,
            tuple(u.node.name or "" for u in group.producers),
            tuple(u.node.name or "" for u in group.consumers),
            group.size,
            after,
            reason,
        )


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


def _by_channel(w: np.ndarray, axis: int, cls: np.ndarray, size: int) -> np.ndarray:
    """[size, n * fan] rows: the weight slices of each channel side by side (n positions per
    channel at most; a channel with fewer is padded with zeros, which no criterion rewards).

    The weight keeps its float dtype (the criteria accumulate in float64 a block at a time)
    and is a view when the channels are already in order: a memory-mapped weight of a big
    model is not copied to be scored."""
    flat = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    if not np.issubdtype(flat.dtype, np.floating):
        flat = flat.astype(np.float64)
    order = np.argsort(cls, kind="stable")
    order = order[cls[order] >= 0]
    counts = np.bincount(cls[order], minlength=size)
    per = max(int(counts.max()) if counts.size else 1, 1)
    if per == 1 and counts.size == size and np.all(counts == 1):
        # A view only when every position is a channel of this group, in order; positions of
        # other groups (-1, a Concat's other inputs) are dropped by the index.
        whole = flat.shape[0] == size and np.array_equal(order, np.arange(size))
        return flat if whole else flat[order]
    out = np.zeros((size, per * flat.shape[1]))
    slot = np.zeros(size, dtype=np.int64)
    for p in order.tolist():
        c = int(cls[p])
        out[c, slot[c] * flat.shape[1]:(slot[c] + 1) * flat.shape[1]] = flat[p]
        slot[c] += 1
    return out


def group_weights(
    group: ChannelGroup, *, seed: int = 0, stats: dict[str, np.ndarray] | None = None
) -> ChannelWeights:
    """The group's weights, channel-first, for the scoring functions.

    A Conv filter is one row (in-channels x kernel); a channel that a Flatten spreads over
    several features, or a packed projection over several columns, is all of them."""
    incoming = []
    seen: set[ir.Value] = set()
    for u in group.producers:
        if u.weight not in seen:
            seen.add(u.weight)
            w = const_array(u.weight)
            assert w is not None
            incoming.append(_by_channel(w, u.out_axis, group.channel_map(u, "out"), group.size))
    outgoing = []
    for u in group.consumers:
        if u.weight not in seen:
            seen.add(u.weight)
            w = const_array(u.weight)
            assert w is not None
            outgoing.append(_by_channel(w, u.reduce_axis, group.channel_map(u, "in"),
                                        group.size))
    return ChannelWeights(tuple(incoming), tuple(outgoing), stats=stats or {}, seed=seed)


def _floor(x: float) -> int:
    """floor that forgives float noise: 0.57 * 100 is 56.99999999999999, and means 57."""
    return int(math.floor(x + 1e-9))


def _kept_count(size: int, remove: int, round_to: int | str) -> int:
    keep = max(size - remove, 1)
    if isinstance(round_to, int) and round_to > 1:
        keep = min(size, max(round_to, math.ceil(keep / round_to) * round_to))
    return keep


def _shapes(calib: Calibration | None) -> dict[str, list[int]] | None:
    """Input shapes of the first calibration batch (the latency table's op sizes)."""
    if calib is None or not calib.batches:
        return None
    return {k: list(np.shape(v)) for k, v in calib.batches[0].items()}


Scorer = Callable[[ChannelGroup], np.ndarray]
Progress = Callable[[int, int, str], None]  # (groups done, groups in all, current group)

class RemoveNeuronsPass(ReportingPass):
    """Removes the least important channels of every prunable channel group."""

    def __init__(
        self,
        *,
        sparsity: float = 0.0,
        criterion: str | None = None,
        global_ranking: bool = False,
        max_group_sparsity: float = 0.9,
        round_to: int | str = 1,
        ignore: Sequence[str] = (),
        seed: int = 0,
        scorer: Scorer | None = None,
        calibration: CalibrationLike | None = None,
        progress: Progress | None = None,
        keep: KeepSpec | None = None,
        reference: ir.Model | None = None,
        sweep: Sweep | None = None,
        latency_table: LatencyTable | None = None,
    ) -> None:
        """`keep`, when given, decides each named group instead of `sparsity`; groups it
        does not name are left whole, and none after the last one it cuts is visited.
        `reference` is the model the repair reproduces when `model` was already pruned by
        an earlier pass (default: the model as given). `sweep`: calibration state shared
        with the runs before and after this one (see Sweep; it holds the targets).
        `calibration`: a Calibration, a path to .npz data, or a list / iterator of batches.
        `round_to="auto"`: counts this machine runs fastest by `latency_table` (default:
        channels/latency.py's cached table); with --global it also shares time, not channels."""
        super().__init__()
        calibration = as_calibration(calibration)
        # OBS with data (chooses and refits jointly), l1 without: the CLI's defaults.
        criterion = criterion or ("obs" if calibration is not None else "l1")
        if not 0 <= sparsity < 1:
            raise InputError(f"--sparsity must be in [0, 1), got {sparsity}")
        if not 0 < max_group_sparsity < 1:
            raise InputError(f"--max-group-sparsity must be in (0, 1), got {max_group_sparsity}")
        if round_to != "auto" and (not isinstance(round_to, int) or round_to < 1):
            raise InputError(f"--round-to must be a positive integer or auto, got {round_to!r}")
        known = set(CRITERIA) | {"obs"}
        if scorer is None and criterion not in known:
            raise InputError(
                f"unknown criterion '{criterion}'; choose from {', '.join(sorted(known))}"
            )
        if criterion in DATA_AWARE and calibration is None and scorer is None:
            raise InputError(f"criterion '{criterion}' needs calibration data (--calibration)")
        self.sparsity = sparsity
        self.criterion = criterion
        self.global_ranking = global_ranking
        self.max_group_sparsity = max_group_sparsity
        self.round_to = round_to
        self.ignore = tuple(ignore)
        self.seed = seed
        self.scorer = scorer
        self.calibration = calibration
        self.progress = progress
        self.keep = keep
        self.reference = reference
        self.sweep = sweep
        self.latency_table = latency_table
        self.result = RemoveNeuronsResult(criterion, ())
        self.kept: dict[str, np.ndarray] = {}  # the channels each pruned group kept

    def _score(self, group: ChannelGroup) -> np.ndarray:
        if self.scorer is not None:
            return np.asarray(self.scorer(group), dtype=np.float64)
        return score_channels(self.criterion, group_weights(group, seed=self.seed))

    def _keep_counts(self, groups: list[ChannelGroup], scores: list[np.ndarray]) -> list[int]:
        if self.keep is not None:
            counts = keep_counts(self.keep, {g.name: g.size for g in groups}, "group")
            return [counts[g.name] for g in groups]
        if not self.global_ranking:
            return [
                _kept_count(g.size, _floor(self.sparsity * g.size), self.round_to)
                for g in groups
            ]
        # One ranking across groups: scores are divided by their group's mean so that
        # groups of different scale compete fairly; each group keeps at least
        # (1 - max_group_sparsity) of its channels.
        total = sum(g.size for g in groups)
        budget = _floor(self.sparsity * total)
        floors = [max(1, g.size - _floor(self.max_group_sparsity * g.size)) for g in groups]
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
        return [
            _kept_count(g.size, r, self.round_to) for g, r in zip(groups, removed, strict=True)
        ]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.calibration is not None:
            return self._call_calibrated(model, self.calibration)
        groups = find_channel_groups(model, ignore=self.ignore)
        prunable = [g for g in groups if g.prunable]
        scores = []
        for g in prunable:
            scores.append(self._score(g))
            release_pages(model)  # a big model's weights are read one group at a time
        counts = self._auto_round(model, prunable, self._keep_counts(prunable, scores), None)
        decisions: list[GroupDecision] = []
        modified = False
        plan = dict(zip((id(g) for g in prunable), zip(scores, counts, strict=True), strict=True))
        cuts: list[tuple[ChannelGroup, np.ndarray]] = []
        for g in groups:
            before = g.size
            if not g.prunable:
                decisions.append(GroupDecision.of(g, before, g.skip_reason))
                continue
            s, count = plan[id(g)]
            decisions.append(GroupDecision.of(g, count))
            if count < before:
                keep = fixed_indices(self.keep.get(g.name)) if self.keep else None
                if keep is None:
                    keep = np.sort(np.argsort(-s, kind="stable")[:count])
                cuts.append((g, keep))
                self.kept[g.name] = keep
                modified = True
            logger.info("group %s: %d -> %d channels", g.name, before, count)
        # All at once: two groups may cut the same tensor (a Concat feeding one consumer),
        # and their positions refer to the original tensors.
        keep_many(model.graph, cuts)
        self.result = RemoveNeuronsResult(self.criterion, tuple(decisions))
        return ir.passes.PassResult(model, modified=modified)

    def _call_calibrated(self, model: ir.Model, calib: Calibration) -> ir.passes.PassResult:
        """Prunes groups one by one in graph order, refitting each against the original."""
        NameFixPass()(model)
        order = {node: i for i, node in enumerate(model.graph)}
        hints = shape_hints(model)
        groups = find_channel_groups(model, ignore=self.ignore, hints=hints)
        prunable = sorted(
            (g for g in groups if g.prunable), key=lambda g: min(order[u.node] for u in g.producers)
        )
        needs_targets = calib.reconstruct == "lstsq" or self.criterion == "obs"
        reasons: dict[str, str] = {}
        for g in prunable:
            if conv_repairable(g):
                continue
            if shared_input(g) is None:
                reasons[g.name] = "consumers read different tensors; no calibration repair"
            elif not g.consumers_are_matrices:
                reasons[g.name] = "channels spread over blocks; no calibration repair"
        counts = self._auto_round(model, prunable, self._calibrated_counts(model, prunable, calib),
                                  calib)
        if self.keep is not None:  # groups after the last one cut have nothing to do
            last = max((i for i, (g, c) in enumerate(zip(prunable, counts, strict=True))
                        if c < g.size), default=-1)
            prunable, counts = prunable[:last + 1], counts[:last + 1]
        if self.sweep is not None:
            self.sweep.check(model)
            reference = self.sweep.targets if needs_targets else None
        else:
            reference = (reference_targets(self.reference or model, prunable, calib)
                         if needs_targets else None)
        # Convs after the first cut are refit once more at the end (conv_refit); their
        # original outputs are captured now, before any edit.
        cut = [u.node for g, c in zip(prunable, counts, strict=True) if c < g.size
               for u in g.producers]
        sweep = sweep_candidates(model, cut) if calib.reconstruct == "lstsq" else []
        sweep_targets = conv_sweep_targets(self.reference or model, sweep, calib) \
            if sweep else None
        source = self.sweep.source if self.sweep is not None else Propagator(
            model, calib.batches, calib.provider)
        decisions: dict[str, GroupDecision] = {}
        modified = False
        # Original output channels each pruned producer still has (for Conv refit targets).
        out_index: dict[str | None, np.ndarray] = {}
        for step, (g0, count) in enumerate(zip(prunable, counts, strict=True)):
            if self.progress is not None:
                self.progress(step, len(prunable), g0.name)
            # Re-analyse: earlier groups' slicing replaced constants this group may share.
            key = g0.producers[0].node
            current = group_of(model, key, hints)
            if current is None or not current.prunable:
                raise InternalError(f"group '{g0.name}' changed while pruning; please report")
            before = current.size
            note = reasons.get(g0.name)
            source.advance(u.node for u in current.producers)
            decisions[g0.name] = GroupDecision.of(current, count, note)
            if count < before:
                fixed = fixed_indices(self.keep.get(g0.name)) if self.keep else None
                if note is None and not current.consumers_are_matrices:
                    scorer = None
                    if self.criterion != "obs":
                        def scorer(st: dict, g: ChannelGroup = current) -> np.ndarray:
                            cw = group_weights(g, seed=self.seed, stats=st)
                            return score_channels(self.criterion, cw)
                    self.kept[g0.name] = prune_conv_group(
                        model, reference, current, count, calib, criterion_scores=scorer,
                        fixed=fixed, out_index=out_index, source=source, hints=hints)
                elif note is None:
                    stats = collect_stats(source, reference, current, calib,
                                          histogram=self.criterion != "obs")
                    scores = None
                    if self.criterion != "obs" and fixed is None:
                        cw = group_weights(current, seed=self.seed, stats=stats.as_dict())
                        scores = score_channels(self.criterion, cw)
                    fit = fit_group(current, stats, count, scores, calib, keep=fixed)
                    keep_channels(model.graph, current, fit.keep, hints=hints)
                    apply_fit(model.graph, current, fit)
                    self.kept[g0.name] = fit.keep
                else:
                    if fixed is None:
                        s = score_channels("l1", group_weights(current, seed=self.seed))
                        fixed = np.sort(np.argsort(-s)[:count])
                    keep_channels(model.graph, current, fixed, hints=hints)
                    self.kept[g0.name] = fixed
                modified = True
                kept = self.kept[g0.name]
                for u in current.producers:
                    m = current.channel_map(u, "out")
                    gone = np.nonzero((m >= 0) & ~np.isin(m, kept))[0]
                    idx = out_index.get(u.node.name, np.arange(m.size))
                    out_index[u.node.name] = np.delete(idx, gone)
            logger.info("group %s: %d -> %d channels", g0.name, before, count)
        if sweep_targets is not None and modified:
            refit_convs(model, sweep_targets, [u.node.name or "" for u in sweep], calib,
                        out_index)
        out = [decisions.get(g.name) or GroupDecision.of(g, g.size, g.skip_reason) for g in groups]
        self.result = RemoveNeuronsResult(self.criterion, tuple(out))
        return ir.passes.PassResult(model, modified=modified)

    def _auto_round(self, model: ir.Model, groups: list[ChannelGroup], counts: list[int],
                    calib: Calibration | None) -> list[int]:
        if self.round_to != "auto" or self.keep is not None:
            return counts
        return fastest_counts(model, groups, counts, self._table(), _shapes(calib))

    def _table(self) -> LatencyTable:
        self.latency_table = self.latency_table or LatencyTable.default()
        return self.latency_table

    def _calibrated_counts(
        self, model: ir.Model, groups: list[ChannelGroup], calib: Calibration
    ) -> list[int]:
        if not self.global_ranking or self.keep is not None:
            return self._keep_counts(groups, [np.zeros(g.size) for g in groups])
        if any(conv_repairable(g) for g in groups):
            return self._sensitivity_counts(model, groups, calib)
        # Global allocation compares groups by data-aware scores on the original model.
        criterion = "activation" if self.criterion == "obs" else self.criterion
        scores = []
        source = Propagator(model, calib.batches, calib.provider)
        for g in groups:
            if shared_input(g) is None or not g.consumers_are_matrices:
                scores.append(score_channels("l1", group_weights(g, seed=self.seed)))
                continue
            source.advance(u.node for u in g.producers)
            stats = collect_stats(source, None, g, calib)
            cw = group_weights(g, seed=self.seed, stats=stats.as_dict())
            scores.append(score_channels(criterion, cw))
        return self._keep_counts(groups, scores)

    def _sensitivity_counts(
        self, model: ir.Model, groups: list[ChannelGroup], calib: Calibration
    ) -> list[int]:
        """Conv groups share the channel budget by their measured output error (each pruned
        alone and refit at a few levels, conv_sensitivity); other groups keep the flat
        share. Levels stop at --max-group-sparsity."""
        conv = [g for g in groups if conv_repairable(g)]
        levels = tuple(v for v in DEFAULT_LEVELS if v < self.max_group_sparsity)
        levels = (*levels, self.max_group_sparsity) if self.max_group_sparsity < 0.75 \
            else levels
        curves = {c.group: c for c in conv_sensitivity(model, conv, calib, levels=levels)}
        budget = _floor(self.sparsity * sum(g.size for g in groups))
        flat = {g.name: _floor(self.sparsity * g.size) for g in groups if g.name not in curves}
        ms = ms_per_channel(model, conv, self._table(), _shapes(calib)) \
            if self.round_to == "auto" else None  # share the time saved, not the channels
        removed = allocate_removals(list(curves.values()), max(budget - sum(flat.values()), 0), ms)
        for name, r in removed.items():
            logger.info("group %s: %d channels removed by measured sensitivity", name, r)
        return [_kept_count(g.size, flat.get(g.name, removed.get(g.name, 0)), self.round_to)
                for g in groups]
