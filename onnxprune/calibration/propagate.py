"""Layer-wise calibration: activations of a model that is pruned front to back.

Calibrated pruning needs, for each channel group in turn, the activations the *pruned so far*
model feeds that group. Running the whole model per group makes the cost grow with the square
of depth. A Propagator instead keeps, per calibration batch, the values that cross a cut
through the graph (the residual stream, masks, rotary tables): everything before the cut is
done. A capture runs only the section of the graph between the cut and the requested
tensors, and `advance` moves the cut forward by running the section between the old and the
new cut, so every node runs about twice in total, whatever the depth.

The cut stays correct while the model is edited: before each run the graph is compared with
a fingerprint taken after the previous one (node inputs, attributes and constant tensors, by
identity), and cached values downstream of anything edited or inserted are dropped, so they
are recomputed from what is still valid. Pruning edits only nodes at or after the group being
pruned, so in practice nothing cached is dropped; the check makes that a guarantee instead of
an assumption.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune.calibration.data import Batch
from onnxprune.core.pages import release_pages
from onnxprune.errors import DataError
from onnxprune.io.detached import initializer_proto
from onnxprune.io.external_data import external_folder
from onnxprune.io.models import model_bytes
from onnxprune.io.runtime import Provider, make_session

__all__ = ["Propagator", "run_batches", "section", "SECTION_ABOVE_BYTES",
           "graph_value", "sectioned_outputs", "weight_bytes"]

# A model with at least this many bytes of weights is calibrated section by section, so no
# session holds all of its weights and its memory-mapped pages are read one section at a time.
SECTION_ABOVE_BYTES = 2**30

OnBatch = Callable[[dict[str, np.ndarray], Batch], None]


def check_finite(captured: dict[str, np.ndarray], index: int, label: str) -> None:
    """Refuses a captured tensor holding NaN or Inf, naming it."""
    for name, arr in captured.items():
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise DataError(f"tensor '{name}' holds NaN/Inf on {label} {index}; check the "
                            "calibration data or leave this layer out with --ignore")


def run_batches(session, wanted: Sequence[str], batches: Iterable[Batch], on_batch: OnBatch,
                extra: Callable[[int], dict[str, np.ndarray]] | None = None, *,
                finite: bool = True, label: str = "calibration batch") -> int:
    """Runs `session` on every batch (plus `extra(i)` feeds) and hands the outputs on.

    With `finite`, raises DataError naming the tensor when a captured value holds NaN or
    Inf, because statistics built on them would turn into NaN weights.
    """
    inputs = {i.name for i in session.get_inputs()}
    count = 0
    for batch in batches:
        feeds = {k: v for k, v in batch.items() if k in inputs}
        if extra is not None:
            feeds.update(extra(count))
        try:
            arrays = session.run(list(wanted), feeds)
        except Exception as e:
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"{label} {count} failed in onnxruntime: {text}") from e
        captured = dict(zip(wanted, arrays, strict=False))
        if finite:
            check_finite(captured, count, label)
        on_batch(captured, batch)
        count += 1
    if count == 0:
        raise DataError("the calibration data holds no batches")
    return count


def _outer_inputs(node: ir.Node) -> list[ir.Value]:
    """Values of the enclosing graphs that the node's subgraphs (If/Loop/Scan bodies) read."""
    found: list[ir.Value] = []
    for attr in node.attributes.values():
        graphs = ([attr.value] if attr.type == ir.AttributeType.GRAPH
                  else list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
        for sub in graphs:
            inner: set[ir.Value] = set(sub.inputs) | set(sub.initializers.values())
            for n in ir.traversal.RecursiveGraphIterator(sub):
                inner.update(n.outputs)
            for n in ir.traversal.RecursiveGraphIterator(sub):
                found.extend(v for v in n.inputs if v is not None and v not in inner)
    return found


def _node_inputs(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None] + _outer_inputs(node)


def value_info(name: str, elem: int | None) -> onnx.ValueInfoProto:
    """Element type only: shapes recorded on the graph may predate slicing, and onnxruntime
    infers what is left out (an output of unknown type gets none at all)."""
    if elem is None:
        return onnx.ValueInfoProto(name=name)
    return onnx.helper.make_tensor_value_info(name, elem, None)


def section(model: ir.Model, wanted: Sequence[ir.Value],
            fed: Callable[[ir.Value], int | None], folder: str | None = None
            ) -> tuple[bytes, list[ir.Value]]:
    """The part of `model` that computes `wanted` from the values `fed` gives a type for
    (an onnx element type; None: not fed).

    Returns the serialized section (weights inline, read from the model's folder) and the
    values it takes as inputs. Values neither fed nor produced by a node must be constants.
    `folder`: external_folder(model), checked once by the caller.
    """
    graph = model.graph
    nodes: set[ir.Node] = set()
    feeds: dict[ir.Value, int] = {}
    consts: list[ir.Value] = []
    seen: set[ir.Value] = set()
    stack = list(wanted)
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        elem = fed(v)
        if elem is not None:
            feeds[v] = elem
            continue
        node = v.producer()
        if node is None:
            if v.const_value is None:
                raise DataError(f"tensor '{v.name}' is neither fed nor computed; "
                                "check the calibration inputs")
            consts.append(v)
            continue
        if node not in nodes:
            nodes.add(node)
            stack.extend(_node_inputs(node))
    proto_graph = onnx.GraphProto(name="section")
    proto_graph.node.extend(ir.serde.serialize_node(n) for n in graph if n in nodes)
    proto_graph.initializer.extend(initializer_proto(v, graph) for v in consts)
    proto_graph.input.extend(value_info(v.name or "", e) for v, e in feeds.items())
    proto_graph.output.extend(value_info(v.name or "", None if v.dtype is None else v.dtype.value)
                              for v in wanted)
    proto = onnx.helper.make_model(
        proto_graph,
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()],
        ir_version=model.ir_version,
    )
    proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    return model_bytes(model, proto, folder=folder), list(feeds)


def _fingerprint(node: ir.Node) -> tuple:
    """What pruning may edit on a node: its inputs, attributes and input constants."""
    inputs = tuple(node.inputs)
    attrs = tuple(node.attributes.values())
    return (inputs, attrs, tuple(a.value for a in attrs),
            tuple(v.const_value for v in inputs if v is not None))


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(
        len(x) == len(y) and all(p is q for p, q in zip(x, y, strict=True))
        for x, y in zip(a, b, strict=True))


def graph_value(graph: ir.Graph, name: str) -> ir.Value | None:
    """The graph input or node output of the main graph called `name`, if any."""
    for v in graph.inputs:
        if v.name == name:
            return v
    for node in graph:
        for out in node.outputs:
            if out.name == name:
                return out
    return None


def weight_bytes(model: ir.Model) -> int:
    """Bytes of the main graph's initializers."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None)


class Propagator:
    """The activations of `model`, computed section by section as its cut moves forward.

    `model` is edited in place by the pruning between calls. Use `advance(node)` once the
    groups before `node` are done, and `capture` for the tensors a group needs. With
    `finite=False` NaN/Inf values are handed on instead of refused (range calibration flags
    such a tensor and leaves it float).
    """

    def __init__(self, model: ir.Model, batches: Sequence[Batch], provider: Provider = "cpu",
                 *, finite: bool = True, label: str = "calibration batch"):
        self.model = model
        self.finite = finite
        self.label = label  # how an error names a batch
        self.batches = batches
        self.provider = provider
        self._cache: list[dict[ir.Value, np.ndarray]] = [{} for _ in batches]
        self._print: dict[ir.Node, tuple] = {}  # of the nodes the cut summarises
        self._folder = external_folder(model)  # containment checked once, not per section
        self._fed = set(batches[0]) if batches else set()

    def _is_input(self, v: ir.Value) -> bool:
        return v.is_graph_input() and v.name in self._fed

    def _refresh(self) -> None:
        """Drops cached values that an edit of the graph since the last run made stale.

        Cached values come from the nodes before the cut, so only those are compared: an
        edit or a node inserted elsewhere reaches them only through their inputs."""
        if not self._cache or not self._cache[0]:
            return
        dirty = [n for n, fp in self._print.items() if not _same(_fingerprint(n), fp)]
        if not dirty:
            return
        self._print.update((n, _fingerprint(n)) for n in dirty)
        stale: set[ir.Value] = set()
        stack = [v for n in dirty for v in n.outputs]
        while stack:
            v = stack.pop()
            if v in stale:
                continue
            stale.add(v)
            stack.extend(out for use in v.uses() for out in use.node.outputs)
        for cache in self._cache:
            for v in stale & cache.keys():
                del cache[v]

    def _run(self, wanted: list[ir.Value], on_batch: OnBatch, finite: bool | None = None
             ) -> int:
        """`finite=False`: values only carried across the cut (a -inf attention mask is one);
        they are checked when a fit captures them."""
        first = self._cache[0] if self._cache else {}
        cached = first.keys()

        def fed(v: ir.Value) -> int | None:
            if v in first:
                return onnx.helper.np_dtype_to_tensor_dtype(first[v].dtype)
            if self._is_input(v):
                return v.dtype.value if v.dtype is not None else None
            return None

        data, feeds = section(self.model, wanted, fed, self._folder)
        session = make_session(data, self.provider)
        from_cache = [v for v in feeds if v in cached]
        names = [v.name or "" for v in wanted]

        def extra(i: int) -> dict[str, np.ndarray]:
            return {v.name or "": self._cache[i][v] for v in from_cache}

        try:
            return run_batches(session, names, self.batches, on_batch, extra,
                               finite=self.finite if finite is None else finite,
                               label=self.label)
        finally:
            del session
            release_pages(self.model)  # the next section reads other weights

    def _value(self, name: str) -> ir.Value:
        value = graph_value(self.model.graph, name)
        if value is None:
            raise DataError(f"cannot capture '{name}': no such tensor in the main graph")
        return value

    def capture(self, names: Sequence[str], on_batch: OnBatch) -> int:
        """As runner.capture on the current model, running only what the cut leaves to do."""
        self._refresh()
        wanted = [self._value(n) for n in dict.fromkeys(names)]
        computed = [v for v in wanted if not self._is_input(v)]

        def with_inputs(arrays: dict[str, np.ndarray], batch: Batch) -> None:
            arrays.update({v.name: batch[v.name] for v in wanted  # type: ignore[misc]
                           if self._is_input(v)})
            on_batch(arrays, batch)

        if not computed:  # graph inputs only
            return run_batches(_Identity(), [], self.batches, with_inputs, finite=self.finite)

        if self._cache and all(v in self._cache[0] for v in computed):
            # The cut holds them already: nothing to run; checked here, as a capture would.
            count = 0
            for cache, batch in zip(self._cache, self.batches, strict=True):
                arrays = {v.name or "": cache[v] for v in computed}
                if self.finite:
                    check_finite(arrays, count, self.label)
                with_inputs(arrays, batch)
                count += 1
            return count
        return self._run(computed, with_inputs)

    def advance(self, before: Iterable[ir.Node]) -> None:
        """Moves the cut to just before the first of `before` in graph order: the nodes ahead
        of it are summarised by the values they hand to the rest of the graph."""
        self._refresh()
        order = list(self.model.graph)
        wanted = set(before)
        first = next((i for i, n in enumerate(order) if n in wanted), None)
        if first is None:
            raise DataError("none of the nodes to stop before is in the graph; please report")
        done = set(order[:first])
        live: set[ir.Value] = {v for v in self.model.graph.inputs if self._is_input(v)}
        for node in order:  # values that depend on the data (constants are recomputed)
            if any(v in live for v in _node_inputs(node)):
                live.update(node.outputs)
        cut = list(dict.fromkeys(v for node in order if node not in done
                                 for v in _node_inputs(node)
                                 if v in live and v.producer() in done))
        missing = [v for v in cut if not self._cache or v not in self._cache[0]]
        if missing:
            new: list[dict[ir.Value, np.ndarray]] = []
            by_name = {v.name: v for v in missing}

            def keep(arrays: dict[str, np.ndarray], batch: Batch) -> None:
                new.append({by_name[k]: a for k, a in arrays.items()})

            self._run(missing, keep, finite=False)
        else:
            new = [{} for _ in self.batches]
        self._cache = [{v: (fresh[v] if v in fresh else old[v]) for v in cut}
                       for old, fresh in zip(self._cache, new, strict=True)]
        self._print = {n: _fingerprint(n) for n in done}


def sectioned_outputs(model: ir.Model, batches: Sequence[Batch], provider: Provider = "cpu",
                      *, section_bytes: int = 256 << 20) -> list[list[np.ndarray]] | None:
    """The graph outputs on every batch, computed in sections of about `section_bytes` of
    weights each, so only one section's weights are resident at a time (a big model's
    verification reference). None when an output is not computed by a main-graph node."""
    outputs = [o.name or "" for o in model.graph.outputs]
    produced = {out.name for node in model.graph for out in node.outputs}
    if not outputs or not all(n in produced for n in outputs):
        return None
    prop = Propagator(model, batches, provider, finite=False,
                      label="reference model batch")
    held = 0
    for node in list(model.graph):
        size = sum(v.const_value.nbytes for v in node.inputs
                   if v is not None and v.is_initializer() and v.const_value is not None)
        if held and held + size > section_bytes:
            prop.advance([node])
            held = 0
        held += size
    out: list[list[np.ndarray]] = []
    prop.capture(outputs, lambda arrays, _: out.append([arrays[n] for n in outputs]))
    return out


class _Identity:
    """A session with nothing to compute, for captures of graph inputs only."""

    def get_inputs(self) -> list:
        return []

    def run(self, names: list[str], feeds: dict) -> list:
        return []
