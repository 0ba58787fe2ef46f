"""Running calibration batches through onnxruntime and capturing inner tensors.

A copy of the model gets the requested inner values as extra graph outputs; the copy is
serialized once per capture, the batches are streamed through, and each batch's captured
arrays go to a callback that folds them into running statistics. Nothing keeps all
activations, so memory does not grow with the amount of data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx_ir as ir

from onnxprune.calibration.data import Batch
from onnxprune.calibration.propagate import Propagator, run_batches, value_info
from onnxprune.core.pages import release_pages
from onnxprune.errors import DataError
from onnxprune.io.detached import serialize_detached
from onnxprune.io.models import ModelBytes, model_bytes
from onnxprune.io.runtime import Provider, make_session

__all__ = ["capture", "row_mask", "with_outputs"]


def with_outputs(model: ir.Model, names: Sequence[str]) -> ModelBytes:
    """The serialized model with `names` added as graph outputs."""
    proto, _ = serialize_detached(model)  # big weights stay where they are (no copy)
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
        proto.graph.output.append(
            value_info(name, None if value.dtype is None else value.dtype.value))
    return model_bytes(model, proto)  # keeps the folder its external data is read from


def capture(
    model: ir.Model | Propagator,
    names: Sequence[str],
    batches: Iterable[Batch],
    on_batch: Callable[[dict[str, np.ndarray], Batch], None],
    *,
    provider: Provider = "cpu",
    finite: bool = True,
) -> int:
    """Runs every batch and hands `on_batch` the captured tensors; returns the batch count.

    A Propagator runs only the section of the graph its cut leaves to do, on its own
    batches (the same ones). With `finite` (a model's run; a Propagator has its own
    setting), raises DataError naming the tensor when a captured value holds NaN or Inf,
    because statistics built on them would turn into NaN weights.
    """
    if isinstance(model, Propagator):
        return model.capture(names, on_batch)
    session = make_session(with_outputs(model, names), provider)
    try:
        return run_batches(session, list(dict.fromkeys(names)), batches, on_batch,
                           finite=finite)
    finally:
        del session
        release_pages(model)


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
