"""Calibrated removal for a channel group read by one Conv: im2col statistics and refit.

A Conv consumer is a matrix product on its im2col input: every output pixel reads a
C·k·k column vector (channel-major: the k·k taps of channel c are columns c·k·k ...
(c+1)·k·k − 1). The same least-squares repair as for MatMul therefore applies, with the
Gram matrix of those columns streamed batch by batch, and removing a channel removes a
block of k·k columns: OBS selection costs a block by ‖W_S‖²_{(H⁻¹_SS)⁻¹}.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnxprune.calibration.data import Batch
from onnxprune.calibration.propagate import Propagator, TargetStore
from onnxprune.calibration.runner import capture
from onnxprune.calibration.stats import LayerStats
from onnxprune.errors import DataError
from onnxprune.graph.channels import ChannelGroup
from onnxprune.graph.slicing import keep_channels
from onnxprune.graph.weights import const_array, set_const_array
from onnxprune.passes.reconstruct import DEFAULT_RIDGE, Calibration, GroupFit
from onnxprune.scoring.lstsq import Problem, cross_validated_ridge, refit

__all__ = ["conv_repairable", "prune_conv_group", "conv_geometry", "collect_conv_stats", "fit_conv_group", "apply_conv_fit",
           "channel_stats", "obs_block_select", "im2col"]

_MAX_ROWS = 8192  # output pixels per batch that enter the statistics (seeded subsample)


def _ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    attr = node.attributes.get(name)
    return default if attr is None else [int(v) for v in attr.as_ints()]


def conv_geometry(node: ir.Node) -> dict[str, list[int]] | None:
    """kernel, strides, pads, dilations of a 2-D Conv with explicit padding, else None."""
    w = const_array(node.inputs[1])
    if w is None or w.ndim != 4:
        return None
    auto = node.attributes.get("auto_pad")
    if auto is not None and auto.as_string() not in ("NOTSET", ""):
        return None
    k = list(w.shape[2:])
    return {"kernel": k, "strides": _ints(node, "strides", [1, 1]),
            "pads": _ints(node, "pads", [0, 0, 0, 0]), "dilations": _ints(node, "dilations", [1, 1])}


def im2col(x: np.ndarray, geo: dict[str, list[int]]) -> np.ndarray:
    """[N, C, H, W] -> [N·H'·W', C·kh·kw], channel-major columns."""
    kh, kw = geo["kernel"]
    sh, sw = geo["strides"]
    dh, dw = geo["dilations"]
    t, left, b, r = geo["pads"]
    xp = np.pad(x, ((0, 0), (0, 0), (t, b), (left, r)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (dh * (kh - 1) + 1, dw * (kw - 1) + 1),
                                                   axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # [N, C, H', W', kh, kw]
    n, c, ho, wo = win.shape[:4]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)


def _prior(node: ir.Node) -> np.ndarray:
    w = const_array(node.inputs[1])
    assert w is not None
    return w.reshape(w.shape[0], -1).T.astype(np.float64)  # [C·k·k, O]


def _bias(node: ir.Node) -> np.ndarray:
    w = const_array(node.inputs[1])
    assert w is not None
    b = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None \
        else None
    return np.zeros(w.shape[0]) if b is None else b.astype(np.float64)


def collect_conv_stats(current: ir.Model | Propagator, reference: TargetStore | None,
                       group: ChannelGroup, calib: Calibration,
                       out_index: np.ndarray | None = None) -> LayerStats:
    """`current`: the model pruned so far, best as a Propagator; `reference`: the original
    model's Conv outputs. `out_index`: which original output channels the consumer still
    has (an earlier group may have pruned them, when the consumer also produces a residual
    stream)."""
    node = group.consumers[0].node
    geo = conv_geometry(node)
    assert geo is not None
    x_name = node.inputs[0].name  # type: ignore[union-attr]
    y_name = node.outputs[0].name
    prior = _prior(node)
    bias = _bias(node)
    folds = min(4, len(calib.batches)) if calib.ridge is None else 1
    stats = LayerStats(prior.shape[0], targets=prior.shape[1] if reference else 0, folds=folds)
    rng = np.random.default_rng(0)
    index = iter(range(len(calib.batches)))

    def on_batch(arrays: dict[str, np.ndarray], batch: Batch) -> None:
        i = next(index)
        cols = im2col(arrays[x_name], geo).astype(np.float64)  # type: ignore[index]
        y = None
        if reference is not None:
            out = reference.get([y_name], i)[0]  # type: ignore[list-item]
            if out_index is not None:
                out = out[:, out_index]
            y = out.transpose(0, 2, 3, 1).reshape(-1, out.shape[1]).astype(np.float64) - bias
            if y.shape[0] != cols.shape[0]:
                raise DataError(f"Conv '{node.name}': {cols.shape[0]} input columns but "
                                f"{y.shape[0]} output pixels")
        if cols.shape[0] > _MAX_ROWS:
            pick = np.sort(rng.choice(cols.shape[0], _MAX_ROWS, replace=False))
            cols = cols[pick]
            y = None if y is None else y[pick]
        stats.add(cols, y)

    capture(current, [x_name], calib.batches, on_batch,  # type: ignore[list-item]
            provider=calib.provider)
    if stats.rows == 0:
        raise DataError("calibration data has no rows")
    return stats


def channel_stats(stats: LayerStats, block: int) -> dict[str, np.ndarray]:
    """Per-channel statistics for the data-aware criteria: the channel's k·k taps averaged."""
    return {k: v.reshape(-1, block).mean(axis=1) for k, v in stats.as_dict().items()}


def obs_block_select(problem: Problem, n_keep: int, block: int, max_steps: int = 64
                     ) -> np.ndarray:
    """Kept channels (sorted) by OBS over blocks of `block` columns (one block per channel)."""
    c = problem.channels
    nb = c // block
    hinv = np.linalg.inv(problem.h)
    hinv = (hinv + hinv.T) / 2
    w = hinv @ problem.b
    alive = np.ones(nb, dtype=bool)
    idx = np.arange(nb)[:, None] * block + np.arange(block)[None, :]
    to_remove = nb - n_keep
    step = max(1, math.ceil(to_remove / max_steps))
    while to_remove > 0:
        hb = hinv[idx[:, :, None], idx[:, None, :]]
        hb_inv = np.linalg.inv(hb + 1e-12 * np.eye(block))
        wb = w[idx]  # [nb, block, D]
        cost = np.einsum("nij,njd,nid->n", hb_inv, wb, wb)
        cost[~alive] = np.inf
        k = min(step, to_remove)
        sel = np.argpartition(cost, k - 1)[:k]
        cols = idx[sel].reshape(-1)
        m = np.linalg.inv(hinv[np.ix_(cols, cols)])
        w -= hinv[:, cols] @ (m @ w[cols])
        hinv -= hinv[:, cols] @ m @ hinv[cols, :]
        w[cols] = 0.0
        alive[sel] = False
        to_remove -= k
    return np.nonzero(alive)[0]


def fit_conv_group(group: ChannelGroup, stats: LayerStats, n_keep: int,
                   scores: np.ndarray | None, calib: Calibration,
                   keep: np.ndarray | None = None) -> GroupFit:
    node = group.consumers[0].node
    prior = _prior(node)
    block = prior.shape[0] // group.size
    ridge = DEFAULT_RIDGE if calib.ridge is None else calib.ridge
    if keep is not None:
        keep = np.sort(np.asarray(keep, dtype=np.int64))
    elif scores is None:
        keep = obs_block_select(Problem(stats.gram, stats.cross, ridge, prior),  # type: ignore[arg-type]
                                n_keep, block)
    else:
        keep = np.sort(np.argsort(-scores, kind="stable")[:n_keep])
    cols = (keep[:, None] * block + np.arange(block)[None, :]).reshape(-1)
    if calib.reconstruct != "lstsq":
        return GroupFit(keep, None, None)
    if calib.ridge is None and len(stats.fold_gram) > 1:
        ridge = cross_validated_ridge(stats.fold_gram, stats.fold_cross, cols, prior)
    w = refit(stats.gram, stats.cross, cols, ridge, prior)  # type: ignore[arg-type]
    if not np.all(np.isfinite(w)):
        raise DataError(f"group '{group.name}': the least-squares refit is not finite")
    return GroupFit(keep, w[:-1], w[-1])


def apply_conv_fit(graph: ir.Graph, group: ChannelGroup, fit: GroupFit) -> None:
    """Writes the refit Conv weight [O, kept, kh, kw] and its bias (after slicing)."""
    if fit.weights is None:
        return
    node = group.consumers[0].node
    w = const_array(node.inputs[1])
    assert w is not None
    o, c = w.shape[0], w.shape[1]
    new = fit.weights.T.reshape(o, c, *w.shape[2:]).astype(w.dtype)
    set_const_array(node.inputs[1], new)  # type: ignore[arg-type]
    bias = (_bias(node) + fit.bias_delta).astype(w.dtype)  # type: ignore[operator]
    b_in = node.inputs[2] if len(node.inputs) > 2 else None
    if b_in is not None and len(b_in.uses()) == 1 and not b_in.is_graph_output():
        set_const_array(b_in, bias)
        return
    name = f"{node.name or 'conv'}_bias_refit"
    value = ir.Value(name=name, shape=ir.Shape(bias.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(bias.dtype)),
                     const_value=ir.tensor(bias, name=name))
    graph.register_initializer(value)
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, value)


def conv_repairable(group: ChannelGroup) -> bool:
    """Every consumer is a plain 2-D Conv (group 1) reading channel p at position p; they
    may read different tensors (a residual stream read by every block)."""
    if not group.consumers:
        return False
    for use in group.consumers:
        node = use.node
        attr = node.attributes.get("group")
        if node.op_type != "Conv" or (attr is not None and attr.as_int() != 1):
            return False
        if conv_geometry(node) is None:
            return False
        m = group.use_maps.get(use)
        if m is None or not np.array_equal(m, np.arange(group.size)):
            return False
    return True


def _single(group: ChannelGroup, use: object) -> ChannelGroup:
    return ChannelGroup(group.name, group.size, consumers=[use],  # type: ignore[list-item]
                        use_maps={use: group.use_maps[use]})  # type: ignore[index]


def _one_step_costs(problem: Problem, block: int) -> np.ndarray:
    hinv = np.linalg.inv(problem.h)
    w = hinv @ problem.b
    nb = problem.channels // block
    idx = np.arange(nb)[:, None] * block + np.arange(block)[None, :]
    hb_inv = np.linalg.inv(hinv[idx[:, :, None], idx[:, None, :]] + 1e-12 * np.eye(block))
    wb = w[idx]
    return np.einsum("nij,njd,nid->n", hb_inv, wb, wb)


def prune_conv_group(model: ir.Model, reference: TargetStore | None,
                     group: ChannelGroup, count: int, calib: Calibration, *,
                     criterion_scores: object = None, fixed: np.ndarray | None = None,
                     out_index: dict[str | None, np.ndarray] | None = None,
                     source: Propagator | None = None) -> np.ndarray:
    """Selects and removes channels of a group read by Conv layers, refitting each of them
    on its own im2col statistics; returns the kept channels.

    `source` gives the activations of `model` (a Propagator over it), else it is run whole.
    One consumer: block OBS. Several (a residual stream): each channel's one-step OBS cost
    summed over the consumers. `criterion_scores(stats_by_channel)` replaces OBS when given.
    """
    subs = [_single(group, u) for u in group.consumers]
    index = out_index or {}
    stats = [collect_conv_stats(source or model, reference, s, calib,
                                index.get(s.consumers[0].node.name)) for s in subs]
    ridge = DEFAULT_RIDGE if calib.ridge is None else calib.ridge
    keep = fixed
    if keep is None and criterion_scores is not None:
        block = stats[0].channels // group.size
        scores = criterion_scores(channel_stats(stats[0], block))  # type: ignore[operator]
        keep = np.sort(np.argsort(-scores, kind="stable")[:count])
    if keep is None and len(subs) == 1:
        keep = obs_block_select(Problem(stats[0].gram, stats[0].cross, ridge,  # type: ignore[arg-type]
                                        _prior(subs[0].consumers[0].node)),
                                count, stats[0].channels // group.size)
    if keep is None:
        cost = sum(_one_step_costs(Problem(st.gram, st.cross, ridge,  # type: ignore[arg-type]
                                           _prior(s.consumers[0].node)),
                                   st.channels // group.size) for s, st in zip(subs, stats, strict=True))
        keep = np.sort(np.argsort(-np.asarray(cost), kind="stable")[:count])
    fits = [fit_conv_group(s, st, count, None, calib, keep=keep)
            for s, st in zip(subs, stats, strict=True)]
    keep_channels(model.graph, group, keep)
    for s, fit in zip(subs, fits, strict=True):
        apply_conv_fit(model.graph, s, fit)
    return keep
