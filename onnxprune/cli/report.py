"""Turning results into JSON files and terminal tables."""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

from onnxprune.core.accounting import ModelStats
from onnxprune.io.files import atomic_path

if TYPE_CHECKING:  # report sits below verify in the layers; only the type is needed
    from onnxprune.verify.compare import VerifyResult

__all__ = [
    "write_json",
    "stats_table",
    "verify_table",
    "kinds_table",
    "pass_table",
    "human_bytes",
]


def _clean(obj: object) -> object:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike[str], data: Mapping[str, object]) -> None:
    """Writes JSON atomically (strict: NaN and infinities become strings)."""
    out = Path(path)
    with atomic_path(out) as tmp, open(tmp, "w") as f:
        json.dump(_clean(data), f, indent=2, allow_nan=False)
        f.write("\n")


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{n} B"


def _ratio(a: float, b: float) -> str:
    return f"{b / a:.3f}x" if a else "-"


def stats_table(before: ModelStats, after: ModelStats) -> Table:
    t = Table(title="before / after")
    t.add_column("")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_column("after/before", justify="right")
    rows = [
        ("parameters", before.parameters, after.parameters),
        ("non-zero parameters", before.nonzero_parameters, after.nonzero_parameters),
        ("MatMul/Gemm FLOPs per row", before.weight_flops_per_row, after.weight_flops_per_row),
    ]
    if before.run_flops is not None and after.run_flops is not None:
        rows.append((f"FLOPs per run ({before.run_shapes})", before.run_flops, after.run_flops))
    for name, a, b in rows:
        t.add_row(name, f"{a:,}", f"{b:,}", _ratio(a, b))
    if before.file_bytes is not None and after.file_bytes is not None:
        t.add_row(
            "file size",
            human_bytes(before.file_bytes),
            human_bytes(after.file_bytes),
            _ratio(before.file_bytes, after.file_bytes),
        )
    nodes_a, nodes_b = sum(before.op_counts.values()), sum(after.op_counts.values())
    t.add_row("nodes", str(nodes_a), str(nodes_b), _ratio(nodes_a, nodes_b))
    ops = sorted(set(before.op_counts) | set(after.op_counts))
    changed = [op for op in ops if before.op_counts.get(op, 0) != after.op_counts.get(op, 0)]
    for op in changed:
        a, b = before.op_counts.get(op, 0), after.op_counts.get(op, 0)
        t.add_row(f"  {op} nodes", str(a), str(b), f"{b - a:+d}")
    top = sorted(after.op_counts.items(), key=lambda kv: -kv[1])[:8]
    t.caption = "ops after: " + ", ".join(f"{op} {n}" for op, n in top) + (
        ", ..." if len(after.op_counts) > 8 else "") + " (all in --report)"
    return t


def _opt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def verify_table(result: VerifyResult) -> Table:
    t = Table(title=f"verification ({result.batches} batch(es)"
              + (", generated inputs" if result.generated_inputs else "") + ")")
    for col in ("output", "kind", "on", "max|d|", "mean|d|", "cos mean",
                "cos min", "SQNR dB", "top-1", "top-5", "KL", "ok"):
        t.add_column(col, justify="left" if col in ("output", "kind") else "right")
    for o in result.outputs:
        t.add_row(
            o.name, o.kind, o.provider, f"{o.max_abs_diff:.4g}", f"{o.mean_abs_diff:.4g}",
            f"{o.cosine_mean:.5f}", f"{o.cosine_min:.5f}", f"{o.sqnr_db:.2f}",
            _opt(o.top1_agreement), _opt(o.top5_agreement), _opt(o.kl_mean),
            "yes" if o.ok else "NO",
        )
    notes = [f"{o.name} is {o.kind}: {o.kind_reason}" for o in result.outputs
             if o.kind_reason and o.provider == result.outputs[0].provider]
    failures = [f"{o.name} [{o.provider}]: {f}" for o in result.outputs for f in o.failures]
    if failures:
        notes.append("failed: " + "; ".join(failures))
    notes += [f"WEAK VERDICT: {w}" for w in result.weak]
    if notes:
        t.caption = "\n".join(notes)
    return t


def kinds_table(rows: list[tuple[str, str, str]]) -> Table:
    """The output kinds and the limits each is held to by default (verify.kinds.kinds_table())."""
    t = Table(title="output kinds and default limits")
    for col in ("kind", "what", "gated by default"):
        t.add_column(col)
    for row in rows:
        t.add_row(*row)
    return t


def _decision_table(
    title: str, what: str, unit: str, rows: list[tuple[str, int, int, str | None]]
) -> Table:
    """What a structured pass changed; what it left alone is summarised by reason."""
    t = Table(title=title)
    for col in (what, unit, "kept", "note"):
        t.add_column(col)
    skipped: Counter[str] = Counter()
    for name, before, after, reason in rows:
        if reason is not None and after == before:
            skipped[re.sub(r"'[^']*'", "'…'", reason)] += 1
            continue
        t.add_row(escape(name), str(before), str(after), escape(reason or ""))
    for reason, n in skipped.items():
        t.add_row(f"{n} more", "", "", escape(f"left alone: {reason}"))
    return t


def _distill_table(name: str, res: dict[str, Any]) -> Table:
    """Each pruned block's distillation: held-out error before and after, and why a block
    kept its least-squares weights."""
    t = Table(title=f"{name}: {res['distilled_blocks']} of {len(res['repairs'])} blocks "
              f"distilled ({res.get('budget') or 'recorded steps'})")
    for col in ("group", "held-out MSE", "steps", "outcome"):
        t.add_column(col)
    for r in res["repairs"]:
        before, after = r.get("held_before"), r.get("held_after")
        mse = "" if before is None or after is None else f"{before:.4g} -> {after:.4g}"
        outcome = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
        t.add_row(r["group"], mse, str(r.get("steps", 0)), outcome)
    return t


def pass_table(name: str, res: dict[str, Any]) -> Table:
    if "quantized_layers" in res:
        t = Table(title=f"{name}: {res['quantized_layers']} layers int8, "
                  f"{res['float_layers']} float")
        for col in ("kept in float", "why"):
            t.add_column(col)
        for layer in res["layers"]:
            if not layer["quantized"]:
                t.add_row(layer["node"], layer.get("reason", ""))
        for tensor, why in res["float_tensors"].items():
            t.add_row(f"tensor {tensor}", why)
        if not t.row_count:
            t.add_row("(none)", "every weight layer runs in int8")
        return t
    if "repairs" in res:
        return _distill_table(name, res)
    if "blocks" in res:
        rows = [(b["block"], b["heads_before"], b["heads_after"],
                 b["reason"] or b.get("note") or None) for b in res["blocks"]]
        return _decision_table(f"{name} (criterion {res.get('criterion')})", "attention block",
                               "heads", rows)
    if "groups" in res:
        rows = [(g["group"], g["channels_before"], g["channels_after"], g["reason"])
                for g in res["groups"]]
        return _decision_table(f"{name} (criterion {res.get('criterion')})", "group",
                               "channels", rows)
    t = Table(title=name)
    for col in ("weight", "size", "sparsity", "note"):
        t.add_column(col)
    for layer in res.get("layers", []):
        t.add_row(layer["weight"], str(layer["size"]), f"{layer['sparsity']:.3f}",
                  layer["skipped"] or "")
    return t
