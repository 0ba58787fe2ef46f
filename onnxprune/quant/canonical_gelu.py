"""Reorders erf-GELU products into the form onnxruntime fuses.

torch's dynamo exporter writes GELU as  x * (0.5 * (1 + erf(x / sqrt 2))); the legacy
exporter writes  (x * (1 + erf(x / sqrt 2))) * 0.5. onnxruntime's CPU optimizer fuses only
the second into one Gelu (or BiasGelu with the preceding bias Add), so the dynamo export
runs five element-wise passes over the widest activation of every FFN instead of one. On
all-MiniLM-L6-v2 that is ~20 % of the int8 model's run time. Moving the 0.5 to the end is
a reassociation of one multiplication: outputs agree to float rounding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.core.passes import ReportingPass
from onnxprune.core.weights import const_array
from onnxprune.quant.qdq_build import retype

__all__ = ["CanonicalGeluPass", "CanonicalGeluResult"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CanonicalGeluResult:
    rewritten: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {"rewritten": list(self.rewritten)}


def _producer(value: ir.Value | None, op: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op or node.domain not in ("", "ai.onnx"):
        return None
    return node


def _scalar(value: ir.Value | None, expected: float, rtol: float = 1e-4) -> bool:
    arr = const_array(value)
    return arr is not None and arr.size == 1 and bool(np.isclose(arr.item(), expected, rtol=rtol))


def _match(node: ir.Node) -> tuple[int, ir.Node, int] | None:
    """(index of x in `node`, the 0.5 Mul, index of the 0.5 in it) for x * (0.5 * (1+erf))."""
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    for xi in (0, 1):
        x, h = node.inputs[xi], node.inputs[1 - xi]
        half = _producer(h, "Mul")
        if half is None or h is None or len(h.uses()) != 1:
            continue
        for ci in (0, 1):
            if not _scalar(half.inputs[ci], 0.5):
                continue
            add = _producer(half.inputs[1 - ci], "Add")
            if add is None:
                continue
            for ei in (0, 1):
                erf = _producer(add.inputs[ei], "Erf")
                if erf is None or not _scalar(add.inputs[1 - ei], 1.0):
                    continue
                div = _producer(erf.inputs[0], "Div")
                mul = _producer(erf.inputs[0], "Mul")
                if div is not None and div.inputs[0] is x and _scalar(div.inputs[1], 2**0.5):
                    return xi, half, ci
                if mul is not None and x in mul.inputs and any(
                    _scalar(v, 2**-0.5) for v in mul.inputs
                ):
                    return xi, half, ci
    return None


class CanonicalGeluPass(ReportingPass):
    """Rewrites x * (0.5 * (1 + erf(x/sqrt2))) as (x * (1 + erf(x/sqrt2))) * 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.result = CanonicalGeluResult()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rewritten = []
        for node in list(model.graph):
            found = _match(node)
            if found is None:
                continue
            xi, half, ci = found
            one_plus_erf = half.inputs[1 - ci]
            const = half.inputs[ci]
            out = node.outputs[0]
            # node: x * (1 + erf)  ->  new Mul(node_out, 0.5) takes over node's consumers.
            node.replace_input_with(1 - xi, one_plus_erf)
            scaled = ir.node("Mul", [out, const], name=f"{node.name or 'gelu'}_half")
            result = scaled.outputs[0]
            if out.dtype is not None:  # a type of its own: out's may be the reference's too
                retype(result, out.dtype, out.shape)
            old_name = out.name
            for user, index in list(out.uses()):
                if user is not scaled:
                    user.replace_input_with(index, result)
            if out.is_graph_output():
                model.graph.outputs[model.graph.outputs.index(out)] = result
            out.name = f"{old_name}_unscaled"
            result.name = old_name
            model.graph.insert_after(node, scaled)
            model.graph.remove(half, safe=True)
            rewritten.append(node.name or old_name or "?")
            logger.debug("GELU at %s reordered for onnxruntime's fusion", node.name)
        self.result = CanonicalGeluResult(tuple(rewritten))
        return ir.passes.PassResult(model, modified=bool(rewritten))
