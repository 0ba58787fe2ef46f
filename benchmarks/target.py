"""Target-driven pruning on all-MiniLM-L6-v2: one table from one run.

    pip install -e '.[bench]'
    python benchmarks/target.py                       # both exporters, ~25 minutes on 2 cores
    python benchmarks/target.py --exporters dynamo
    python benchmarks/target.py --reconstruct distill --only flops   # searches distil

Per exporter, through the CLI as a user runs it, with 512 calibration sentences (the
search holds out the last quarter of the batches; the uniform baseline is fitted on the same
three quarters):
- uniform 50 % FFN removal (obs + lstsq), the baseline;
- `--target params=P --max-drop 0.1` with P = the baseline's parameter share (same size);
- `--target flops=0.75 --max-drop 0.02`, its wall time, peak memory and CPU speedup;
- the saved plan reapplied with `--plan`, compared byte for byte with the search's output.
Quality is measured on the disjoint evaluation sentences against the dense model (mean/min
cosine, Spearman of pairwise similarities); CPU latency ratio as in minilm.py (batch 8 x 128,
1 thread, interleaved medians). Results also go to build/bench_target.json.
"""

from __future__ import annotations

import argparse
import filecmp
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
from minilm import BUILD, ROOT, ensure_inputs  # noqa: E402


def run_cli(args: list[str]) -> dict[str, object]:
    """The CLI with wall time and peak RSS; exit 0 and 1 (target missed) both count."""
    # This tree's code (the installed `onnxprune` script may be another checkout's).
    cmd = [sys.executable, "-m", "onnxprune"]
    timer = ["/usr/bin/time", "-f", "%e %M"] if Path("/usr/bin/time").exists() else []
    full = [*timer, *cmd, *args, "--no-verify"]
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(full, capture_output=True, text=True, env=env)
    wall, peak = time.perf_counter() - start, float("nan")
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(full)} failed: {proc.stderr.strip()}")
    if timer:
        last = proc.stderr.strip().splitlines()[-1].split()
        wall, peak = float(last[0]), float(last[1]) / 1024
    return {"wall_s": wall, "peak_mib": peak, "rc": proc.returncode}


def fit_part(calib: Path) -> Path:
    """The calibration batches the search fits on (all but the last quarter), as a folder."""
    files = sorted(calib.glob("*.npz"))
    out = BUILD / f"{calib.name}_fit"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for f in files[: len(files) - max(1, len(files) // 4)]:
        (out / f.name).symlink_to(f.resolve())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exporters", default="dynamo,legacy")
    p.add_argument("--latency-repeats", type=int, default=15)
    p.add_argument("--reconstruct", default=None,
                   help="repair of the searches and the replay (e.g. distill; default: the "
                   "tool's)")
    p.add_argument("--repair-seconds", type=float, default=None)
    p.add_argument("--only", choices=("all", "flops"), default="all",
                   help="flops: only the flops=0.75 search and its replay")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    calib = ensure_inputs(512)
    fit = fit_part(calib)
    sentences = textdata.evaluation_sentences()
    work = BUILD / "bench_target"
    work.mkdir(exist_ok=True)
    common = ["--calibration", str(calib), "--token-mask", "attention_mask", "-q"]
    if args.reconstruct:
        common += ["--reconstruct", args.reconstruct]
    if args.repair_seconds:
        common += ["--repair-seconds", str(args.repair_seconds)]
    results = []
    for kind in args.exporters.split(","):
        dense = BUILD / f"minilm_{kind}.onnx"
        ref = sources.Reference(dense, sentences)
        dense_params = metrics.model_stats(dense)["parameters"]

        # Called only within this iteration, so the loop variables it reads are current.
        def score(out: Path, method: str, cost: dict[str, object], **extra: object) -> None:
            row = {"exporter": kind, "method": method,  # noqa: B023
                   **ref.quality(out),  # noqa: B023
                   **metrics.model_stats(out), **cost, **extra}
            row["param_share"] = row["parameters"] / dense_params  # noqa: B023
            row["speedup"] = metrics.latency_ratio(dense, out,  # noqa: B023
                                                   repeats=args.latency_repeats)["speedup"]
            results.append(row)
            print(json.dumps(row), flush=True)

        if args.only == "all":
            uni = work / f"{kind}_uniform.onnx"
            cost = run_cli([str(dense), "-o", str(uni), "--sparsity", "0.5", "--calibration",
                            str(fit), "--token-mask", "attention_mask", "--reconstruct",
                            "lstsq", "-q"])
            score(uni, "uniform 50 % FFN (obs + lstsq)", cost)
            share = results[-1]["param_share"]

            same = work / f"{kind}_params.onnx"
            rep = work / f"{kind}_params.json"
            cost = run_cli([str(dense), "-o", str(same), "--target", f"params={share:.6f}",
                            "--max-drop", "0.1", "--report", str(rep), *common])
            search = json.loads(rep.read_text())["search"]
            score(same, f"--target params={share:.4f}", cost, search_drop=search["drop"],
                  reached=search["reached"], rounds=search["rounds"])

        out = work / f"{kind}_flops.onnx"
        plan = work / f"{kind}_flops_plan.json"
        rep = work / f"{kind}_flops.json"
        cost = run_cli([str(dense), "-o", str(out), "--target", "flops=0.75", "--max-drop",
                        "0.02", "--save-plan", str(plan), "--report", str(rep), *common])
        report = json.loads(rep.read_text())
        search = report["search"]
        flops = report["after"]["weight_flops_per_row"] / report["before"]["weight_flops_per_row"]
        label = "--target flops=0.75 --max-drop 0.02" + (
            f" --reconstruct {args.reconstruct}" if args.reconstruct else "")
        score(out, label, cost, search_drop=search["drop"],
              reached=search["reached"], flops_share=flops, rounds=search["rounds"],
              search_s=search["seconds"])

        again = work / f"{kind}_replayed.onnx"
        cost = run_cli([str(dense), "-o", str(again), "--plan", str(plan), *common])
        results.append({"exporter": kind, "method": "--plan (replay of the flops plan)",
                        **cost, "identical": filecmp.cmp(out, again, shallow=False)})
        print(json.dumps(results[-1]), flush=True)
    (BUILD / "bench_target.json").write_text(json.dumps(results, indent=1))
    print("\n" + metrics.markdown_table(results, COLUMNS))
    return 0


COLUMNS = [
    ("exporter", metrics.cell("exporter")),
    ("method", metrics.cell("method")),
    ("params share", metrics.cell("param_share", ".4f")),
    ("FLOPs share", metrics.cell("flops_share", ".4f")),
    *metrics.QUALITY_COLUMNS,
    ("held-out drop (search)", metrics.cell("search_drop", ".4f")),
    ("target met", metrics.cell("reached")),
    ("tool time", metrics.cell("wall_s", ".0f", " s")),
    ("peak mem", metrics.cell("peak_mib", ".0f", " MiB")),
    ("CPU speedup", metrics.cell("speedup", ".2f", "x")),
    ("same bytes", metrics.cell("identical")),
]


if __name__ == "__main__":
    sys.exit(main())
