"""Calibration-driven removal: statistics per group, selection, and repair of the consumer.

Groups are pruned one after another in graph order. For each, the calibration batches run
through the model pruned so far (giving the consumer's input x) and through the original
model (giving the consumer's original output y), and the consumer is refit so that the
pruned model reproduces the original there. Errors therefore do not pile up layer by layer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.calibration.calibration import Calibration
from onnxprune.calibration.data import Batch
from onnxprune.calibration.propagate import Propagator, graph_value
from onnxprune.calibration.runner import capture, row_mask
from onnxprune.calibration.stats import LayerStats
from onnxprune.calibration.targets import TargetStore
from onnxprune.channels.model import ChannelGroup
from onnxprune.core.rewire import take_over_output
from onnxprune.core.weights import WeightUse, const_array, matmul_use, set_const_array
from onnxprune.errors import DataError
from onnxprune.repair.lstsq import Problem, cross_validated_ridge, fold_bias, obs_order

__all__ = ["GroupFit", "Sweep", "collect_stats", "fit_group",
           "apply_fit", "reference_targets", "input_group", "absorb", "shared_input",
           "common_input", "joined_weight", "DEFAULT_RIDGE", "conv_target"]

logger = logging.getLogger(__name__)

# Relative to the mean activation power. Tuned on MiniLM at 50 % FFN: 1e-3 0.9551, 0.01 0.9573,
# 0.05 0.9597, 0.1 0.9595, 1.0 0.9386 (mean cosine, 256 calibration sentences).
DEFAULT_RIDGE = 0.05


@dataclass(frozen=True)
class Sweep:
    """One front-to-back calibrated removal that several pass runs share, as when a plan is
    applied unit by unit: the activations of the model being pruned, cut where the last run
    left off (each run only advances it), and the original model's targets for every group
    the runs will repair (best a forward TargetStore, which moves along with them). Without
    it each run starts again from the input and captures the original again, which costs
    the square of the depth."""

    source: Propagator  # over the model the runs edit
    targets: TargetStore

    def check(self, model: ir.Model) -> None:
        if self.source.model is not model:
            raise ValueError("a Sweep serves the model its Propagator runs; please report")


@dataclass
class GroupFit:
    keep: np.ndarray
    weights: np.ndarray | None  # [len(keep), sum D] for the joined consumers, or None
    bias_delta: np.ndarray | None  # [sum D]


def shared_input(group: ChannelGroup) -> ir.Value | None:
    """The one activation all consumers read, or None when they read different ones."""
    return common_input(group.consumers)


def common_input(uses: Sequence[WeightUse]) -> ir.Value | None:
    """The one tensor all these weight users read, or None when they read different ones."""
    inputs = {u.node.inputs[0] for u in uses}
    return next(iter(inputs)) if len(inputs) == 1 else None


def joined_weight(group: ChannelGroup) -> np.ndarray:
    """Consumer weights side by side as [C, sum D] (x W layout), float32 or wider (the
    solves widen the rows they read; a float64 copy of a 4096² layer is 128 MiB)."""
    parts = []
    for u in group.consumers:
        w = const_array(u.weight)
        assert w is not None
        parts.append(w.T if u.reduce_axis == 1 else w)
    joined = np.concatenate(parts, axis=1)
    return joined.astype(np.promote_types(joined.dtype, np.float32), copy=False)


@dataclass(frozen=True)
class Target:
    """What the refit consumer should reproduce.

    Plain: the consumer's own original output. Residual: when the consumer output (plus a
    constant bias) is added to another tensor r, the original *sum* minus the current r and
    the bias - so the refit also absorbs error that earlier layers left in r.
    """

    reference: tuple[str, ...]  # names read from the original model, concatenated
    residual: str | None = None  # name read from the current model and subtracted
    bias: np.ndarray | None = None  # constant subtracted
    norm_scale: np.ndarray | None = None  # gain of a LayerNormalization reading the sum


def _gemm_bias(use: WeightUse) -> np.ndarray | None:
    """β·C of a Gemm consumer, broadcast to its output width (None: no constant bias)."""
    node = use.node
    if node.op_type != "Gemm" or len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    c = const_array(node.inputs[2])
    w = const_array(use.weight)
    if c is None or w is None or c.size not in (1, w.shape[1 - use.reduce_axis]):
        return None
    beta = node.attributes["beta"].as_float() if "beta" in node.attributes else 1.0
    return np.broadcast_to(beta * c.astype(np.float64).reshape(-1),
                           (w.shape[1 - use.reduce_axis],)).copy()


def consumer_target(group: ChannelGroup) -> Target:
    """What to fit; a Gemm consumer's own bias C is part of its output, so it is taken off
    the target (the fit's bias row is a correction added to C)."""
    target = _consumer_target(group)
    own = [_gemm_bias(u) for u in group.consumers]
    if all(b is None for b in own) or target.residual is not None and len(own) != 1:
        return target
    widths = [int(np.shape(const_array(u.weight))[1 - u.reduce_axis]) for u in group.consumers]
    joined = np.concatenate([np.zeros(d) if b is None else b
                             for b, d in zip(own, widths, strict=True)])
    bias = joined if target.bias is None else target.bias + joined
    return Target(target.reference, target.residual, bias, target.norm_scale)


def _consumer_target(group: ChannelGroup) -> Target:
    outputs = tuple(u.node.outputs[0].name or "" for u in group.consumers)
    if len(group.consumers) != 1:
        return Target(outputs)
    value = group.consumers[0].node.outputs[0]
    bias = None
    for _ in range(2):
        uses = list(value.uses())
        if value.is_graph_output() or len(uses) != 1 or uses[0].node.op_type != "Add":
            return Target(outputs)
        add = uses[0].node
        other = add.inputs[1 - uses[0].idx]
        if other is None:
            return Target(outputs)
        out_shape, in_shape = add.outputs[0].shape, value.shape
        if out_shape is not None and in_shape is not None and list(out_shape) != list(in_shape):
            return Target(outputs)  # the Add broadcasts the consumer output: not a residual
        b = const_array(other)
        if b is not None:
            if bias is not None:
                return Target(outputs)
            bias = b.astype(np.float64)
            value = add.outputs[0]
            continue
        return Target((add.outputs[0].name or "",), residual=other.name, bias=bias,
                      norm_scale=_layer_norm_scale(add.outputs[0]))
    return Target(outputs)


def conv_target(use: WeightUse) -> Target:
    """What one Conv consumer is refit to: its own output, or - when that output is added
    (with nothing in between) to another tensor r of the same shape, a residual block - the
    original sum minus the current r, so the refit also absorbs the error earlier blocks
    left in the stream. A constant added on the way keeps the plain target."""
    target = _consumer_target(ChannelGroup("", 0, consumers=[use]))
    if target.residual is None or target.bias is not None:
        return Target((use.node.outputs[0].name or "",))
    return Target(target.reference, target.residual)


def _layer_norm_scale(value: ir.Value) -> np.ndarray | None:
    """γ of the LayerNormalization (over the last axis) that alone reads `value`."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0].node
    axis = node.attributes.get("axis")
    if node.op_type != "LayerNormalization" or uses[0].idx != 0:
        return None
    if axis is not None and axis.as_int() != -1:
        rank = None if value.shape is None else len(value.shape)
        if rank is None or axis.as_int() != rank - 1:
            return None
    gamma = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if gamma is None or gamma.ndim != 1 else gamma.astype(np.float64)


def collect_stats(
    current: ir.Model | Propagator,
    reference: TargetStore | None,
    group: ChannelGroup,
    calib: Calibration,
    histogram: bool = True,
) -> LayerStats:
    """Streams the batches through the current model (x) and reads the reference targets (y).

    `current` is best a Propagator (only the section up to the group runs). `reference`
    holds the original model's target tensors (see reference_targets); without it only
    per-channel statistics are gathered. `histogram=False` leaves out the per-channel
    histograms (only the entropy criterion reads them).
    """
    x_value = shared_input(group)
    assert x_value is not None and x_value.name
    target = consumer_target(group)
    d = sum(int(np.shape(const_array(u.weight))[1 - u.reduce_axis]) for u in group.consumers)
    folds = min(4, len(calib.batches)) if calib.ridge is None else 1
    stats = LayerStats(group.size, targets=d if reference is not None else 0, folds=folds,
                       histogram=histogram)
    names = [x_value.name]
    graph = current.model.graph if isinstance(current, Propagator) else current.graph
    graph_inputs = {v.name for v in graph.inputs}
    if reference is not None and target.residual not in (None, *graph_inputs):
        names.append(target.residual)  # type: ignore[arg-type]

    index = iter(range(len(calib.batches)))

    def on_batch(arrays: dict[str, np.ndarray], batch: Batch) -> None:
        i = next(index)
        x = arrays[x_value.name]  # type: ignore[index]
        lead = x.shape[:-1]
        mask = row_mask(batch, calib.token_mask, int(np.prod(lead)), tuple(lead))
        y = None
        w = None
        if reference is not None:
            parts = reference.get(list(target.reference), i)
            if target.norm_scale is not None:
                # LayerNorm divides each row by its spread: an error on a row of small
                # spread is amplified, so weight rows by 1 / variance (first-order LN).
                t = parts[0].reshape(-1, parts[0].shape[-1]).astype(np.float64)
                w = 1.0 / np.maximum(t.var(axis=1), 1e-12)
                w /= w.mean()
            y = np.concatenate([a.reshape(-1, a.shape[-1]) for a in parts], axis=1)
            y = y.astype(np.float64)
            if target.residual is not None:
                if target.residual in batch:
                    r = batch[target.residual]
                elif target.residual in arrays:
                    r = arrays[target.residual]
                else:  # a graph input with a default (an initializer listed as an input)
                    raise DataError(
                        f"residual '{target.residual}' is a graph input the calibration data "
                        "does not feed; feed it in the batches or use --reconstruct bias")
                if r.shape != parts[0].shape:
                    raise DataError(
                        f"residual '{target.residual}' has shape {list(r.shape)}, the sum "
                        f"'{target.reference[0]}' {list(parts[0].shape)}; use --reconstruct bias"
                    )
                y -= r.reshape(y.shape)
            if target.bias is not None:
                y -= target.bias.reshape(-1)
        stats.add(x, y, mask, w)

    capture(current, names, calib.batches, on_batch, provider=calib.provider)
    if stats.rows == 0:
        raise DataError("calibration data has no unmasked rows; check --token-mask")
    return stats


def reference_targets(original: ir.Model, groups: Sequence[ChannelGroup], calib: Calibration,
                      forward: bool = False) -> TargetStore:
    """The original model's tensors every group of `groups` fits to, captured before any
    edit (whole, or section by section for a big model), or with `forward` group by group
    as they are asked for (see TargetStore)."""
    wanted = []
    for g in groups:
        names = (consumer_target(g).reference if g.consumers_are_matrices
                 else tuple(conv_target(u).reference[0] for u in g.consumers))
        stops = [u.node.name or "" for u in g.producers + g.consumers]
        check = [u.node.inputs[0].name or "" for u in g.consumers]
        wanted.append((stops, names, check))
    return TargetStore(original, wanted, calib.batches, provider=calib.provider,
                       forward=forward)


def input_group(model: ir.Model, source: str, name: str) -> ChannelGroup | None:
    """The layers with a constant weight of their own (MatMul/Gemm) that read `source`, as
    one group whose channels are `source`'s features, for absorb(); None when there are
    none."""
    value = graph_value(model.graph, source)
    if value is None:
        return None
    uses = []
    for use in value.uses():
        w = matmul_use(use.node) if use.idx == 0 else None
        if w is not None and use.node.graph is model.graph and len(w.weight.uses()) == 1:
            uses.append(w)
    if not uses:
        return None
    size = const_array(uses[0].weight).shape[uses[0].reduce_axis]  # type: ignore[union-attr]
    return ChannelGroup(name, int(size), consumers=uses)


def absorb(model: ir.Model, group: ChannelGroup, sweep: Sweep, calib: Calibration) -> None:
    """Refits the layers of an input_group() to their original outputs from the input the
    pruned model now gives them, so the error of the units pruned before is absorbed before
    it reaches this block's nonlinearity (softmax, GELU). Nothing is removed. The ridge
    pulls towards the trained weights: an input the pruning left alone gives them back."""
    sweep.check(model)
    sweep.source.advance(u.node for u in group.consumers)
    stats = collect_stats(sweep.source, sweep.targets, group, calib, histogram=False)
    fit = fit_group(group, stats, group.size, None, calib, keep=np.arange(group.size))
    apply_fit(model.graph, group, fit)


def fit_group(
    group: ChannelGroup,
    stats: LayerStats,
    n_keep: int,
    scores: np.ndarray | None,
    calib: Calibration,
    keep: np.ndarray | None = None,
) -> GroupFit:
    """Chooses the kept channels (by OBS when scores is None) and the repaired weights.

    `keep`, when given, fixes the kept channels: only the repair is computed.
    """
    prior = joined_weight(group)
    select_ridge = DEFAULT_RIDGE if calib.ridge is None else calib.ridge
    # One Problem over the statistics (not copied) serves the selection and the refit.
    problem = Problem(stats.gram, stats.cross, select_ridge, prior)  # type: ignore[arg-type]
    if keep is not None:
        keep = np.sort(np.asarray(keep, dtype=np.int64))
    elif scores is None:
        gamma = consumer_target(group).norm_scale
        order = obs_order(problem, group.size - n_keep,
                          out_weights=None if gamma is None else np.square(gamma),
                          center=gamma is not None)
        keep = np.setdiff1d(np.arange(group.size), order)
    else:
        keep = np.sort(np.argsort(-scores, kind="stable")[:n_keep])
    w = None
    if calib.reconstruct == "lstsq":
        ridge = select_ridge
        if calib.ridge is None and len(stats.fold_gram) > 1:
            ridge = cross_validated_ridge(stats.fold_gram, stats.fold_cross, keep, prior)
            logger.info("group %s: ridge %.3g chosen by cross-validation", group.name, ridge)
        w = problem.solve(keep, ridge)
    if w is not None:
        if not np.all(np.isfinite(w)):
            raise DataError(f"group '{group.name}': the least-squares refit is not finite")
        return GroupFit(keep, w[:-1], w[-1])
    if calib.reconstruct == "bias":
        return GroupFit(keep, None, fold_bias(stats.mean, prior, keep))
    return GroupFit(keep, None, None)


def apply_fit(graph: ir.Graph, group: ChannelGroup, fit: GroupFit) -> None:
    """Writes refit consumer weights and bias corrections (after the group was sliced)."""
    start = 0
    for use in group.consumers:
        w = const_array(use.weight)
        assert w is not None
        d = w.shape[1 - use.reduce_axis]
        if fit.weights is not None:
            new = fit.weights[:, start : start + d].astype(w.dtype)
            set_const_array(use.weight, new.T if use.reduce_axis == 1 else new)
        if fit.bias_delta is not None:
            _add_bias(graph, use, fit.bias_delta[start : start + d])
        start += d


def _add_bias(graph: ir.Graph, use: WeightUse, delta: np.ndarray) -> None:
    """Adds `delta` to the consumer's bias: Gemm's C, a following Add, or a new Add."""
    node = use.node
    out = node.outputs[0]
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = node.inputs[2]
        b = const_array(bias)
        if b is not None and len(bias.uses()) == 1:
            new = np.broadcast_to(b, b.shape[:-1] + (delta.size,)) + delta.astype(b.dtype)
            set_const_array(bias, new.astype(b.dtype))
            return
    uses = list(out.uses())
    if len(uses) == 1 and uses[0].node.op_type == "Add" and not out.is_graph_output():
        add = uses[0].node
        other = add.inputs[1 - uses[0].idx]
        b = const_array(other)
        fits = b is not None and b.shape[-1:] == (delta.size,) and b.size == delta.size
        if fits and len(other.uses()) == 1:  # type: ignore[union-attr]
            set_const_array(other, (b + delta.astype(b.dtype)).reshape(b.shape))  # type: ignore
            return
    dtype = const_array(use.weight).dtype  # type: ignore[union-attr]
    name = f"{out.name}_bias_fix"
    bias_value = ir.Value(
        name=name, shape=ir.Shape([delta.size]),
        type=ir.TensorType(ir.DataType.from_numpy(dtype)),
        const_value=ir.tensor(delta.astype(dtype), name=name),
    )
    graph.register_initializer(bias_value)
    new_out = ir.Value(name=f"{out.name}_biased", shape=out.shape, type=out.type)
    add = ir.Node("", "Add", [out, bias_value], outputs=[new_out], name=f"{node.name}_bias_fix")
    take_over_output(graph, out, new_out, "_unbiased")
    ir.convenience.replace_all_uses_with(out, new_out)
    add.replace_input_with(0, out)  # replace_all_uses_with rewired the new node onto itself
    graph.insert_after(node, add)

