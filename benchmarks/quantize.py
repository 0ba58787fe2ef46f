"""8-bit quantization of all-MiniLM-L6-v2, onnxprune next to onnxruntime's own tools.

    pip install -e '.[bench]'
    python benchmarks/quantize.py                      # both exporters, ~5-10 min on 2 cores
    python benchmarks/quantize.py --exporters legacy --eval-n 300

Rows per exporter (legacy TorchScript and dynamo), each against the dense model of the same
exporter on the held-out sentences:

* onnxprune int8 QDQ (`onnxprune.quant.driver.quantize_model`, default config);
* onnxruntime `quantize_static`, QDQ, MinMax, per-channel, every op it supports;
* onnxruntime `quantize_static`, QDQ, MinMax, per-channel, weight MatMuls only
  (op_types_to_quantize=["MatMul"], MatMulConstBOnly);
* onnxruntime `quantize_dynamic` (int8 weights);
* onnxsim 0.8.1 `quantize_static` when installed (skipped with a note otherwise).

Columns: file size relative to the float file, mean/min cosine, Spearman of the pairwise
similarities, topic-probe accuracy, the tool's wall time, and CPU speedup vs dense. Speed
is measured with every model of one exporter interleaved in the same loop (A B C ... A B C,
medians, batch 8 x 128 tokens, 1 thread), so the ratios share the machine's noise.
Results also go to build/bench_quantize.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metrics  # noqa: E402
import textdata  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"


def ensure_inputs(calib_n: int) -> Path:
    from export_minilm import ensure_inputs as ensure

    return ensure(calib_n, BUILD)


def _batches(calib: Path) -> Iterator[dict[str, np.ndarray]]:
    for f in sorted(calib.glob("*.npz")):
        with np.load(f) as data:
            yield {k: data[k] for k in data.files}


def run_onnxprune(model: Path, out: Path, calib: Path) -> float:
    """Load, calibrate, quantize and save, as `onnxprune quantize` does; wall seconds."""
    from onnxprune.calibration.data import input_specs, load_batches
    from onnxprune.io.models import load_model, save_model
    from onnxprune.quant.config import QuantizeConfig
    from onnxprune.quant.driver import quantize_model

    start = time.perf_counter()
    m = load_model(model)
    report = quantize_model(m, QuantizeConfig(), load_batches(calib, input_specs(m)))
    save_model(m, out)
    seconds = time.perf_counter() - start
    (out.parent / f"{out.stem}.report.json").write_text(json.dumps(report.to_dict(), indent=1))
    return seconds


class _Reader:
    """onnxruntime CalibrationDataReader over the .npz batches (ragged sequence lengths)."""

    def __init__(self, calib: Path) -> None:
        self._it = _batches(calib)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def run_ort_static(model: Path, out: Path, calib: Path, *, matmul_only: bool) -> float:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    start = time.perf_counter()
    quantize_static(
        str(model), str(out), _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        op_types_to_quantize=["MatMul"] if matmul_only else None,
        extra_options={"MatMulConstBOnly": True} if matmul_only else None,
    )
    return time.perf_counter() - start


def run_ort_dynamic(model: Path, out: Path, calib: Path) -> float:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    del calib
    start = time.perf_counter()
    quantize_dynamic(str(model), str(out), weight_type=QuantType.QInt8)
    return time.perf_counter() - start


def run_onnxsim(model: Path, out: Path, calib: Path) -> float:
    import onnxsim  # type: ignore[import-not-found]

    start = time.perf_counter()
    onnxsim.quantize_static(str(model), str(out), _Reader(calib))  # type: ignore[attr-defined]
    return time.perf_counter() - start


def interleaved_speedups(paths: list[Path], repeats: int, warmup: int = 3) -> list[float]:
    """Median latency of every model in one interleaved loop; speedup vs the first (dense)."""
    medians = metrics.interleaved_medians([metrics.make_session(p) for p in paths],
                                          metrics.latency_feeds(), repeats, warmup)
    return [medians[0] / m for m in medians]


METHODS = {
    "onnxprune int8 QDQ": run_onnxprune,
    "onnxruntime quantize_static QDQ MinMax per-channel": lambda m, o, c: run_ort_static(
        m, o, c, matmul_only=False),
    "onnxruntime quantize_static MatMulConstBOnly": lambda m, o, c: run_ort_static(
        m, o, c, matmul_only=True),
    "onnxruntime quantize_dynamic int8": run_ort_dynamic,
    "onnxsim 0.8.1 quantize_static": run_onnxsim,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exporters", default="legacy,dynamo")
    p.add_argument("--calib-n", type=int, default=256)
    p.add_argument("--eval-n", type=int, default=0, help="limit evaluation sentences (0: all)")
    p.add_argument("--latency-repeats", type=int, default=20)
    p.add_argument("--only", default="", help="comma-separated method name prefixes")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    calib = ensure_inputs(args.calib_n)
    sentences = textdata.evaluation_sentences()
    if args.eval_n:
        sentences = sentences[: args.eval_n]
    labels = [s.topic for s in sentences]
    topics = textdata.labelled_topics()
    work = BUILD / "bench_quantize"
    work.mkdir(exist_ok=True)
    methods = {k: v for k, v in METHODS.items()
               if not args.only or any(k.startswith(o) for o in args.only.split(","))}
    if importlib.util.find_spec("onnxsim") is None:
        methods.pop("onnxsim 0.8.1 quantize_static", None)
        print("onnxsim is not installed: its row is skipped (pip install onnxsim==0.8.1).")
    results: list[dict[str, object]] = []
    for kind in args.exporters.split(","):
        dense = BUILD / f"minilm_{kind}.onnx"
        dense_size = dense.stat().st_size
        dense_emb = metrics.embed(dense, sentences)
        rows = [{"exporter": kind, "method": "dense (float32)", "size_ratio": 1.0,
                 "mean_cosine": 1.0, "min_cosine": 1.0, "spearman": 1.0,
                 "probe": metrics.probe_accuracy(dense_emb, labels, topics),
                 "wall_s": float("nan"), "path": dense}]
        for name, fn in methods.items():
            out = work / f"{kind}_{name.split()[0]}_{len(rows)}.onnx"
            try:
                wall = fn(dense, out, calib)
                emb = metrics.embed(out, sentences)
            except Exception as e:  # a peer that crashes is a result too
                print(f"{kind} | {name}: failed ({type(e).__name__}: {str(e)[:120]})")
                continue
            size = out.stat().st_size + sum(f.stat().st_size for f in work.glob(f"{out.name}.*")
                                            if f.suffix == ".data")
            rows.append({"exporter": kind, "method": name, "size_ratio": size / dense_size,
                         **metrics.compare(dense_emb, emb),
                         "probe": metrics.probe_accuracy(emb, labels, topics),
                         "wall_s": wall, "path": out})
            print(metrics.markdown_row(rows[-1], COLUMNS), flush=True)
        speedups = interleaved_speedups([r["path"] for r in rows],  # type: ignore[misc]
                                        args.latency_repeats)
        for r, s in zip(rows, speedups, strict=True):
            r["speedup"] = s
            r["path"] = str(r["path"])
        results += rows
    print("\n" + metrics.markdown_table(results, COLUMNS))
    (BUILD / "bench_quantize.json").write_text(json.dumps(results, indent=1))
    return 0


COLUMNS = [
    ("exporter", metrics.cell("exporter")),
    ("method", metrics.cell("method")),
    ("file size", metrics.cell("size_ratio", ".1%")),
    *metrics.QUALITY_COLUMNS,
    ("tool time", metrics.cell("wall_s", ".1f", " s")),
    ("CPU speedup", metrics.cell("speedup", ".2f", "x")),
]


if __name__ == "__main__":
    sys.exit(main())
