"""The pipeline every front end runs: load -> passes -> check -> verify -> save.

The CLI's main command and Olive's pass both call `run_job`; they differ only in how they
show progress and results (and Olive hands in its own `save`). The order is the promise:
options are checked before any file is touched, the model is verified in memory before it
is written (a run that cannot verify writes nothing), and a default run that changed nothing
writes the input's own bytes, so the output is never larger.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx_ir as ir

from onnxprune.calibration.data import Batch, input_specs, load_batches
from onnxprune.calibration.fit import fitting_batches
from onnxprune.core.accounting import describe_shapes, fixed_input_shapes, run_flops
from onnxprune.errors import InputError, InternalError, OptionError
from onnxprune.io.detached import check_detached
from onnxprune.io.files import atomic_path, make_parent, same_file
from onnxprune.io.models import (
    check_output_path,
    load_model,
    save_model,
    serialized_model,
    stored_bytes,
    uses_external_data,
)
from onnxprune.io.runtime import Provider, make_session
from onnxprune.recipe.config import PruneConfig
from onnxprune.recipe.export_folder import check_copy_config, copy_config, layer_sizes
from onnxprune.recipe.passes import build_passes
from onnxprune.recipe.run import PruneReport, check_supported, prune_model
from onnxprune.search.plans import Plan
from onnxprune.verify.compare import Tolerances, VerifyResult, compare_models

__all__ = ["Job", "Checks", "Outcome", "run_job", "check_written", "verification_batches",
           "check_distinct_outputs"]

Progress = Callable[[int, int, str], None]
Saver = Callable[[ir.Model, Path], None]


@dataclass(frozen=True)
class Checks:
    """How the written model is verified against the input.

    The verdict is always shown; it decides the exit code only when `enforced` (the user set
    a tolerance). Otherwise the run did what was asked, and only a broken output (NaN/Inf)
    fails it. Per-token outputs are compared on real tokens (`token_mask`, by default the
    run's own token mask)."""

    tolerances: Tolerances
    data: str | os.PathLike[str] | None = None  # None: inputs generated from the signature
    providers: tuple[Provider, ...] = ("cpu",)
    shapes: dict[str, tuple[int, ...]] | None = None
    enforced: bool = True
    outputs: tuple[str, ...] | None = None
    output_kinds: dict[str, str] | None = None
    token_mask: str | None = None


@dataclass(frozen=True)
class Job:
    """One run: which model, what to do to it, where the results go."""

    model: str | os.PathLike[str]
    output: str | os.PathLike[str]
    config: PruneConfig
    checks: Checks | None = None  # None: not verified
    force: bool = False  # the output may be the input file
    copy_config: bool = False  # export folder: config.json and tokenizer files go along
    save_plan: str | os.PathLike[str] | None = None
    report: str | os.PathLike[str] | None = None  # where the CLI writes its JSON report


@dataclass
class Outcome:
    report: PruneReport
    output: Path
    verification: VerifyResult | None = None
    written: bool = True  # False: a search stayed over its budget, nothing written
    notes: list[str] = field(default_factory=list)  # the export folder's copied files
    enforced: bool = True  # the verdict gates (a tolerance was set)

    @property
    def failures(self) -> list[str]:
        """What fails the run: a missed tolerance the user set, or a broken output."""
        r = self.verification
        if r is None:
            return []
        if self.enforced:
            return r.failures
        return [f"{o.name} [{o.provider}]: {o.nonfinite} NaN/Inf values" for o in r.outputs
                if o.nonfinite]


def verification_batches(
    model: ir.Model,
    data: str | os.PathLike[str] | None,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> tuple[list[Batch], bool]:
    """The user's data, or inputs generated from the signature (second item True)."""
    if data is not None:
        return list(load_batches(data, input_specs(model))), False
    return fitting_batches(model, shapes), True


def check_written(model: ir.Model, *, load: bool = True) -> None:
    """The checks every model we write must pass: onnx.checker (full) and onnxruntime load.

    `load=False` skips the onnxruntime load for a caller that loads the model next anyway
    (verification on the CPU provider). A failure is ours (InternalError: the CLI exits 3),
    and nothing broken is ever saved.
    """
    with serialized_model(model) as data:
        try:  # the graph without its big weights; their sizes checked against their dims
            check_detached(data, data.weights)
        except OSError as e:  # the machine's, not the model's: a full disk, a file limit
            raise InputError(f"cannot check the rewritten model: {e}; nothing was "
                             "written") from e
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InternalError(
                f"the rewritten model fails onnx.checker ({first}); nothing was written. "
                "Please report this with the model's op list (onnxprune inspect)"
            ) from e
        if load:
            try:
                make_session(data, "cpu")
            except Exception as e:
                raise InternalError(
                    f"onnxruntime cannot load the rewritten model ({str(e).splitlines()[0]}); "
                    "nothing was written. Please report this with the model's op list "
                    "(onnxprune inspect)") from e


def check_distinct_outputs(paths: dict[str, str | os.PathLike[str] | None],
                           *inputs: str | os.PathLike[str]) -> None:
    """Every output path is safe to write and names a different file from the others (a
    report equal to the model's output would replace the model with JSON) and from the
    inputs. Keys are config-style names (`@output`), rendered as flags by the CLI."""
    given = [(name, p) for name, p in paths.items() if p]
    for i, (name, p) in enumerate(given):
        if name != "output":
            check_output_path(p, list(inputs))
        for other_name, other in given[:i]:
            if same_file(p, other):
                raise OptionError(f"{p}: @{name} names the same file as @{other_name}; give "
                                  "each output its own path")
            if other_name == "output" and _is_data_name(Path(p), Path(other)):
                raise OptionError(f"{p}: @{name} names a data file of the model written to "
                                  f"{other}; choose another path")


def _is_data_name(path: Path, model: Path) -> bool:
    """Whether `path` has the form save_model uses for the data of `model` (<name>[.*].data)."""
    return (same_file(path.parent, model.parent) and path.name.startswith(f"{model.name}.")
            and path.name.endswith(".data"))


def _write_input_bytes(src: str | os.PathLike[str], out: Path) -> None:
    """The input model's own file as the output (atomically): a run that changed nothing, or
    whose rewrite would be larger, writes these bytes."""
    with atomic_path(out) as tmp:
        shutil.copyfile(src, tmp)


def _run_shapes(model: ir.Model, batches: list[Batch] | None,
                config: PruneConfig) -> dict[str, list[int]] | None:
    """The input shapes FLOPs per run are counted at: the verification data's first batch, else
    the calibration data's, else the graph's own when every dimension but the first (batch,
    counted as 1) is fixed. Generated inputs are not used: their free sizes are arbitrary."""
    first: Batch | None = batches[0] if batches else None
    if first is None and isinstance(config.calibration, (str, os.PathLike)):
        first = next(iter(load_batches(config.calibration, input_specs(model))), None)
    elif first is None and config.calibration is not None:
        first = next(iter(config.calibration), None)
    if first is not None:
        return {k: list(v.shape) for k, v in first.items()}
    return fixed_input_shapes(model)


def run_job(job: Job, *, progress: Progress | None = None,
            on_plan: Callable[[Plan], None] | None = None,
            save: Saver | None = None) -> Outcome:
    """Loads, prunes, checks, verifies and saves; returns what happened for the caller to
    show. `save(model, path)` replaces the default atomic save (Olive writes its own)."""
    config = job.config
    config.check()  # validates the options before any file is touched
    if not config.planned:
        build_passes(config)  # the passes' own option checks
    if job.save_plan and not config.planned:
        raise OptionError("@save_plan records a @target search or a @plan; with fixed "
                          "options the command line itself is the recipe")
    out = check_output_path(job.output, [job.model], force=job.force)
    check_distinct_outputs({"output": out, "report": job.report, "save_plan": job.save_plan},
                           job.model)
    if job.copy_config:
        check_copy_config(job.model, out)
    model = load_model(job.model)
    check_supported(model, str(job.model))
    # With external data, verification compares against the loaded model (a clone sharing
    # its memory-mapped weights): onnxruntime given the file would map every weight again.
    reference: str | os.PathLike[str] | ir.Model = (
        model.clone() if uses_external_data(model) else job.model)
    sizes_before = layer_sizes(model) if job.copy_config else None
    checks = job.checks
    batches, generated = None, False
    on_calibration = False
    if checks is not None:  # bad verification options must fail before anything is written
        if checks.data is None and config.calibration is not None:
            # Real inputs at hand beat generated ones (random token ids judge a text model
            # wrongly); the report says they were not held out.
            batches, generated, on_calibration = config.batches(model), False, True
        else:
            batches, generated = verification_batches(model, checks.data, checks.shapes)
    shapes = _run_shapes(model, None if generated else batches, config)
    flops_before = None if shapes is None else run_flops(model, shapes)
    report = prune_model(model, config, progress, on_plan=on_plan,
                         check_batches=None if generated or on_calibration else batches)
    if flops_before is not None and report.modified:
        after = run_flops(model, shapes)
        if after is not None:
            described = describe_shapes(shapes)
            report.before = replace(report.before, run_flops=flops_before,
                                    run_shapes=described)
            report.after = replace(report.after, run_flops=after, run_shapes=described)
    outcome = Outcome(report, out)
    if report.search is not None and report.search.over_budget:
        if job.save_plan and report.plan is not None:
            report.plan.save(job.save_plan)
        outcome.written = False
        return outcome
    size_in = stored_bytes(job.model)
    report.before = replace(report.before, file_bytes=size_in)
    check_written(model, load=checks is None or "cpu" not in checks.providers)
    if checks is not None:
        # Verify the model in memory first: a run that cannot verify writes nothing.
        assert batches is not None
        outcome.enforced = checks.enforced
        if on_calibration:
            outcome.notes.append("verified on the --calibration data (the run fitted to it, "
                                 "so this is not held out); give --data for a held-out check")
        outcome.verification = compare_models(
            reference, model, batches, providers=checks.providers,
            tolerances=checks.tolerances, generated_inputs=generated,
            outputs=checks.outputs, output_kinds=checks.output_kinds,
            token_mask=checks.token_mask or report.token_mask)
    make_parent(out)
    if save is not None:
        save(model, out)
    elif config.is_default and not report.modified and not uses_external_data(model):
        _write_input_bytes(job.model, out)  # nothing changed: never larger
    else:
        save_model(model, out, keep=[] if same_file(job.model, out) else [job.model])
    size_out = stored_bytes(out)
    if size_out > size_in and save is None:
        if config.is_default and not uses_external_data(model):
            _write_input_bytes(job.model, out)
            report.notes.append(f"the rewritten model took {size_out:,} bytes, more than the "
                                f"input's {size_in:,} (recorded shapes and constants outweigh "
                                "what was removed); the input's bytes were written instead")
            report.modified, size_out = False, size_in
        else:
            report.notes.append(f"the output is {size_out - size_in:,} bytes larger than the "
                                "input: what was asked adds more (scales, zero points, int32 "
                                "biases, recorded shapes) than it removed")
    report.after = replace(report.after, file_bytes=size_out)
    if sizes_before is not None:
        outcome.notes += copy_config(job.model, out, sizes_before, layer_sizes(model))
    if job.save_plan and report.plan is not None:
        report.plan.save(job.save_plan)
    return outcome
