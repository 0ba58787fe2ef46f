"""One calibrated Conv pruning run on a torch CNN, timed, against data-free l1.

    python benchmarks/cnn_calibrated_probe.py resnet18 16     # model, calibration images

50 % of every group's channels (flat share), legacy export, seeded normal images (the first
`n` of benchmarks/cnn.py's 32 calibration images, and its 4 x 8 agreement images). Prints
pruning time and (top-1 agreement, cosine of logits) with the dense model, and how much the
dense logits vary between images at all. A quicker probe
than cnn.py's calibrated rows, which also measure sensitivity and int8.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cnn  # noqa: E402

from onnxprune.calibration.calibration import Calibration  # noqa: E402
from onnxprune.prune.remove_neurons import RemoveNeuronsPass  # noqa: E402


def main(name: str, n: int) -> None:
    rng = np.random.default_rng(0)
    calib = [{"input": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)}
             for _ in range(32)][:n]
    feeds = [{"input": rng.standard_normal((8, 3, 224, 224)).astype(np.float32)}
             for _ in range(4)]
    path = cnn.exported(name, "legacy")
    dense = cnn.session(path)
    # Random-init logits can be (almost) the same for every input; then a cosine near 1 says
    # only that the constant was kept, not that the input-dependent part was.
    out = np.concatenate([dense.run(None, f)[0] for f in feeds])
    spread = np.linalg.norm(out - out.mean(0)) / np.linalg.norm(out)
    print(f"{name} dense logits: per-image deviation from their mean / norm {spread:.2e}")
    for criterion, cal in (("l1", None), ("obs", Calibration(calib))):
        m = ir.load(str(path))
        t = time.perf_counter()
        RemoveNeuronsPass(sparsity=0.5, criterion=criterion, calibration=cal)(m)
        print(f"{name} 50 % {criterion}: {time.perf_counter() - t:.0f} s, "
              f"(top-1 agreement, cosine) {cnn.agreement(dense, m, feeds)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
