"""Running only the part of a model between a fed tensor and the tensors wanted.

Block-wise repair needs each block's inputs from the model repaired so far, once per block.
Running the whole model each time costs a full calibration pass per block. Instead, the
previous block's output (which the repair computes itself) is fed in as an input: its
producer is cut, and only the nodes the wanted tensors depend on are kept. For a stack of
layers that is one layer per block instead of the whole model.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
import onnx_ir as ir

__all__ = ["cut_model"]


def cut_model(model: ir.Model, outputs: Sequence[str], cut: str | None = None) -> bytes:
    """The serialized model computing `outputs`, with `cut` (when given) as an extra input.

    Nodes no output depends on are dropped, and so are their initializers. A model with
    subgraphs (If, Loop, Scan), which may read outer values by name, is not pruned or cut.
    """
    proto = ir.serde.serialize_model(model)
    g = proto.graph
    dtypes = {v.name: v.dtype for n in model.graph for v in n.outputs if v.name}
    subgraphs = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                    for n in g.node for a in n.attribute)
    needed = set(outputs)
    kept = []
    for node in reversed(g.node):
        if not subgraphs and cut is not None and cut in node.output and not any(
                o in needed and o != cut for o in node.output):
            continue  # fed from outside
        if subgraphs or any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    cut_fed = not subgraphs and cut is not None and cut in needed and not any(
        cut in n.output for n in kept)
    kept.reverse()
    del g.node[:]
    g.node.extend(kept)
    inits = [t for t in g.initializer if t.name in needed or subgraphs]
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.output[:]
    for name in outputs:
        dtype = dtypes.get(name)
        elem = dtype.value if dtype is not None else onnx.TensorProto.FLOAT
        g.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    if cut_fed:
        dtype = dtypes.get(cut or "")
        elem = dtype.value if dtype is not None else onnx.TensorProto.FLOAT
        g.input.append(onnx.helper.make_tensor_value_info(cut, elem, None))
    del g.value_info[:]  # shapes recorded for the full model need not hold for the part
    return proto.SerializeToString()
