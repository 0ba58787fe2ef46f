"""How fast this machine runs a Conv / Gemm / MatMul at a given channel count.

onnxruntime's CPU kernels do not slow down in proportion to channels: with AVX-512 its NCHWc
Conv layout works in blocks of 16 channels, and a Conv whose channel counts are not
multiples of the block falls back to the plain NCHW path (im2col + GEMM), with layout
reorders around it. ResNet-50 pruned by 30 % (64 -> 45 channels) ran 36 of its 53 Convs
that way, 1.39x faster for 2x fewer FLOPs. So the channel counts are chosen by measuring:

* `OpShape`: one op's signature (op type, in/out channels, kernel, strides, group,
  input spatial size or rows).
* `LatencyTable`: ms per run of a one-node model of that signature, timed once (1 thread,
  onnxruntime's kernel time, median of a few runs) and cached in a JSON file per machine and
  onnxruntime version: $ONNXPRUNE_CACHE or ~/.cache/onnxprune/latency-<cpu>-ort<ver>.json.
  The timer is injectable (unit tests use a formula).

channels/latency_counts.py uses the table to pick each group's kept count.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

__all__ = ["OpShape", "LatencyTable", "cache_path", "time_op"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpShape:
    """One op as the table times it. Conv: `spatial` is the input's (H, W), weights
    [cout, cin / group, *kernel]; Gemm / MatMul: `spatial` is (rows,), weight [cin, cout]."""

    op: str
    cin: int
    cout: int
    spatial: tuple[int, ...]
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    group: int = 1

    @property
    def depthwise(self) -> bool:
        return self.op == "Conv" and self.group > 1 and self.group == self.cin == self.cout

    def with_channels(self, cin: int | None = None, cout: int | None = None) -> OpShape:
        """The same op with other channel counts (a depthwise Conv's group follows)."""
        cin = self.cin if cin is None else cin
        cout = self.cout if cout is None else cout
        group = self.group
        if self.depthwise:
            group = cin = cout = min(cin, cout)
        return replace(self, cin=cin, cout=cout, group=group)

    def key(self) -> str:
        parts = [self.op, f"i{self.cin}", f"o{self.cout}",
                 "s" + "x".join(map(str, self.spatial))]
        if self.op == "Conv":
            parts += ["k" + "x".join(map(str, self.kernel)),
                      "st" + "x".join(map(str, self.strides)),
                      "p" + "x".join(map(str, self.pads)),
                      "d" + "x".join(map(str, self.dilations)), f"g{self.group}"]
        return "|".join(parts)


def _model(op: OpShape) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if op.op == "Conv":
        w = rng.standard_normal((op.cout, op.cin // op.group, *op.kernel)).astype(np.float32)
        x_shape = [1, op.cin, *op.spatial]
        attrs = {"kernel_shape": list(op.kernel), "strides": list(op.strides),
                 "pads": list(op.pads), "dilations": list(op.dilations), "group": op.group}
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)
    elif op.op == "Gemm":
        w = rng.standard_normal((op.cout, op.cin)).astype(np.float32)
        x_shape = [op.spatial[0], op.cin]
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
    else:
        w = rng.standard_normal((op.cin, op.cout)).astype(np.float32)
        x_shape = [op.spatial[0], op.cin]
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
    inits = [numpy_helper.from_array(w, "w")]
    if op.op != "MatMul":
        inits.append(numpy_helper.from_array(np.zeros(op.cout, np.float32), "b"))
    graph = helper.make_graph(
        [node], "op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model).SerializeToString()


def time_op(op: OpShape, runs: int = 7) -> float:
    """ms per run of `op` alone: onnxruntime's kernel time (1 thread), median of `runs`.

    Layout reorders (NCHWc ReorderInput / ReorderOutput) are left out: inside a network of
    blocked Convs they are not paid, and a Conv that falls out of the blocked layout pays
    them in the network, which the plain-layout penalty below stands for."""
    import onnxruntime as ort

    x_shape = [1, op.cin, *op.spatial] if op.op == "Conv" else [op.spatial[0], op.cin]
    x = np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(d, "p")
        s = ort.InferenceSession(_model(op), so, providers=["CPUExecutionProvider"])
        for _ in range(2 + runs):
            s.run(None, {"x": x})
        events = json.loads(Path(s.end_profiling()).read_text())
    compute: list[float] = []
    reorder: list[float] = []
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        name = e["args"]["op_name"]
        if name.startswith("Reorder"):
            reorder.append(e["dur"])
        else:
            compute.append(e["dur"])
    per_run = max(len(compute) // (2 + runs), 1)
    runs_us = [sum(compute[i:i + per_run]) for i in range(0, len(compute), per_run)][2:]
    ms = statistics.median(runs_us) / 1000 if runs_us else float("nan")
    if op.op == "Conv" and not reorder:
        # Plain layout inside a blocked network: the tensors are reordered out of and back
        # into blocks around this Conv. Estimated as one read + write of input and output
        # at ~10 GB/s (ResNet-50 at 45 channels: 0.87 ms of reorders over 36 Convs).
        n = op.cin * int(np.prod(op.spatial)) + op.cout * int(np.prod(
            [max(s // st, 1) for s, st in zip(op.spatial, op.strides or (1,) * len(op.spatial),
                                              strict=True)]))
        ms += 2 * 4 * n / 10e9 * 1000
    return ms


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:60] or "cpu"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_path() -> Path:
    """The table's file for this machine and onnxruntime version."""
    import onnxruntime as ort

    folder = os.environ.get("ONNXPRUNE_CACHE") or str(Path.home() / ".cache" / "onnxprune")
    return Path(folder) / f"latency-{_slug(_cpu_name())}-ort{ort.__version__}.json"


class LatencyTable:
    """ms per run of each op signature, measured on demand and cached.

    `timer`: how one signature is timed (default `time_op`); `path`: the JSON cache (None:
    memory only). `ms` measures what the cache lacks; `save` writes the file when new
    entries were measured."""

    def __init__(self, path: Path | str | None = None,
                 timer: Callable[[OpShape], float] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.timer = timer or time_op
        self.entries: dict[str, float] = {}
        self.measured = 0
        self._dirty = False
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self.entries = {str(k): float(v) for k, v in data.get("entries", {}).items()}
            except (OSError, ValueError, AttributeError):
                logger.warning("latency cache %s unreadable; measuring again", self.path)

    @classmethod
    def default(cls) -> LatencyTable:
        return cls(cache_path())

    def ms(self, op: OpShape) -> float:
        key = op.key()
        if key not in self.entries:
            self.entries[key] = float(self.timer(op))
            self.measured += 1
            self._dirty = True
        return self.entries[key]

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"cpu": _cpu_name(), "entries": self.entries},
                                      indent=0, sort_keys=True))
            tmp.replace(self.path)
            self._dirty = False
        except OSError as e:
            logger.warning("could not write the latency cache %s: %s", self.path, e)
