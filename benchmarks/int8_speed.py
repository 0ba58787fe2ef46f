"""int8 MiniLM speed on CPU onnxruntime: onnxprune next to onnxruntime's quantize_dynamic.

    python benchmarks/int8_speed.py                        # both exporters, 1 and 2 threads
    python benchmarks/int8_speed.py --exporters legacy --threads 1 --no-prune

Per exporter (build/minilm_{legacy,dynamo}.onnx), one interleaved timing loop per thread
count over: dense, onnxprune int8 (QDQ format), onnxprune int8 (operator format),
onnxruntime quantize_dynamic, and (legacy, unless --no-prune) onnxprune 50 % structured
prune + int8 (operator format). Prints mean/min cosine vs dense on the held-out
build/eval_npz batches, median latency (batch 8 x 128), speedup vs dense, ours/quantize_dynamic
speed ratio, the load average at each timing, and the op counts of the graphs onnxruntime
runs (ORT_ENABLE_ALL, optimized_model_filepath). Models are written to --work.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metrics  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
OPS = ("MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QuantizeLinear", "DequantizeLinear",
       "DynamicQuantizeLinear", "MatMul", "FusedMatMul", "Add", "Mul", "Gelu", "BiasGelu",
       "LayerNormalization", "SkipLayerNormalization", "Softmax")


def session(path: Path, threads: int, optimized: Path | None = None):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    o.log_severity_level = 3
    if optimized is not None:
        o.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def eval_cosine(dense: Path, model: Path, data: Path) -> tuple[float, float]:
    """Mean and min cosine of the first output vs dense, over every held-out batch."""
    a, b = session(dense, 1), session(model, 1)
    cos = []
    for f in sorted(data.glob("*.npz")):
        with np.load(f) as d:
            feeds = {k: d[k] for k in d.files}
        x = a.run(None, {i.name: feeds[i.name] for i in a.get_inputs()})[0].astype(np.float64)
        y = b.run(None, {i.name: feeds[i.name] for i in b.get_inputs()})[0].astype(np.float64)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        y /= np.linalg.norm(y, axis=1, keepdims=True)
        cos.append(np.sum(x * y, axis=1))
    c = np.concatenate(cos)
    return float(c.mean()), float(c.min())


def optimized_ops(path: Path) -> collections.Counter:
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        session(path, 1, out)
        return collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)


def medians(paths: list[Path], threads: int, repeats: int, warmup: int = 3) -> list[float]:
    """Median latency of every model, all run in one interleaved loop (A B C A B C ...)."""
    return metrics.interleaved_medians([session(p, threads) for p in paths],
                                       metrics.latency_feeds(), repeats, warmup)


def _cli(*args: str) -> None:
    """`onnxprune ARGS` from this checkout, as a user runs it (token mask detected, ...)."""
    cmd = [sys.executable, "-c", "import sys; from onnxprune.cli import main; sys.exit(main())",
           *args]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                   stdout=subprocess.DEVNULL)


def ours(dense: Path, out: Path, calib: Path, quant_format: str) -> None:
    _cli("quantize", str(dense), "-o", str(out), "--calibration", str(calib),
         "--quant-format", quant_format)


def dynamic(dense: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(dense), str(out), weight_type=QuantType.QInt8)


def pruned(dense: Path, out: Path, calib: Path) -> None:
    _cli(str(dense), "-o", str(out), "--sparsity", "0.5", "--calibration", str(calib),
         "--token-mask", "attention_mask", "--quantize", "int8", "--quant-format", "operator")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exporters", default="legacy,dynamo")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--no-prune", action="store_true", help="skip the prune 50 %% + int8 row")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "int8_speed")
    p.add_argument("--reuse", action="store_true", help="keep models already in --work")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    calib, data = BUILD / "calib_256", BUILD / "eval_npz"
    rows: list[str] = []
    for kind in args.exporters.split(","):
        dense = BUILD / f"minilm_{kind}.onnx"
        models = {"dense": dense}
        for name, build in (
            ("ours qdq", lambda o, d=dense: ours(d, o, calib, "qdq")),
            ("ours operator", lambda o, d=dense: ours(d, o, calib, "operator")),
            ("quantize_dynamic", lambda o, d=dense: dynamic(d, o)),
            *((("prune50+int8 op", lambda o, d=dense: pruned(d, o, calib)),)
              if kind == "legacy" and not args.no_prune else ()),
        ):
            out = args.work / f"{kind}_{name.replace(' ', '_')}.onnx"
            if not (args.reuse and out.exists()):
                build(out)
            models[name] = out
        cos = {n: eval_cosine(dense, m, data) if n != "dense" else (1.0, 1.0)
               for n, m in models.items()}
        print(f"\n## {kind}: ORT-optimized op counts")
        counts = {n: optimized_ops(m) for n, m in models.items()}
        print("| op | " + " | ".join(counts) + " |")
        print("|---|" + "---|" * len(counts))
        for op in OPS:
            if any(c[op] for c in counts.values()):
                print(f"| {op} | " + " | ".join(str(c[op]) for c in counts.values()) + " |")
        for threads in (int(t) for t in args.threads.split(",")):
            load = os.getloadavg()
            ms = medians(list(models.values()), threads, args.repeats)
            load_after = os.getloadavg()
            qd = ms[list(models).index("quantize_dynamic")]
            for (name, _), m in zip(models.items(), ms, strict=True):
                rows.append(
                    f"| {kind} | {threads} | {name} | {cos[name][0]:.5f} | {cos[name][1]:.4f} | "
                    f"{m * 1e3:.1f} | {ms[0] / m:.2f}x | {qd / m:.3f} | "
                    f"{load[0]:.2f}->{load_after[0]:.2f} |")
            print("\n".join(rows[-len(models):]), flush=True)
    import onnxruntime

    print(f"\n## speed (batch 8 x 128, {args.repeats} interleaved repeats, medians, onnxruntime "
          f"{onnxruntime.__version__}, {os.cpu_count()} cores; 2-thread timings only mean "
          "something on an otherwise idle machine)")
    print("| exporter | threads | model | cos mean | cos min | median ms | vs dense | "
          "vs quantize_dynamic | load avg 1 min (before->after) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
