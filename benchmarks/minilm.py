"""onnxprune on all-MiniLM-L6-v2, side by side with the peers, one table from one run.

    pip install -e '.[bench]'
    python benchmarks/minilm.py                 # full table (about 15-25 minutes on 2 cores)
    python benchmarks/minilm.py --quick         # 50 % only, the main rows

Exports both torch exporters' models into build/ (if missing), writes the calibration
batches (the first N shuffled pydoc sentences) and scores every variant on the disjoint
evaluation sentences against the dense model of the same exporter: mean/min cosine,
Spearman of the pairwise-similarity matrices, topic-probe accuracy, parameters, onnxprune's
own wall time and peak memory (/usr/bin/time), and CPU latency ratio (batch 8 x 128 tokens,
1 thread, interleaved runs, medians). Results also go to build/bench_minilm.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metrics  # noqa: E402
import sources  # noqa: E402
import textdata  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"


def ensure_inputs(calib_n: int) -> Path:
    from export_minilm import ensure_inputs as ensure

    return ensure(calib_n, BUILD)


def run_onnxprune(model: Path, out: Path, args: list[str]) -> dict[str, float]:
    """Runs the CLI as a user would; wall time and peak RSS from /usr/bin/time."""
    exe = shutil.which("onnxprune")
    cmd = [exe] if exe else [sys.executable, "-m", "onnxprune"]
    timer = ["/usr/bin/time", "-f", "%e %M"] if Path("/usr/bin/time").exists() else []
    full = [*timer, *cmd, str(model), "-o", str(out), "--no-verify", "-q", *args]
    start = time.perf_counter()
    proc = subprocess.run(full, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} failed: {proc.stderr.strip()}")
    peak = float("nan")
    if timer:
        last = proc.stderr.strip().splitlines()[-1].split()
        wall, peak = float(last[0]), float(last[1]) / 1024
    return {"wall_s": wall, "peak_mib": peak}


def quantize_dynamic(model: Path, out: Path) -> dict[str, float]:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as qd

    start = time.perf_counter()
    qd(str(model), str(out), weight_type=QuantType.QInt8)
    return {"wall_s": time.perf_counter() - start, "peak_mib": float("nan")}


def variants(quick: bool, calib: Path, calib512: Path | None) -> list[tuple[str, list[str]]]:
    """Every criterion with and without repair at 50 %; the main rows at 30 % and 70 %."""
    cal = ["--calibration", str(calib), "--token-mask", "attention_mask"]
    rows: list[tuple[str, list[str]]] = []
    for s in [0.5] if quick else [0.3, 0.5, 0.7]:
        sp = ["--sparsity", str(s)]
        full = s == 0.5 and not quick
        data_free = ["l1", "l2", "variance", "entropy", "random"] if full else ["l1", "random"]
        for c in data_free:
            rows.append((f"{c}, no repair | {s:.0%}", [*sp, "--criterion", c]))
        aware = ["activation", "activation-variance", "activation-entropy"] if full else [
            "activation"]
        for c in aware:
            for r in ["none", "bias", "lstsq"] if full else ["lstsq"]:
                rows.append((f"{c} + {r} | {s:.0%}", [*sp, *cal, "--criterion", c,
                                                      "--reconstruct", r]))
        rows.append((f"random + lstsq | {s:.0%}", [*sp, *cal, "--criterion", "random",
                                                   "--reconstruct", "lstsq"]))
        rows.append((f"obs + lstsq | {s:.0%}", [*sp, *cal, "--reconstruct", "lstsq"]))
        rows.append((f"obs + lstsq + distill (default) | {s:.0%}", [*sp, *cal]))
        if calib512 is not None and s in (0.5, 0.7):
            rows.append((f"obs + lstsq + distill (default), 512 calibration sentences | "
                         f"{s:.0%}", [*sp, "--calibration", str(calib512), "--token-mask",
                                      "attention_mask"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--exporters", default="legacy,dynamo")
    p.add_argument("--calib-n", type=int, default=256)
    p.add_argument("--eval-n", type=int, default=0, help="limit evaluation sentences (0: all)")
    p.add_argument("--latency-repeats", type=int, default=15)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    calib = ensure_inputs(args.calib_n)
    calib512 = None if args.quick else ensure_inputs(512)
    sentences = textdata.evaluation_sentences()
    if args.eval_n:
        sentences = sentences[: args.eval_n]
    results = []
    work = BUILD / "bench"
    work.mkdir(exist_ok=True)
    for kind in args.exporters.split(","):
        dense = BUILD / f"minilm_{kind}.onnx"
        ref = sources.Reference(dense, sentences)
        dense_stats = metrics.model_stats(dense)
        results.append({
            "exporter": kind, "method": "dense", "parameters": dense_stats["parameters"],
            **ref.dense_row(),
            "wall_s": float("nan"), "peak_mib": float("nan"), "speedup": 1.0,
        })
        print(metrics.markdown_row(results[-1], COLUMNS), flush=True)
        rows = variants(args.quick, calib, calib512)
        rows.append(("onnxruntime quantize_dynamic int8 (peer)", []))
        for name, cli_args in rows:
            out = work / f"{kind}.onnx"
            cost = run_onnxprune(dense, out, cli_args) if cli_args else quantize_dynamic(dense, out)
            quality = ref.quality(out)
            lat = metrics.latency_ratio(dense, out, repeats=args.latency_repeats)
            results.append({
                "exporter": kind, "method": name,
                "parameters": metrics.model_stats(out)["parameters"], **quality, **cost,
                "speedup": lat["speedup"],
            })
            print(metrics.markdown_row(results[-1], COLUMNS), flush=True)
    if importlib.util.find_spec("onnxsim") is None:
        print("\nonnxsim is not installed: its rows are skipped (pip install onnxsim==0.8.1).")
    print("\n" + metrics.markdown_table(results, COLUMNS))
    (BUILD / "bench_minilm.json").write_text(json.dumps(results, indent=1))
    return 0


COLUMNS = [
    ("exporter", metrics.cell("exporter")),
    ("method", lambda r: str(r["method"]).partition(" | ")[0]),
    ("FFN removed", lambda r: str(r["method"]).partition(" | ")[2] or "-"),
    ("params", metrics.cell("parameters", ".2f", "M", 1e-6)),
    *metrics.QUALITY_COLUMNS,
    ("tool time", metrics.cell("wall_s", ".1f", " s")),
    ("peak mem", metrics.cell("peak_mib", ".0f", " MiB")),
    ("CPU speedup", metrics.cell("speedup", ".2f", "x")),
]


if __name__ == "__main__":
    sys.exit(main())
