"""Command line: argument parsing, printing, exit codes; nothing else.

Exit codes: 0 ok, 1 verification failed, 2 bad input or usage, 3 internal error,
130 interrupted. Errors are one line on stderr; ONNXPRUNE_DEBUG=1 shows tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx_ir as ir
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from onnxprune import api
from onnxprune.calibration.data import Batch, data_budget, parse_shape_overrides
from onnxprune.channels.criteria import CRITERIA
from onnxprune.cli.report import human_bytes, pass_table, stats_table, verify_table, write_json
from onnxprune.errors import InputError, OnnxPruneError
from onnxprune.io.files import atomic_path, same_file
from onnxprune.io.models import (
    check_output_path,
    load_model,
    save_model,
    stored_bytes,
    uses_external_data,
)
from onnxprune.io.runtime import Provider, parse_providers
from onnxprune.quant.driver import QuantizeConfig
from onnxprune.recipe.export_folder import check_copy_config, copy_config, layer_sizes
from onnxprune.repair.reconstruct import DEFAULT_RIDGE
from onnxprune.search.plot import write_plot
from onnxprune.search.search import DEFAULT_MAX_DROP
from onnxprune.verify.compare import Tolerances, VerifyResult

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other error
        raise InputError(f"{message} (see {self.prog} --help)")


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be in [0, 1)")
    return v


def _ridge(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a number nor auto") from None


def _nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not N:M, e.g. 2:4") from None
    if not 0 < n < m:
        raise argparse.ArgumentTypeError(f"'{text}': need 0 < N < M")
    return n, m


def _add_verify_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("verification")
    g.add_argument("--data", help=".npz batch or folder of .npz batches keyed by input name")
    g.add_argument("--shape", action="append", default=[], metavar="NAME:D0,D1,...",
                   help="shape of a generated input when no --data is given (repeatable)")
    g.add_argument("--providers", default="cpu",
                   help="comma list of cpu,cuda (default cpu): verification runs on each; "
                   "with cuda, calibration runs there too (never a silent CPU fallback)")
    g.add_argument("--min-cosine", type=float, help="fail below this per-row cosine")
    g.add_argument("--atol", type=float, help="absolute tolerance (with --rtol: allclose)")
    g.add_argument("--rtol", type=float, help="relative tolerance")
    g.add_argument("--min-sqnr", type=float, help="fail below this SQNR in dB")
    g.add_argument("--min-top1", type=float, help="fail below this top-1 agreement")
    g.add_argument("--top1", action="store_true",
                   help="report top-1 agreement for every output, not only class scores")
    g.add_argument("--report", help="write a JSON report to this file")


def _tolerances(args: argparse.Namespace) -> Tolerances:
    """The same rule as onnxprune.verify(): none given means Tolerances.defaults()."""
    return Tolerances.from_options(
        min_cosine=args.min_cosine, atol=args.atol, rtol=args.rtol,
        min_sqnr_db=args.min_sqnr, min_top1=args.min_top1, top1=True if args.top1 else None,
    )


def _prune_tolerances(args: argparse.Namespace) -> Tolerances:
    """The built-in check after pruning: `onnxprune verify`'s rule, except that a --target
    search or a --plan, told no tolerance, is gated by its quality budget on held-out data
    (the check then reports, and the note says so)."""
    given = any(getattr(args, k) is not None
                for k in ("min_cosine", "atol", "rtol", "min_sqnr", "min_top1"))
    searched = args.calibration is not None and all(
        getattr(args, k) is None for k in ("sparsity", "threshold", "nm", "heads", "quantize"))
    if not given and (args.target is not None or args.plan is not None or searched):
        return Tolerances(top1=True if args.top1 else None)
    return _tolerances(args)


def _main_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="onnxprune",
        description="Prune (and/or quantize) an ONNX model without retraining, save it, and "
        "verify it. Other commands: onnxprune verify REFERENCE CANDIDATE; onnxprune inspect "
        "MODEL; onnxprune quantize MODEL -o OUT --calibration DATA; onnxprune analyze MODEL "
        "--calibration DATA.",
    )
    p.add_argument("model", help="input .onnx model (never modified)")
    p.add_argument("-o", "--output", required=True, help="where to write the pruned model")
    p.add_argument("--force", action="store_true", help="allow --output to be the input file")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    g = p.add_argument_group("pruning")
    g.add_argument("--sparsity", type=_fraction, help="fraction of each group's neurons to remove "
                   "(or of each layer's weights with --mode unstructured)")
    g.add_argument("--mode", choices=("structured", "unstructured"), default="structured")
    g.add_argument("--threshold", type=float, help="zero weights with |w| <= this value")
    g.add_argument("--nm", type=_nm, help="N:M sparsity along the reduction axis, e.g. 2:4")
    g.add_argument("--criterion", choices=sorted([*CRITERIA, "obs"]),
                   help="neuron importance (default: l1, or obs with --calibration: "
                   "OBS-style selection that chooses and refits jointly)")
    g.add_argument("--calibration", metavar="PATH",
                   help=".npz batch or folder of .npz batches for data-aware pruning")
    g.add_argument("--token-mask", metavar="INPUT|auto|none",
                   help="input whose zeros mark padding rows to leave out of the calibration "
                   "statistics (default auto: an integer [batch, seq] input named "
                   "attention_mask or *_mask; none: use every row)")
    g.add_argument("--reconstruct", choices=("none", "bias", "lstsq", "distill"),
                   help="repair after removal (default with --calibration: distill, i.e. "
                   "lstsq, then each pruned block learns the original's output; without: "
                   "none)")
    g.add_argument("--repair-steps", type=int, default=None, metavar="N",
                   help="optimiser steps each pruned block may take in the distillation "
                   "repair (default: a fixed amount of arithmetic shared by the blocks, "
                   "642 steps each on MiniLM at 50 %%; the same bytes on any machine)")
    g.add_argument("--repair-seconds", type=float, default=None, metavar="S",
                   help="time budget of the distillation repair, shared by the pruned "
                   "blocks (default: none; capturing their inputs comes on top; with "
                   "--target: per real removal; a --plan replays its recorded steps "
                   "instead)")
    g.add_argument("--repair-augment", type=int, default=None, metavar="N",
                   help="distillation repair with a token mask: also fit N copies of the "
                   "calibration sentences with a few tokens left out or exchanged "
                   "(default 3; 0: only the sentences as given)")
    g.add_argument("--ridge", type=_ridge, default=None, metavar="F|auto",
                   help="ridge strength of the repair, relative to the mean activation power "
                   "(default auto: chosen per layer by cross-validation on the calibration "
                   f"batches; channel selection then uses {DEFAULT_RIDGE})")
    g.add_argument("--global", dest="global_ranking", action="store_true",
                   help="rank neurons across groups instead of per group (with --calibration, "
                   "Conv groups share the budget by their measured output error)")
    g.add_argument("--max-group-sparsity", type=_fraction, default=0.9,
                   help="cap per group with --global (default 0.9)")
    g.add_argument("--round-to", type=int, default=1, help="keep counts a multiple of N")
    g.add_argument("--ignore", action="append", default=[], metavar="GLOB",
                   help="node names to leave alone (repeatable)")
    g.add_argument("--heads", type=_fraction, metavar="F",
                   help="fraction of attention heads to remove from each block")
    g.add_argument("--global-heads", action="store_true",
                   help="rank heads across blocks (the default with --calibration; each keeps "
                   "at least 25 %%)")
    g.add_argument("--seed", type=int, default=0)
    t = p.add_argument_group("target search (instead of --sparsity/--heads; needs --calibration)")
    t.add_argument("--target", metavar="KIND=F",
                   help="params=F, flops=F (weight MatMul FLOPs) or latency=F (measured here "
                   "with onnxruntime): the share of the original to reach, e.g. flops=0.75")
    t.add_argument("--max-drop", type=float, metavar="D",
                   help="quality budget: largest drop of the metric allowed (default "
                   f"{DEFAULT_MAX_DROP:g})")
    _add_metric_options(t)
    t.add_argument("--save-plan", metavar="FILE.json",
                   help="write the chosen per-group decisions (with --target or --plan)")
    t.add_argument("--plan", metavar="FILE.json",
                   help="apply a saved plan exactly (same model + data: same bytes)")
    _add_quantize_options(p)
    p.add_argument("--no-verify", action="store_true", help="skip verification")
    p.add_argument("--copy-config", action="store_true",
                   help="export folder (Optimum): copy config.json and the tokenizer files "
                   "beside --output; config.json's intermediate_size / num_attention_heads "
                   "are updated when every layer was pruned alike")
    _add_verify_options(p)
    _add_budget_option(p)
    return p


def _add_budget_option(p: argparse.ArgumentParser) -> None:
    # Read (and removed from argv) by main(), which applies it to every command.
    p.add_argument("--max-calibration-bytes", type=int, metavar="N",
                   help="memory budget for calibration/verification arrays, checked from the "
                   "file headers before decompressing (default: a quarter of RAM)")


def _take_budget(argv: list[str]) -> tuple[list[str], int | None]:
    """Removes --max-calibration-bytes N from argv; returns the rest and the value."""
    out: list[str] = []
    value: str | None = None
    it = iter(argv)
    for arg in it:
        if arg == "--max-calibration-bytes":
            value = next(it, "")
        elif arg.startswith("--max-calibration-bytes="):
            value = arg.partition("=")[2]
        else:
            out.append(arg)
    if value is None:
        return out, None
    try:
        return out, int(value)
    except ValueError:
        raise InputError(f"--max-calibration-bytes '{value}': give a number of bytes") from None


def _add_metric_options(g: argparse._ActionsContainer) -> None:
    g.add_argument("--metric", choices=("cosine", "sqnr", "top1"),
                   help="quality measured against the original on held-out batches (default "
                   "cosine; sqnr as 1 - noise/signal energy)")
    g.add_argument("--eval", metavar="MODULE:FUNCTION",
                   help="user metric instead: called with an onnxruntime session, returns a "
                   "number (higher is better)")
    g.add_argument("--holdout", metavar="PATH",
                   help="held-out .npz batches for measuring quality (default: the last quarter "
                   "of the calibration batches, which are then not used for fitting)")


def _add_quantize_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("8-bit quantization (after pruning, or alone: onnxprune quantize)")
    g.add_argument("--quantize", choices=("int8",), help="insert QuantizeLinear/DequantizeLinear")
    g.add_argument("--calibration-method", choices=("minmax", "percentile", "entropy"),
                   default="percentile", help="activation ranges (default percentile 99.99)")
    g.add_argument("--activation-dtype", choices=("uint8", "int8"), default="uint8")
    g.add_argument("--weight-only", action="store_true",
                   help="int8 weights behind DequantizeLinear, float activations (no data needed)")
    g.add_argument("--quantize-ops", default="MatMul,Gemm,Conv", metavar="OPS",
                   help="comma list of ops to quantize (default MatMul,Gemm,Conv)")
    g.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="node/weight/tensor names to keep in float (repeatable)")
    g.add_argument("--max-float-layers", type=int, metavar="N",
                   help="keep up to N layers with the worst measured error in float")
    g.add_argument("--smooth", default="auto", metavar="auto|ALPHA|none",
                   help="SmoothQuant-style scale migration (default auto: per tensor, where it "
                   "halves the error)")


def _calibration_provider(args: argparse.Namespace) -> Provider:
    """Where calibration runs: CUDA when --providers names it (checked to exist), else CPU."""
    return "cuda" if "cuda" in parse_providers(args.providers) else "cpu"


def _quantize_config(args: argparse.Namespace, provider: Provider) -> QuantizeConfig | None:
    if args.quantize is None:
        return None
    smooth: float | str | None
    if args.smooth == "none":
        smooth = None
    elif args.smooth == "auto":
        smooth = "auto"
    else:
        try:
            smooth = float(args.smooth)
        except ValueError:
            raise InputError(f"--smooth '{args.smooth}': use auto, none or a number") from None
    return QuantizeConfig(
        method=args.calibration_method,
        activation_dtype=args.activation_dtype,
        weight_only=args.weight_only,
        ops=tuple(o.strip() for o in args.quantize_ops.split(",") if o.strip()),
        exclude=tuple(args.exclude),
        max_float_layers=args.max_float_layers,
        smooth=smooth,  # type: ignore[arg-type]
        token_mask=args.token_mask,
        seed=args.seed,
        provider=provider,
    )


def _verify_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnxprune verify",
                usage="onnxprune verify REFERENCE CANDIDATE [options] | MODEL --save-golden "
                "FILE.npz [--data D] | MODEL --golden FILE.npz [options]",
                description="Compare CANDIDATE against REFERENCE, or MODEL against golden "
                "outputs saved earlier; exit 0 within tolerance, 1 outside, 2 on bad input. "
                "Without tolerance options: cosine min >= 0.99 for embeddings and other "
                "outputs, top-1 agreement >= 0.99 for class scores.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="REFERENCE CANDIDATE, or one MODEL with --golden / --save-golden")
    p.add_argument("--golden", metavar="FILE.npz",
                   help="compare MODEL with the inputs and outputs saved in this file")
    p.add_argument("--save-golden", metavar="FILE.npz",
                   help="run MODEL on --data (or generated inputs) and save inputs + outputs")
    p.add_argument("-q", "--quiet", action="store_true")
    _add_verify_options(p)
    _add_budget_option(p)
    return p


def _inspect_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnxprune inspect", description="What is prunable, and why not.")
    p.add_argument("model")
    p.add_argument("--report", help="write the inspection as JSON")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def _analyze_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnxprune analyze",
                description="Sensitivity of every prunable group and attention block: the "
                "quality drop when it alone is pruned (with repair) at several sparsities.")
    p.add_argument("model")
    p.add_argument("--calibration", required=True, metavar="PATH",
                   help=".npz batch or folder of .npz batches")
    p.add_argument("--token-mask", metavar="INPUT|auto|none",
                   help="input whose zeros mark padding rows (default auto: attention_mask "
                   "or another integer [batch, seq] *_mask input; none: every row)")
    _add_metric_options(p)
    p.add_argument("--levels", default="0.125,0.25,0.375,0.5,0.75", metavar="F,F,...",
                   help="fractions of each unit to measure (default 0.125,0.25,0.375,0.5,0.75)")
    p.add_argument("--no-heads", action="store_true", help="FFN groups only")
    p.add_argument("--ignore", action="append", default=[], metavar="GLOB")
    p.add_argument("--report", metavar="FILE.json", help="write the curves as JSON")
    p.add_argument("--plot", metavar="FILE.html|FILE.png", help="draw the curves")
    p.add_argument("-q", "--quiet", action="store_true")
    _add_budget_option(p)
    return p


@contextlib.contextmanager
def _progress_bar(console: Console, what: str) -> Iterator[Callable[[int, int, str], None]]:
    """A rich progress bar fed by the library's (done, total, label) callback."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(what, total=None)

        def update(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=f"{what}: {label}")

        yield update


def _run_verify(console: Console, args: argparse.Namespace, reference: str | ir.Model,
                candidate: str | ir.Model,
                tolerances: Tolerances, batches: list[Batch] | None = None,
                generated: bool = False, show: bool = True) -> VerifyResult:
    providers = parse_providers(args.providers)
    shapes = parse_shape_overrides(args.shape)
    with console.status("verifying on onnxruntime ..."):
        result = api.verify(reference, candidate,
                            data=args.data if batches is None else batches,
                            providers=providers, tolerances=tolerances, shapes=shapes,
                            generated_inputs=generated)
    if show:
        _show_verify(console, result)
    return result


def _show_verify(console: Console, result: VerifyResult) -> None:
    if result.generated_inputs:
        console.print("[yellow]no --data given: verified on inputs generated from the input "
                      "signature (random values); give --data for a meaningful check[/]")
    console.print(verify_table(result))
    tol = result.tolerances
    if tol.by_kind or any(v is not None for v in (tol.min_cosine, tol.atol, tol.rtol,
                                                    tol.min_sqnr_db, tol.min_top1)):
        console.print(f"enforced: {tol.describe()}")
    else:  # a search or plan told no tolerance: its budget was the gate
        console.print("enforced here: finite outputs only; the quality budget (--max-drop) "
                      "on held-out calibration batches is the gate")


def _cmd_prune(argv: Sequence[str], console: Console) -> int:
    args = _main_parser().parse_args(argv)
    calibration_provider = _calibration_provider(args)
    config = api.PruneConfig(
        sparsity=args.sparsity, mode=args.mode, threshold=args.threshold, nm=args.nm,
        criterion=args.criterion, calibration=args.calibration, token_mask=args.token_mask,
        reconstruct=args.reconstruct, ridge=args.ridge, global_ranking=args.global_ranking,
        repair_seconds=args.repair_seconds, repair_steps=args.repair_steps,
        repair_augment=args.repair_augment,
        calibration_provider=calibration_provider,
        max_group_sparsity=args.max_group_sparsity, round_to=args.round_to,
        ignore=tuple(args.ignore), seed=args.seed,
        quantize=_quantize_config(args, calibration_provider),
        heads=args.heads, global_heads=args.global_heads, target=args.target,
        max_drop=args.max_drop, metric=args.metric, eval=args.eval, holdout=args.holdout,
        plan=args.plan,
    )
    planned = args.target is not None or args.plan is not None
    if config.is_default and not args.quiet:
        console.print("no pruning option given: " + (
            "removing as much as the quality budget (--max-drop) allows on --calibration data"
            if args.calibration else "lossless clean-up, and int8 embedding tables where they "
            "pass the default tolerances (give --calibration DATA to remove as much as the "
            "quality budget allows)"))
    config.check_planning()  # validates the options before any file is touched
    if not planned:
        config.passes()
    if args.save_plan and not planned:
        raise InputError("--save-plan records a --target search or a --plan; with fixed "
                         "options the command line itself is the recipe")
    out = check_output_path(args.output, [args.model], force=args.force)
    _check_distinct_outputs({"-o": out, "--report": args.report, "--save-plan": args.save_plan},
                            args.model)
    if args.copy_config:
        check_copy_config(args.model, out)
    model = load_model(args.model)
    api.check_supported(model, args.model)
    # With external data, verification compares against the loaded model (a clone sharing
    # its memory-mapped weights): onnxruntime given the file would map every weight again.
    reference: str | ir.Model = model.clone() if uses_external_data(model) else args.model
    sizes_before = layer_sizes(model) if args.copy_config else None
    batches, generated = None, False
    if not args.no_verify:  # bad verification options must fail before anything is written
        parse_providers(args.providers)
        batches, generated = api.verification_batches(model, args.data,
                                              parse_shape_overrides(args.shape))
    if planned:
        best: list[api.Plan] = []
        try:
            what = "searching" if args.target else "applying the plan"
            with _progress_bar(console, what) as progress:
                report = api.prune_model(model, config, progress, on_plan=best.append)
        except KeyboardInterrupt:
            if best:
                print(json.dumps(best[-1].to_dict()), file=sys.stderr)
                print("onnxprune: the line above is the best plan found so far"
                      + (f"; saved to {args.save_plan}" if args.save_plan else ""),
                      file=sys.stderr)
                if args.save_plan:
                    best[-1].save(args.save_plan)
            raise
        if report.search is not None and report.search.over_budget:
            if args.save_plan and report.plan is not None:
                report.plan.save(args.save_plan)
            print(f"onnxprune: {report.search.message}; no model written", file=sys.stderr)
            return EXIT_FAILED
    else:
        with console.status("pruning ...") as status:
            def progress(done: int, total: int, label: str) -> None:
                status.update(f"pruning: group {done + 1}/{total} ({label}), calibrating and "
                              "refitting")

            report = api.prune_model(model, config, progress)
    report.before = replace(report.before, file_bytes=stored_bytes(args.model))
    verify_on_cpu = not args.no_verify and "cpu" in parse_providers(args.providers)
    api.check_written(model, load=not verify_on_cpu)  # verification loads it on the CPU
    data: dict[str, object] = {"input": str(args.model), "output": str(out)}
    code = EXIT_OK
    result = None
    if not args.no_verify:
        # Verify the model in memory first: a run that cannot verify writes nothing.
        result = _run_verify(console, args, reference, model, _prune_tolerances(args),
                             batches, generated, show=False)
        data["verification"] = result.to_dict()
        code = EXIT_OK if result.ok else EXIT_FAILED
    with console.status(f"saving {out} ..."):
        if config.is_default and not report.modified and not uses_external_data(model):
            # Nothing changed: the input's own bytes, so the output is never larger.
            with atomic_path(out) as tmp:
                shutil.copyfile(args.model, tmp)
        else:
            save_model(model, out, keep=[] if same_file(args.model, out) else [args.model])
    report.after = replace(report.after, file_bytes=stored_bytes(out))
    console.print(stats_table(report.before, report.after))
    for name, res in report.passes.items():
        if name not in ("CleanupPass", "Int8Embeddings"):  # the notes say what these did
            console.print(pass_table(name, res))
    for note in report.notes:
        console.print(f"[yellow]{note}[/]")
    if result is not None:
        _show_verify(console, result)
    console.print(f"wrote {out} ({human_bytes(report.after.file_bytes)}, "
                  f"{report.after.file_bytes / max(report.before.file_bytes or 1, 1):.1%} "
                  "of the input)")
    failed = []  # the one stderr line of an exit 1
    if code == EXIT_FAILED and result is not None:
        failed.append("the written model is outside the verification tolerances: "
                      + "; ".join(result.failures))
    if report.search is not None:
        _show_search(console, report.search)
        if not report.search.reached:
            failed.append(report.search.message)
            code = EXIT_FAILED
    if failed:
        print(f"onnxprune: {'; '.join(failed)}", file=sys.stderr)
    if sizes_before is not None:
        for note in copy_config(args.model, out, sizes_before, layer_sizes(model)):
            console.print(note, soft_wrap=True)
    if args.save_plan and report.plan is not None:
        report.plan.save(args.save_plan)
        console.print(f"wrote the plan to {args.save_plan}")
    if args.report:
        write_json(args.report, {**data, **report.to_dict()})
    return code


def _check_distinct_outputs(paths: dict[str, str | os.PathLike[str] | None],
                            *inputs: str | os.PathLike[str]) -> None:
    """Every output path is safe to write and names a different file from the others (a
    --report equal to -o would replace the model with JSON) and from the inputs."""
    given = [(flag, p) for flag, p in paths.items() if p]
    for i, (flag, p) in enumerate(given):
        if flag != "-o":
            check_output_path(p, list(inputs))
        for other_flag, other in given[:i]:
            if same_file(p, other):
                raise InputError(f"{p}: {flag} names the same file as {other_flag}; give "
                                 "each output its own path")
            if other_flag == "-o" and _is_data_name(Path(p), Path(other)):
                raise InputError(f"{p}: {flag} names a data file of the model written to "
                                 f"{other}; choose another path")


def _is_data_name(path: Path, model: Path) -> bool:
    """Whether `path` has the form save_model uses for the data of `model` (<name>[.*].data)."""
    return (same_file(path.parent, model.parent) and path.name.startswith(f"{model.name}.")
            and path.name.endswith(".data"))


def _show_search(console: Console, r: api.SearchResult) -> None:
    t = Table(title="target search", show_lines=False)
    for col in ("round", "allocation", "masked drop", "real drop", "share"):
        t.add_column(col)
    for row in r.rounds:
        t.add_row(str(row["round"]), str(row["allocation"]), f"{row['masked_drop']:.4f}",
                  f"{row['drop']:.4f}", f"{row['share']:.1%}")
    console.print(t)
    colour = "green" if r.reached else "red"
    console.print(f"[{colour}]{r.message}[/] ({r.seconds:.0f} s)")


def _cmd_analyze(argv: Sequence[str], console: Console) -> int:
    args = _analyze_parser().parse_args(argv)
    try:
        levels = tuple(float(x) for x in args.levels.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--levels '{args.levels}': use fractions like 0.25,0.5") from None
    _check_distinct_outputs({"--report": args.report, "--plot": args.plot}, args.model)
    model = load_model(args.model)
    api.check_supported(model, args.model)
    with _progress_bar(console, "analysing") as progress:
        analysis = api.analyze(model, args.calibration, token_mask=args.token_mask,
                               metric=args.metric, eval=args.eval, holdout=args.holdout,
                               levels=levels, heads=not args.no_heads,
                               ignore=tuple(args.ignore), progress=progress)
    t = Table(title=f"{analysis.evaluator.name} drop per unit pruned alone "
              f"(held out: {analysis.holdout_source})")
    t.add_column("unit")
    t.add_column("kind")
    t.add_column("items")
    levels_seen = sorted({round(k / a.unit.items, 3) for a in analysis.units for k in a.curve})
    for f in levels_seen:
        t.add_column(f"{f:.1%}", justify="right")
    for a in analysis.units:
        by_f = {round(k / a.unit.items, 3): v for k, v in a.curve.items()}
        t.add_row(a.unit.name, a.unit.kind, str(a.unit.items),
                  *(f"{by_f[f]:.4f}" if f in by_f else "" for f in levels_seen))
    console.print(t)
    for name, why in analysis.skipped.items():
        console.print(f"  [yellow]skipped[/] {name}: {why}", soft_wrap=True)
    if args.report:
        write_json(args.report, analysis.to_dict())
    if args.plot:
        write_plot(analysis, args.plot)
        console.print(f"wrote {args.plot}")
    return EXIT_OK


def _cmd_quantize(argv: Sequence[str], console: Console) -> int:
    """`onnxprune quantize MODEL -o OUT --calibration DATA`: the main job, quantizing only."""
    argv = list(argv)
    if "--quantize" not in argv:
        argv += ["--quantize", "int8"]
    return _cmd_prune(argv, console)


def _cmd_verify(argv: Sequence[str], console: Console) -> int:
    args = _verify_parser().parse_args(argv)
    models = list(args.models)
    _check_distinct_outputs({"--save-golden": args.save_golden, "--report": args.report},
                            *models)
    if args.golden and args.save_golden:
        raise InputError("give --golden (compare) or --save-golden (write), not both")
    if args.save_golden or args.golden:
        if len(models) != 1:
            raise InputError("--golden / --save-golden take one MODEL, got "
                             f"{len(models)}: {' '.join(models)}")
    elif len(models) != 2:
        raise InputError("verify needs REFERENCE CANDIDATE, or MODEL --golden FILE.npz "
                         "(see onnxprune verify --help)")
    if args.golden and args.data:
        raise InputError("--golden files hold their own inputs; drop --data")
    if args.save_golden:
        out = check_output_path(args.save_golden, models)
        if args.report:
            check_output_path(args.report, [*models, out])
        tolerances_given = any(getattr(args, k) is not None for k in
                               ("min_cosine", "atol", "rtol", "min_sqnr", "min_top1"))
        if tolerances_given:
            raise InputError("tolerances apply when comparing: give them with --golden")
        model = load_model(models[0])
        api.check_supported(model, models[0])
        batches, generated = api.verification_batches(model, args.data,
                                                      parse_shape_overrides(args.shape))
        golden = api.save_golden(models[0], out, batches)
        if generated:
            console.print("[yellow]no --data given: saved outputs on inputs generated from the "
                          "input signature (random values); give --data for a meaningful "
                          "gate[/]")
        console.print(f"wrote {len(golden.batches)} batch(es) of inputs and outputs "
                      f"({', '.join(golden.names)}) to {out} "
                      f"({human_bytes(out.stat().st_size)})")
        return EXIT_OK
    for path in models:
        api.check_supported(load_model(path), path)
    tolerances = _tolerances(args)
    if args.golden:
        providers = parse_providers(args.providers)
        with console.status("verifying on onnxruntime ..."):
            result = api.verify_golden(models[0], args.golden, tolerances=tolerances,
                                       providers=providers)
        _show_verify(console, result)
    else:
        result = _run_verify(console, args, models[0], models[1], tolerances)
    if args.report:
        write_json(args.report, result.to_dict())
    if not result.ok:
        print(f"onnxprune: verification failed: {'; '.join(result.failures)}", file=sys.stderr)
        return EXIT_FAILED
    console.print("[green]verification passed[/]")
    return EXIT_OK


def _cmd_inspect(argv: Sequence[str], console: Console) -> int:
    args = _inspect_parser().parse_args(argv)
    _check_distinct_outputs({"--report": args.report}, args.model)
    info = api.inspect(args.model)
    console.print(f"{args.model}: {info.stats.parameters:,} parameters, opset {info.opset}, "
                  f"{human_bytes(info.stats.file_bytes)}, "
                  f"{info.stats.weight_flops_per_row:,} MatMul/Gemm FLOPs per row")
    for g in info.groups:
        consumers = ", ".join(u.node.name or "?" for u in g.consumers) or "-"
        if g.prunable:
            console.print(f"  [green]prunable[/] {g.name}: {g.size} channels -> {consumers}",
                          soft_wrap=True)
        else:
            console.print(f"  [yellow]skipped[/]  {g.name}: {g.size} channels: {g.skip_reason}",
                          soft_wrap=True)
    for b in info.attention:
        d = b.to_dict()
        state = "[green]prunable[/]" if d["prunable"] else "[yellow]skipped[/] "
        why = "" if d["prunable"] else f": {d['reason']}"
        console.print(f"  {state} attention {d['name']}: {d['heads']} heads of "
                      f"{d['head_size']}{why}", soft_wrap=True)
    n = sum(g.prunable for g in info.groups)
    console.print(f"{n} of {len(info.groups)} channel groups prunable"
                  + ("" if n else " - structured pruning would change nothing"))
    if args.report:
        write_json(args.report, info.to_dict())
    return EXIT_OK


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an exception so every temporary file is removed on the way out."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Library warnings (onnx_ir's logging, numpy's RuntimeWarnings) are kept off stderr:
    the exit line must be the only line there. ONNXPRUNE_DEBUG=1 shows them again."""
    if os.environ.get("ONNXPRUNE_DEBUG"):
        yield
        return
    root = logging.getLogger()
    handler = logging.NullHandler()  # stops logging's last-resort printing to stderr
    root.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with np.errstate(all="ignore"):
                yield
    finally:
        root.removeHandler(handler)


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet = "-q" in argv or "--quiet" in argv
    # Piped output gets 120 columns, not rich's 80: node names are long.
    width = None if sys.stdout.isatty() else 120
    console = Console(quiet=quiet, stderr=False, highlight=False, width=width)
    commands = {"verify": _cmd_verify, "inspect": _cmd_inspect, "quantize": _cmd_quantize,
                "analyze": _cmd_analyze}
    try:
        argv, budget = _take_budget(argv)
        with _sigterm_as_exception(), _quiet_libraries(), data_budget(budget):
            if argv and argv[0] in commands:
                return commands[argv[0]](argv[1:], console)
            return _cmd_prune(argv, console)
    except OnnxPruneError as e:
        print(f"onnxprune: error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except _Terminated:
        print("onnxprune: terminated; no output written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("onnxprune: interrupted; no output written", file=sys.stderr)
        return 130
    except SystemExit as e:  # --help
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
    except Exception as e:
        if os.environ.get("ONNXPRUNE_DEBUG"):
            raise
        print(f"onnxprune: internal error: {type(e).__name__}: {_one_line(str(e))[:300]} "
              "(rerun with ONNXPRUNE_DEBUG=1 for a traceback and report it)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
