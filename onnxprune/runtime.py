"""onnxruntime sessions that run where they were asked to.

onnxruntime quietly falls back to the CPU when a provider cannot be created; a
verification that claims to have checked CUDA must actually have run on CUDA, so the
provider in use is checked after the session is built.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import onnx_ir as ir
import onnxruntime as ort

from onnxprune.errors import InputError, OnnxPruneError, ProviderError

__all__ = ["Provider", "PROVIDERS", "parse_providers", "make_session", "ModelSource"]

Provider = Literal["cpu", "cuda"]
PROVIDERS: dict[str, str] = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
ModelSource = str | os.PathLike[str] | ir.Model | bytes

_PROTO_LIMIT = 2**31 - 2**20
_EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def parse_providers(text: str | Sequence[str]) -> list[Provider]:
    names = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text)]
    out: list[Provider] = []
    for name in names:
        if name not in PROVIDERS:
            raise InputError(
                f"unknown provider '{name}'; choose from {', '.join(PROVIDERS)} (e.g. cpu,cuda)"
            )
        out.append(name)  # type: ignore[arg-type]
    if not out:
        raise InputError("no provider given; use e.g. --providers cpu")
    for name in out:
        require_provider(name)
    return out


def require_provider(provider: Provider) -> None:
    """Fails unless this onnxruntime build offers `provider` at all."""
    wanted = PROVIDERS[provider]
    if wanted not in ort.get_available_providers():
        raise ProviderError(
            f"provider '{provider}' is not available in this onnxruntime "
            f"(available: {', '.join(ort.get_available_providers())}); "
            "install onnxruntime-gpu and check the CUDA libraries"
        )


def make_session(
    model: ModelSource,
    provider: Provider = "cpu",
    *,
    threads: int | None = None,
    optimized_path: str | os.PathLike[str] | None = None,
) -> ort.InferenceSession:
    """Builds a session on `provider` and fails if onnxruntime would use another one."""
    if provider not in PROVIDERS:
        raise InputError(f"unknown provider '{provider}'; choose from {', '.join(PROVIDERS)}")
    require_provider(provider)
    wanted = PROVIDERS[provider]
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    if threads is not None:
        opts.intra_op_num_threads = threads
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    providers = [wanted] if provider == "cpu" else [wanted, PROVIDERS["cpu"]]
    try:
        if isinstance(model, ir.Model):
            session = _session_from_ir(model, opts, providers)
        elif isinstance(model, bytes):
            _resolve_external_in(opts, getattr(model, "base_dir", None))
            session = ort.InferenceSession(model, sess_options=opts, providers=providers)
        else:
            session = ort.InferenceSession(str(model), sess_options=opts, providers=providers)
    except (ProviderError, InputError):
        raise
    except Exception as e:  # onnxruntime raises several unrelated exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxPruneError(f"onnxruntime cannot load the model: {first}") from e
    if wanted not in session.get_providers():
        raise ProviderError(
            f"onnxruntime fell back to {', '.join(session.get_providers())} instead of "
            f"'{provider}'; check the CUDA/cuDNN installation"
        )
    return session


def _session_from_ir(
    model: ir.Model, opts: ort.SessionOptions, providers: list[str]
) -> ort.InferenceSession:
    from onnxprune.io import model_bytes  # io sits beside runtime; imported late

    data = model_bytes(model)  # checks every external reference as loading does
    _resolve_external_in(opts, data.base_dir)
    return ort.InferenceSession(data, sess_options=opts, providers=providers)


def _resolve_external_in(opts: ort.SessionOptions, base_dir: str | None) -> None:
    """Makes onnxruntime read the external data of a model given as bytes from `base_dir`.

    Without this it resolves them against the working directory, where a file of the same
    name may hold other weights. Bytes that do not say where their data is (plain bytes)
    get a folder that does not exist, so external references fail instead of reading the
    working directory.
    """
    folder = base_dir if base_dir is not None else os.path.join(os.sep, "nonexistent-onnxprune")
    opts.add_session_config_entry(_EXTERNAL_FOLDER_KEY, str(folder))
