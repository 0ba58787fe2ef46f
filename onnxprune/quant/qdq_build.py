"""Building Quantize/Dequantize nodes and int8 constants into an onnx_ir graph.

The small, fiddly part of QDQ insertion: unique names, typed values, inserting at the right
place, and rewiring consumers without rewiring a new node onto itself.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["QdqBuilder", "constant_bytes", "retype"]

_IR = {np.dtype(np.uint8): ir.DataType.UINT8, np.dtype(np.int8): ir.DataType.INT8}


def retype(value: ir.Value, dtype: ir.DataType, shape: ir.Shape | None) -> None:
    """Gives `value` a type and shape objects of its own.

    Never `value.dtype = ...`: onnx_ir changes the existing type object in place, and
    `ir.Model.clone()` shares type objects between the copy and the original, so retyping
    a value recorded in value_info (the dynamo exporter records them all) would retype the
    reference model too (issue 25). Shapes are copied for the same reason.
    """
    value.type = ir.TensorType(dtype)
    value.shape = None if shape is None else shape.copy()


class QdqBuilder:
    """Adds initializers and Q/DQ nodes to `graph` under names no other value uses."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self._taken = {v.name for n in graph for v in n.outputs if v.name}
        self._taken |= set(graph.initializers) | {v.name for v in graph.inputs if v.name}

    def name(self, base: str) -> str:
        name, i = base, 0
        while name in self._taken:
            i += 1
            name = f"{base}_{i}"
        self._taken.add(name)
        return name

    def const(self, base: str, array: np.ndarray) -> ir.Value:
        """A new initializer; a 0-d array stays a scalar (np.ascontiguousarray would not)."""
        name = self.name(base)
        array = array if array.flags.c_contiguous else array.copy()
        tensor = ir.tensor(array, name=name)
        value = ir.Value(name=name, type=ir.TensorType(tensor.dtype),
                         shape=ir.Shape(array.shape), const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def _out(self, node: ir.Node, base: str, dtype: ir.DataType,
             shape: ir.Shape | None) -> ir.Value:
        out = node.outputs[0]
        out.name = self.name(base)
        retype(out, dtype, shape)
        return out

    def int8_const(self, base: str, q: np.ndarray, scale: np.ndarray
                   ) -> tuple[ir.Value, ir.Value, ir.Value]:
        """The stored form of a narrow constant: values, scale, zero point (initializers)."""
        return (self.const(f"{base}_quantized", q), self.const(f"{base}_scale", scale),
                self.const(f"{base}_zero_point", np.zeros(scale.shape, q.dtype)))

    def dequantize_const(self, base: str, stored: tuple[ir.Value, ir.Value, ir.Value],
                         axis: int | None, before: ir.Node) -> ir.Value:
        """DequantizeLinear(q, scale, 0) of an `int8_const`, inserted before `before`.

        Layers that share a weight each get a DequantizeLinear of their own reading the one
        stored copy: the file holds it once, and each Dequantize has the single consumer
        onnxruntime's QDQ fusions look for.
        """
        node = ir.node("DequantizeLinear", list(stored), {} if axis is None else {"axis": axis},
                       name=self.name(f"{base}_DequantizeLinear"))
        self.graph.insert_before(before, node)
        return self._out(node, f"{base}_dequantized", ir.DataType.FLOAT, stored[0].shape)

    def dequantized_const(self, base: str, q: np.ndarray, scale: np.ndarray,
                          axis: int | None, before: ir.Node) -> ir.Value:
        """DequantizeLinear(q, scale, 0) inserted before `before`: a constant stored narrow."""
        return self.dequantize_const(base, self.int8_const(base, q, scale), axis, before)

    def quantize(self, value: ir.Value, src: ir.Value, scale: float, zero_point: np.ndarray,
                 pre: list[ir.Node]) -> ir.Value:
        """QuantizeLinear(src) placed (after the `pre` nodes) right after `value` is made."""
        base = value.name or "activation"
        sv = self.const(f"{base}_scale", np.array(scale, np.float32))
        zv = self.const(f"{base}_zero_point", zero_point)
        q = ir.node("QuantizeLinear", [src, sv, zv], name=self.name(f"{base}_QuantizeLinear"))
        out = self._out(q, f"{base}_quantized", _IR[zero_point.dtype], value.shape)
        producer = value.producer()
        if producer is not None:
            self.graph.insert_after(producer, [*pre, q])
        else:
            self.graph.insert_before(self.graph.node(0), [*pre, q])
        return out

    def dequantize(self, quantized: ir.Value, like: ir.Value, before: ir.Node) -> ir.Value:
        """A DequantizeLinear of `quantized` (same scale and zero point), before `before`."""
        q_node = quantized.producer()
        assert q_node is not None
        dq = ir.node("DequantizeLinear", [quantized, q_node.inputs[1], q_node.inputs[2]],
                     name=self.name(f"{like.name}_DequantizeLinear"))
        self.graph.insert_before(before, dq)
        return self._out(dq, f"{like.name}_dequantized", ir.DataType.FLOAT, like.shape)

    def smooth(self, value: ir.Value, inverse: np.ndarray) -> ir.Node:
        """A Mul by the per-channel inverse SmoothQuant factor (not inserted yet)."""
        base = value.name or "activation"
        mul = ir.node("Mul", [value, self.const(f"{base}_smooth_inv", inverse)],
                      name=self.name(f"{base}_Smooth"))
        self._out(mul, f"{base}_smoothed", ir.DataType.FLOAT, value.shape)
        return mul

    def qdq_after(self, node: ir.Node, scale: float, zero_point: np.ndarray) -> bool:
        """Quantize then dequantize `node`'s output for all its consumers (not graph outputs)."""
        out = node.outputs[0]
        if out.is_graph_output():
            return False
        base = out.name or "output"
        # Take the consumers before the new Quantize reads `out`, or it is rewired onto itself.
        uses = list(out.uses())
        sv = self.const(f"{base}_scale", np.array(scale, np.float32))
        zv = self.const(f"{base}_zero_point", zero_point)
        q = ir.node("QuantizeLinear", [out, sv, zv], name=self.name(f"{base}_QuantizeLinear"))
        qv = self._out(q, f"{base}_quantized", _IR[zero_point.dtype], out.shape)
        dq = ir.node("DequantizeLinear", [qv, sv, zv], name=self.name(f"{base}_DequantizeLinear"))
        dqv = self._out(dq, f"{base}_dequantized", ir.DataType.FLOAT, out.shape)
        for user, index in uses:
            user.replace_input_with(index, dqv)
        self.graph.insert_after(node, [q, dq])
        return True

    def gather_first(self, node: ir.Node, base: str, table: ir.Value,
                     row_scale: ir.Value) -> None:
        """Gather(table) becomes Gather(int8 table) * Gather(row scales): no full dequantize.

        DequantizeLinear before Gather is the textbook QDQ form, but onnxruntime does not
        constant-fold it, so every run would dequantize the whole table (5 ms of an 80 ms
        MiniLM run); gathering first touches only the rows the batch uses. `table` is the
        int8 table ([rows, width]) and `row_scale` its scales as [rows, 1]; both may be
        shared with other readers of the same float table.
        """
        out = node.outputs[0]
        uses = list(out.uses())
        row_scale_node = ir.node("Gather", [row_scale, node.inputs[1]], {"axis": 0},
                                 name=self.name(f"{base}_GatherScale"))
        cast = ir.node("Cast", [out], {"to": ir.DataType.FLOAT}, name=self.name(f"{base}_Cast"))
        mul = ir.node("Mul", [cast.outputs[0], row_scale_node.outputs[0]],
                      name=self.name(f"{base}_Dequantize"))
        self._out(row_scale_node, f"{out.name}_row_scale", ir.DataType.FLOAT, None)
        self._out(cast, f"{out.name}_float", ir.DataType.FLOAT, out.shape)
        result = self._out(mul, f"{out.name}_dequantized", ir.DataType.FLOAT, out.shape)
        for user, index in uses:
            user.replace_input_with(index, result)
        if out.is_graph_output():
            self.graph.outputs[self.graph.outputs.index(out)] = result
            old_name = out.name
            out.name = self.name(f"{old_name}_quantized")
            result.name = old_name
        node.replace_input_with(0, table)
        retype(out, ir.DataType.INT8, out.shape)
        self.graph.insert_after(node, [row_scale_node, cast, mul])


def constant_bytes(graph: ir.Graph) -> int:
    """Bytes held by initializers and Constant nodes of the main graph."""
    total = sum(v.const_value.nbytes for v in graph.initializers.values()
                if v.const_value is not None)
    for node in graph:
        if node.op_type == "Constant" and "value" in node.attributes:
            total += node.attributes["value"].as_tensor().nbytes
    return total
