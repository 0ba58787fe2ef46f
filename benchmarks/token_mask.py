"""Auto token mask on all-MiniLM-L6-v2: 50 % FFN, calibrated, with no --token-mask (the
mask input is detected), with --token-mask attention_mask, and with --token-mask none.

    python benchmarks/token_mask.py [--exporters legacy,dynamo]

Quality on all held-out sentences against the dense model of the same exporter.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metrics  # noqa: E402
import sources  # noqa: E402
import textdata  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
VARIANTS = {"no --token-mask (auto)": [], "--token-mask attention_mask":
            ["--token-mask", "attention_mask"], "--token-mask none": ["--token-mask", "none"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exporters", default="legacy,dynamo")
    args = p.parse_args(argv)
    from export_minilm import ensure_inputs

    calib = ensure_inputs(256, BUILD)
    sentences = textdata.evaluation_sentences()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this tree's code, not an installed one
    rows = []
    for kind in args.exporters.split(","):
        dense = BUILD / f"minilm_{kind}.onnx"
        ref = sources.Reference(dense, sentences)
        for name, extra in VARIANTS.items():
            out = BUILD / f"tm_{kind}.onnx"
            cmd = [sys.executable, "-m", "onnxprune", str(dense), "-o", str(out), "--sparsity",
                   "0.5", "--calibration", str(calib), "--no-verify", *extra]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr)
            note = "detected" if "token mask:" in proc.stdout else "-"
            rows.append({"exporter": kind, "calibration": name, "note": note,
                         **ref.quality(out)})
            print(metrics.markdown_row(rows[-1], COLUMNS), flush=True)
    print("\n" + metrics.markdown_table(rows, COLUMNS))
    return 0


COLUMNS = [("exporter", metrics.cell("exporter")), ("calibration", metrics.cell("calibration")),
           *metrics.QUALITY_COLUMNS, ("token mask note", metrics.cell("note"))]


if __name__ == "__main__":
    sys.exit(main())
