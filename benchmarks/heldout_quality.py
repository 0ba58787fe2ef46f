"""Quality of optimized MiniLM models on text the settings were not chosen on, with labels.

The settings (ridge, step rates, budgets) were chosen on pydoc sentences. This script judges
models that already exist on every source of ``benchmarks/sources.py``: the 1,059 held-out
pydoc sentences, 512 held-out news sentences nobody tuned on, and the 200 labelled
movie-review sentences (leave-one-out nearest-centroid probe, paired against the dense model
on the same rows). The other MiniLM benchmarks print the same columns for the models they make.

    python benchmarks/heldout_quality.py --dense build/minilm_legacy.onnx --recipes default,int8,p50

Usage::

    python benchmarks/heldout_quality.py --dense build/minilm_legacy.onnx \\
        --model p50=OUT/p50.onnx --model int8=OUT/int8.onnx [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metrics  # noqa: E402
import sources  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [("model", metrics.cell("model")), *metrics.QUALITY_COLUMNS]
CAL = ["--calibration", "build/calib_256", "--token-mask", "attention_mask"]
# --recipes: the MiniLM variants the READMEs quote, made here with the CLI (pydoc calibration
# unless the name says news), so one table judges them all on every source.
RECIPES = {
    "default": [],
    "int8": ["quantize", *CAL],
    "int8-operator": ["quantize", "--quant-format", "operator", *CAL],
    "p50": ["--sparsity", "0.5", *CAL],
    "p50-lstsq": ["--sparsity", "0.5", "--reconstruct", "lstsq", *CAL],
    "p70": ["--sparsity", "0.7", *CAL],
    "p50-news": ["--sparsity", "0.5", "--calibration", "build/calib_news_256",
                 "--token-mask", "attention_mask"],
    "heads25": ["--heads", "0.25", *CAL],
    "flops75": ["--target", "flops=0.75", "--max-drop", "0.02", "--calibration",  # as target.py
                "build/calib_512", "--token-mask", "attention_mask"],
    "p50+int8": ["--sparsity", "0.5", "--quantize", "int8", *CAL],
    "p50+int8-operator": ["--sparsity", "0.5", "--quantize", "int8", "--quant-format",
                          "operator", *CAL],
}


def make(dense: Path, name: str, folder: Path) -> Path:
    """The recipe's model (made once; delete the file to remake it)."""
    out = folder / f"{dense.stem}_{name}.onnx"
    if not out.exists():
        args = RECIPES[name]
        cmd = ["quantize", str(dense)] if args[:1] == ["quantize"] else [str(dense)]
        rest = args[1:] if args[:1] == ["quantize"] else args
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "onnxprune", *cmd, "-o", str(out), *rest,
                        "--no-verify", "-q"], check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", type=Path, required=True)
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--gensim-wheel", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--recipes", default="", help=f"comma-separated: {', '.join(RECIPES)}")
    opts = parser.parse_args(argv)
    for name in filter(None, opts.recipes.split(",")):
        opts.model.append(f"{name}={make(opts.dense, name, ROOT / 'build' / 'heldout')}")
    if opts.gensim_wheel:
        os.environ["GENSIM_WHEEL"] = str(opts.gensim_wheel)
    ref = sources.Reference(opts.dense)
    print(f"{len(ref.pydoc)} pydoc, {len(ref.news)} news and {len(ref.polarity)} polarity "
          "sentences", flush=True)
    rows = [{"model": "dense", **ref.dense_row()}]
    print(metrics.markdown_row(rows[-1], COLUMNS), flush=True)
    for spec in opts.model:
        name, _, path = spec.partition("=")
        rows.append({"model": name, **ref.quality(path)})
        print(metrics.markdown_row(rows[-1], COLUMNS), flush=True)
    print("\n" + metrics.markdown_table(rows, COLUMNS))
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
