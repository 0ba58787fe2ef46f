"""What each part of the calibrated Conv repair is worth on ddddocr at 30 % of channels.

    python benchmarks/cnn_ddddocr_ablation.py            # ~15 min on 2 cores, 1 thread

Same data as benchmarks/cnn.py (calibration captchas seed 1, 500 held-out ones seed 2).
Sensitivity curves (each group pruned alone at 25 / 50 / 75 %, OBS + refit) are measured
once on 128 calibration captchas and scored five ways: relative error of all logits (the
default), per-step KL of the softmax, share of time steps whose argmax changes, a hinge on
the dense top class's margin, and share of decoded strings that change. Each allocation is
pruned (128 calibration captchas) and its held-out accuracy printed; then, for the default
allocation, the repair without the residual target, without the downstream refit, and with
256 calibration captchas.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cnn  # noqa: E402

from onnxprune.calibration.calibration import Calibration
from onnxprune.channels.groups import find_channel_groups  # noqa: E402
from onnxprune.conv import refit as conv_refit  # noqa: E402
from onnxprune.conv import repair as conv_repair  # noqa: E402
from onnxprune.conv.repair import conv_repairable  # noqa: E402
from onnxprune.conv.sensitivity import (  # noqa: E402
    GroupCurve,
    allocate_removals,
    conv_sensitivity,
)
from onnxprune.io.runtime import make_session  # noqa: E402
from onnxprune.prune import remove_neurons  # noqa: E402
from onnxprune.prune.remove_neurons import RemoveNeuronsPass  # noqa: E402
from onnxprune.repair import reconstruct  # noqa: E402
from onnxprune.repair.reconstruct import Target  # noqa: E402

METRICS = ("rel", "kl", "flips", "hinge", "strings")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _decode(idx: np.ndarray) -> tuple[int, ...]:
    out, prev = [], None
    for i in idx.tolist():
        if i != prev and i != 0:
            out.append(i)
        prev = i
    return tuple(out)


def scorer(model: ir.Model, feeds: list[dict]):  # noqa: ANN201
    """An `evaluate` for conv_sensitivity that records all five scores per candidate."""
    dense = make_session(model, "cpu")
    ref = [dense.run(None, f)[0][:, 0, :].astype(np.float64) for f in feeds]
    power = sum(float(np.sum(r * r)) for r in ref)
    lp = [_log_softmax(r) for r in ref]
    top = [r.argmax(-1) for r in ref]
    record: list[dict[str, float]] = []

    def evaluate(session) -> float:  # noqa: ANN001
        s = dict.fromkeys(METRICS, 0.0)
        steps = 0
        for f, r, p, a in zip(feeds, ref, lp, top, strict=True):
            o = session.run(None, f)[0][:, 0, :].astype(np.float64)
            s["rel"] += float(np.sum((o - r) ** 2)) / power
            s["kl"] += float(np.sum(np.exp(p) * (p - _log_softmax(o))))
            b = o.argmax(-1)
            s["flips"] += float(np.sum(a != b))
            rows = np.arange(len(a))
            others = o.copy()
            others[rows, a] = -np.inf
            s["hinge"] += float(np.sum(np.maximum(0.0, 2.0 - (o[rows, a] - others.max(-1)))))
            s["strings"] += float(_decode(a) != _decode(b)) * len(a)
            steps += len(a)
        s = {k: v if k == "rel" else v / steps for k, v in s.items()}
        record.append(s)
        return s["rel"]

    return evaluate, record


def main() -> None:
    ocr = cnn.OCR()
    seen = ocr.inputs(256, seed=1)
    calib = {n: [{"input1": a} for _, a in seen[:n]] for n in (128, 256)}
    data = ocr.inputs(500, seed=2)
    m = ir.load(str(ocr.path))
    NameFixPass()(m)
    groups = [g for g in find_channel_groups(m) if g.prunable and conv_repairable(g)]
    evaluate, record = scorer(m, calib[128])
    curves = conv_sensitivity(m, groups, Calibration(calib[128]), evaluate=evaluate)
    budget = int(0.3 * sum(g.size for g in groups))
    print(f"dense: accuracy {ocr.accuracy(ocr.path, data):.3f}", flush=True)

    def keep(metric: str) -> dict[str, int]:
        at, scored = 0, []
        for c in curves:
            errs = tuple(r[metric] for r in record[at:at + len(c.removed)])
            at += len(c.removed)
            scored.append(GroupCurve(c.group, c.size, c.removed, errs))
        removed = allocate_removals(scored, budget)
        return {c.group: c.size - removed[c.group] for c in scored}

    def pruned(k: dict[str, int], n: int = 128) -> float:
        p = ir.load(str(ocr.path))
        RemoveNeuronsPass(criterion="obs", calibration=Calibration(calib[n]), keep=k)(p)
        return ocr.accuracy(p, data)

    for metric in METRICS:
        print(f"30 % allocated by {metric}: accuracy {pruned(keep(metric)):.3f}", flush=True)
    default = keep("rel")
    modules = (reconstruct, conv_repair, conv_refit)  # every module that reads conv_target
    residual = reconstruct.conv_target
    for mod in modules:
        mod.conv_target = lambda use: Target((use.node.outputs[0].name or "",))
    print(f"  without the residual target: {pruned(default):.3f}", flush=True)
    for mod in modules:
        mod.conv_target = residual
    sweep = remove_neurons.sweep_candidates
    remove_neurons.sweep_candidates = lambda *a: []
    print(f"  without the downstream refit: {pruned(default):.3f}", flush=True)
    remove_neurons.sweep_candidates = sweep
    print(f"  with 256 calibration captchas: {pruned(default, 256):.3f}", flush=True)


if __name__ == "__main__":
    main()
