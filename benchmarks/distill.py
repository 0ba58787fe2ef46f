"""The default repair with data (distillation) against least squares, as users run the CLI.

    python benchmarks/distill.py                      # MiniLM 50 % and 70 % FFN, both exporters
    python benchmarks/distill.py --exporters legacy --sparsity 0.5
    python benchmarks/distill.py --args "--repair-augment 0"   # extra options for both runs

For each exporter and FFN fraction the CLI runs twice on the same model and calibration data:
``onnxprune M -o OUT --sparsity S --calibration C --token-mask attention_mask`` with its
defaults (least squares, then distillation with the default step budget), and the same with
``--reconstruct lstsq``. Both select the same channels. Time and peak memory are the whole
command's (/usr/bin/time; ``--no-verify``, as in minilm.py). Quality is measured against the
dense model of the same exporter on 512 held-out evaluation sentences (never used for
fitting, early stopping included: that holds out every 8th calibration sentence) and, side
by side, on the 512 calibration sentences the repair was fitted on. The digits MLP at 50 %
is scored by test accuracy. Results also go to build/bench_distill.json.

The default budget counts optimiser steps, so quality does not depend on the machine's load;
the times do: the load average at the start and the end is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metrics  # noqa: E402
import sources  # noqa: E402
import textdata  # noqa: E402
from target import run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
REPAIRS = {"lstsq": ["--reconstruct", "lstsq"], "default (distill)": []}


def prune(model: Path, calib: Path, sparsity: float, stem: str, extra: list[str],
          mask: bool = True) -> dict[str, dict]:
    """Both repairs through the CLI: output path, wall time, peak memory, the report."""
    out = {}
    for repair, flags in REPAIRS.items():
        dest = BUILD / f"{stem}_{flags[-1] if flags else 'default'}.onnx"
        report = dest.with_suffix(".json")
        cost = run_cli([str(model), "-o", str(dest), "--sparsity", str(sparsity),
                        "--calibration", str(calib), *(["--token-mask", "attention_mask"]
                                                       if mask else []),
                        "-q", "--report", str(report), *flags, *extra])
        if cost["rc"] != 0:
            raise RuntimeError(f"onnxprune exited {cost['rc']} on {model}")
        out[repair] = {"path": dest, **cost, "report": json.loads(report.read_text())}
    return out


def quality(dense_emb, model: Path, sentences) -> dict[str, float]:
    return metrics.compare(dense_emb, metrics.embed(model, sentences))


def digits_rows(extra: list[str]) -> list[dict]:
    sys.path.insert(0, str(ROOT / "models"))
    from build_digits import accuracy  # type: ignore[import-not-found]

    runs = prune(ROOT / "models" / "digits_mlp.onnx", ROOT / "models" / "digits_calib.npz",
                 0.5, "distill_digits", extra, mask=False)
    dense = accuracy(ROOT / "models" / "digits_mlp.onnx")
    return [{"model": "digits MLP", "FFN": "50%", "repair": r,
             "accuracy": accuracy(o["path"]), "dense accuracy": dense,
             "time_s": o["wall_s"], "peak_mib": o["peak_mib"]} for r, o in runs.items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exporters", default="legacy,dynamo",
                   help="models build/minilm_<name>.onnx to run (comma-separated)")
    p.add_argument("--sparsity", default="0.5,0.7")
    p.add_argument("--calib-n", type=int, default=512)
    p.add_argument("--eval-n", type=int, default=512)
    p.add_argument("--args", default="", help="more onnxprune options for both runs")
    p.add_argument("--no-digits", action="store_true")
    p.add_argument("--json", type=Path, default=BUILD / "bench_distill.json",
                   help="where the rows go (runs of different exporters may run side by side)")
    args = p.parse_args(argv)
    extra = shlex.split(args.args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from export_minilm import ensure_inputs

    print(f"load average at start: {os.getloadavg()}", flush=True)
    calib = ensure_inputs(args.calib_n, BUILD)
    held = textdata.evaluation_sentences()[: args.eval_n]
    fitted = textdata.calibration_sentences(args.calib_n)
    rows: list[dict] = []
    if not args.no_digits:
        rows += digits_rows(extra)
        for r in rows:
            print(r, flush=True)
    for kind in [k for k in args.exporters.split(",") if k]:
        dense = BUILD / f"minilm_{kind}.onnx"
        ref = sources.Reference(dense, held)
        dense_fit = metrics.embed(dense, fitted)
        for sp in (float(s) for s in args.sparsity.split(",") if s):
            runs = prune(dense, calib, sp, f"distill_{kind}_{int(round(sp * 100))}", extra)
            for r, o in runs.items():
                row = {"model": f"MiniLM {kind}", "FFN": f"{sp:.0%}", "repair": r,
                       "held": ref.quality(o["path"]),
                       "calib": quality(dense_fit, o["path"], fitted),
                       "time_s": o["wall_s"], "peak_mib": o["peak_mib"]}
                repair = o["report"]["passes"].get("DistillRepairPass")
                if repair:
                    row["budget"] = repair["budget"]
                    row["blocks"] = repair["repairs"]
                rows.append(row)
                print({k: v for k, v in row.items() if k != "blocks"}, flush=True)
    print(f"load average at end: {os.getloadavg()}")
    print()
    print("| model | FFN removed | repair | held-out cos mean / min | held-out Spearman "
          "| news cos mean / min | polarity acc (d/m) | calib cos mean / min | calib Spearman "
          "| time | peak mem |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "held" in r:
            h, c = r["held"], r["calib"]
            print(f"| {r['model']} | {r['FFN']} | {r['repair']} | {h['mean_cosine']:.4f} / "
                  f"{h['min_cosine']:.4f} | {h['spearman']:.4f} | {h['news_cosine']:.4f} / "
                  f"{h['news_min']:.4f} | {metrics.QUALITY_COLUMNS[-1][1](h)} | "
                  f"{c['mean_cosine']:.4f} / "
                  f"{c['min_cosine']:.4f} | {c['spearman']:.4f} | {r['time_s']:.0f} s | "
                  f"{r['peak_mib']:.0f} MiB |")
        else:
            print(f"| {r['model']} | {r['FFN']} | {r['repair']} | accuracy {r['accuracy']:.3f} "
                  f"(dense {r['dense accuracy']:.3f}) | | | | | | {r['time_s']:.1f} s | "
                  f"{r['peak_mib']:.0f} MiB |")
    args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
