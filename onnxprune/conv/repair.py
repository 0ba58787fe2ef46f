"""Calibrated removal for a channel group read by one Conv: im2col statistics and refit.

A Conv consumer is a matrix product on its im2col input: every output pixel reads a
C·k·k column vector (channel-major: the k·k taps of channel c are columns c·k·k ...
(c+1)·k·k − 1). The same least-squares repair as for MatMul therefore applies, with the
Gram matrix of those columns streamed batch by batch, and removing a channel removes a
block of k·k columns: OBS selection costs a block by ‖W_S‖²_{(H⁻¹_SS)⁻¹}.

Which input channels of the consumer are the group's comes from the group's index map
(channel_columns): a Conv reading a Concat sees the group's channels at an offset, and the
other inputs' columns (map -1) stay in the fit, never removed (an FPN/PAN neck).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnxprune.calibration.calibration import Calibration
from onnxprune.calibration.data import Batch
from onnxprune.calibration.propagate import Propagator
from onnxprune.calibration.runner import capture
from onnxprune.calibration.stats import LayerStats
from onnxprune.calibration.targets import TargetStore
from onnxprune.channels.model import ChannelGroup
from onnxprune.channels.slicing import keep_channels
from onnxprune.core.weights import WeightUse, const_array, set_const_array
from onnxprune.errors import DataError
from onnxprune.repair.lstsq import Problem, cross_validated_ridge, refit
from onnxprune.repair.reconstruct import DEFAULT_RIDGE, GroupFit, conv_target

__all__ = ["conv_repairable", "prune_conv_group", "conv_geometry", "collect_conv_stats",
           "fit_conv_group", "apply_conv_fit", "channel_stats", "obs_block_select", "im2col",
           "ConvStats", "select_conv_channels", "channel_columns", "kept_positions"]

# Output pixels per batch that enter the statistics (a seeded subsample): about
# _ROWS_PER_COLUMN rows per im2col column over all batches, between _MIN_ROWS and _MAX_ROWS.
_ROWS_PER_COLUMN = 32
_MIN_ROWS = 256
_MAX_ROWS = 8192


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
            "pads": _ints(node, "pads", [0, 0, 0, 0]),
            "dilations": _ints(node, "dilations", [1, 1])}


def _windows(x: np.ndarray, geo: dict[str, list[int]]) -> np.ndarray:
    """A view [N, C, H', W', kh, kw] of every receptive field (no copy)."""
    kh, kw = geo["kernel"]
    sh, sw = geo["strides"]
    dh, dw = geo["dilations"]
    t, left, b, r = geo["pads"]
    xp = np.pad(x, ((0, 0), (0, 0), (t, b), (left, r))) if any(geo["pads"]) else x
    win = np.lib.stride_tricks.sliding_window_view(xp, (dh * (kh - 1) + 1, dw * (kw - 1) + 1),
                                                   axis=(2, 3))
    return win[:, :, ::sh, ::sw, ::dh, ::dw]


def im2col(x: np.ndarray, geo: dict[str, list[int]],
           pixels: np.ndarray | None = None) -> np.ndarray:
    """[N, C, H, W] -> [N·H'·W', C·kh·kw], channel-major columns.

    `pixels` (flat indices into N·H'·W') gathers only those rows, so a subsample never
    materialises the whole im2col matrix (k·k times the activation)."""
    win = _windows(x, geo)
    n, c, ho, wo, kh, kw = win.shape
    if pixels is None:
        return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)
    i_n, rest = np.divmod(pixels, ho * wo)
    i_h, i_w = np.divmod(rest, wo)
    return win[i_n, :, i_h, i_w].reshape(len(pixels), c * kh * kw)  # [rows, C, kh, kw]


class ConvStats:
    """H = Σ [x,1]ᵀ[x,1] and B = Σ [x,1]ᵀ y of one Conv's im2col rows, per fold.

    The per-channel moments and histograms of LayerStats are not needed by OBS and cost as
    much as the Gram itself on k·k-wide rows, so this keeps only what the refit reads. Each
    batch's products are taken in float32 (the BLAS-heavy part) and summed in float64."""

    def __init__(self, channels: int, targets: int, folds: int) -> None:
        self.channels = channels
        self.rows = 0
        self.folds = folds
        c = channels + 1
        self._gram = [np.zeros((c, c)) for _ in range(folds)]
        self._cross = [np.zeros((c, targets)) for _ in range(folds)] if targets else []
        self._batches = 0

    def add(self, x: np.ndarray, y: np.ndarray | None) -> None:
        xa = np.empty((x.shape[0], self.channels + 1), dtype=np.float32)
        xa[:, :-1] = x
        xa[:, -1] = 1.0
        fold = self._batches % self.folds
        self._batches += 1
        self._gram[fold] += xa.T @ xa
        if self._cross:
            assert y is not None
            self._cross[fold] += xa.T @ y.astype(np.float32)
        self.rows += x.shape[0]

    @property
    def gram(self) -> np.ndarray:
        return sum(self._gram[1:], self._gram[0].copy())

    @property
    def cross(self) -> np.ndarray | None:
        return sum(self._cross[1:], self._cross[0].copy()) if self._cross else None

    @property
    def fold_gram(self) -> list[np.ndarray]:
        return self._gram if self.folds > 1 else []

    @property
    def fold_cross(self) -> list[np.ndarray]:
        return self._cross if self.folds > 1 else []


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


def _row_cap(columns: int, batches: int) -> int:
    """Output pixels per batch that enter the statistics: enough for about
    `_ROWS_PER_COLUMN` rows per im2col column over all batches, at most `_MAX_ROWS`."""
    want = math.ceil(_ROWS_PER_COLUMN * (columns + 1) / max(batches, 1))
    return int(min(_MAX_ROWS, max(_MIN_ROWS, want)))


def collect_conv_stats(current: ir.Model | Propagator, reference: TargetStore | None,
                       groups: list[ChannelGroup], calib: Calibration,
                       out_index: dict[str | None, np.ndarray] | None = None, *,
                       per_channel: bool = False) -> list[LayerStats | ConvStats]:
    """The im2col statistics of each single-consumer group, from one pass over the data.

    `current`: the model pruned so far, best as a Propagator (only the section up to the
    Convs runs); `reference`: the original model's Conv outputs.
    `out_index`: per consumer node, which original output channels it still has (an earlier
    group may have pruned them, when the consumer also produces a residual stream).
    `per_channel`: also the moments and histograms the data-aware criteria read (LayerStats,
    slower)."""
    nodes = [g.consumers[0].node for g in groups]
    geos = [conv_geometry(node) for node in nodes]
    priors = [_prior(node) for node in nodes]
    biases = [_bias(node) for node in nodes]
    index = out_index or {}
    folds = min(4, len(calib.batches)) if calib.ridge is None else 1
    stats: list[LayerStats | ConvStats] = []
    for prior in priors:
        targets = prior.shape[1] if reference else 0
        stats.append(LayerStats(prior.shape[0], targets=targets, folds=folds) if per_channel
                     else ConvStats(prior.shape[0], targets, folds))
    caps = [_row_cap(p.shape[0], len(calib.batches)) for p in priors]
    x_names = [node.inputs[0].name or "" for node in nodes]
    targets = [conv_target(g.consumers[0]) for g in groups]
    y_names = [t.reference[0] for t in targets]
    r_names = [t.residual if reference is not None else None for t in targets]
    graph = current.model.graph if isinstance(current, Propagator) else current.graph
    fed = {v.name for v in graph.inputs}
    captured = list(dict.fromkeys(x_names + [r for r in r_names if r and r not in fed]))
    rng = np.random.default_rng(0)
    batch_index = iter(range(len(calib.batches)))

    def on_batch(arrays: dict[str, np.ndarray], batch: Batch) -> None:
        i = next(batch_index)
        outs = None
        if reference is not None:
            wanted = list(dict.fromkeys(y_names))
            outs = dict(zip(wanted, reference.get(wanted, i), strict=True))
        for k, node in enumerate(nodes):
            geo = geos[k]
            assert geo is not None
            x = arrays[x_names[k]]
            ho, wo = _windows(x[:1, :1], geo).shape[2:4]
            total = x.shape[0] * ho * wo
            pick = None if total <= caps[k] else np.sort(rng.choice(total, caps[k],
                                                                    replace=False))
            y = None
            if outs is not None:
                out = outs[y_names[k]]
                if node.name in index:
                    out = out[:, index[node.name]]
                if out.shape[0] * out.shape[2] * out.shape[3] != total:
                    raise DataError(f"Conv '{node.name}': {total} input columns but "
                                    f"{out.shape[0] * out.shape[2] * out.shape[3]} output "
                                    "pixels")
                if r_names[k] is not None:
                    out = out - _residual(arrays, batch, r_names[k], out.shape)
                y = out.transpose(0, 2, 3, 1).reshape(total, out.shape[1])
                y = (y if pick is None else y[pick]).astype(np.float64) - biases[k]
            stats[k].add(im2col(x, geo, pick), y)

    capture(current, captured, calib.batches, on_batch, provider=calib.provider)
    if stats and stats[0].rows == 0:
        raise DataError("calibration data has no rows")
    return stats


def _residual(arrays: dict[str, np.ndarray], batch: Batch, name: str,
              shape: tuple[int, ...]) -> np.ndarray:
    """The current value of the tensor a residual Conv consumer's output is added to."""
    r = batch.get(name) if name in batch else arrays.get(name)
    if r is None:  # a graph input with a default (an initializer listed as an input)
        raise DataError(f"residual '{name}' is a graph input the calibration data does not "
                        "feed; feed it in the batches or use --reconstruct bias")
    if tuple(r.shape) != tuple(shape):
        try:  # the Add broadcasts it (a per-channel tensor computed at run time)
            return np.broadcast_to(r, shape)
        except ValueError:
            raise DataError(f"residual '{name}' has shape {list(r.shape)}, the refit target "
                            f"{list(shape)}; use --reconstruct bias") from None
    return r


def channel_columns(group: ChannelGroup, use: WeightUse, columns: int) -> np.ndarray:
    """[channels, n·k·k]: the im2col columns of `use`'s input that carry each channel of
    `group` (n: the positions per channel, from the index map; columns of other groups'
    positions are in no row). `columns`: C·k·k of the consumer."""
    m = group.channel_map(use, "in")
    kk = columns // m.size
    order = np.argsort(m, kind="stable")
    order = order[m[order] >= 0]
    per = order.size // group.size
    if per == 0 or order.size != per * group.size or np.any(
            np.bincount(m[order], minlength=group.size) != per):
        raise ValueError(f"group '{group.name}': channels do not appear equally often in "
                         f"the input of {use.node.op_type} '{use.node.name}'")
    pos = order.reshape(group.size, per)  # channel-sorted, so row c is channel c
    return (pos[:, :, None] * kk + np.arange(kk)).reshape(group.size, per * kk)


def kept_positions(group: ChannelGroup, use: WeightUse, keep: np.ndarray) -> np.ndarray:
    """Positions of `use`'s input channel axis still there once only `keep` is kept: the
    kept channels' and every position that is not this group's."""
    m = group.channel_map(use, "in")
    return np.nonzero((m < 0) | np.isin(m, keep))[0]


def _kept_columns(group: ChannelGroup, use: WeightUse, columns: int, keep: np.ndarray
                  ) -> np.ndarray:
    kk = columns // group.channel_map(use, "in").size
    pos = kept_positions(group, use, keep)
    return (pos[:, None] * kk + np.arange(kk)).reshape(-1)


def channel_stats(stats: LayerStats | ConvStats, block: int | np.ndarray
                  ) -> dict[str, np.ndarray]:
    """Per-channel statistics for the data-aware criteria: the channel's columns averaged
    (`block`: k·k when channel c owns columns c·k·k..., else channel_columns' rows)."""
    idx = _blocks(stats.channels, block)
    return {k: v[idx].mean(axis=1) for k, v in stats.as_dict().items()}


def _blocks(columns: int, block: int | np.ndarray) -> np.ndarray:
    if isinstance(block, np.ndarray):
        return block
    return np.arange(columns // block)[:, None] * block + np.arange(block)[None, :]


def obs_block_select(problem: Problem, n_keep: int, block: int | np.ndarray,
                     max_steps: int = 64) -> np.ndarray:
    """Kept channels (sorted) by OBS over blocks of columns, one block per channel:
    `block` columns each in order, or the rows of channel_columns (columns in no row are
    never removed)."""
    idx = _blocks(problem.channels, block)
    nb = idx.shape[0]
    hinv = np.linalg.inv(problem.h)
    hinv = (hinv + hinv.T) / 2
    w = hinv @ problem.b
    alive = np.ones(nb, dtype=bool)
    width = idx.shape[1]
    to_remove = nb - n_keep
    step = max(1, math.ceil(to_remove / max_steps))
    while to_remove > 0:
        hb = hinv[idx[:, :, None], idx[:, None, :]]
        hb_inv = np.linalg.inv(hb + 1e-12 * np.eye(width))
        wb = w[idx]  # [nb, width, D]
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


def fit_conv_group(group: ChannelGroup, stats: LayerStats | ConvStats, n_keep: int,
                   scores: np.ndarray | None, calib: Calibration,
                   keep: np.ndarray | None = None) -> GroupFit:
    use = group.consumers[0]
    prior = _prior(use.node)
    block = channel_columns(group, use, prior.shape[0])
    ridge = DEFAULT_RIDGE if calib.ridge is None else calib.ridge
    if keep is not None:
        keep = np.sort(np.asarray(keep, dtype=np.int64))
    elif scores is None:
        keep = obs_block_select(Problem(stats.gram, stats.cross, ridge, prior),  # type: ignore[arg-type]
                                n_keep, block)
    else:
        keep = np.sort(np.argsort(-scores, kind="stable")[:n_keep])
    cols = _kept_columns(group, use, prior.shape[0], keep)
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
    """Every consumer is a plain 2-D Conv (group 1) that reads each channel of the group
    equally often (position p channel p, or at an offset of a Concat among other groups'
    channels); they may read different tensors (a residual stream read by every block)."""
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
        if m is None or not np.any(m >= 0):
            return False
        counts = np.bincount(m[m >= 0], minlength=group.size)
        if counts.size != group.size or np.any(counts != counts[0]):
            return False
    return True


def _single(group: ChannelGroup, use: object) -> ChannelGroup:
    return ChannelGroup(group.name, group.size, consumers=[use],  # type: ignore[list-item]
                        use_maps={use: group.use_maps[use]})  # type: ignore[index]


def _one_step_costs(problem: Problem, block: int | np.ndarray) -> np.ndarray:
    hinv = np.linalg.inv(problem.h)
    w = hinv @ problem.b
    idx = _blocks(problem.channels, block)
    hb_inv = np.linalg.inv(hinv[idx[:, :, None], idx[:, None, :]]
                           + 1e-12 * np.eye(idx.shape[1]))
    wb = w[idx]
    return np.einsum("nij,njd,nid->n", hb_inv, wb, wb)


def select_conv_channels(subs: list[ChannelGroup], stats: list[LayerStats | ConvStats],
                         count: int, calib: Calibration, criterion_scores: object = None
                         ) -> np.ndarray:
    """The `count` channels to keep (sorted). One consumer: block OBS. Several (a residual
    stream): each channel's one-step OBS cost summed over the consumers.
    `criterion_scores(stats_by_channel)` replaces OBS when given."""
    ridge = DEFAULT_RIDGE if calib.ridge is None else calib.ridge
    blocks = [channel_columns(s, s.consumers[0], st.channels)
              for s, st in zip(subs, stats, strict=True)]
    if criterion_scores is not None:
        scores = criterion_scores(channel_stats(stats[0], blocks[0]))  # type: ignore[operator]
        return np.sort(np.argsort(-scores, kind="stable")[:count])
    problems = [Problem(st.gram, st.cross, ridge, _prior(s.consumers[0].node))  # type: ignore[arg-type]
                for s, st in zip(subs, stats, strict=True)]
    if len(subs) == 1:
        return obs_block_select(problems[0], count, blocks[0])
    cost = sum(_one_step_costs(p, b) for p, b in zip(problems, blocks, strict=True))
    return np.sort(np.argsort(-np.asarray(cost), kind="stable")[:count])


def prune_conv_group(model: ir.Model, reference: TargetStore | None,
                     group: ChannelGroup, count: int, calib: Calibration, *,
                     criterion_scores: object = None, fixed: np.ndarray | None = None,
                     out_index: dict[str | None, np.ndarray] | None = None,
                     source: Propagator | None = None,
                     hints: dict[str, list[int | None]] | None = None) -> np.ndarray:
    """Selects and removes channels of a group read by Conv layers, refitting each of them
    on its own im2col statistics; returns the kept channels (see select_conv_channels).
    `source` gives the activations of `model` (a Propagator over it), else it runs whole.
    `hints`: the shape hints later analyses read, kept current (see keep_many)."""
    subs = [_single(group, u) for u in group.consumers]
    stats = collect_conv_stats(source or model, reference, subs, calib, out_index,
                               per_channel=criterion_scores is not None)
    keep = fixed
    if keep is None:
        keep = select_conv_channels(subs, stats, count, calib, criterion_scores)
    fits = [fit_conv_group(s, st, count, None, calib, keep=keep)
            for s, st in zip(subs, stats, strict=True)]
    keep_channels(model.graph, group, keep, hints=hints)
    for s, fit in zip(subs, fits, strict=True):
        apply_conv_fit(model.graph, s, fit)
    return keep
