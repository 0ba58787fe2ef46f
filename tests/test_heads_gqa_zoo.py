"""Issue 27 on what users export: Llama with 8 query heads over 2 K/V heads (two layers,
hidden 64) through both torch exporters, with and without its key/value cache.

`--heads 0.25` thins one query head out of every K/V group (8 -> 6 per layer; 25 % of 2
groups would round to 0): Q rows, output-projection columns, the repeat_kv Expand/Reshape
literals (in the legacy export a Concat piece behind Where and a Mul) change, and the
model runs in onnxruntime, cache inputs included. Query heads whose output columns were
zeroed first are removed exactly. `--heads 0.5` removes one whole K/V group per layer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import zoo  # noqa: E402

from onnxprune.attention.remove_heads import RemoveHeadsPass, recognise_blocks  # noqa: E402
from onnxprune.attention.slicing import head_columns  # noqa: E402
from onnxprune.core.weights import const_array, set_const_array  # noqa: E402

pytestmark = pytest.mark.zoo

CASES = [(a, e) for a in ("llama-gqa", "llama-gqa-kv") for e in ("legacy", "dynamo")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    return {}


def _path(cache: dict, tmp: Path, arch: str, exporter: str) -> Path:
    if (arch, exporter) not in cache:
        cache[arch, exporter] = zoo.export(zoo.ARCHS[arch], exporter, "sdpa", True,
                                           tmp / f"{arch}_{exporter}.onnx")
    return cache[arch, exporter]


def _written(model: ir.Model, tmp: Path) -> Path:
    out = tmp / "pruned.onnx"
    ir.save(model, str(out))
    onnx.checker.check_model(str(out), full_check=True)
    return out


@pytest.mark.parametrize(("arch", "exporter"), CASES)
def test_quarter_thins_query_heads_exactly(tmp_path: Path, exported: dict, arch: str,
                                           exporter: str) -> None:
    path = _path(exported, tmp_path.parent, arch, exporter)
    feeds = dict(np.load(path.with_suffix(".npz")))
    model = ir.load(str(path))
    blocks = [b for b in recognise_blocks(model) if b.prunable]
    assert len(blocks) == 2 and all((b.num_heads, b.group) == (2, 4) for b in blocks)
    assert all(b.thin_reason is None for b in blocks), [b.thin_reason for b in blocks]
    for b in blocks:  # zero query heads 0 and 5: one per group
        o = b.output
        assert o is not None
        w = np.array(const_array(o.weight))
        index: list[object] = [slice(None)] * 2
        index[o.reduce_axis] = head_columns([0, 5], b.v_head_size // b.group)
        w[tuple(index)] = 0
        set_const_array(o.weight, w)
    # the zeroed heads score lowest on weight norms only if their Q columns are zero too
    for b in [b for b in recognise_blocks(model) if b.prunable]:
        q = b.projection("q")
        w = np.array(const_array(q.use.weight))
        index = [slice(None)] * 2
        index[q.use.out_axis] = head_columns([0, 5], q.head_size // b.group, q.offset)
        w[tuple(index)] = 0
        set_const_array(q.use.weight, w)
    expected = zoo._run(_written(model, tmp_path), feeds)
    p = RemoveHeadsPass(fraction=0.25)
    p(model)
    for d in p.result.blocks:
        assert (d.granularity, d.query_heads, d.kv_heads) == ("query-heads", (8, 6), (2, 2))
        assert d.removed == (0, 5)
        assert "25 % of 2 K/V groups rounds to 0" in (d.reason or "")
    got = zoo._run(_written(model, tmp_path), feeds)
    assert float(np.max(np.abs(got - expected))) < 1e-5


@pytest.mark.parametrize(("arch", "exporter"), CASES)
def test_half_removes_a_kv_group(tmp_path: Path, exported: dict, arch: str,
                                 exporter: str) -> None:
    path = _path(exported, tmp_path.parent, arch, exporter)
    feeds = dict(np.load(path.with_suffix(".npz")))
    model = ir.load(str(path))
    p = RemoveHeadsPass(fraction=0.5)
    p(model)
    for d in p.result.blocks:
        assert (d.granularity, d.query_heads, d.kv_heads) == ("kv-groups", (8, 4), (2, 1))
    zoo._run(_written(model, tmp_path), feeds)
