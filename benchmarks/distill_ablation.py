"""One distillation variant on one saved least-squares model, scored like benchmarks/distill.py.

    python benchmarks/distill_ablation.py --tag lstsq                       # the start itself
    python benchmarks/distill_ablation.py --tag aug0 --pass-opts '{"augment": {"copies": 0}}'
    python benchmarks/distill_ablation.py --tag aug3 --pass-opts '{"augment": {"copies": 3}}'
    python benchmarks/distill_ablation.py --tag aug3_p5 --opts '{"prior": 5.0}' \\
        --pass-opts '{"augment": {"copies": 3}}'

The least-squares model (50 % FFN, 512 calibration sentences, the same selection and repair
as `onnxprune --sparsity 0.5 --calibration`) is made once and kept in build/, so variants of
the distillation stage (FitOptions via --opts, DistillRepairPass options via --pass-opts) are
compared from the same start. Quality: 512 held-out evaluation sentences and the 512
calibration sentences, against the dense model of the same exporter. Timings depend on the
machine's load; compare variants run under similar load only.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import metrics  # noqa: E402
import numpy as np  # noqa: E402
import textdata  # noqa: E402
from onnx_ir.passes.common import RemoveUnusedNodesPass  # noqa: E402

from onnxprune.api import PruneConfig  # noqa: E402
from onnxprune.calibration.calibration import Calibration  # noqa: E402
from onnxprune.io.models import load_model, save_model  # noqa: E402
from onnxprune.repair.augment import Augment  # noqa: E402
from onnxprune.repair.distill import DistillRepairPass  # noqa: E402
from onnxprune.repair.fit import FitOptions  # noqa: E402

BUILD = ROOT / "build"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", default="legacy")
    p.add_argument("--sp", type=float, default=0.5)
    p.add_argument("--n-eval", type=int, default=512)
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--opts", default="{}", help="FitOptions fields as JSON")
    p.add_argument("--pass-opts", default="{}", help="DistillRepairPass options as JSON")
    p.add_argument("--tag", default="base")
    p.add_argument("--steps", default=None,
                   help="every block takes at most this many optimiser steps (no clock: "
                   "variants compare alike under any load); a comma list gives the blocks' "
                   "steps in graph order")
    a = p.parse_args()
    from export_minilm import ensure_inputs

    calib = ensure_inputs(512, BUILD)
    dense = BUILD / f"minilm_{a.kind}.onnx"
    lst = BUILD / f"x_{a.kind}_{int(a.sp * 100)}_lstsq.onnx"
    held = textdata.evaluation_sentences()[: a.n_eval]
    fitted = textdata.calibration_sentences(512)

    def cached(name: str, fn):  # noqa: ANN001, ANN202
        f = BUILD / name
        if f.exists():
            return np.load(f)
        x = fn()
        np.save(f, x)
        return x

    dh = cached(f"x_dense_{a.kind}_held{a.n_eval}.npy", lambda: metrics.embed(dense, held))
    dc = cached(f"x_dense_{a.kind}_calib.npy", lambda: metrics.embed(dense, fitted))
    m0 = load_model(str(dense))
    cfg = PruneConfig(sparsity=a.sp, calibration=str(calib), token_mask="attention_mask",
                      reconstruct="lstsq")
    batches = cfg.batches(m0)
    kept_file = BUILD / (lst.name + ".kept.json")
    if not lst.exists():
        (neurons,) = cfg.passes(m0, None, batches)
        m = load_model(str(dense))
        neurons(m)
        save_model(m, str(lst))
        kept_file.write_text(json.dumps({k: v.tolist() for k, v in neurons.kept.items()}))

    def score(path: Path) -> tuple[dict, dict]:
        return (metrics.compare(dh, metrics.embed(path, held)),
                metrics.compare(dc, metrics.embed(path, fitted)))

    if a.tag == "lstsq":
        h, c = score(lst)
        print(json.dumps({"tag": "lstsq", "kind": a.kind, "sp": a.sp, "held": h, "calib": c}))
        return
    kept = {k: np.array(v) for k, v in json.loads(kept_file.read_text()).items()}
    m = load_model(str(lst))
    po = json.loads(a.pass_opts)
    if "augment" in po:
        po["augment"] = Augment(**po["augment"])
    if a.steps is not None:
        from onnxprune.channels.groups import find_channel_groups

        names = [g.name for g in find_channel_groups(m) if g.prunable]
        counts = [int(c) for c in a.steps.split(",")]
        po["steps"] = dict(zip(names, counts * len(names) if len(counts) == 1 else counts,
                               strict=False))
    ps = DistillRepairPass(reference=m0, calibration=Calibration(batches,
                           token_mask="attention_mask"), seconds=a.seconds, kept=kept,
                           options=FitOptions(**json.loads(a.opts)), **po)
    t = time.perf_counter()
    ps(m)
    RemoveUnusedNodesPass()(m)
    dt = time.perf_counter() - t
    out = BUILD / f"x_{a.kind}_{int(a.sp * 100)}_{a.tag}.onnx"
    save_model(m, str(out))
    h, c = score(out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    blocks = [(b.status, b.held_before and round(b.held_after / b.held_before, 3),
               b.fit_before and round(b.fit_after / b.fit_before, 3), b.epochs,
               round(b.seconds, 1), b.steps, b.fit_rows, b.held_rows)
              for b in ps.result.blocks]
    print(json.dumps({"tag": a.tag, "kind": a.kind, "sp": a.sp, "time": dt, "peak": peak,
                      "held": {k: round(v, 4) for k, v in h.items()},
                      "calib": {k: round(v, 4) for k, v in c.items()}, "blocks": blocks}))


if __name__ == "__main__":
    main()
