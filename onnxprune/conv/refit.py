"""After calibrated channel removal: every Conv downstream is refit to the original outputs.

Removal refits only the consumers of each pruned group, each at the moment its group is
cut. Later cuts then change what those (and all other) Convs read: a residual stream's
readers were refit before the blocks that write into the stream lost their channels, and a
Conv that reads nothing pruned directly (a stem the analysis declines, a block after the
last pruned group) is never refit at all. So the error of every cut travels on and adds up.
One sweep in graph order fixes that: each plain Conv whose input has changed is refit by
least squares on its im2col input, with the final pruned model upstream, to the original
model's output at that Conv (or to the original residual sum minus the current stream, see
conv_target). Its kept channels do not change, only its weights and bias.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxprune.calibration.calibration import Calibration
from onnxprune.calibration.propagate import Propagator
from onnxprune.calibration.targets import TargetStore
from onnxprune.channels.model import ChannelGroup
from onnxprune.conv.repair import (
    apply_conv_fit,
    collect_conv_stats,
    conv_geometry,
    fit_conv_group,
)
from onnxprune.core.weights import WeightUse, const_array, conv_use
from onnxprune.repair.reconstruct import conv_target

__all__ = ["sweep_candidates", "conv_sweep_targets", "refit_convs"]

logger = logging.getLogger(__name__)


def _plain(node: ir.Node) -> WeightUse | None:
    """The weight use of a group-1 2-D Conv with explicit padding and a weight of its own
    (a weight another node reads too would change under it), else None."""
    if node.op_type != "Conv":
        return None
    attr = node.attributes.get("group")
    if attr is not None and attr.as_int() != 1:
        return None
    use = conv_use(node)
    if use is None or conv_geometry(node) is None:
        return None
    w = node.inputs[1]
    if w is None or len(w.uses()) != 1 or w.is_graph_output():
        return None
    return use


def sweep_candidates(model: ir.Model, after: Sequence[ir.Node]) -> list[WeightUse]:
    """Plain Convs of the main graph that come after the first of `after` (the producers of
    the groups to be cut) in graph order: the ones whose input a cut can change."""
    order = {n: i for i, n in enumerate(model.graph)}
    start = min((order[n] for n in after if n in order), default=None)
    if start is None:
        return []
    uses = [_plain(n) for n in model.graph if order[n] > start]
    return [u for u in uses if u is not None and u.node.name]


def conv_sweep_targets(original: ir.Model, uses: Sequence[WeightUse], calib: Calibration
                       ) -> TargetStore:
    """The original model's tensors the sweep fits to, captured before any edit."""
    wanted = [([u.node.name or ""], (conv_target(u).reference[0],), ()) for u in uses]
    return TargetStore(original, wanted, calib.batches, provider=calib.provider)


def refit_convs(model: ir.Model, targets: TargetStore, names: Sequence[str],
                calib: Calibration, out_index: dict[str | None, np.ndarray]) -> int:
    """Refits the Convs named `names` (sweep_candidates of the model before the cuts) in
    graph order; `out_index`: the original output channels each pruned producer still has.
    Returns how many were refit."""
    by_name = {n.name: n for n in model.graph if n.name}
    source = Propagator(model, calib.batches, calib.provider)
    done = 0
    for name in names:
        node = by_name.get(name)
        use = None if node is None else _plain(node)
        if use is None:  # gone or changed by the cuts: nothing to refit
            continue
        w = const_array(use.weight)
        assert w is not None
        size = int(w.shape[1])
        group = ChannelGroup(name, size, consumers=[use], use_maps={use: np.arange(size)})
        source.advance([use.node])
        stats = collect_conv_stats(source, targets, [group], calib, out_index)
        fit = fit_conv_group(group, stats[0], size, None, calib, keep=np.arange(size))
        apply_conv_fit(model.graph, group, fit)
        done += 1
    logger.info("refit %d Convs downstream of the cuts", done)
    return done
