"""The command line's options: one parser per command, each option's dest named after the
config field it sets (recipe/config.py), so a namespace becomes a config with no hand copy."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from onnxprune.calibration.data import parse_shape_overrides
from onnxprune.calibration.images import PRESETS
from onnxprune.calibration.raw import DEFAULT_BATCH_SIZE, DEFAULT_MAX_LENGTH, DataSource
from onnxprune.channels.criteria import CRITERIA
from onnxprune.errors import InputError
from onnxprune.io.runtime import Provider, parse_providers
from onnxprune.quant.config import QuantizeConfig
from onnxprune.recipe.config import PruneConfig, from_options
from onnxprune.repair.reconstruct import DEFAULT_RIDGE
from onnxprune.search.search import DEFAULT_MAX_DROP
from onnxprune.verify.compare import Tolerances
from onnxprune.verify.kinds import KINDS


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other error
        raise InputError(f"{message} (see {self.prog} --help)")

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        ns, rest = super().parse_known_args(args, namespace)
        return _data_sources(ns), rest


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


def _round_to(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a positive integer nor auto")
    return value


def _nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not N:M, e.g. 2:4") from None
    if not 0 < n < m:
        raise argparse.ArgumentTypeError(f"'{text}': need 0 < N < M")
    return n, m


DATA_PATHS = ("calibration", "data", "holdout")  # the options that name data


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v


def _add_data_options(p: argparse.ArgumentParser) -> None:
    """How text and image data (--calibration/--data/--holdout) are read. The dests are the
    fields of calibration.raw.DataSource, which carries them with each data path."""
    g = p.add_argument_group("text and image data (a .txt/.jsonl file or a folder of images "
                             "instead of .npz batches)")
    g.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer.json, or a folder holding one (default: the one beside "
                   "the model); needs pip install 'onnxprune[text]'")
    g.add_argument("--text-field", metavar="NAME",
                   help=".jsonl data: the field holding the text (default text)")
    g.add_argument("--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE, metavar="N",
                   help=f"examples per batch (default {DEFAULT_BATCH_SIZE})")
    g.add_argument("--max-length", type=_positive, default=DEFAULT_MAX_LENGTH, metavar="N",
                   help=f"tokens per example; longer ones are cut (default "
                   f"{DEFAULT_MAX_LENGTH})")
    g.add_argument("--image-preset", choices=tuple(PRESETS),
                   help="scaling after 0..1: imagenet mean/std (default for 3 channels), "
                   "none (default for 1 channel), minus1to1; needs pip install "
                   "'onnxprune[image]'")


def _data_sources(ns: argparse.Namespace) -> argparse.Namespace:
    """Each data path given becomes a DataSource carrying the data options and the model's
    folder (where a tokenizer.json may sit); .npz data reads as before."""
    if not hasattr(ns, "batch_size"):
        return ns
    model = getattr(ns, "model", None) or next(iter(getattr(ns, "models", None) or []), None)
    shapes = tuple(parse_shape_overrides(getattr(ns, "shape", None) or []).items())
    for dest in DATA_PATHS:
        path = getattr(ns, dest, None)
        if isinstance(path, str):
            setattr(ns, dest, DataSource(
                path, tokenizer=ns.tokenizer, text_field=ns.text_field,
                model_dir=str(Path(model).parent) if model else None,
                batch_size=ns.batch_size, max_length=ns.max_length,
                image_preset=ns.image_preset, shapes=shapes))
    return ns


def _add_verify_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("verification")
    g.add_argument("--data", help=".npz batch or folder of .npz batches keyed by input name, "
                   "a .txt/.jsonl text file, or a folder of images")
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
    g.add_argument("--min-top5", type=float, help="fail below this top-5 overlap")
    g.add_argument("--max-kl", type=float, help="fail above this mean KL of the class scores")
    g.add_argument("--min-exact", type=float, help="fail below this exact-match rate "
                   "(integer outputs)")
    g.add_argument("--output-kind", action="append", default=[], metavar="NAME=KIND",
                   dest="output_kinds", type=_output_kind,
                   help="what an output is, instead of what the graph says (repeatable): "
                   f"{', '.join(KINDS)}")
    g.add_argument("--outputs", type=_names, metavar="NAME,NAME,...",
                   help="check only these outputs (default: every output)")
    g.add_argument("--top1", action="store_true",
                   help="report top-1 agreement for every output, not only class scores")
    g.add_argument("--report", help="write a JSON report to this file")


TOLERANCE_OPTIONS = ("min_cosine", "atol", "rtol", "min_sqnr", "min_top1", "min_top5", "max_kl",
                     "min_exact")


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _output_kind(text: str) -> tuple[str, str]:
    name, sep, kind = text.rpartition("=")
    if not sep or not name or kind not in KINDS:
        raise argparse.ArgumentTypeError(f"'{text}': give NAME=KIND with KIND one of "
                                         f"{', '.join(KINDS)}")
    return name, kind


def tolerances_given(args: argparse.Namespace) -> bool:
    return any(getattr(args, k) is not None for k in TOLERANCE_OPTIONS)


def tolerances(args: argparse.Namespace) -> Tolerances:
    """The same rule as onnxprune.verify(): none given means Tolerances.defaults()."""
    return Tolerances.from_options(
        min_cosine=args.min_cosine, atol=args.atol, rtol=args.rtol,
        min_sqnr_db=args.min_sqnr, min_top1=args.min_top1, top1=True if args.top1 else None,
        min_top5=args.min_top5, max_kl=args.max_kl, min_exact=args.min_exact,
    )


MAIN_DESCRIPTION = (
    "Prune (and/or quantize) an ONNX model without retraining, save it, and verify it. Other "
    "commands: onnxprune verify REFERENCE CANDIDATE; onnxprune inspect MODEL; onnxprune "
    "quantize MODEL -o OUT --calibration DATA; onnxprune analyze MODEL --calibration DATA.")
QUANTIZE_DESCRIPTION = (
    "8-bit QDQ quantization: int8 per-channel weights, calibrated 8-bit activations (needs "
    "--calibration; --weight-only needs none). The same options as the main command, which "
    "runs after any pruning option given; then saved and verified.")


def quantize_parser() -> argparse.ArgumentParser:
    return main_parser("onnxprune quantize", QUANTIZE_DESCRIPTION)


def main_parser(prog: str = "onnxprune", description: str = MAIN_DESCRIPTION
                ) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=description)
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
                   help=".npz batch or folder of .npz batches for data-aware pruning, a "
                   ".txt/.jsonl text file (one example a line), or a folder of images")
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
    g.add_argument("--round-to", type=_round_to, default=1, metavar="N|auto",
                   help="keep counts a multiple of N; auto: from the count asked up to the "
                   "next multiple of 16, the count this CPU's kernels run fastest (a table "
                   "timed once per machine, cached in $ONNXPRUNE_CACHE or ~/.cache/onnxprune)")
    g.add_argument("--ignore", action="append", default=[], metavar="GLOB",
                   help="node names to leave alone (repeatable)")
    g.add_argument("--heads", type=_fraction, metavar="F",
                   help="fraction of attention heads to remove from each block")
    g.add_argument("--global-heads", action="store_true",
                   help="rank heads across blocks (the default with --calibration; each keeps "
                   "at least 25 %%)")
    g.add_argument("--max-block-heads", type=_fraction, default=0.75, metavar="F",
                   help="with heads ranked across blocks: the largest fraction any one block "
                   "may lose (default 0.75)")
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
    _add_data_options(p)
    _add_budget_option(p)
    return p


def _add_budget_option(p: argparse.ArgumentParser) -> None:
    # Read (and removed from argv) by main(), which applies it to every command.
    p.add_argument("--max-calibration-bytes", type=int, metavar="N",
                   help="memory budget for calibration/verification arrays, checked from the "
                   "file headers before decompressing (default: a quarter of RAM)")


def take_budget(argv: list[str]) -> tuple[list[str], int | None]:
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
    g.add_argument("--calibration-method", dest="method",
                   choices=("minmax", "percentile", "entropy"),
                   default="percentile", help="activation ranges (default percentile 99.99)")
    g.add_argument("--activation-dtype", choices=("uint8", "int8"), default="uint8")
    g.add_argument("--quant-format", choices=("qdq", "operator"), default="qdq", help="qdq "
                   "(portable) or operator: MatMulIntegerToFloat + bias (onnxruntime, faster)")
    g.add_argument("--weight-only", action="store_true",
                   help="int8 weights behind DequantizeLinear, float activations (no data needed)")
    g.add_argument("--quantize-ops", dest="ops", type=_ops, default=("MatMul", "Gemm", "Conv"),
                   metavar="OPS",
                   help="comma list of ops to quantize (default MatMul,Gemm,Conv)")
    g.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="node/weight/tensor names to keep in float (repeatable)")
    g.add_argument("--max-float-layers", type=int, metavar="N",
                   help="keep up to N layers with the worst measured error in float")
    g.add_argument("--smooth", type=_smooth, default="auto", metavar="auto|ALPHA|none",
                   help="SmoothQuant-style scale migration (default auto: per tensor, where it "
                   "halves the error)")


def calibration_provider(args: argparse.Namespace) -> Provider:
    """Where calibration runs: CUDA when --providers names it (checked to exist), else CPU."""
    return "cuda" if "cuda" in parse_providers(args.providers) else "cpu"


def _ops(text: str) -> tuple[str, ...]:
    return tuple(o.strip() for o in text.split(",") if o.strip())


def _smooth(text: str) -> float | str | None:
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': use auto, none or a number") from None


def prune_config(args: argparse.Namespace) -> PruneConfig:
    """The run's config, read off the namespace: every option's dest is a config field."""
    provider = calibration_provider(args)
    quantize = None
    if args.quantize is not None:
        quantize = from_options(QuantizeConfig, vars(args), provider=provider)
    return from_options(PruneConfig, vars(args), calibration_provider=provider,
                        quantize=quantize)


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Config field (an option's dest) -> the flag that sets it, for error messages."""
    names = {a.dest: max(a.option_strings, key=len) for a in parser._actions
             if a.option_strings}
    return {**names, "output": "-o", "calibration_provider": "--providers"}


def verify_parser() -> argparse.ArgumentParser:
    p = Parser(prog="onnxprune verify",
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
    p.add_argument("--token-mask", metavar="INPUT",
                   help="integer [batch, seq] input whose zeros mark padding: per-token "
                   "outputs are compared on real tokens only")
    p.add_argument("-q", "--quiet", action="store_true")
    _add_verify_options(p)
    _add_data_options(p)
    _add_budget_option(p)
    return p


def inspect_parser() -> argparse.ArgumentParser:
    p = Parser(prog="onnxprune inspect", description="What is prunable, and why not.")
    p.add_argument("model")
    p.add_argument("--report", help="write the inspection as JSON")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def analyze_parser() -> argparse.ArgumentParser:
    p = Parser(prog="onnxprune analyze",
                description="Sensitivity of every prunable group and attention block: the "
                "quality drop when it alone is pruned (with repair) at several sparsities.")
    p.add_argument("model")
    p.add_argument("--calibration", required=True, metavar="PATH",
                   help=".npz batch or folder of .npz batches, a .txt/.jsonl text file, or a "
                   "folder of images")
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
    _add_data_options(p)
    _add_budget_option(p)
    return p




PARSERS = {"prune": main_parser, "quantize": quantize_parser, "verify": verify_parser,
           "inspect": inspect_parser, "analyze": analyze_parser}
