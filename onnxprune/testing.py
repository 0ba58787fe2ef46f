"""pytest helpers: gate a model in a test suite with the same verdict as `onnxprune verify`.

    from onnxprune.testing import assert_close

    def test_small_model_still_behaves():
        assert_close("small.onnx", golden="tests/golden.npz")            # saved outputs
        assert_close("small.onnx", reference="model.onnx", data="batches/", min_cosine=0.995)
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import onnx

from onnxprune.api import verify, verify_golden
from onnxprune.calibration.data import Batch
from onnxprune.errors import InputError
from onnxprune.io.runtime import ModelSource, Provider
from onnxprune.verify.compare import VerifyResult

__all__ = ["assert_close"]


def assert_close(
    model: ModelSource | onnx.ModelProto,
    golden: str | os.PathLike[str] | None = None,
    data: str | os.PathLike[str] | Sequence[Batch] | None = None,
    *,
    reference: ModelSource | onnx.ModelProto | None = None,
    providers: Sequence[Provider] = ("cpu",),
    **tolerances: float | bool | None,
) -> VerifyResult:
    """Raises AssertionError, listing each failed output and metric, unless `model` matches
    the golden outputs (a file from `onnxprune verify MODEL --save-golden`) or the
    `reference` model on `data`.

    Tolerances are verify()'s keywords (min_cosine, atol, rtol, min_sqnr_db, min_top1, top1);
    none given means the CLI's defaults. Returns the result for further checks.
    """
    if (golden is None) == (reference is None):
        raise InputError("assert_close needs golden=FILE.npz or reference=MODEL (one of them)")
    if golden is not None:
        if data is not None:
            raise InputError("golden files hold their own inputs; drop data=")
        result = verify_golden(model, golden, providers=providers,
                               **tolerances)  # type: ignore[arg-type]
    else:
        assert reference is not None
        result = verify(reference, model, data, providers=providers,
                        **tolerances)  # type: ignore[arg-type]
    result.raise_for_failure()
    return result
