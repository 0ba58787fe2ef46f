"""The commands: each parses its options, calls the library, and renders what came back."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from onnxprune import api
from onnxprune.calibration.data import parse_shape_overrides
from onnxprune.calibration.raw import data_forms
from onnxprune.calibration.specs import input_specs, value_dims
from onnxprune.cli import options
from onnxprune.cli.report import human_bytes, pass_table, stats_table, verify_table, write_json
from onnxprune.errors import InputError
from onnxprune.io.models import check_output_path, load_model
from onnxprune.io.runtime import parse_providers
from onnxprune.recipe.pipeline import (
    Checks,
    Job,
    check_distinct_outputs,
    run_job,
    verification_batches,
)
from onnxprune.recipe.run import check_supported
from onnxprune.search.plans import Plan
from onnxprune.search.plot import write_plot
from onnxprune.search.search import SearchResult
from onnxprune.verify.compare import Tolerances, VerifyResult
from onnxprune.verify.kinds import KINDS

__all__ = ["COMMANDS", "prune", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERNAL"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


PLAIN_EVERY = 10.0  # seconds between plain progress lines in a log


@contextlib.contextmanager
def _plain_progress(console: Console, what: str) -> Iterator[Callable[[int, int, str], None]]:
    """Progress as plain lines for a log (output not a terminal): the first step, then at
    most one line every PLAIN_EVERY seconds, each with the time so far."""
    start = time.monotonic()
    last = [-PLAIN_EVERY]

    def update(done: int, total: int, label: str) -> None:
        now = time.monotonic() - start
        if now - last[0] >= PLAIN_EVERY:
            last[0] = now
            console.print(f"{what}: {done}/{total or '?'} {escape(label)} ({now:.0f} s)",
                          soft_wrap=True)

    yield update


@contextlib.contextmanager
def _progress_bar(console: Console, what: str) -> Iterator[Callable[[int, int, str], None]]:
    """A rich progress bar fed by the library's (done, total, label) callback; plain lines
    when the output is not a terminal (a bar would print nothing there)."""
    if not console.is_terminal:
        with _plain_progress(console, what) as update:
            yield update
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(what, total=None)

        def update(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=f"{what}: {label}")

        yield update


def _run_verify(console: Console, args: argparse.Namespace, reference: str,
                candidate: str, tolerances: Tolerances) -> VerifyResult:
    providers = parse_providers(args.providers)
    shapes = parse_shape_overrides(args.shape)
    with console.status("verifying on onnxruntime ..."):
        result = api.verify(reference, candidate, data=args.data, providers=providers,
                            tolerances=tolerances, shapes=shapes, **_selection(args))
    _show_verify(console, result)
    return result


def _selection(args: argparse.Namespace) -> dict[str, object]:
    """Which outputs verification checks, as what, and on which tokens."""
    return {"outputs": args.outputs, "output_kinds": dict(args.output_kinds) or None,
            "token_mask": args.token_mask}


def _show_verify(console: Console, result: VerifyResult, enforced: bool = True,
                 searched: bool = False) -> None:
    if result.generated_inputs:
        console.print("[yellow]no --data given: verified on inputs generated from the input "
                      "signature (random values); give --data for a meaningful check[/]")
    for why in result.weak:
        console.print(f"[yellow]weak verdict: {escape(why)}[/]", soft_wrap=True)
    console.print(verify_table(result))
    tol = result.tolerances
    limits = tol.describe()
    if tol.by_kind:  # only the kinds this model's outputs are
        kinds = dict.fromkeys(o.kind for o in result.outputs)
        limits = "; ".join(f"{k}: {KINDS[k].limits.describe()}" for k in kinds if k in KINDS)
    if not enforced:
        verdict = "passes" if result.ok else "misses"
        console.print(f"verdict: {verdict} onnxprune verify's defaults ({limits}); reported, "
                      "not enforced: give a tolerance (--min-cosine, --atol, ...) to make "
                      "it the exit code" + ("; a search's gate is its quality budget "
                                            "(--max-drop) on held-out calibration batches"
                                            if searched else ""))
    else:
        console.print(f"enforced: {limits}")


def _cmd_prune(argv: Sequence[str], console: Console,
               parser: argparse.ArgumentParser | None = None) -> int:
    args = (parser or options.main_parser()).parse_args(argv)
    config = options.prune_config(args)
    if config.is_default and not args.quiet:
        console.print("no pruning option given: " + (
            "removing as much as the quality budget (--max-drop) allows on --calibration data"
            if args.calibration else "lossless clean-up, and int8 embedding tables where they "
            "pass the default tolerances (give --calibration DATA to remove as much as the "
            "quality budget allows)"))
    checks = None
    if not args.no_verify:
        checks = Checks(options.tolerances(args), args.data,
                        tuple(parse_providers(args.providers)),
                        parse_shape_overrides(args.shape),
                        enforced=options.tolerances_given(args), outputs=args.outputs,
                        output_kinds=dict(args.output_kinds) or None)
    job = Job(args.model, args.output, config, checks, force=args.force,
              copy_config=args.copy_config, save_plan=args.save_plan, report=args.report)
    if config.planned:
        best: list[Plan] = []
        try:
            what = "searching" if args.target else "applying the plan"
            with _progress_bar(console, what) as progress:
                outcome = run_job(job, progress=progress, on_plan=best.append)
        except KeyboardInterrupt:
            if best:
                print(json.dumps(best[-1].to_dict()), file=sys.stderr)
                print("onnxprune: the line above is the best plan found so far"
                      + (f"; saved to {args.save_plan}" if args.save_plan else ""),
                      file=sys.stderr)
                if args.save_plan:
                    best[-1].save(args.save_plan)
            raise
    else:
        with _progress_bar(console, "pruning (calibrating and refitting group by group)"
                           ) as progress:
            outcome = run_job(job, progress=progress)
    report, out, result = outcome.report, outcome.output, outcome.verification
    if not outcome.written:
        assert report.search is not None
        print(f"onnxprune: {report.search.message}; no model written", file=sys.stderr)
        return EXIT_FAILED
    console.print(stats_table(report.before, report.after))
    for name, res in report.passes.items():
        if name not in ("CleanupPass", "Int8Embeddings"):  # the notes say what these did
            console.print(pass_table(name, res))
    for note in report.notes:
        console.print(f"[yellow]{escape(note)}[/]", soft_wrap=True)
    if result is not None:
        _show_verify(console, result, outcome.enforced, report.search is not None
                     or report.plan is not None)
    console.print(f"wrote {out} ({human_bytes(report.after.file_bytes)}, "
                  f"{report.after.file_bytes / max(report.before.file_bytes or 1, 1):.1%} "
                  "of the input)")
    code = EXIT_OK
    failed = []  # the one stderr line of an exit 1
    if outcome.failures:
        failed.append(("the written model is outside the verification tolerances: "
                       if outcome.enforced else "the written model's outputs are broken: ")
                      + "; ".join(outcome.failures))
        code = EXIT_FAILED
    if report.search is not None:
        _show_search(console, report.search)
        if not report.search.reached:
            failed.append(report.search.message)
            code = EXIT_FAILED
    if failed:
        print(f"onnxprune: {'; '.join(failed)}", file=sys.stderr)
    for note in outcome.notes:
        console.print(escape(note), soft_wrap=True)
    if args.save_plan and report.plan is not None:
        console.print(f"wrote the plan to {args.save_plan}")
    if args.report:
        data: dict[str, object] = {"input": str(args.model), "output": str(out)}
        if result is not None:
            data["verification"] = result.to_dict()
        write_json(args.report, {**data, **report.to_dict()})
    return code


def _show_search(console: Console, r: SearchResult) -> None:
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
    args = options.analyze_parser().parse_args(argv)
    try:
        levels = tuple(float(x) for x in args.levels.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--levels '{args.levels}': use fractions like 0.25,0.5") from None
    check_distinct_outputs({"report": args.report, "plot": args.plot}, args.model)
    model = load_model(args.model)
    check_supported(model, args.model)
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
        console.print(f"  [yellow]skipped[/] {escape(name)}: {escape(why)}", soft_wrap=True)
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
    return _cmd_prune(argv, console, options.quantize_parser())


def _cmd_verify(argv: Sequence[str], console: Console) -> int:
    args = options.verify_parser().parse_args(argv)
    models = list(args.models)
    check_distinct_outputs({"save_golden": args.save_golden, "report": args.report},
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
        if options.tolerances_given(args):
            raise InputError("tolerances apply when comparing: give them with --golden")
        model = load_model(models[0])
        check_supported(model, models[0])
        batches, generated = verification_batches(model, args.data,
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
        check_supported(load_model(path), path)
    tolerances = options.tolerances(args)
    if args.golden:
        providers = parse_providers(args.providers)
        with console.status("verifying on onnxruntime ..."):
            result = api.verify_golden(models[0], args.golden, tolerances=tolerances,
                                       providers=providers, **_selection(args))
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
    args = options.inspect_parser().parse_args(argv)
    check_distinct_outputs({"report": args.report}, args.model)
    info = api.inspect(args.model)
    console.print(f"{args.model}: {info.stats.parameters:,} parameters, opset {info.opset}, "
                  f"{human_bytes(info.stats.file_bytes)}, "
                  f"{info.stats.weight_flops_per_row:,} MatMul/Gemm FLOPs per row" + (
                      "" if info.stats.run_flops is None else
                      f", {info.stats.run_flops:,} FLOPs per run (Conv, MatMul/Gemm, LSTM; "
                      f"{info.stats.run_shapes})"))
    for g in info.groups:
        consumers = ", ".join(u.node.name or "?" for u in g.consumers) or "-"
        if g.prunable:
            console.print(f"  [green]prunable[/] {g.name}: {g.size} channels -> {consumers}",
                          soft_wrap=True)
        else:
            console.print(f"  [yellow]skipped[/]  {escape(g.name)}: {g.size} channels: "
                          f"{escape(g.skip_reason or '')}", soft_wrap=True)
    for b in info.attention:
        d = b.to_dict()
        state = "[green]prunable[/]" if d["prunable"] else "[yellow]skipped[/] "
        why = "" if d["prunable"] else f": {d['reason']}"
        size = (f"{d['heads']} heads of {d['head_size']}" if d["heads"] and d["head_size"]
                else "heads not counted")
        console.print(f"  {state} attention {escape(str(d['name']))}: {size}{escape(why)}",
                      soft_wrap=True)
    n = sum(g.prunable for g in info.groups)
    console.print(f"{n} of {len(info.groups)} channel groups prunable"
                  + ("" if n else " - structured pruning would change nothing"))
    model = load_model(args.model, validate=False)
    specs = input_specs(model)
    outputs = [(v.name, v.dtype.numpy().name if v.dtype is not None else "?", value_dims(v))
               for v in model.graph.outputs]
    for kind, values in (("input", [(s.name, s.dtype.name, s.dims) for s in specs]),
                         ("output", outputs)):
        for name, dtype, dims in values:
            shape = "rank ?" if dims is None else \
                "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
            console.print(f"  {kind:6s} {escape(str(name))}: {dtype} {escape(shape)}",
                          soft_wrap=True)
    forms = data_forms(specs, str(Path(args.model).parent))
    console.print("data for --calibration / --data:")
    for form in forms:
        console.print(f"  {escape(form)}", soft_wrap=True)
    if args.report:
        write_json(args.report, {**info.to_dict(), "data_forms": forms})
    return EXIT_OK


prune = _cmd_prune
COMMANDS = {"verify": _cmd_verify, "inspect": _cmd_inspect, "quantize": _cmd_quantize,
            "analyze": _cmd_analyze}
