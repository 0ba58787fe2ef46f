"""Temporary pruning: one onnxruntime session that evaluates any candidate.

Each unit's consumer weight becomes an overridable initializer (a graph input with a default)
and gets a bias input, zero by default, added to its output. A candidate is a set of
replacement weights: removed items' rows are zero - the mask - and the kept rows may hold a
least-squares repair. Feeding them evaluates the candidate exactly as the sliced model would
compute it, without building or loading another model; feeding nothing gives the original
model. Real removal happens once, at the end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxprune.calibration.data import Batch
from onnxprune.core.weights import const_array
from onnxprune.errors import DataError, OnnxPruneError
from onnxprune.io.runtime import make_session
from onnxprune.search.units import Unit

__all__ = ["MaskedModel", "MaskedSession", "Candidate", "run_batches"]

# Per unit name: consumer weights joined as [C, sum D] (x W layout) and a bias delta [sum D].
Candidate = Mapping[str, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class _Slot:
    weight: str  # the overridable weight input
    bias: str  # the bias input added to the consumer output
    start: int  # columns of the joined weight this consumer owns
    stop: int
    transposed: bool  # stored as [D, C] (Gemm transB)
    dtype: np.dtype


class MaskedModel:
    """The model with every unit's consumer weight and bias exposed as inputs."""

    def __init__(self, model: ir.Model, units: Sequence[Unit]) -> None:
        m = model.clone()  # tensors are shared; only the graph structure is copied
        nodes = {n.name: n for n in m.graph}
        self.slots: dict[str, list[_Slot]] = {}
        for u in units:
            start = 0
            slots = []
            for use in u.group.consumers:
                node = nodes.get(use.node.name)
                if node is None:
                    raise OnnxPruneError(f"consumer '{use.node.name}' of '{u.name}' not found")
                w = const_array(use.weight)
                assert w is not None
                d = int(w.shape[1 - use.reduce_axis])
                idx = next(i for i, v in enumerate(node.inputs)
                           if v is not None and v.name == use.weight.name)
                tag = f"onnxprune_mask_{len(self.slots)}_{len(slots)}"
                weight = _input(m.graph, f"{tag}_w", w)
                node.replace_input_with(idx, weight)
                bias = _input(m.graph, f"{tag}_b", np.zeros(d, dtype=w.dtype))
                _add_after(m.graph, node, bias)
                slots.append(_Slot(f"{tag}_w", f"{tag}_b", start, start + d,
                                   use.reduce_axis == 1, w.dtype))
                start += d
            self.slots[u.name] = slots
        self.session = make_session(m, "cpu")
        self.inputs = [i for i in self.session.get_inputs() if not i.name.startswith(
            "onnxprune_mask_")]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def feeds(self, candidate: Candidate) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, (weight, delta) in candidate.items():
            for s in self.slots[name]:
                w = weight[:, s.start:s.stop]
                out[s.weight] = np.ascontiguousarray(w.T if s.transposed else w, dtype=s.dtype)
                out[s.bias] = np.ascontiguousarray(delta[s.start:s.stop], dtype=s.dtype)
        return out

    def run(self, batches: Sequence[Batch], candidate: Candidate) -> list[list[np.ndarray]]:
        """Every output for every batch, with the candidate's weights in place."""
        return run_batches(MaskedSession(self, candidate), batches)


def run_batches(session: ort.InferenceSession | MaskedSession,
                batches: Sequence[Batch]) -> list[list[np.ndarray]]:
    """Every output for every batch, on a real session or a masked candidate's."""
    names = {i.name for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    out = []
    for k, batch in enumerate(batches):
        feeds = {n: v for n, v in batch.items() if n in names}
        try:
            out.append(session.run(outputs, feeds))
        except Exception as e:
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"held-out batch {k} failed in onnxruntime: {text}") from e
    return out


class MaskedSession:
    """An onnxruntime.InferenceSession look-alike running one candidate, for user metrics.

    It offers the model's own inputs and outputs; the candidate's weights ride along.
    """

    def __init__(self, masked: MaskedModel, candidate: Candidate) -> None:
        self._masked = masked
        self._extra = masked.feeds(candidate)

    def get_inputs(self) -> list[ort.NodeArg]:
        return list(self._masked.inputs)

    def get_outputs(self) -> list[ort.NodeArg]:
        return list(self._masked.session.get_outputs())

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, np.ndarray],
            run_options: ort.RunOptions | None = None) -> list[np.ndarray]:
        names = list(output_names) if output_names else self._masked.output_names
        return self._masked.session.run(names, {**input_feed, **self._extra}, run_options)


def _input(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """An initializer that is also a graph input: onnxruntime lets a feed override it."""
    value = ir.Value(name=name, shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    graph.inputs.append(value)
    return value


def _add_after(graph: ir.Graph, node: ir.Node, bias: ir.Value) -> None:
    out = node.outputs[0]
    new = ir.Value(name=f"{bias.name}_sum", shape=out.shape, type=out.type)
    add = ir.Node("", "Add", [out, bias], outputs=[new], name=f"{bias.name}_add")
    if out.is_graph_output():
        outputs = graph.outputs
        name = out.name
        out.name = f"{name}_before_mask_bias"
        new.name = name
        outputs[outputs.index(out)] = new
    ir.convenience.replace_all_uses_with(out, new)
    add.replace_input_with(0, out)
    graph.insert_after(node, add)
