"""Peak memory of loading and re-saving a 1 GiB external-data model.

    python benchmarks/io_memory.py [--gib 1.0] [--dir build/io_memory]

Builds a model of 16 MatMul layers whose weights (float32, 1 GiB in all) sit in an
external data file, written from memory-mapped arrays so the builder itself stays small.
Then, in fresh processes under /usr/bin/time -v, measures the maximum resident set size of
(a) onnxprune.io.models load_model + save_model (re-save with external data) and
(b) the full CLI (`onnxprune MODEL -o OUT --threshold 0 --no-verify`), which also reads
every weight. Target: (a) below 400 MiB.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import numpy as np


def build(folder: Path, gib: float) -> Path:
    import onnx_ir as ir

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "big.onnx"
    if path.exists():
        return path
    layers = 16
    n = int(np.sqrt(gib * 2**30 / 4 / layers))
    x = ir.val("x", ir.DataType.FLOAT, ["batch", n])
    graph_inputs = [x]
    nodes, inits = [], []
    cur = x
    rng = np.random.default_rng(0)
    for i in range(layers):
        mm = np.lib.format.open_memmap(folder / f"w{i}.npy", mode="w+", dtype=np.float32,
                                       shape=(n, n))
        for r in range(0, n, 1024):  # fill in slices: never the whole matrix in RAM
            mm[r : r + 1024] = rng.standard_normal((min(1024, n - r), n), dtype=np.float32)
        mm.flush()
        w = ir.Value(name=f"w{i}", shape=ir.Shape([n, n]), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(mm, name=f"w{i}"))
        inits.append(w)
        out = ir.val(f"h{i}", ir.DataType.FLOAT, ["batch", n])
        nodes.append(ir.node("MatMul", [cur, w], outputs=[out], name=f"mm{i}"))
        cur = out
    graph = ir.Graph(graph_inputs, [cur], nodes=nodes, initializers=inits,
                     opset_imports={"": 17}, name="big")
    ir.save(ir.Model(graph, ir_version=8), path, external_data="big.onnx.data")
    for i in range(layers):
        (folder / f"w{i}.npy").unlink()
    return path


def peak_mib(cmd: list[str]) -> float:
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise RuntimeError(proc.stderr[-2000:])
    kb = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    assert kb is not None
    return int(kb.group(1)) / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--dir", type=Path, default=Path("build/io_memory"))
    args = p.parse_args()
    model = build(args.dir, args.gib)
    data = model.with_name(model.name + ".data")
    print(f"model: {model} + {data.stat().st_size / 2**30:.2f} GiB external data")
    baseline = peak_mib([sys.executable, "-c", "import onnxprune.io.models, onnx_ir, onnxruntime"])
    resave = peak_mib([sys.executable, "-c",
                       "import sys; from onnxprune.io.models import load_model, save_model; "
                       "save_model(load_model(sys.argv[1]), sys.argv[2])",
                       str(model), str(args.dir / "resaved.onnx")])
    cli = peak_mib([sys.executable, "-m", "onnxprune", str(model), "-o",
                    str(args.dir / "zeroed.onnx"), "--threshold", "0", "--no-verify", "-q"])
    print("| step | peak RSS |")
    print("|---|---|")
    print(f"| python + imports only | {baseline:.0f} MiB |")
    print(f"| load_model + save_model (external data) | {resave:.0f} MiB |")
    print(f"| onnxprune CLI, --threshold 0 (reads every weight) | {cli:.0f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
