"""Quality of a candidate against the original model, as one number where 1 is "unchanged".

Built in: `cosine` (mean row cosine of the outputs), `top1` (agreement of the argmax over the
last axis) and `sqnr` as 1 - noise/signal energy (so a drop of 0.01 is 20 dB). A user metric
`module:function` receives an onnxruntime session (or a look-alike, see MaskedSession) and
returns any number where higher is better; its drop is measured from the original model's
own score.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from onnxprune.errors import InputError, MetricError, OnnxPruneError

__all__ = ["BUILTIN_METRICS", "builtin_score", "load_user_metric",
           "call_user_metric"]

BuiltinMetric = Literal["cosine", "sqnr", "top1"]
BUILTIN_METRICS: tuple[BuiltinMetric, ...] = ("cosine", "sqnr", "top1")
UserMetric = Callable[[Any], float]


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a.reshape(1, -1)


def builtin_score(metric: BuiltinMetric, reference: Sequence[Sequence[np.ndarray]],
                  outputs: Sequence[Sequence[np.ndarray]]) -> float:
    """The metric over every float output of every batch (averaged over outputs)."""
    per_output: list[float] = []
    for k in range(len(reference[0]) if reference else 0):
        if not np.issubdtype(np.asarray(reference[0][k]).dtype, np.floating):
            continue
        ref = [_rows(b[k]) for b in reference]
        out = [_rows(b[k]) for b in outputs]
        if metric == "cosine":
            cos = []
            for r, o in zip(ref, out, strict=True):
                nr, no = np.linalg.norm(r, axis=1), np.linalg.norm(o, axis=1)
                c = np.sum(r * o, axis=1) / np.maximum(nr * no, 1e-30)
                c[(nr == 0) & (no == 0)] = 1.0
                cos.append(c)
            per_output.append(float(np.mean(np.concatenate(cos))))
        elif metric == "sqnr":
            noise = sum(float(np.sum(np.square(r - o))) for r, o in zip(ref, out, strict=True))
            signal = sum(float(np.sum(np.square(r))) for r in ref)
            per_output.append(1.0 - noise / signal if signal > 0 else float(noise == 0))
        else:
            agree = np.concatenate([np.argmax(r, axis=1) == np.argmax(o, axis=1)
                                    for r, o in zip(ref, out, strict=True)])
            per_output.append(float(np.mean(agree)))
    if not per_output:
        raise InputError(f"metric '{metric}' needs a floating-point model output")
    value = float(np.mean(per_output))
    if not math.isfinite(value):
        raise OnnxPruneError(f"the {metric} of a candidate is not finite")
    return value


def load_user_metric(spec: str) -> UserMetric:
    """`module:function` (or `path/to/file.py:function`) -> the function."""
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise InputError(f"--eval '{spec}' must look like module:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            spec_ = importlib.util.spec_from_file_location(path.stem, path)
            if spec_ is None or spec_.loader is None or not path.is_file():
                raise InputError(f"--eval: no such file '{module_name}'")
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"--eval: cannot import '{module_name}': {type(e).__name__}: {e}") from e
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise InputError(f"--eval: '{module_name}' has no function '{func_name}'")
    fn.__onnxprune_name__ = spec  # type: ignore[attr-defined]
    return fn  # type: ignore[no-any-return]


def call_user_metric(fn: UserMetric, session: Any) -> float:
    """Calls the metric; anything but a finite number stops the run with its error."""
    name = getattr(fn, "__onnxprune_name__", getattr(fn, "__name__", "metric"))
    try:
        value = fn(session)
    except Exception as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MetricError(f"--eval {name} raised {type(e).__name__}: {text}; "
                          "nothing was written") from e
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MetricError(f"--eval {name} returned {value!r}, not a number; "
                          "nothing was written") from None
    if not math.isfinite(number):
        raise MetricError(f"--eval {name} returned {number}; nothing was written")
    return number
