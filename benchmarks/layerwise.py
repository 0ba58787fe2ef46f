"""Layer-wise calibration against whole-model runs, side by side in one run.

    python benchmarks/layerwise.py                          # MiniLM legacy, 50 % FFN
    python benchmarks/layerwise.py --model build/minilm_dynamo.onnx --heads 0.25
    python benchmarks/layerwise.py --model M --calibration DIR --sparsity 0.5
    python benchmarks/layerwise.py --llama 8          # random-init Llama decoder, 8 layers

`--llama N` builds (once, into build/layerwise/) a random-init Llama-style decoder from a
transformers LlamaConfig (width 256, FFN 688, 8 heads, 4 K/V heads, N layers), exported with
the legacy torch exporter (opset 17), and 8 calibration batches of 8 random sequences x 128
tokens.

Each mode runs in its own worker process, one after the other, on the same calibration data:
- `sections`: what onnxprune does (a Propagator runs only the graph between the cut and
  the group; the original model's targets come from one pass);
- `whole`: every capture runs the whole current model, as calibrated pruning did before
  sections existed (the reference targets still come from the one stored pass, so this
  under-states the old cost).
Each worker reports its wall time, the time spent inside onnxruntime captures (sessions
built and run), the rest (fitting, analysis), and its peak memory. The two outputs are
compared weight by weight: the decisions must be the same up to float noise.

Timings on a shared machine are noisy; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
sys.path.insert(0, str(ROOT))


def worker(mode: str, model: str, calib: str, sparsity: float | None, heads: float | None,
           out: str) -> dict[str, float]:
    from onnxprune.api import PruneConfig, prune
    from onnxprune.calibration import propagate, runner

    spent = [0.0]
    if mode == "whole":
        def whole(self, names, on_batch):  # type: ignore[no-untyped-def]
            return runner.capture(self.model, names, self.batches, on_batch,
                                  provider=self.provider)

        propagate.Propagator.capture = whole  # type: ignore[method-assign]
        propagate.Propagator.advance = lambda self, before: None  # type: ignore[method-assign]
    original = propagate.run_batches

    def timed(session, wanted, batches, on_batch, extra=None):  # type: ignore[no-untyped-def]
        # Time inside onnxruntime only: the callbacks (statistics) are subtracted.
        inner = [0.0]

        def cb(arrays, batch):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            on_batch(arrays, batch)
            inner[0] += time.perf_counter() - t

        t0 = time.perf_counter()
        n = original(session, wanted, batches, cb, extra)
        spent[0] += time.perf_counter() - t0 - inner[0]
        return n

    propagate.run_batches = timed  # type: ignore[assignment]
    runner.run_batches = timed  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    prune(model, PruneConfig(sparsity=sparsity, heads=heads, calibration=calib), output=out)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"wall_s": wall, "onnxruntime_s": spent[0], "other_s": wall - spent[0],
            "peak_mb": peak}


def build_llama(layers: int, folder: Path) -> tuple[Path, Path]:
    """The random-init decoder and its calibration folder (built once)."""
    import numpy as np

    model, calib = folder / f"llama{layers}.onnx", folder / "calib"
    if not calib.exists():
        calib.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(8):
            np.savez(calib / f"b{i}.npz",
                     input_ids=rng.integers(0, 1000, (8, 128)).astype(np.int64),
                     attention_mask=np.ones((8, 128), np.int64))
    if not model.exists():
        from scale import export_llama  # benchmarks/scale.py, beside this script

        export_llama(layers, 256, model, intermediate=688, heads=8, kv_heads=4,
                     max_positions=256)
    return model, calib


def compare(a: str, b: str) -> float:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    wa = {t.name: numpy_helper.to_array(t) for t in onnx.load(a).graph.initializer}
    wb = {t.name: numpy_helper.to_array(t) for t in onnx.load(b).graph.initializer}
    if wa.keys() != wb.keys():
        return float("inf")
    worst = 0.0
    for k, x in wa.items():
        y = wb[k]
        if x.shape != y.shape:
            return float("inf")
        if np.issubdtype(x.dtype, np.floating) and x.size:
            scale = max(float(np.max(np.abs(x))), 1e-12)
            worst = max(worst, float(np.max(np.abs(x - y))) / scale)
        elif not np.array_equal(x, y):
            return float("inf")
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(BUILD / "minilm_legacy.onnx"))
    p.add_argument("--calibration", default=str(BUILD / "calib_256"))
    p.add_argument("--sparsity", type=float, default=None)
    p.add_argument("--heads", type=float, default=None)
    p.add_argument("--llama", type=int, metavar="LAYERS",
                   help="build and use a random-init Llama decoder with this many layers")
    p.add_argument("--worker", nargs=2, metavar=("MODE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.sparsity is None and args.heads is None:
        args.sparsity = 0.5
    if args.llama and not args.worker:
        model, calib = build_llama(args.llama, BUILD / "layerwise")
        args.model, args.calibration = str(model), str(calib)
    if args.worker:
        mode, out = args.worker
        res = worker(mode, args.model, args.calibration, args.sparsity, args.heads, out)
        print(json.dumps(res))
        return
    for need in (args.model, args.calibration):
        if not Path(need).exists():
            sys.exit(f"{need} is missing: run benchmarks/export_minilm.py and "
                     "benchmarks/textdata.py first (see BENCHMARKS.md)")
    BUILD.mkdir(exist_ok=True)
    rows = {}
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    for mode in ("sections", "whole"):
        out = str(BUILD / f"layerwise_{Path(args.model).stem}_{mode}.onnx")
        cmd = [sys.executable, __file__, "--worker", mode, out, "--model", args.model,
               "--calibration", args.calibration]
        if args.sparsity is not None:
            cmd += ["--sparsity", str(args.sparsity)]
        if args.heads is not None:
            cmd += ["--heads", str(args.heads)]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if res.returncode != 0:
            sys.exit(f"{mode} worker failed:\n{res.stderr[-2000:]}")
        rows[mode] = json.loads(res.stdout.strip().splitlines()[-1])
        rows[mode]["out"] = out
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    what = " ".join(f"--{k} {v}" for k, v in (("sparsity", args.sparsity),
                                              ("heads", args.heads)) if v is not None)
    print(f"\n{Path(args.model).name}, {what}, calibration {args.calibration}\n")
    print("| mode | wall s | in onnxruntime s | fitting + analysis s | peak MB |")
    print("|---|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['wall_s']:.1f} | {r['onnxruntime_s']:.1f} | {r['other_s']:.1f} "
              f"| {r['peak_mb']:.0f} |")
    s, w = rows["sections"], rows["whole"]
    print(f"\nspeedup: {w['wall_s'] / s['wall_s']:.2f}x overall, "
          f"{w['onnxruntime_s'] / max(s['onnxruntime_s'], 1e-9):.2f}x in onnxruntime")
    print(f"largest weight difference (relative to the tensor's max): "
          f"{compare(s['out'], w['out']):.2e}")


if __name__ == "__main__":
    main()
