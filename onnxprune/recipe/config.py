"""The one typed configuration of a pruning run, shared by the CLI, the API, Olive and plans.

Its fields are the options: the CLI's option table names them as its `dest`s and builds the
config from the parsed namespace (`from_options`), the API takes them as keywords, Olive reads
them from its pass config. `check()` is the one place options are validated; its messages
name the fields (`@max_drop`), which the CLI renders as its flags.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar

import onnx_ir as ir

from onnxprune.calibration.calibration import Reconstruct
from onnxprune.calibration.data import Batch, input_specs, load_batches
from onnxprune.calibration.propagate import SECTION_ABOVE_BYTES, weight_bytes
from onnxprune.errors import OptionError
from onnxprune.io.runtime import Provider
from onnxprune.quant.config import QuantizeConfig
from onnxprune.search.plans import Plan
from onnxprune.search.quality import BUILTIN_METRICS, BuiltinMetric, UserMetric, load_user_metric
from onnxprune.search.search import Target

__all__ = ["PruneConfig", "from_options", "check_metric", "chosen_metric"]

C = TypeVar("C")


def from_options(cls: type[C], options: Mapping[str, Any], **computed: Any) -> C:
    """A config dataclass from a mapping of options named by its fields (an argparse
    namespace's vars, Olive's pass config): options that are not fields are left out, lists
    become tuples, and `computed` values win."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    values = {k: tuple(v) if isinstance(v, list) else v
              for k, v in options.items() if k in names}
    return cls(**{**values, **computed})


@dataclass(frozen=True)
class PruneConfig:
    """What to do to a model. Structured removal and unstructured zeroing may be combined."""

    sparsity: float | None = None
    mode: Literal["structured", "unstructured"] = "structured"
    threshold: float | None = None
    nm: tuple[int, int] | None = None
    criterion: str | None = None
    calibration: str | os.PathLike[str] | Sequence[Batch] | None = None
    token_mask: str | None = None
    reconstruct: Reconstruct | Literal["distill"] | None = None
    ridge: float | None = None  # None: per layer, by cross-validation on the batches
    repair_seconds: float | None = None  # time budget of the distillation repair
    repair_steps: int | None = None  # optimiser steps per block of the distillation repair
    calibration_provider: Provider = "cpu"  # where calibration batches run
    repair_augment: int | None = None  # edited copies of the calibration sentences (distill)
    global_ranking: bool = False
    max_group_sparsity: float = 0.9
    round_to: int | Literal["auto"] = 1  # auto: counts the latency table says run fastest
    ignore: tuple[str, ...] = ()
    seed: int = 0
    heads: float | None = None  # fraction of attention heads removed (per block, or global)
    global_heads: bool = False
    max_block_heads: float = 0.75  # cap per block with global_heads
    quantize: QuantizeConfig | None = None  # 8-bit QDQ after pruning
    # Target search (instead of sparsity/heads): e.g. target="flops=0.75", max_drop=0.02.
    target: str | None = None
    max_drop: float | None = None  # default 0.01
    metric: str | None = None  # cosine (default), sqnr, top1
    eval: str | Callable[[object], float] | None = None  # user metric: module:function
    holdout: str | os.PathLike[str] | Sequence[Batch] | None = None
    plan: str | os.PathLike[str] | Plan | None = None  # reapply a saved plan

    def holdout_batches(self, model: ir.Model) -> list[Batch] | None:
        """The held-out batches given (None: the search holds out calibration batches)."""
        if isinstance(self.holdout, (str, os.PathLike)):
            return list(load_batches(self.holdout, input_specs(model)))
        return None if self.holdout is None else list(self.holdout)

    @property
    def fixed(self) -> list[str]:
        """The fixed pruning options given (field names): how much to remove, stated."""
        return [n for n in ("sparsity", "heads", "threshold", "nm") if getattr(self, n) is not None]

    @property
    def planned(self) -> bool:
        """A target search or a saved plan decides what is removed."""
        return self.target is not None or self.plan is not None

    @property
    def is_default(self) -> bool:
        """No pruning option given: the default recipe (see prune_model)."""
        return all(v is None for v in (self.sparsity, self.threshold, self.nm, self.heads,
                                       self.quantize, self.target, self.plan))

    def distills(self, model: ir.Model | None) -> bool:
        """Whether --sparsity with data ends with the distillation repair: asked for, or by
        default on a model with less than SECTION_ABOVE_BYTES of weights (a bigger one is
        calibrated section by section to stay near its own size in memory, and the default
        step budget would not serve its blocks anyway)."""
        if self.reconstruct is not None:
            return self.reconstruct == "distill"
        return model is not None and weight_bytes(model) < SECTION_ABOVE_BYTES


    @property
    def repair_tuning(self) -> str | None:
        """The first distillation option given, if any (its field name)."""
        return next((n for n in ("repair_seconds", "repair_steps", "repair_augment")
                     if getattr(self, n) is not None), None)

    @property
    def searches(self) -> bool:
        """A target search runs: asked for, or the default recipe with data."""
        return self.target is not None or self.is_default and self.calibration is not None

    def check(self) -> None:
        """Refuses bad values and contradictory combinations, before any file is touched."""
        fixed = self.fixed
        search_only = [n for n in ("max_drop", "metric", "eval", "holdout")
                       if getattr(self, n) is not None]
        if self.target is not None and self.plan is not None:
            raise OptionError("@target searches for a plan and @plan applies one: give one")
        if self.target is not None:
            Target.parse(self.target)
            if fixed:
                raise OptionError(f"@target decides how much to prune; drop @{fixed[0]}")
            if self.calibration is None:
                raise OptionError("@target needs @calibration data to measure quality")
            if self.quantize is not None:
                raise OptionError("@target with @quantize: the quality budget would not "
                                  "cover quantization; quantize the result afterwards")
        elif search_only and not (self.is_default and self.calibration is not None):
            raise OptionError(f"@{search_only[0]} only applies to a @target search (or to "
                              "@calibration given alone)")
        if self.searches:
            check_metric(self.metric, self.eval)
            if self.max_drop is not None and self.max_drop < 0:
                raise OptionError(f"@max_drop must be >= 0, got {self.max_drop}")
        tuning = self.repair_tuning
        if self.searches and tuning and self.reconstruct != "distill":
            raise OptionError(f"@{tuning} tunes the distillation repair; a search "
                              "distils only with @reconstruct distill")
        if self.plan is not None and (fixed or self.criterion is not None):
            raise OptionError(f"@plan decides what to prune; drop @{(fixed or ['criterion'])[0]}")
        if self.reconstruct not in (None, "none") and self.calibration is None:
            raise OptionError(f"@reconstruct {self.reconstruct} needs @calibration data")
        for name, ok, rule in (("ridge", lambda v: v >= 0, ">= 0"),
                               ("repair_seconds", lambda v: v > 0, "> 0"),
                               ("repair_steps", lambda v: v >= 1, ">= 1"),
                               ("repair_augment", lambda v: v >= 0, ">= 0")):
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise OptionError(f"@{name} must be {rule}, got {value}")
        if tuning is not None and self.reconstruct not in (None, "distill"):
            raise OptionError(f"@{tuning} tunes the distillation repair; it does not apply to "
                              f"@reconstruct {self.reconstruct}")

    def batches(self, model: ir.Model) -> list[Batch] | None:
        """The calibration batches, checked against the model's inputs."""
        if self.calibration is None:
            return None
        if isinstance(self.calibration, (str, os.PathLike)):
            return list(load_batches(self.calibration, input_specs(model)))
        return list(self.calibration)


def check_metric(metric: str | None, eval: object) -> None:
    if metric is not None and eval is not None:
        raise OptionError("give @metric or @eval, not both")
    if metric is not None and metric not in BUILTIN_METRICS:
        raise OptionError(f"@metric '{metric}': choose from {', '.join(BUILTIN_METRICS)}")


def chosen_metric(metric: str | None, eval: str | Callable[[object], float] | None
                  ) -> BuiltinMetric | UserMetric:
    """The quality measure chosen (checked by check_metric): cosine unless told."""
    if isinstance(eval, str):
        return load_user_metric(eval)
    return eval or metric or "cosine"  # type: ignore[return-value]
