"""Running calibration batches through onnxruntime and capturing inner tensors.

A copy of the model gets the requested inner values as extra graph outputs; the copy is
serialized once per capture, the batches are streamed through, and each batch's captured
arrays go to a callback that folds them into running statistics. Nothing keeps all
activations, so memory does not grow with the amount of data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune.calibration.data import Batch
from onnxprune.errors import DataError
from onnxprune.io import ModelBytes, model_bytes
from onnxprune.runtime import make_session

__all__ = ["capture", "row_mask", "with_outputs"]


def with_outputs(model: ir.Model, names: Sequence[str]) -> ModelBytes:
    """The serialized model with `names` added as graph outputs."""
    proto = ir.serde.serialize_model(model)
    present = {o.name for o in proto.graph.output}
    known: dict[str, ir.Value] = {}
    for node in model.graph:
        for out in node.outputs:
            if out.name:
                known[out.name] = out
    for name in names:
        if name in present:
            continue
        value = known.get(name)
        if value is None:
            raise DataError(f"cannot capture '{name}': no such tensor in the main graph")
        elem = value.dtype.value if value.dtype is not None else onnx.TensorProto.FLOAT
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return model_bytes(model, proto)  # keeps the folder its external data is read from


def capture(
    model: ir.Model,
    names: Sequence[str],
    batches: Iterable[Batch],
    on_batch: Callable[[dict[str, np.ndarray], Batch], None],
) -> int:
    """Runs every batch and hands `on_batch` the captured tensors; returns the batch count.

    Raises DataError naming the tensor when a captured value holds NaN or Inf, because
    statistics built on them would turn into NaN weights.
    """
    session = make_session(with_outputs(model, names), "cpu")
    wanted = list(dict.fromkeys(names))
    inputs = {i.name for i in session.get_inputs()}
    count = 0
    for batch in batches:
        feeds = {k: v for k, v in batch.items() if k in inputs}
        try:
            arrays = session.run(wanted, feeds)
        except Exception as e:
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"calibration batch {count} failed in onnxruntime: {text}") from e
        captured = dict(zip(wanted, arrays, strict=False))
        for name, arr in captured.items():
            if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
                raise DataError(
                    f"tensor '{name}' holds NaN/Inf on calibration batch {count}; "
                    "check the calibration data or leave this layer out with --ignore"
                )
        on_batch(captured, batch)
        count += 1
    if count == 0:
        raise DataError("the calibration data holds no batches")
    return count


def row_mask(batch: Batch, mask_input: str | None, rows: int, lead_shape: tuple[int, ...]) -> (
    np.ndarray | None
):
    """Boolean mask over the flattened rows of an activation, from a [batch, seq] input.

    Padding tokens (mask 0) then do not count in the statistics.
    """
    if mask_input is None:
        return None
    if mask_input not in batch:
        raise DataError(
            f"--token-mask '{mask_input}' is not in the calibration batch "
            f"(inputs: {', '.join(batch)})"
        )
    mask = np.asarray(batch[mask_input]) != 0
    if mask.shape == lead_shape:
        return mask.reshape(rows)
    if mask.ndim <= len(lead_shape) and lead_shape[: mask.ndim] == mask.shape:
        extra = lead_shape[mask.ndim:]
        return np.broadcast_to(mask.reshape(mask.shape + (1,) * len(extra)), lead_shape).reshape(
            rows
        )
    raise DataError(
        f"--token-mask '{mask_input}' has shape {list(mask.shape)}, which does not match "
        f"the activation rows {list(lead_shape)}"
    )
