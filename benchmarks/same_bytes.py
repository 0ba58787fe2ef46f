"""Hash the model files that four fixed onnxprune commands write, to prove two trees alike.

Run it once on a frozen copy of the code before a change and once on the changed tree; the
``files`` sections of the two ``hashes.json`` must be equal (exit codes too)::

    python benchmarks/same_bytes.py --tree /work/baseline --out build/baseline_hashes
    python benchmarks/same_bytes.py --tree . --out build/after_hashes

``--tree`` is the source tree to run: it is put first on PYTHONPATH and is the working
directory of every command, so ``python -m onnxprune`` imports that tree's package even when
another checkout is pip-installed (each run records which ``onnxprune/__init__.py`` it
imported).  The MiniLM commands read ``BUILD/minilm_legacy.onnx``,
``BUILD/minilm_dynamo.onnx`` and ``BUILD/calib_256`` (``--build``; made by
``benchmarks/export_minilm.py --out-dir build/`` and ``benchmarks/textdata.py --calib-dir
build/calib_256 --calib-n 256``).

The commands:

* ``digits_default``: ``onnxprune models/digits_mlp.onnx -o OUT/digits_default.onnx``
* ``digits_small``: the README quick start (``--sparsity 0.5`` with digits calibration/data)
* ``minilm_p50``: ``BUILD/minilm_legacy.onnx --sparsity 0.5 --calibration BUILD/calib_256
  --no-verify``
* ``minilm_int8``: ``quantize BUILD/minilm_dynamo.onnx --calibration BUILD/calib_256
  --no-verify``

Each command's output files (``OUT/NAME.onnx`` and any ``OUT/NAME*.data`` beside it) are
removed before it runs, so a failing command leaves no stale hash; a nonzero exit is recorded
and the next command still runs.  Each command's stdout+stderr goes to ``OUT/NAME.log``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_BUILD = Path(__file__).resolve().parent.parent / "build"


def commands(build: Path, out: Path) -> dict[str, list[str]]:
    """Name -> onnxprune argv (after ``python -m onnxprune``), relative to the tree's root."""
    calib = str(build / "calib_256")
    return {
        "digits_default": ["models/digits_mlp.onnx", "-o", str(out / "digits_default.onnx")],
        "digits_small": [
            "models/digits_mlp.onnx", "-o", str(out / "digits_small.onnx"),
            "--sparsity", "0.5", "--calibration", "models/digits_calib.npz",
            "--data", "models/digits_test.npz",
        ],
        "minilm_p50": [
            str(build / "minilm_legacy.onnx"), "-o", str(out / "minilm_p50.onnx"),
            "--sparsity", "0.5", "--calibration", calib, "--no-verify",
        ],
        "minilm_int8": [
            "quantize", str(build / "minilm_dynamo.onnx"), "-o", str(out / "minilm_int8.onnx"),
            "--calibration", calib, "--no-verify",
        ],
    }


def model_files(out: Path, name: str) -> list[Path]:
    """``NAME.onnx`` and the external-data files written beside it."""
    return sorted(
        p for p in out.iterdir()
        if p.is_file() and p.name.startswith(name) and (p.suffix in (".onnx", ".data"))
        and (p.name == f"{name}.onnx" or p.name.startswith((f"{name}.", f"{name}_")))
    )


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, required=True, help="source tree to run (PYTHONPATH, cwd)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the models and hashes.json")
    ap.add_argument("--build", type=Path, default=DEFAULT_BUILD,
                    help=f"MiniLM exports and calib_256 (default {DEFAULT_BUILD})")
    ap.add_argument("--only", default="", help="comma list of command names (default: all)")
    ap.add_argument("--python", default=sys.executable, help="interpreter to run")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per command")
    opts = ap.parse_args(argv)

    tree = opts.tree.resolve()
    out = opts.out.resolve()
    build = opts.build.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tree), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])

    probe = subprocess.run(
        [opts.python, "-c", "import onnxprune; print(onnxprune.__file__)"],
        cwd=tree, env=env, capture_output=True, text=True)
    imported = probe.stdout.strip()
    print(f"onnxprune imported from {imported or probe.stderr.strip()}")
    if not imported.startswith(str(tree) + os.sep):
        print(f"error: onnxprune does not resolve to {tree}", file=sys.stderr)
        return 2
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--", "onnxprune"],
                           capture_output=True, text=True).stdout.strip() != ""

    wanted = [n for n in opts.only.split(",") if n]
    cmds = commands(build, out)
    unknown = set(wanted) - set(cmds)
    if unknown:
        ap.error(f"unknown command names: {sorted(unknown)} (known: {list(cmds)})")
    results: dict[str, dict] = {}
    for name, args in cmds.items():
        if wanted and name not in wanted:
            continue
        for stale in model_files(out, name):
            stale.unlink()
        argv_full = [opts.python, "-m", "onnxprune", *args]
        print(f"\n[{name}] $ {' '.join(argv_full)}", flush=True)
        start = time.perf_counter()
        with (out / f"{name}.log").open("w") as log:
            try:
                rc = subprocess.run(argv_full, cwd=tree, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, timeout=opts.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        seconds = round(time.perf_counter() - start, 1)
        files = {p.name: sha256(p) for p in model_files(out, name)}
        print(f"[{name}] exit {rc}, {seconds} s")
        for file, digest in files.items():
            print(f"  {digest}  {file}")
        if not files:
            print("  (no model file written)")
        results[name] = {"command": ["python", "-m", "onnxprune", *args], "exit_code": rc,
                         "seconds": seconds, "files": files}

    report = {"tree": str(tree), "commit": head, "onnxprune_dirty": dirty,
              "onnxprune_imported_from": imported, "python": opts.python,
              "results": results}
    path = out / "hashes.json"
    if wanted and path.exists():  # keep the other commands' entries from an earlier run
        old = json.loads(path.read_text())
        report["results"] = {**old.get("results", {}), **results}
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
