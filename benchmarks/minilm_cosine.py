"""Mean/min cosine of a pruned all-MiniLM-L6-v2 to its dense export on held-out sentences.

    python benchmarks/minilm_cosine.py build/minilm_legacy.onnx build/pruned.onnx [N=400]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import textdata  # noqa: E402


def main(argv: list[str]) -> None:
    dense, pruned = argv[0], argv[1]
    n = int(argv[2]) if len(argv) > 2 else 400
    sentences = textdata.evaluation_sentences()[:n]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    a = ort.InferenceSession(dense, opts, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(pruned, opts, providers=["CPUExecutionProvider"])
    cos: list[float] = []
    for batch in textdata.iter_batches(sentences, 16):
        x, y = a.run(None, batch)[0], b.run(None, batch)[0]
        cos.extend(np.sum(x * y, 1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1))
    print(f"{pruned}: {len(cos)} held-out sentences, mean cosine {np.mean(cos):.4f}, "
          f"min {np.min(cos):.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
