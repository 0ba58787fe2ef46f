"""Distillation repair against today's least-squares repair, side by side in one run.

    python benchmarks/distill.py                      # MiniLM 50 % and 70 % FFN, both exporters
    python benchmarks/distill.py --exporters legacy --sparsity 0.5
    python benchmarks/distill.py --repair-augment 0          # without edited sentence copies

For each exporter and FFN fraction one worker process runs exactly what
``onnxprune --reconstruct distill`` runs (PruneConfig.passes: RemoveNeuronsPass with the
least-squares repair, then DistillRepairPass); the model after the first pass is saved too,
so both repairs come from the same channel selection. The worker reports each stage's wall
time and its own peak memory. Quality is measured against the dense model of the same
exporter on 512 held-out evaluation sentences (never used for fitting, early stopping
included: that holds out every 8th calibration sentence) and, side by side, on the 512
calibration sentences the repair was fitted on. The digits MLP at 50 % is scored by
test accuracy. Results also go to build/bench_distill.json.

Timings on a shared machine are noisy: the load average at the start and the end is printed.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metrics  # noqa: E402
import textdata  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
sys.path.insert(0, str(ROOT))


def worker(model: str, calib: str, sparsity: float, lstsq_out: str, distill_out: str,
           seconds: float | None, token_mask: str | None, augment: int | None
           ) -> dict[str, float]:
    """Runs the --reconstruct distill passes, saving the model between the two stages."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from onnxprune.api import PruneConfig
    from onnxprune.io import load_model, save_model

    m = load_model(model)
    cfg = PruneConfig(sparsity=sparsity, calibration=calib, token_mask=token_mask,
                      reconstruct="distill", repair_seconds=seconds, repair_augment=augment)
    t0 = time.perf_counter()
    batches = cfg.batches(m)
    neurons, distill = cfg.passes(m, None, batches)
    neurons(m)
    t1 = time.perf_counter()
    save_model(m, lstsq_out)
    t2 = time.perf_counter()
    distill(m)
    RemoveUnusedNodesPass()(m)
    t3 = time.perf_counter()
    save_model(m, distill_out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"lstsq_s": t1 - t0, "distill_s": t3 - t2, "peak_mib": peak,
            "repair": distill.result.to_dict()}  # type: ignore[attr-defined]


def run_worker(model: Path, calib: Path, sparsity: float, stem: Path, seconds: float | None,
               token_mask: str | None, augment: int | None = None) -> dict:
    lstsq, dist = stem.with_name(stem.name + "_lstsq.onnx"), stem.with_name(
        stem.name + "_distill.onnx")
    cmd = [sys.executable, __file__, "--worker", str(model), str(calib), str(sparsity),
           str(lstsq), str(dist), str(seconds or 0), token_mask or "",
           "" if augment is None else str(augment)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip()[-2000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**out, "lstsq": lstsq, "distill": dist}


def quality(dense_emb, model: Path, sentences) -> dict[str, float]:
    return metrics.compare(dense_emb, metrics.embed(model, sentences))


def digits_rows(seconds: float | None) -> list[dict]:
    sys.path.insert(0, str(ROOT / "models"))
    from build_digits import accuracy  # type: ignore[import-not-found]

    stem = BUILD / "distill_digits"
    out = run_worker(ROOT / "models" / "digits_mlp.onnx", ROOT / "models" / "digits_calib.npz",
                     0.5, stem, seconds, None)
    dense = accuracy(ROOT / "models" / "digits_mlp.onnx")
    return [{"model": "digits MLP", "FFN": "50%", "repair": r,
             "accuracy": accuracy(out[r]), "dense accuracy": dense,
             "time_s": out["lstsq_s"] + (out["distill_s"] if r == "distill" else 0.0),
             "peak_mib": out["peak_mib"]} for r in ("lstsq", "distill")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=8, help=argparse.SUPPRESS)
    p.add_argument("--exporters", default="legacy,dynamo",
                   help="models build/minilm_<name>.onnx to run (comma-separated)")
    p.add_argument("--sparsity", default="0.5,0.7")
    p.add_argument("--calib-n", type=int, default=512)
    p.add_argument("--eval-n", type=int, default=512)
    p.add_argument("--repair-seconds", type=float, default=None)
    p.add_argument("--repair-augment", type=int, default=None,
                   help="edited copies of the calibration sentences (default: onnxprune's)")
    p.add_argument("--no-digits", action="store_true")
    p.add_argument("--json", type=Path, default=BUILD / "bench_distill.json",
                   help="where the rows go (runs of different exporters may run side by side)")
    args = p.parse_args(argv)
    if args.worker:
        model, calib, sp, lo, do, secs, mask, aug = args.worker
        res = worker(model, calib, float(sp), lo, do, float(secs) or None, mask or None,
                     int(aug) if aug else None)
        print(json.dumps(res))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from export_minilm import ensure_inputs

    print(f"load average at start: {os.getloadavg()}", flush=True)
    calib = ensure_inputs(args.calib_n, BUILD)
    held = textdata.evaluation_sentences()[: args.eval_n]
    fitted = textdata.calibration_sentences(args.calib_n)
    rows: list[dict] = []
    if not args.no_digits:
        rows += digits_rows(args.repair_seconds)
        for r in rows:
            print(r, flush=True)
    for kind in [k for k in args.exporters.split(",") if k]:
        dense = BUILD / f"minilm_{kind}.onnx"
        dense_held = metrics.embed(dense, held)
        dense_fit = metrics.embed(dense, fitted)
        for sp in (float(s) for s in args.sparsity.split(",") if s):
            stem = BUILD / f"distill_{kind}_{int(round(sp * 100))}"
            out = run_worker(dense, calib, sp, stem, args.repair_seconds, "attention_mask",
                             args.repair_augment)
            for r in ("lstsq", "distill"):
                row = {"model": f"MiniLM {kind}", "FFN": f"{sp:.0%}", "repair": r,
                       "held": quality(dense_held, out[r], held),
                       "calib": quality(dense_fit, out[r], fitted),
                       "time_s": out["lstsq_s"] + (out["distill_s"] if r == "distill" else 0),
                       "peak_mib": out["peak_mib"]}
                if r == "distill":
                    row["blocks"] = out["repair"]["repairs"]
                rows.append(row)
                print({k: v for k, v in row.items() if k != "blocks"}, flush=True)
    print(f"load average at end: {os.getloadavg()}")
    print()
    print("| model | FFN removed | repair | held-out cos mean / min | held-out Spearman "
          "| calib cos mean / min | calib Spearman | time | peak mem |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "held" in r:
            h, c = r["held"], r["calib"]
            print(f"| {r['model']} | {r['FFN']} | {r['repair']} | {h['mean_cosine']:.4f} / "
                  f"{h['min_cosine']:.4f} | {h['spearman']:.4f} | {c['mean_cosine']:.4f} / "
                  f"{c['min_cosine']:.4f} | {c['spearman']:.4f} | {r['time_s']:.0f} s | "
                  f"{r['peak_mib']:.0f} MiB |")
        else:
            print(f"| {r['model']} | {r['FFN']} | {r['repair']} | accuracy {r['accuracy']:.3f} "
                  f"(dense {r['dense accuracy']:.3f}) | | | | {r['time_s']:.1f} s | "
                  f"{r['peak_mib']:.0f} MiB |")
    args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
