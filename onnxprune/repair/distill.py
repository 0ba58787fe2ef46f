"""Distillation repair: each pruned block learns to reproduce the original model's block.

Runs after neuron removal (whose least-squares refit is the starting point). Blocks are
repaired in graph order. For each, the calibration batches run through the model repaired
so far (giving the block's inputs) while the original model gives the target: the block
output after the following norm, where one exists. All block weights - both matrices and
their biases - are then optimised with mini-batch Adam (numpy, no torch), with early
stopping on calibration sentences held out from the gradient. The least-squares weights
are kept when distillation does not lower the loss on the fitted rows or its held-out loss
is more than FitOptions.start_slack above theirs (which is in-sample: the least-squares
repair was fitted on the held-out sentences too; repair/fit.py).

Blocks it cannot model (an op it has no gradient for, a value read outside the block, a
target missing from the original) are left as they are and the result says why.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.calibration.calibration import Calibration
from onnxprune.calibration.data import Batch
from onnxprune.calibration.propagate import Propagator
from onnxprune.calibration.runner import row_mask
from onnxprune.channels.groups import find_channel_groups
from onnxprune.channels.model import ChannelGroup
from onnxprune.core.weights import const_array, const_shape, set_const_array
from onnxprune.errors import DataError, InputError
from onnxprune.repair.augment import Augment, augmented
from onnxprune.repair.block import Block, BlockFunction, find_block
from onnxprune.repair.fit import FitOptions, Rows, distill_block

__all__ = ["DistillRepairPass", "DistillResult", "BlockRepair", "DEFAULT_AUGMENT",
           "DEFAULT_REPAIR_FLOPS", "HOLDOUT_EVERY", "default_steps", "step_flops"]

logger = logging.getLogger(__name__)

# Every 8th calibration sample (sentence) is held out for early stopping.
HOLDOUT_EVERY = 8
MIN_SAMPLES = 2 * HOLDOUT_EVERY
# The default budget is arithmetic, not time, so the same model and data give the same bytes
# on any machine at any load: the optimiser steps of all blocks together may cost this many
# floating-point operations (forward and backward, `step_flops`), shared evenly. On MiniLM
# at 50 % FFN that is 642 steps per block: the held-out best comes after 632 (4 passes over
# the rows) and 700 steps give the same quality (benchmarks/distill_ablation.py).
DEFAULT_REPAIR_FLOPS = 3.5e12
MAX_BLOCK_STEPS = 2000  # a block never takes more by default
MIN_BLOCK_STEPS = 100  # fewer than this by default: the least-squares repair is kept
# Edited copies of each calibration batch (with a token mask). On MiniLM at 50 % FFN, 3
# copies raised the held-out cosine from 0.9698 to 0.9721 in the same optimisation time.
DEFAULT_AUGMENT = 3


@dataclass(frozen=True)
class BlockRepair:
    """What happened to one block. Losses are mean squared errors per output element."""

    group: str
    status: str  # "distilled", "kept least squares", "declined"
    reason: str | None = None
    fit_before: float | None = None
    fit_after: float | None = None
    held_before: float | None = None
    held_after: float | None = None
    epochs: int = 0
    seconds: float = 0.0
    target: str | None = None
    fit_rows: int = 0  # rows the gradient saw (edited copies included)
    held_rows: int = 0  # rows of the held-out calibration sentences (early stopping)
    steps: int = 0  # optimiser steps to the kept weights: replaying them gives the same bytes
    horizon: int = 0  # steps the learning rate decayed towards (replayed with `steps`)

    def to_dict(self) -> dict[str, object]:
        return dict(vars(self))


@dataclass(frozen=True)
class DistillResult:
    blocks: tuple[BlockRepair, ...] = ()
    seconds: float = 0.0
    budget: str = ""  # how long blocks could optimise, e.g. "1000 steps per block"

    @property
    def distilled(self) -> int:
        return sum(b.status == "distilled" for b in self.blocks)

    @property
    def steps(self) -> dict[str, int]:
        """Steps per block (`DistillRepairPass(steps=...)` replays them exactly)."""
        return {b.group: b.steps for b in self.blocks if b.status != "declined"}

    @property
    def horizons(self) -> dict[str, int]:
        """The learning-rate schedule length per block, replayed along with `steps`."""
        return {b.group: b.horizon for b in self.blocks if b.status != "declined"}

    def to_dict(self) -> dict[str, object]:
        return {"distilled_blocks": self.distilled, "seconds": round(self.seconds, 2),
                "budget": self.budget, "repairs": [b.to_dict() for b in self.blocks]}


def step_flops(block: Block, batch_rows: int) -> float:
    """Floating-point operations of one optimiser step on `block`: forward and backward
    through its weight matrices (3 multiply-adds per weight and row)."""
    weights = sum(int(np.prod(np.shape(block.consts[v]))) for v in block.params)
    return 6.0 * batch_rows * weights


def default_steps(blocks: Sequence[Block], batch_rows: int, flops: float | None = None) -> int:
    """Steps per block that an arithmetic budget (default DEFAULT_REPAIR_FLOPS) allows, at
    most MAX_BLOCK_STEPS."""
    per_step = sum(step_flops(b, batch_rows) for b in blocks)
    budget = DEFAULT_REPAIR_FLOPS if flops is None else flops
    return int(min(MAX_BLOCK_STEPS, budget // max(per_step, 1.0)))


def _samples(batch: Batch, lead: tuple[int, ...]) -> np.ndarray:
    """Sample index (within the batch) of each flattened row: the first axis is the batch."""
    per = int(np.prod(lead[1:])) if len(lead) > 1 else 1
    return np.arange(int(np.prod(lead))) // per


class _Collector:
    """Keeps the unmasked rows of some tensors, batch by batch, and the sample of each row."""

    def __init__(self, names: Sequence[str], token_mask: str | None, dtype: type,
                 origins: Sequence[int | None] = ()) -> None:
        self.names = list(names)
        # Per batch: None for a calibration batch, else the index of the batch it was made
        # from (its rows belong to the same samples, so they are held out together).
        self.origins = list(origins)
        self.starts: list[int] = []  # first sample index of each calibration batch
        self.aug_parts: list[np.ndarray] = []
        self.token_mask = token_mask
        self.dtype = dtype
        self.parts: dict[str, list[np.ndarray]] = {n: [] for n in self.names}
        self.sample_parts: list[np.ndarray] = []
        self.leads: list[tuple[int, ...]] = []
        self.offset = 0

    def __call__(self, arrays: dict[str, np.ndarray], batch: Batch) -> None:
        arrays = {**batch, **arrays}  # a block may read a graph input directly
        first = arrays[self.names[0]]
        lead = tuple(first.shape[:-1]) or (1,)
        rows = int(np.prod(lead))
        mask = row_mask(batch, self.token_mask, rows, lead)
        k = len(self.leads)
        origin = self.origins[k] if k < len(self.origins) else None
        if origin is None:
            self.starts.append(self.offset)
            samples = _samples(batch, lead) + self.offset
            self.offset += lead[0]
        else:
            samples = _samples(batch, lead) + self.starts[origin]
        self.leads.append(tuple(first.shape[:-1]) if first.ndim > 1 else (first.shape[0],))
        for name in self.names:
            a = arrays[name]
            flat = a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a.reshape(-1, 1)
            if flat.shape[0] != rows:
                raise _Decline(f"'{name}' has {flat.shape[0]} rows where '{self.names[0]}' "
                               f"has {rows}; the block does not act row by row")
            self.parts[name].append((flat if mask is None else flat[mask]).astype(self.dtype))
        self.sample_parts.append(samples if mask is None else samples[mask])
        self.aug_parts.append(np.full(self.sample_parts[-1].shape, origin is not None))

    def rows(self, name: str) -> np.ndarray:
        return np.concatenate(self.parts[name], axis=0)

    def samples(self) -> np.ndarray:
        return np.concatenate(self.sample_parts)

    def augmented(self) -> np.ndarray:
        return np.concatenate(self.aug_parts)


class _Decline(Exception):
    pass


def _constants(model: ir.Model) -> dict[str, ir.Value]:
    values = {v.name: v for v in model.graph.initializers.values() if v.name}
    for node in model.graph:
        if node.op_type == "Constant" and node.outputs[0].name:
            values[node.outputs[0].name] = node.outputs[0]
    return values


def _pruned(group: ChannelGroup, reference: dict[str, ir.Value]) -> bool:
    """Whether the group lost channels: its consumer weight is smaller than the original's
    (a weight the original does not have by that name counts as changed)."""
    w = group.consumers[0].weight if group.consumers else None
    ref = reference.get(w.name or "") if w is not None else None
    if w is None or ref is None:
        return True
    a, b = const_shape(w), const_shape(ref)  # a big model's weights stay on disk
    return a is None or b is None or a != b


class DistillRepairPass(ir.passes.InPlacePass):
    """Optimises the weights of every pruned block against the original model's output."""

    def __init__(
        self,
        *,
        reference: ir.Model,
        calibration: Calibration,
        seconds: float | None = None,
        max_steps: int | None = None,
        groups: Collection[str] | None = None,
        kept: Mapping[str, np.ndarray] | None = None,
        options: FitOptions | None = None,
        augment: Augment | None = None,
        steps: Mapping[str, int] | None = None,
        horizons: Mapping[str, int] | None = None,
    ) -> None:
        """`reference`: the original model (not modified). `groups`: names of the groups to
        repair (default: every group with fewer channels than in `reference`). `kept`: the
        channels each pruned group kept (RemoveNeuronsPass.kept), needed where a block's
        output is itself a pruned group (an MLP layer feeding the next). `max_steps`: the
        optimiser steps each block may take. `seconds`: the optimisation time for all blocks,
        shared evenly, unused time passed on (running the calibration batches to capture
        inputs and targets comes on top); whichever of the two ends first stops a block.
        Neither given: the default arithmetic budget (DEFAULT_REPAIR_FLOPS), which gives the
        same bytes on any machine; a model too big for it keeps its least-squares repair and
        the result says why. `augment`: edited
        copies of the calibration sentences added to the fitted rows (repair/augment.py);
        the held-out rows for early stopping stay unedited sentences. `steps`: replay a
        recorded run (DistillResult.steps): each named block takes exactly that many steps,
        whatever the time, which gives the same weights on the same data; a block not
        named keeps its least-squares weights. `horizons`: the recorded learning-rate
        schedules (DistillResult.horizons) that go with `steps`."""
        super().__init__()
        if seconds is not None and not seconds > 0:
            raise InputError(f"--repair-seconds must be > 0, got {seconds}")
        if max_steps is not None and (type(max_steps) is not int or max_steps < 1):
            raise InputError(f"--repair-steps must be an integer >= 1, got {max_steps}")
        self.reference = reference
        self.calibration = calibration
        self.seconds = seconds
        self.max_steps = max_steps
        self.groups = None if groups is None else set(groups)
        self.kept = kept if kept is not None else {}
        self.options = options or FitOptions()
        self.augment = augment or Augment()
        self.steps = None if steps is None else dict(steps)
        self.horizons = dict(horizons or {})
        if any(type(n) is not int or n < 0
               for n in [*(self.steps or {}).values(), *self.horizons.values()]):
            raise InputError("distillation steps and horizons must be integers >= 0 per block")
        self._batches: list[Batch] = []
        self._origins: list[int | None] = []
        self._all: list[ChannelGroup] = []
        self.result = DistillResult()

    def _blocks(self, model: ir.Model) -> tuple[list[ChannelGroup], list[BlockRepair]]:
        ref = _constants(self.reference)
        order = {node: i for i, node in enumerate(model.graph)}
        self._all = find_channel_groups(model)
        chosen = [g for g in self._all if g.prunable
                  and (g.name in self.groups if self.groups is not None else _pruned(g, ref))]
        chosen.sort(key=lambda g: order[g.producers[0].node])
        return chosen, []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        t0 = time.perf_counter()
        groups, reports = self._blocks(model)
        ref_names = {o.name for n in self.reference.graph for o in n.outputs if o.name}
        blocks: list[Block] = []
        for g in groups:
            try:
                block = find_block(g)
            except ValueError as e:
                reports.append(BlockRepair(g.name, "declined", str(e)))
                continue
            if block.output.name not in ref_names:
                reports.append(BlockRepair(g.name, "declined", f"the original model has no "
                                           f"tensor '{block.output.name}' to learn from"))
                continue
            if not block.params:
                reports.append(BlockRepair(g.name, "declined", "no weight it may change"))
                continue
            blocks.append(block)
        modified = False
        cap, budget_text = self._step_cap(blocks)
        if self._default_budget and cap is not None and cap < MIN_BLOCK_STEPS:
            why = (f"the default budget allows {cap} optimiser steps per block for a model "
                   f"this size (at least {MIN_BLOCK_STEPS} needed); the least-squares repair "
                   "is kept. --repair-steps N or --repair-seconds S runs it anyway")
            reports.extend(BlockRepair(b.name, "declined", why) for b in blocks)
            blocks = []
        if blocks:
            extra = augmented(self.calibration.batches, self.calibration.token_mask,
                              self.augment)
            self._batches = [*self.calibration.batches, *(b for b, _ in extra)]
            self._origins = [None] * len(self.calibration.batches) + [o for _, o in extra]
            provider = self.calibration.provider
            self._source = Propagator(model, self._batches, provider)
            self._ref_source = Propagator(self.reference, self._batches, provider)
            budget = math.inf if self.seconds is None else self.seconds  # captures not counted
            for k, block in enumerate(blocks):
                report = self._repair(model, block, budget / (len(blocks) - k), cap)
                budget = max(budget - report.seconds, 0.0)  # unused time moves on
                reports.append(report)
                modified = modified or report.status == "distilled"
                logger.info("block %s: %s", block.name, report.status)
        done = {r.group: r for r in reports}
        ordered = tuple(done[g.name] for g in groups)
        self.result = DistillResult(ordered, time.perf_counter() - t0, budget_text)
        return ir.passes.PassResult(model, modified=modified)

    @property
    def _default_budget(self) -> bool:
        """No replay, step cap or time budget was given: the arithmetic budget decides."""
        return self.steps is None and self.max_steps is None and self.seconds is None

    def _step_cap(self, blocks: Sequence[Block]) -> tuple[int | None, str]:
        """The steps each block may take (None: only the clock decides), and how that was
        decided, for the report."""
        if self.steps is not None:
            return None, "recorded steps replayed"
        if self.max_steps is not None:
            clock = "" if self.seconds is None else f", within {self.seconds:g} s"
            return self.max_steps, f"{self.max_steps} steps per block{clock}"
        if not self._default_budget:
            return None, f"{self.seconds:g} s"
        cap = default_steps(blocks, self.options.batch_rows)
        return cap, f"{cap} steps per block, default budget"

    def _block_inputs(self, source: Propagator, nodes: Sequence[ir.Node],
                      names: Sequence[str], collect: _Collector) -> None:
        """Runs the calibration batches up to the block's inputs. Only the graph between the
        previous block and this one runs (calibration/propagate.py), on the model as the
        repairs so far left it."""
        if nodes:
            source.advance(nodes)
        source.capture(names, collect)

    def _target(self, block: Block) -> np.ndarray:
        """The original model's block output on the calibration rows. Like the inputs, it is
        computed from the original's previous block output, so one block's rows are held at
        a time and only the layers in between run."""
        out = block.output.name or ""
        collect = _Collector([out], self.calibration.token_mask, np.float32, self._origins)
        names = {n.name for n in block.nodes if n.name}
        order = list(self.reference.graph)
        at = [i for i, n in enumerate(order) if n.name in names]
        after = order[at[-1] + 1:] if at else []
        produced = order[at[-1]].outputs[0] if at else None
        later = set(after)
        if produced is not None and produced.name == out and any(
                u.node in later for u in produced.uses()):
            # The cut moves past the block, so the block runs once: its output is then a
            # value the cut holds, and the next block's section starts after it.
            self._ref_source.advance([after[0]])
            self._ref_source.capture([out], collect)
        else:
            self._block_inputs(self._ref_source, [order[i] for i in at], [out], collect)
        return collect.rows(out)

    def _repair(self, model: ir.Model, block: Block, seconds: float, cap: int | None
                ) -> BlockRepair:
        name, out = block.name, block.output.name or ""
        names = [v.name or "" for v in block.inputs]
        collect = _Collector(names, self.calibration.token_mask, np.float32, self._origins)
        try:
            self._block_inputs(self._source, block.nodes, names, collect)
        except _Decline as e:
            return BlockRepair(name, "declined", str(e), target=out)
        try:
            target = self._target(block)
        except _Decline as e:
            return BlockRepair(name, "declined", str(e), target=out)
        inputs = tuple(collect.rows(n) for n in names)
        collect.parts.clear()  # the rows are in `inputs` now; peak memory counts on MiniLM
        fn = BlockFunction(block, np.float32)
        start = {v: np.asarray(const_array(v), dtype=np.float32) for v in block.params}
        width = fn.forward({v: a[:1] for v, a in zip(block.inputs, inputs, strict=True)},
                           start, keep=False)[0].shape[-1]
        if width != target.shape[1]:
            owner = next((g for g in self._all if block.output in g.members), None)
            keep = None if owner is None else self.kept.get(owner.name)
            if keep is None or len(keep) != width:
                return BlockRepair(name, "declined", f"'{out}' has {width} channels here and "
                                   f"{target.shape[1]} in the original, and which were kept "
                                   "is not known", target=out)
            target = target[:, np.asarray(keep)]
        if inputs[0].shape[0] != target.shape[0]:
            raise DataError(f"block '{name}': {inputs[0].shape[0]} input rows but "
                            f"{target.shape[0]} target rows in '{out}'; please report")
        samples = collect.samples()
        n_samples = int(samples.max()) + 1 if samples.size else 0
        if n_samples < MIN_SAMPLES:
            return BlockRepair(name, "declined", f"{n_samples} calibration samples; "
                               f"distillation needs at least {MIN_SAMPLES} to hold some out",
                               target=out)
        held_mask = samples % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
        edited = collect.augmented()
        rows = Rows(inputs, target)
        # Edited copies of held-out sentences are dropped: they would leak into the check.
        fit_rows, held_rows = rows.take(~held_mask), rows.take(held_mask & ~edited)
        del rows, inputs, target
        options = FitOptions(**{**vars(self.options), "seconds": seconds, "stop_at": cap})
        if self.steps is not None:
            options = FitOptions(**{**vars(options), "stop_at": self.steps.get(name, 0),
                                    "horizon": self.horizons.get(name, 0),
                                    "seconds": math.inf})
        res = distill_block(fn, start, fit_rows, held_rows, options)
        status = "distilled" if res.improved else "kept least squares"
        if res.improved:
            for v, arr in res.params.items():
                old = const_array(v)
                assert old is not None
                set_const_array(v, arr.astype(old.dtype).reshape(old.shape))
        logger.info("block %s: held-out MSE %.4g -> %.4g in %d epochs (%s)", name,
                    res.held_before, res.held_after, res.epochs, res.stopped)
        return BlockRepair(name, status, None if res.improved else res.stopped,
                           res.fit_before, res.fit_after, res.held_before, res.held_after,
                           res.epochs, res.seconds, out, fit_rows.count, held_rows.count,
                           res.steps, res.horizon)
