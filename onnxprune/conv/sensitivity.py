"""Measured sensitivity of Conv channel groups, and a channel budget allocated by it.

A flat share per group treats a 24-channel stem like a 256-channel block, and a global
ranking of weight scores compares numbers of different layers that mean different things.
What matters is what removal does to the model's output. So each group is pruned alone at a
few levels, with the same OBS selection and im2col refit the real removal uses, and the
relative error of the model's outputs on (up to 128 of) the calibration batches is
measured. The consumer
weights are swapped for masked ones (removed channels' columns zero, kept ones refit) in a
copy of the serialized model, which computes exactly what the sliced model would.

The budget then goes greedily to the cheapest measured error per channel removed, reading
each group's curve piecewise linearly between the measured levels (never beyond the last).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxprune.calibration.calibration import Calibration
from onnxprune.calibration.propagate import Propagator
from onnxprune.channels.model import ChannelGroup
from onnxprune.conv.repair import (
    _bias,
    _single,
    collect_conv_stats,
    fit_conv_group,
    kept_positions,
    select_conv_channels,
)
from onnxprune.core.weights import const_array
from onnxprune.io.external_data import model_bytes
from onnxprune.io.runtime import make_session
from onnxprune.repair.reconstruct import reference_targets

__all__ = ["GroupCurve", "conv_sensitivity", "allocate_removals", "DEFAULT_LEVELS"]

logger = logging.getLogger(__name__)

DEFAULT_LEVELS = (0.25, 0.5, 0.75)
# Scores a candidate session: lower is better (default: relative output error on the batches).
Evaluate = Callable[[ort.InferenceSession], float]


@dataclass(frozen=True)
class GroupCurve:
    """The error the model shows with only this group pruned (and refit), per level."""

    group: str
    size: int
    removed: tuple[int, ...]
    error: tuple[float, ...]

    def cost(self, removed: int) -> float:
        """Piecewise-linear between (0, 0) and the measured points; inf beyond the last."""
        if removed > self.removed[-1]:
            return float("inf")
        return float(np.interp(removed, (0, *self.removed), (0.0, *self.error)))


# Calibration batches the default score runs on (each level of each group runs them all).
# Scoring is cheap next to the statistics and the OBS/refit of each level; 16 batches left
# ddddocr's allocation noisy enough to move its 30 % accuracy by a point (README, CNNs).
EVAL_BATCHES = 128


def _output_error(model: ir.Model, calib: Calibration) -> Evaluate:
    """Relative squared error of every model output against `model`'s, on up to
    EVAL_BATCHES calibration batches."""
    dense = make_session(model, calib.provider)
    names = [o.name for o in dense.get_outputs()]
    inputs = {i.name for i in dense.get_inputs()}
    feeds = [{k: v for k, v in b.items() if k in inputs}
             for b in list(calib.batches)[:EVAL_BATCHES]]
    ref = [dense.run(names, f) for f in feeds]
    power = sum(float(np.sum(np.square(a, dtype=np.float64))) for r in ref for a in r)

    def evaluate(session: ort.InferenceSession) -> float:
        err = 0.0
        for f, r in zip(feeds, ref, strict=True):
            for a, b in zip(session.run(names, f), r, strict=True):
                err += float(np.sum(np.square(a - b, dtype=np.float64)))
        return err / max(power, 1e-30)

    return evaluate


def _masked_proto(base: onnx.ModelProto, subs: list[ChannelGroup], keep: np.ndarray,
                  fits: list) -> onnx.ModelProto:
    """A copy of `base` whose consumer Convs read channels `keep` only, with refit weights."""
    proto = onnx.ModelProto()
    proto.CopyFrom(base)
    by_output = {n.output[0]: n for n in proto.graph.node if n.output}
    for s, fit in zip(subs, fits, strict=True):
        node = s.consumers[0].node
        w = const_array(node.inputs[1])
        assert w is not None and fit.weights is not None
        o, _, kh, kw = w.shape
        new = np.zeros_like(w)
        pos = kept_positions(s, s.consumers[0], keep)  # a Concat's other inputs stay
        new[:, pos] = fit.weights.T.reshape(o, len(pos), kh, kw).astype(w.dtype)
        bias = (_bias(node) + fit.bias_delta).astype(w.dtype)
        target = by_output[node.outputs[0].name or ""]
        stem = f"{target.output[0]}__sensitivity"
        proto.graph.initializer.extend([onnx.numpy_helper.from_array(new, stem + "_w"),
                                        onnx.numpy_helper.from_array(bias, stem + "_b")])
        while len(target.input) < 3:
            target.input.append("")
        target.input[1] = stem + "_w"
        target.input[2] = stem + "_b"
    return proto


def conv_sensitivity(model: ir.Model, groups: Sequence[ChannelGroup], calib: Calibration,
                     *, levels: Sequence[float] = DEFAULT_LEVELS,
                     evaluate: Evaluate | None = None) -> list[GroupCurve]:
    """Each group (every consumer a plain Conv: conv_repairable) pruned alone at `levels`
    (shares of its channels), scored by `evaluate` on the masked model. `model` is not
    changed."""
    if calib.reconstruct != "lstsq":
        calib = replace(calib, reconstruct="lstsq")
    evaluate = evaluate or _output_error(model, calib)
    reference = reference_targets(model, list(groups), calib)
    source = Propagator(model, calib.batches, calib.provider)  # the model is not edited
    order = {n: i for i, n in enumerate(model.graph)}
    base = ir.serde.serialize_model(model)
    curves = []
    for g in sorted(groups, key=lambda g: min(order[u.node] for u in g.producers)):
        subs = [_single(g, u) for u in g.consumers]
        source.advance(u.node for u in g.producers)
        stats = collect_conv_stats(source, reference, subs, calib)
        removed, errors = [], []
        for level in levels:
            count = max(1, g.size - int(round(level * g.size)))
            if count >= g.size or g.size - count in removed:
                continue
            keep = select_conv_channels(subs, stats, count, calib)
            fits = [fit_conv_group(s, st, count, None, calib, keep=keep)
                    for s, st in zip(subs, stats, strict=True)]
            proto = _masked_proto(base, subs, keep, fits)
            session = make_session(model_bytes(model, proto), calib.provider)
            removed.append(g.size - count)
            errors.append(float(evaluate(session)))
            logger.info("group %s: %d of %d channels removed -> error %.4g", g.name,
                        removed[-1], g.size, errors[-1])
        if removed:
            curves.append(GroupCurve(g.name, g.size, tuple(removed), tuple(errors)))
    return curves


def allocate_removals(curves: Sequence[GroupCurve], budget: int,
                      ms_per_channel: Mapping[str, float] | None = None) -> dict[str, int]:
    """Channels to remove per group, `budget` in all (or as many as the curves allow),
    one at a time to the group whose next channel costs least by its measured curve.

    With `ms_per_channel` (what the latency table says one channel of each group costs,
    `--round-to auto`), the budget is time: as many ms as removing `budget` channels spread
    over the groups by their size would save, and the next channel goes to the group whose
    error grows least per ms saved."""
    removed = {c.group: 0 for c in curves}
    goal, spent = float(budget), 0.0
    if ms_per_channel is not None:
        sizes = sum(c.size for c in curves) or 1
        goal = sum(ms_per_channel[c.group] * budget * c.size / sizes for c in curves)
    while spent < goal - 1e-12:
        best, best_cost = None, float("inf")
        for c in curves:
            r = removed[c.group]
            step = c.cost(r + 1) - c.cost(r)
            if ms_per_channel is not None:
                step /= max(ms_per_channel[c.group], 1e-12)
            if step < best_cost:
                best, best_cost = c, step
        if best is None:
            break
        removed[best.group] += 1
        spent += 1.0 if ms_per_channel is None else max(ms_per_channel[best.group], 1e-12)
    return removed
