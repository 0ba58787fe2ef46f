"""benchmarks/scale.py: every CLI step on an exported Llama, and on a model over 2 GB.

The smallest configuration (2 layers, hidden 64, 8 x 32 tokens) runs with the zoo tests
when torch and transformers are installed. The > 2 GB model is marked `scale` (excluded by
default: it writes 2.25 GiB and runs for several minutes): `python -m pytest -m scale`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import scale  # noqa: E402

from onnxprune.io.models import load_model  # noqa: E402
from onnxprune.io.runtime import make_session  # noqa: E402


def _outputs_load(work: Path, names: list[str]) -> None:
    for name in names:
        session = make_session(load_model(work / name))
        assert session.get_outputs(), name


@pytest.mark.zoo
def test_smallest_llama_goes_through_every_step(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    model = scale.export_llama(2, 64, tmp_path / "model.onnx")
    row = scale.measure("llama2-h64", 2, model, tmp_path, sequences=8, tokens=32, big=False,
                        steps=scale.STEPS)
    assert set(row.steps) == set(scale.STEPS)
    assert row.floor_s > 0 and row.model_bytes == model.stat().st_size
    for name, step in row.steps.items():
        # 1: verification outside the default tolerances (half of a random-init model)
        assert step.code in (0, 1), (name, (tmp_path / f"{name}.log").read_text()[-2000:])
        assert step.seconds > 0 and step.peak_rss > 2**20
    assert row.steps["inspect"].code == 0
    _outputs_load(tmp_path, ["pruned.onnx", "calibrated.onnx", "heads.onnx", "int8.onnx"])
    text = scale.table([row], scale.STEPS)
    assert "llama2-h64" in text and text.count("|") > 2 * len(scale.STEPS)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = scale.build_big(12, tmp_path_factory.mktemp("big") / "model.onnx")
    assert scale.model_size(model) > 2**31
    return model


def _run_big(model: Path, steps: tuple[str, ...]) -> scale.Row:
    work = model.parent
    return scale.measure("big", 12, model, work, sequences=2, tokens=64, big=True,
                         steps=steps)


@pytest.mark.scale
def test_model_over_2gb_prunes_and_verifies_within_one_and_a_half_times_its_size(
    big: Path,
) -> None:
    row = _run_big(big, ("inspect", "prune", "verify"))
    size = scale.model_size(big)
    for name, step in row.steps.items():
        assert step.code in (0, 1), (name, (big.parent / f"{name}.log").read_text()[-2000:])
        assert step.peak_rss <= 1.5 * size, (name, step.peak_rss / size)
    _outputs_load(big.parent, ["pruned.onnx"])


@pytest.mark.scale
@pytest.mark.xfail(reason="calibration statistics and quantization are not streamed yet "
                   "(measured 2.4x and 2.1x of the model's size)", strict=False)
def test_model_over_2gb_calibrates_within_one_and_a_half_times_its_size(big: Path) -> None:
    row = _run_big(big, ("calibrated", "quantize"))
    size = scale.model_size(big)
    for name, step in row.steps.items():
        assert step.code in (0, 1), (name, (big.parent / f"{name}.log").read_text()[-2000:])
        assert step.peak_rss <= 1.5 * size, (name, step.peak_rss / size)
    _outputs_load(big.parent, ["calibrated.onnx", "int8.onnx"])
