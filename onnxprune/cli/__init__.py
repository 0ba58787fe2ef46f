"""Command line: argument parsing, printing, exit codes; nothing else.

Exit codes: 0 ok, 1 a tolerance or budget the user set was missed or the output is broken,
2 bad input or usage, 3 internal error, 130 interrupted. Errors are one line on stderr;
ONNXPRUNE_DEBUG=1 shows tracebacks. Options live in cli/options.py, commands in
cli/commands.py, tables in cli/report.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
from rich.console import Console

from onnxprune.calibration.data import data_budget
from onnxprune.cli import options
from onnxprune.cli.commands import COMMANDS, EXIT_INTERNAL, EXIT_USAGE, prune
from onnxprune.errors import InternalError, OnnxPruneError, OptionError

__all__ = ["main"]


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
    try:
        argv, budget = options.take_budget(argv)
        with _sigterm_as_exception(), _quiet_libraries(), data_budget(budget):
            if argv and argv[0] in COMMANDS:
                return COMMANDS[argv[0]](argv[1:], console)
            return prune(argv, console)
    except InternalError as e:
        print(f"onnxprune: internal error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_INTERNAL
    except OptionError as e:
        command = argv[0] if argv and argv[0] in COMMANDS else "prune"
        flags = options.flag_names(options.PARSERS[command]())
        message = e.render(lambda field: flags.get(field, field))
        print(f"onnxprune: error: {_one_line(message)}", file=sys.stderr)
        return EXIT_USAGE
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
