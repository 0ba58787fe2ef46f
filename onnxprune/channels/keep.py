"""What a run is told to keep per unit: a count (chosen by the criterion) or exact indices.

Plans and searches hand these to the removal passes (neurons and heads alike)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from onnxprune.errors import InputError

__all__ = ["KeepSpec", "fixed_indices", "keep_counts"]

# Per group name: how many channels it keeps (chosen by the criterion) or exactly which.
KeepSpec = Mapping[str, "int | Sequence[int] | np.ndarray"]


def fixed_indices(spec: int | Sequence[int] | np.ndarray | None) -> np.ndarray | None:
    """The given kept indices, or None when only a count was given."""
    if spec is None or isinstance(spec, (int, np.integer)):
        return None
    return np.sort(np.asarray(spec, dtype=np.int64))


def keep_counts(spec: KeepSpec, sizes: Mapping[str, int], what: str) -> dict[str, int]:
    """How many items each unit keeps under `spec` (units it does not name keep all), after
    checking that every named unit exists and every count or index fits it."""
    for name, k in spec.items():
        if name not in sizes:
            raise InputError(
                f"the plan names {what} '{name}', which this model does not have (or cannot "
                "prune); was the plan made for another model?"
            )
        idx = fixed_indices(k)
        n = int(k) if idx is None else len(idx)  # type: ignore[arg-type]
        bad = idx is not None and (len(np.unique(idx)) != n or n and (
            idx[0] < 0 or idx[-1] >= sizes[name]))
        if not 1 <= n <= sizes[name] or bad:
            raise InputError(f"the plan's entry for {what} '{name}' does not fit its "
                             f"{sizes[name]} channels")
    return {name: size if name not in spec else
            int(spec[name]) if (idx := fixed_indices(spec[name])) is None  # type: ignore[arg-type]
            else len(idx) for name, size in sizes.items()}
