"""Concrete shapes of masks the file leaves unrecorded, from one run of the model.

Recognition declines a block whose mask might differ per head; one run (a calibration batch,
or generated inputs with an empty key/value cache) settles what the file does not say.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import onnx_ir as ir

from onnxprune.calibration.calibration import Calibration
from onnxprune.calibration.data import InputSpec, input_specs, random_batches
from onnxprune.calibration.runner import with_outputs
from onnxprune.io.runtime import make_session

__all__ = ["probe_shapes"]

logger = logging.getLogger(__name__)


def probe_shapes(model: ir.Model, names: Sequence[str],
                  calib: Calibration | None) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of `names` from one run (a calibration batch or random inputs).

    Empty when the model cannot be run here: the blocks then stay declined with the reason.
    """
    try:
        session = make_session(with_outputs(model, names), "cpu")
        if calib is not None and len(calib.batches):
            batches = [next(iter(calib.batches))]
        else:
            specs = input_specs(model)
            batches = [random_batches(specs, count=1, default_dim=3)[0]]
            empty = _empty_cache(specs)
            if empty:
                batches.append(random_batches(specs, empty, count=1, default_dim=3)[0])
    except Exception as e:  # any failure leaves the masks unresolved, never breaks the pass
        logger.info("could not probe mask shapes: %s", e)
        return {}
    for batch in batches:
        try:
            feeds = {i.name: batch[i.name] for i in session.get_inputs()}
            arrays = session.run(list(names), feeds)
        except Exception as e:  # a failure leaves the masks unresolved, never breaks the pass
            logger.info("could not probe mask shapes: %s", e)
            continue
        return {n: tuple(int(d) for d in a.shape) for n, a in zip(names, arrays, strict=True)}
    return {}


def _empty_cache(specs: Sequence[InputSpec]) -> dict[str, tuple[int, ...]]:
    """Shapes that feed key/value cache inputs (`past*`) an empty cache: their own symbolic
    lengths 0. Generated inputs give every symbol one size, which a decoder with a cache
    rejects (its mask spans past + new positions); with no past, every length agrees."""
    past = [s for s in specs if s.name.startswith("past") and s.dims is not None]
    if not past:
        return {}
    shared = {d for s in specs if s not in past for d in (s.dims or ()) if isinstance(d, str)}
    out = {}
    for s in past:
        dims = s.dims or ()
        if any(d is None for d in dims):
            return {}
        out[s.name] = tuple(d if isinstance(d, int) else 3 if d in shared else 0 for d in dims)
    return out
