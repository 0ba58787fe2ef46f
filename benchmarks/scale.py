"""How the CLI's cost grows with depth and size: tool time and peak RSS per command.

    python benchmarks/scale.py                        # 2, 8, 24 layers + the > 2 GB model
    python benchmarks/scale.py --layers 2,8 --skip-big

Models:
- Random-init Llama decoders (transformers' LlamaModel from a LlamaConfig, default sdpa
  attention) at the given depths and one width (default hidden 256, 4 heads, FFN 1024,
  vocab 1000), exported with the legacy exporter (torch.onnx.export(dynamo=False),
  opset 17) with inputs input_ids and attention_mask and output last_hidden_state.
- The > 2 GB model ("big"): built directly with onnx.helper, as exporting a 2 GB Llama
  needs several copies of it in RAM. A stack of `--big-layers` residual blocks,
  h <- h + h @ Wm; h <- h + Relu(h @ W1) @ W2, every W 4096 x 4096 float32 (64 MiB), input
  x [batch, seq, 4096]: 12 blocks are 2.25 GiB, a third of it in Wm (not prunable, as
  attention and embeddings are not for --sparsity), as in a Llama. Its weights are written
  tensor by tensor to one external data file.

Each CLI step runs as its own subprocess (`python -m onnxprune ...`, this checkout first on
PYTHONPATH); its wall time (Python start-up included) and peak RSS (GNU time's %M, the
maximum resident set size of that process) are recorded.
Calibration data: `--sequences` x `--tokens` (default 64 x 128 for Llama; the big model
uses `--big-sequences`, default 4, since one forward pass of it costs ~1 GFLOP per token),
written as a folder of .npz batches of 8 sequences. Verification data: 2 sequences.
The floor: one plain onnxruntime forward pass over the same calibration data (the
session is built first and not timed; one thread per core, onnxruntime's defaults).

Steps (every step also verifies its output on the verification data, as users run it):
inspect; prune --sparsity 0.5 (data-free); prune --sparsity 0.5 --calibration; --heads 0.25
(data-free; Llama only: the big model has no attention); quantize --calibration; verify
(the input against the data-free pruned model; exit 1 = outside the default tolerances
is expected for 50 % of a random-init model and is reported, not an error).

Writes build/scale/scale.md (the table) and build/scale/scale.png (time against layers,
needs matplotlib: `pip install '.[plot]'`; skipped with a message otherwise).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("inspect", "prune", "calibrated", "heads", "quantize", "verify")
BATCH_SEQUENCES = 8
BIG_WIDTH = 4096


@dataclass
class Step:
    seconds: float
    peak_rss: int  # bytes
    code: int


@dataclass
class Row:
    name: str
    layers: int
    model_bytes: int
    floor_s: float
    steps: dict[str, Step] = field(default_factory=dict)


# -- models ---------------------------------------------------------------------------------
def export_llama(layers: int, hidden: int, out: Path, *, intermediate: int | None = None,
                 heads: int | None = None, kv_heads: int | None = None,
                 max_positions: int = 512) -> Path:
    """A random-init LlamaModel at `layers` x `hidden`, exported with the legacy exporter
    (default: FFN 4 x hidden, one head per 64 channels, no grouped keys/values)."""
    import torch
    import transformers

    torch.manual_seed(0)
    heads = heads or max(1, hidden // 64)
    cfg = transformers.LlamaConfig(
        num_hidden_layers=layers, hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden, num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads, vocab_size=1000,
        max_position_embeddings=max_positions)
    model = transformers.LlamaModel(cfg).eval()

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=ids, attention_mask=mask, use_cache=False)[0]

    ids = torch.randint(3, 1000, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    tmp = out.with_name(out.name + ".partial")
    with torch.no_grad():
        torch.onnx.export(Hidden().eval(), (ids, mask), str(tmp), dynamo=False,
                          opset_version=17, input_names=["input_ids", "attention_mask"],
                          output_names=["hidden"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"}})
    tmp.replace(out)
    return out


def build_big(layers: int, out: Path, width: int = BIG_WIDTH) -> Path:
    """The > 2 GB residual stack, weights streamed to `<out>.data` one tensor at a time.

    Each block is h <- h + h @ Wm; h <- h + Relu(h @ W1) @ W2 (all width x width float32).
    Wm stands in for attention: its output joins the residual stream, which reaches the
    graph output, so it is never pruned; as in Llama, a third of the weights are not FFN.
    """
    import onnx
    from onnx import TensorProto, helper

    data = out.with_name(out.name + ".data")
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    h = "x"
    offset = 0
    scale = {"wm": 0.5, "w1": 2.0, "w2": 0.5}
    with open(data, "wb") as f:
        for i in range(layers):
            for kind in ("wm", "w1", "w2"):
                w = (rng.standard_normal((width, width), dtype=np.float32)
                     * np.float32(scale[kind] / np.sqrt(width)))
                t = TensorProto(name=f"{kind}_{i}", data_type=TensorProto.FLOAT,
                                dims=[width, width])
                t.data_location = TensorProto.EXTERNAL
                for k, v in (("location", data.name), ("offset", str(offset)),
                             ("length", str(w.nbytes))):
                    entry = t.external_data.add()
                    entry.key, entry.value = k, v
                f.write(w.tobytes())
                offset += w.nbytes
                inits.append(t)
                del w
            nodes += [
                helper.make_node("MatMul", [h, f"wm_{i}"], [f"mix_{i}"]),
                helper.make_node("Add", [h, f"mix_{i}"], [f"r_{i}"]),
                helper.make_node("MatMul", [f"r_{i}", f"w1_{i}"], [f"up_{i}"]),
                helper.make_node("Relu", [f"up_{i}"], [f"act_{i}"]),
                helper.make_node("MatMul", [f"act_{i}", f"w2_{i}"], [f"down_{i}"]),
                helper.make_node("Add", [f"r_{i}", f"down_{i}"], [f"h_{i}"]),
            ]
            h = f"h_{i}"
    graph = helper.make_graph(
        nodes, "residual_stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", width])],
        [helper.make_tensor_value_info(h, TensorProto.FLOAT, ["batch", "seq", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(out))
    return out


def model_size(path: Path) -> int:
    data = [p for p in path.parent.glob(path.name + "*.data")]
    return path.stat().st_size + sum(p.stat().st_size for p in data)


# -- data -----------------------------------------------------------------------------------
def write_data(folder: Path, *, sequences: int, tokens: int, big: bool, seed: int) -> Path:
    """A folder of .npz batches of BATCH_SEQUENCES sequences each (fewer in the last)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    done = 0
    while done < sequences:
        n = min(BATCH_SEQUENCES, sequences - done)
        if big:
            feeds = {"x": rng.standard_normal((n, tokens, BIG_WIDTH), dtype=np.float32)}
        else:
            feeds = {"input_ids": rng.integers(3, 1000, (n, tokens)).astype(np.int64),
                     "attention_mask": np.ones((n, tokens), np.int64)}
        np.savez(folder / f"batch_{done // BATCH_SEQUENCES:03d}.npz", **feeds)
        done += n
    return folder


def floor_seconds(model: Path, data: Path) -> float:
    """One plain onnxruntime forward pass over every batch in `data` (session not timed)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    batches = [dict(np.load(p)) for p in sorted(data.glob("*.npz"))]
    start = time.perf_counter()
    for feeds in batches:
        session.run(None, feeds)
    return time.perf_counter() - start


# -- steps ----------------------------------------------------------------------------------
def run_step(argv: list[str], log: Path) -> Step:
    """Runs `python -m onnxprune argv` under /usr/bin/time, which measures that child alone.

    (os.wait4 on a child forked from this process would count this process's own RSS at
    the fork, torch included.)
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    stats = log.with_suffix(".time")
    cmd = [sys.executable, "-m", "onnxprune", *argv]
    timer = shutil.which("time", path="/usr/bin:/bin")
    if timer is None:
        raise SystemExit("benchmarks/scale.py needs /usr/bin/time (GNU time) to measure RSS")
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call([timer, "-f", "%M", "-o", str(stats), *cmd], stdout=f,
                               stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    seconds = time.perf_counter() - start
    kib = int(stats.read_text().split()[-1])
    return Step(seconds, kib * 1024, code)


def steps_for(model: Path, work: Path, calib: Path, verify: Path, *, heads: bool
              ) -> dict[str, list[str]]:
    m, d = str(model), str(verify)
    plans = {
        "inspect": ["inspect", m],
        "prune": [m, "-o", str(work / "pruned.onnx"), "--sparsity", "0.5", "--data", d],
        "calibrated": [m, "-o", str(work / "calibrated.onnx"), "--sparsity", "0.5",
                       "--calibration", str(calib), "--data", d],
        "heads": [m, "-o", str(work / "heads.onnx"), "--heads", "0.25", "--data", d],
        "quantize": ["quantize", m, "-o", str(work / "int8.onnx"), "--calibration",
                     str(calib), "--data", d],
        "verify": ["verify", m, str(work / "pruned.onnx"), "--data", d],
    }
    if not heads:
        del plans["heads"]
    return plans


def measure(name: str, layers: int, model: Path, work: Path, *, sequences: int, tokens: int,
            big: bool, steps: tuple[str, ...]) -> Row:
    calib = write_data(work / "calib", sequences=sequences, tokens=tokens, big=big, seed=1)
    verify = write_data(work / "verify", sequences=2, tokens=tokens, big=big, seed=2)
    row = Row(name, layers, model_size(model), floor_seconds(model, calib))
    print(f"{name}: {row.model_bytes / 2**20:.1f} MiB, floor {row.floor_s:.2f} s", flush=True)
    for step, argv in steps_for(model, work, calib, verify, heads=not big).items():
        if step not in steps:
            continue
        row.steps[step] = run_step(argv, work / f"{step}.log")
        s = row.steps[step]
        print(f"  {step}: {s.seconds:.1f} s, peak RSS {s.peak_rss / 2**20:.0f} MiB, "
              f"exit {s.code}", flush=True)
    return row


# -- output ---------------------------------------------------------------------------------
def table(rows: list[Row], steps: tuple[str, ...]) -> str:
    head = ["model", "layers", "size MiB", "floor s"] + [f"{s} s / RSS MiB (exit)"
                                                          for s in steps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.name, str(r.layers), f"{r.model_bytes / 2**20:.1f}", f"{r.floor_s:.2f}"]
        for s in steps:
            st = r.steps.get(s)
            cells.append("n/a" if st is None else
                         f"{st.seconds:.1f} / {st.peak_rss / 2**20:.0f} ({st.code})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[Row], steps: tuple[str, ...], out: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install '.[plot]'): no PNG written"
    llama = [r for r in rows if r.name.startswith("llama")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r.layers for r in llama]
    for s in steps:
        ys = [r.steps[s].seconds if s in r.steps else np.nan for r in llama]
        ax.plot(xs, ys, marker="o", label=s)
    ax.plot(xs, [r.floor_s for r in llama], "k--", marker="x", label="ORT forward (floor)")
    ax.set_xlabel("decoder layers")
    ax.set_ylabel("seconds")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return f"wrote {out}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="2,8,24", help="Llama depths, e.g. 2,8 (empty: none)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--skip-big", action="store_true", help="leave out the > 2 GB model")
    p.add_argument("--big-layers", type=int, default=12, help="12 x 192 MiB = 2.25 GiB")
    p.add_argument("--big-sequences", type=int, default=4)
    p.add_argument("--steps", default=",".join(STEPS))
    p.add_argument("--out", type=Path, default=ROOT / "build" / "scale")
    p.add_argument("--keep", action="store_true", help="keep the models and outputs")
    args = p.parse_args(argv)
    steps = tuple(s for s in args.steps.split(",") if s)
    unknown = set(steps) - set(STEPS)
    if unknown:
        p.error(f"unknown steps {sorted(unknown)}; choose from {','.join(STEPS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for layers in [int(x) for x in args.layers.split(",") if x]:
        work = args.out / f"llama{layers}"
        work.mkdir(exist_ok=True)
        model = export_llama(layers, args.hidden, work / "model.onnx")
        rows.append(measure(f"llama{layers}-h{args.hidden}", layers, model, work,
                            sequences=args.sequences, tokens=args.tokens, big=False,
                            steps=steps))
        if not args.keep:
            shutil.rmtree(work)
    if not args.skip_big:
        work = args.out / "big"
        work.mkdir(exist_ok=True)
        model = build_big(args.big_layers, work / "model.onnx")
        rows.append(measure(f"stack{args.big_layers}-w{BIG_WIDTH} (> 2 GB)", args.big_layers,
                            model, work, sequences=args.big_sequences, tokens=args.tokens,
                            big=True, steps=steps))
        if not args.keep:
            shutil.rmtree(work)
    text = table(rows, steps)
    print(text)
    (args.out / "scale.md").write_text(
        f"`python benchmarks/scale.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
        f"\n\n{text}\n")
    print(plot(rows, steps, args.out / "scale.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
