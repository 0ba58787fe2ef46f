"""What users export: small random-init transformers models through both torch exporters.

Each case builds the smallest config of an architecture (two layers, hidden 32, 4 heads)
with transformers' default attention (sdpa), exports it, and checks that every attention
block is recognised, that ``--sparsity 0.5 --heads 0.25`` writes a model that passes the
checker and runs, and that removing heads whose output rows are zero changes nothing.
The full table is ``python benchmarks/zoo.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import zoo  # noqa: E402

pytestmark = pytest.mark.zoo

CASES = [
    ("bert", "legacy", "sdpa"),
    ("bert", "dynamo", "eager"),
    ("llama-gqa", "legacy", "sdpa"),
    ("llama-gqa", "dynamo", "sdpa"),
    ("gpt2", "dynamo", "sdpa"),
    ("gpt2", "legacy", "sdpa"),
    ("phi3", "dynamo", "sdpa"),
    ("phi3", "legacy", "sdpa"),
    ("llama-gqa-kv", "legacy", "sdpa"),
    ("llama-gqa-kv", "dynamo", "sdpa"),
    ("t5-encoder", "legacy", "sdpa"),
]
# Everything of these is prunable: FFN groups whose width is read at run time by a Shape
# (GPT-2's Conv1D, Phi-3's packed gate_up on the legacy exporter), heads with their cache.
FULL = {("gpt2", "legacy"), ("phi3", "legacy"), ("llama-gqa-kv", "legacy"),
        ("llama-gqa-kv", "dynamo")}


@pytest.mark.parametrize(("arch", "exporter", "attention"), CASES)
def test_heads_are_removed_exactly(tmp_path: Path, arch: str, exporter: str,
                                   attention: str) -> None:
    path = zoo.export(zoo.ARCHS[arch], exporter, attention, True, tmp_path / f"{arch}.onnx")
    row = zoo.analyse(path, zoo.Row(arch, exporter, attention))
    found, total = (int(x) for x in row.heads.split("/"))
    assert total == 2 and found == 2, row.reason
    assert row.runs == "yes", row.error
    assert row.removed > 0
    assert row.exact is not None and row.exact < 1e-5
    assert row.prunable >= (0.99 if (arch, exporter) in FULL else 0.4)


def test_albert_shared_layers_are_declined_not_copied(tmp_path: Path) -> None:
    """ALBERT's legacy export reads one set of weights through Identity nodes in every
    layer: nothing is pruned (a pruned copy would grow the model), and nothing crashes."""
    path = zoo.export(zoo.ARCHS["albert"], "legacy", "sdpa", True, tmp_path / "albert.onnx")
    row = zoo.analyse(path, zoo.Row("albert", "legacy", "sdpa"))
    assert row.error is None or "nothing prunable" in row.error, row.error
    assert row.removed == 0
    assert row.heads.startswith("0/")
    assert "shared" in (row.reason or "")
