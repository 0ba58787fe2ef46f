"""Applying a plan's decisions for real: every unit's removal in one forward sweep, with the
sequential residual-aware repair of the passes, each unit after the first pruned one having
its input layers refit to the original's outputs first."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass, RemoveUnusedNodesPass

from onnxprune.attention.remove_heads import RemoveHeadsPass
from onnxprune.calibration.calibration import Calibration
from onnxprune.calibration.propagate import Propagator
from onnxprune.channels.keep import KeepSpec, keep_counts
from onnxprune.channels.model import ChannelGroup
from onnxprune.core.weights import const_shape
from onnxprune.prune.remove_neurons import Progress, RemoveNeuronsPass
from onnxprune.repair.reconstruct import Sweep, absorb, input_group, reference_targets
from onnxprune.search.units import Unit, find_units

__all__ = ["apply_decisions", "decided_units"]


def decided_units(model: ir.Model, neurons: KeepSpec, heads: KeepSpec,
                  calib: Calibration | None = None, ignore: tuple[str, ...] = ()) -> list[Unit]:
    """The model's units, after checking that every decision names one and fits it.

    Names the model's nodes (NameFixPass) first, as units are found by name.
    """
    NameFixPass()(model)
    units, _ = find_units(model, calib, ignore)
    keep_counts(neurons, {u.name: u.items for u in units if u.kind == "neurons"}, "group")
    keep_counts(heads, {u.name: u.items for u in units if u.kind == "heads"}, "attention block")
    return units


def apply_decisions(model: ir.Model, neurons: KeepSpec, heads: KeepSpec,
                    calib: Calibration | None, progress: Progress | None = None,
                    ignore: tuple[str, ...] = (), units: Sequence[Unit] | None = None,
                    absorb_inputs: bool = True,
                    ) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Removes for real (in place): counts are chosen by OBS, indices are taken as given.

    `units`: what decided_units() gave for this model, when the caller checked already.
    With a least-squares repair and `absorb_inputs`, every unit after the first pruned one
    first has its input layers refit (reconstruct.absorb). Returns the channels and
    heads actually kept, which is what a plan records.
    """
    if units is None:  # every entry is checked before anything is removed
        units = decided_units(model, neurons, heads, calib, ignore)
    kept_n: dict[str, tuple[int, ...]] = {}
    kept_h: dict[str, tuple[int, ...]] = {}
    todo = [u for u in units if u.name in (neurons if u.kind == "neurons" else heads)]
    pruned = {u.name for u in todo}
    # Unit by unit in graph order, every repair reproducing the original model: each one
    # then also absorbs what the units before it (neurons or heads) changed. One sweep
    # serves them all: the pruned model's activations and the original's targets move
    # forward with the units, so each part of either model runs about once.
    reference = model.clone() if calib is not None else None
    sweep = None
    inputs: dict[str, ChannelGroup] = {}
    widths: dict[str, tuple[int, ...] | None] = {}  # input layers' weight shapes, unpruned
    if calib is not None and reference is not None and todo:
        if absorb_inputs and calib.reconstruct == "lstsq":
            # On MiniLM at 75 % of the FLOPs (the search's plan) the held-out drop went from
            # 0.0196 to 0.0192; refitting the output layers of units left whole made it
            # worse (0.0202), so only the input side is refit.
            first = units.index(todo[0])  # the units before it, and it, read what they did
            for u in units[first + 1:]:
                g = None if u.source is None else input_group(model, u.source, u.name)
                if g is not None:
                    inputs[u.name] = g
                    widths.update((c.node.name or "", const_shape(c.weight))
                                  for c in g.consumers)
        wanted = [g for u in units for g in (inputs.get(u.name),
                                              u.group if u.name in pruned else None)
                  if g is not None]
        sweep = Sweep(Propagator(model, calib.batches, calib.provider),
                      reference_targets(reference, wanted, calib, forward=True))
    step = 0
    for u in units:
        if u.name in inputs:
            assert sweep is not None and calib is not None and u.source is not None
            # Found again: earlier units' slicing may have replaced the weights' values. A
            # layer that slicing narrowed (a parallel block's other branch) is left out:
            # its original output no longer matches it.
            g = input_group(model, u.source, u.name)
            if g is not None:
                g.consumers[:] = [c for c in g.consumers
                                  if widths.get(c.node.name or "") == const_shape(c.weight)]
            if g is not None and g.consumers:
                absorb(model, g, sweep, calib)
        if u.name not in pruned:
            continue
        if progress is not None:
            progress(step, len(todo), u.name)
        step += 1
        if u.kind == "neurons":
            p = RemoveNeuronsPass(keep={u.name: neurons[u.name]},
                                  criterion="obs" if calib else "l1", calibration=calib,
                                  ignore=ignore, reference=reference, sweep=sweep)
            p(model)
            kept_n.update({k: tuple(int(i) for i in v) for k, v in p.kept.items()})
        else:
            h = RemoveHeadsPass(fraction=0.0, keep={u.name: heads[u.name]}, calibration=calib,
                                ignore=ignore, reference=reference, sweep=sweep)
            h(model)
            for b in h.result.blocks:
                if b.heads_after < b.heads_before:
                    kept_h[b.block] = tuple(int(i) for i in np.setdiff1d(
                        np.arange(b.heads_before), b.removed))
    RemoveUnusedNodesPass()(model)
    return kept_n, kept_h
