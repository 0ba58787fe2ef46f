"""Where the CPU time goes, per op type, before and after channel pruning.

    python benchmarks/profile_ops.py                          # ddddocr, resnet50, resnet18
    python benchmarks/profile_ops.py --models ddddocr --sparsity 0.3,0.5 --round-to 1,auto
    python benchmarks/profile_ops.py --models minilm,minilm:dynamo --sparsity 0.5 --round-to 1 \
        --add minilm/flops75=build/heldout/minilm_legacy_flops75.onnx

Per model (ddddocr's shipped CRNN at 1x1x64x170; torchvision-layout resnet50 / resnet18,
random init, legacy exporter, 1x3x224x224; MiniLM from build/, batch 8 x 128 tokens, FFN
neurons pruned): onnxruntime's per-node profile (1 thread,
`--runs` runs, all variants interleaved) of the dense model and of each pruned variant (l1,
data-free, `--sparsity` of every group's channels, `--round-to` 1 and/or auto; auto's table
sizes ops at ddddocr's width 64 then, the data-free default for a symbolic dim), per op type:
ms/run dense and pruned, the op type's share of the dense time next to its share of the
dense FLOPs (an op whose time share is far above its FLOPs share is memory- or
overhead-bound: pruning FLOPs elsewhere cannot move it), and how many Conv nodes run in
onnxruntime's NCHWc layout (blocked by 16 channels with AVX-512, 8 with AVX2) before and after.

Then the speed table: FLOPs share, measured speedup (dense and every variant interleaved in
one loop, 1 thread, medians of `--reps`), ideal = 1 / FLOPs share, ratio = speedup / ideal;
where the ratio is below 0.85 it says why, from the profile: the time share of op types whose
FLOPs pruning did not change, the Amdahl bound that leaves, and the layout traffic added.
Results go to build/bench_profile_ops.json. The load average (`uptime`) is printed with each
table: the numbers are only as quiet as the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from onnxprune.core.accounting import inference_flops  # noqa: E402
from onnxprune.prune.remove_neurons import RemoveNeuronsPass  # noqa: E402

# onnxruntime kernels that stand for an ONNX op of the source model (fusions, layouts).
KERNEL_OP = {"FusedConv": "Conv", "FusedGemm": "Gemm", "FusedMatMul": "MatMul",
             "ReorderInput": "layout (NCHWc reorder)", "ReorderOutput": "layout (NCHWc reorder)"}
FLOP_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM")


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _options(threads: int = 1) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def _bytes(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def profile(models: list[ir.Model], feeds: dict, runs: int) -> list[dict[str, float]]:
    """ms per run, per op type, of each model (onnxruntime's kernel times, 1 thread): all
    models' sessions run round-robin, so a load change on the machine hits them alike."""
    with tempfile.TemporaryDirectory() as d:
        sessions = []
        for k, model in enumerate(models):
            so = _options()
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(d, f"p{k}")
            sessions.append(ort.InferenceSession(_bytes(model), so,
                                                 providers=["CPUExecutionProvider"]))
        for s in sessions:
            s.run(None, feeds)
        for _ in range(runs):
            for s in sessions:
                s.run(None, feeds)
        files = [Path(s.end_profiling()) for s in sessions]
        out = []
        for f in files:
            t: Counter = Counter()
            for e in json.loads(f.read_text()):
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    op = e["args"]["op_name"]
                    t[KERNEL_OP.get(op, op)] += e["dur"]
            out.append({k: v / (runs + 1) / 1000 for k, v in t.items()})
    return out


def conv_layouts(model: ir.Model) -> tuple[int, int, list[str]]:
    """(Conv nodes in NCHWc, Conv nodes in plain NCHW, the NCHW ones' shapes) after
    onnxruntime's graph optimizations."""
    with tempfile.TemporaryDirectory() as d:
        so = _options()
        so.optimized_model_filepath = os.path.join(d, "opt.onnx")
        ort.InferenceSession(_bytes(model), so, providers=["CPUExecutionProvider"])
        opt = onnx.load(so.optimized_model_filepath)
    init = {i.name: list(i.dims) for i in opt.graph.initializer}
    nchwc, plain, shapes = 0, 0, []
    for n in opt.graph.node:
        if n.op_type not in ("Conv", "FusedConv"):
            continue
        if n.domain == "com.microsoft.nchwc":
            nchwc += 1
        else:
            plain += 1
            w = init.get(n.input[1])
            if w:
                shapes.append(f"{w[1]}->{w[0]}")
    return nchwc, plain, shapes


def flops_by_op(model: ir.Model, shapes: dict[str, list[int]]) -> dict[str, int]:
    return {op: inference_flops(model, shapes, ops={op}) for op in FLOP_OPS}


def timed(sessions: list[ort.InferenceSession], feeds: dict, reps: int
          ) -> tuple[list[float], list[float]]:
    """Median and minimum ms per run of each session, run interleaved (one loop over all).
    On a shared machine the minimum is the run least disturbed by other processes."""
    times: list[list[float]] = [[] for _ in sessions]
    for s in sessions:
        s.run(None, feeds)
    for _ in range(reps):
        for k, s in enumerate(sessions):
            t = time.perf_counter()
            s.run(None, feeds)
            times[k].append(time.perf_counter() - t)
    return [float(np.median(t)) * 1000 for t in times], [float(np.min(t)) * 1000 for t in times]


def load_model(name: str) -> tuple[Path, dict[str, np.ndarray], dict[str, list[int]]]:
    rng = np.random.default_rng(0)
    if name == "ddddocr":
        import ddddocr

        path = Path(ddddocr.__file__).parent / "common.onnx"
        x = rng.random((1, 1, 64, 170), dtype=np.float32)
        return path, {"input1": x}, {"input1": [1, 1, 64, 170]}
    model, _, exporter = name.partition(":")
    if model == "minilm":  # build/minilm_<exporter>.onnx (benchmarks/export_minilm.py)
        import metrics

        feeds = metrics.latency_feeds(8, 128)
        return (BUILD / f"minilm_{exporter or 'legacy'}.onnx", feeds,
                {k: list(v.shape) for k, v in feeds.items()})
    from cnn import exported

    path = exported(model, exporter or "legacy")
    x = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    return path, {"input": x}, {"input": [1, 3, 224, 224]}


def pruned(path: Path, sparsity: float, round_to: int | str) -> ir.Model:
    m = ir.load(str(path))
    RemoveNeuronsPass(sparsity=sparsity, criterion="l1", round_to=round_to)(m)  # type: ignore[arg-type]
    return m


def _shapes(model: ir.Model) -> tuple:
    return tuple(tuple(v.shape or ()) for v in model.graph.initializers.values())


def why(dense_t: dict[str, float], var_t: dict[str, float], dense_f: dict[str, int],
        var_f: dict[str, int]) -> list[str]:
    """The reasons a variant's speedup stays below its FLOPs ideal, from the profile."""
    total = sum(dense_t.values())
    fixed = [op for op in dense_t if dense_f.get(op, 0) == 0 or var_f.get(op) == dense_f[op]]
    fixed_share = sum(dense_t[op] for op in fixed) / total
    pruned_ops = [op for op in dense_t if op not in fixed]
    f_ratio = (sum(var_f[op] for op in pruned_ops) / max(sum(dense_f[op] for op in pruned_ops),
                                                        1))
    bound = 1 / (fixed_share + (1 - fixed_share) * f_ratio)
    top = sorted(fixed, key=lambda op: -dense_t[op])[:4]
    lines = [f"{fixed_share:.0%} of the dense time is in ops whose FLOPs pruning did not "
             f"change ({', '.join(f'{op} {dense_t[op] / total:.0%}' for op in top)}); "
             f"even if the pruned ops sped up exactly by their FLOPs ({f_ratio:.2f}), "
             f"the speedup would be {bound:.2f}x (Amdahl)"]
    for op in pruned_ops:
        if dense_t[op] and var_f[op] and dense_f[op]:
            got = dense_t[op] / max(var_t.get(op, 0), 1e-9)
            ideal = dense_f[op] / var_f[op]
            if got < 0.85 * ideal:
                lines.append(f"{op}: {got:.2f}x faster for {ideal:.2f}x fewer FLOPs")
    layout = var_t.get("layout (NCHWc reorder)", 0) - dense_t.get("layout (NCHWc reorder)", 0)
    if layout > 0.01 * total:
        lines.append(f"NCHWc reorders added {layout:.2f} ms/run")
    return lines


def run(name: str, sparsities: list[float], rounds: list[int | str], runs: int, reps: int,
        added: list[tuple[str, Path]] = ()) -> list[dict]:  # type: ignore[assignment]
    path, feeds, shapes = load_model(name)
    dense = ir.load(str(path))
    variants: list[tuple[str, ir.Model]] = [("dense", dense)]
    variants += [(label, ir.load(str(p))) for label, p in added]
    seen = {_shapes(m): label for label, m in variants}
    for sp in sparsities:
        for r in rounds:
            t = time.perf_counter()
            label, m = f"{sp:.0%} round-to {r}", pruned(path, sp, r)
            same = seen.setdefault(_shapes(m), label)
            print(f"   pruned {name} {label} in {time.perf_counter() - t:.1f} s"
                  + (f": the same channel counts as {same}, not timed again" if same != label
                     else ""), flush=True)
            if same == label:
                variants.append((label, m))
    flops = [flops_by_op(m, shapes) for _, m in variants]
    profiles = profile([m for _, m in variants], feeds, runs)
    layouts = [conv_layouts(m) for _, m in variants]
    d_t, d_f = profiles[0], flops[0]
    total_t, total_f = sum(d_t.values()), max(sum(d_f.values()), 1)
    print(f"\n## {name}: per op type, ms/run (1 thread, {runs} runs; load {load_avg()})")
    head = " | ".join(label for label, _ in variants[1:])
    print(f"| op | dense ms | time share | FLOPs share | {head} (ms, FLOPs rel) |")
    print("|---|---|---|---|" + "---|" * (len(variants) - 1))
    ops = sorted(set().union(*profiles), key=lambda op: -d_t.get(op, 0))
    for op in ops:
        if max(p.get(op, 0) for p in profiles) < 0.005 * total_t:
            continue
        cells = []
        for p, f in zip(profiles[1:], flops[1:], strict=True):
            rel = f"{f[op] / d_f[op]:.2f}" if d_f.get(op) else "-"
            cells.append(f"{p.get(op, 0):.2f} ({rel})")
        print(f"| {op} | {d_t.get(op, 0):.2f} | {d_t.get(op, 0) / total_t:.1%} | "
              f"{d_f.get(op, 0) / total_f:.1%} | " + " | ".join(cells) + " |")
    rest = {label: sum(p.values()) for (label, _), p in zip(variants, profiles, strict=True)}
    print("| total | " + " | ".join(f"{v:.2f}" for v in rest.values()) + " |")
    for (label, _), (nc, pl, sh) in zip(variants, layouts, strict=True):
        extra = f" (NCHW in->out channels: {', '.join(sh[:8])}{' ...' if len(sh) > 8 else ''})"
        print(f"   {label}: Conv in NCHWc {nc}, plain {pl}{extra if sh else ''}")
    sessions = [ort.InferenceSession(_bytes(m), _options(), providers=["CPUExecutionProvider"])
                for _, m in variants]
    ms, fastest = timed(sessions, feeds, reps)
    print(f"\n| {name} | FLOPs share | ms/run (median) | speedup | ideal | ratio | speedup "
          f"(min) | ratio (min) | (interleaved, {reps} reps, load {load_avg()})")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for k, (label, _) in enumerate(variants):
        share = sum(flops[k].values()) / total_f
        sp = ms[0] / ms[k]
        ratio = sp * share
        sp_min = fastest[0] / fastest[k]
        print(f"| {label} | {share:.3f} | {ms[k]:.2f} | {sp:.2f}x | {1 / share:.2f}x | "
              f"{ratio:.2f} | {sp_min:.2f}x | {sp_min * share:.2f} |")
        row = {"model": name, "variant": label, "flops_share": share, "ms": ms[k],
               "speedup": sp, "ideal": 1 / share, "ratio": ratio, "load": load_avg(),
               "ms_min": fastest[k], "speedup_min": sp_min,
               "profile_ms": profiles[k], "flops": flops[k],
               "conv_nchwc": layouts[k][0], "conv_plain": layouts[k][1]}
        if k and ratio < 0.85:
            row["why"] = why(d_t, profiles[k], d_f, flops[k])
            for line in row["why"]:
                print(f"     why ({label}): {line}")
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ddddocr,resnet50,resnet18",
                    help="ddddocr, resnet18, resnet50, mobilenet_v3_small; NAME:dynamo for "
                    "the dynamo exporter")
    ap.add_argument("--sparsity", default="0.3", help="comma-separated")
    ap.add_argument("--round-to", default="1,auto", help="comma-separated: N or auto")
    ap.add_argument("--runs", type=int, default=20, help="profiled runs per model")
    ap.add_argument("--reps", type=int, default=30, help="interleaved timing rounds")
    ap.add_argument("--add", action="append", default=[], metavar="MODEL/LABEL=PATH",
                    help="also time a model made elsewhere as a variant of MODEL, e.g. "
                    "minilm/flops75=build/heldout/minilm_legacy_flops75.onnx")
    args = ap.parse_args(argv)
    rounds: list[int | str] = [r if r == "auto" else int(r) for r in args.round_to.split(",")]
    sparsities = [float(s) for s in args.sparsity.split(",")]
    rows = []
    for name in args.models.split(","):
        added = [(spec.split("=", 1)[0].split("/", 1)[1], Path(spec.split("=", 1)[1]))
                 for spec in args.add if spec.split("/", 1)[0] == name]
        rows += run(name, sparsities, rounds, args.runs, args.reps, added)
    BUILD.mkdir(exist_ok=True)
    (BUILD / "bench_profile_ops.json").write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
