"""Quality of optimized MiniLM models on text the settings were not chosen on, with labels.

The settings (ridge, step rates, budgets) were chosen on pydoc sentences. This script judges
models that already exist on every source of ``benchmarks/sources.py``: the 1,059 held-out
pydoc sentences, 512 held-out news sentences nobody tuned on, and the 200 labelled
movie-review sentences (leave-one-out nearest-centroid probe, paired against the dense model
on the same rows). The other MiniLM benchmarks print the same columns for the models they make.

Usage::

    python benchmarks/heldout_quality.py --dense build/minilm_legacy.onnx \\
        --model p50=OUT/p50.onnx --model int8=OUT/int8.onnx [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metrics  # noqa: E402
import sources  # noqa: E402

COLUMNS = [("model", metrics.cell("model")), *metrics.QUALITY_COLUMNS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", type=Path, required=True)
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--gensim-wheel", type=Path)
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args(argv)
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
