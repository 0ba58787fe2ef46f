"""Moving a graph output from one value to another without changing its name."""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["take_over_output"]


def take_over_output(graph: ir.Graph, old: ir.Value, new: ir.Value, suffix: str) -> None:
    """If `old` is a graph output, `new` takes its place and its name, so callers of the
    model see no change; `old` is renamed with `suffix`."""
    if not old.is_graph_output():
        return
    name = old.name
    old.name = f"{name}{suffix}"
    new.name = name
    outputs = graph.outputs
    outputs[outputs.index(old)] = new
