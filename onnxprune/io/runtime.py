"""onnxruntime sessions that run where they were asked to.

onnxruntime quietly falls back to the CPU when a provider cannot be created; a
verification that claims to have checked CUDA must actually have run on CUDA, so the
provider in use is checked after the session is built.

An in-memory model reaches onnxruntime as its graph plus its big weights as arrays
(onnxprune.io.detached): no 2 GB limit, and on the CPU no second copy of the weights (they
stay memory-mapped from the model's data file, or are the arrays the passes wrote).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxprune.errors import InputError, OnnxPruneError, ProviderError
from onnxprune.io.detached import PREPACK_LIMIT_BYTES, placeholder_folder

logger = logging.getLogger(__name__)

__all__ = ["Provider", "PROVIDERS", "parse_providers", "make_session", "ModelSource"]

Provider = Literal["cpu", "cuda"]
PROVIDERS: dict[str, str] = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
ModelSource = str | os.PathLike[str] | ir.Model | bytes

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

    def options() -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        if threads is not None:
            opts.intra_op_num_threads = threads
        if optimized_path is not None:
            opts.optimized_model_filepath = str(optimized_path)
        return opts

    providers = [wanted] if provider == "cpu" else [wanted, PROVIDERS["cpu"]]
    try:
        if isinstance(model, ir.Model):
            session = _session_from_ir(model, options, providers)
        elif isinstance(model, bytes):
            session = _session_from_bytes(model, options, providers)
        else:
            session = ort.InferenceSession(str(model), sess_options=options(),
                                           providers=providers)
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
    model: ir.Model, options: Callable[[], ort.SessionOptions], providers: list[str]
) -> ort.InferenceSession:
    from onnxprune.io.models import model_bytes  # io sits beside runtime; imported late

    data = model_bytes(model)  # checks every external reference as loading does
    return _session_from_bytes(data, options, providers)


def _session_from_bytes(
    data: bytes, options: Callable[[], ort.SessionOptions], providers: list[str]
) -> ort.InferenceSession:
    """A session on serialized bytes; ModelBytes hand their detached weights over.

    On the CPU the arrays are first shared with `add_initializer` (used in place, no copy;
    kept alive on the session object). Some of onnxruntime's graph optimizers read a
    weight's data from the graph itself (Conv and QDQ fusions, for instance): they then hit
    the empty placeholder and the session fails, so it is built again with
    `add_external_initializers`, which copies the arrays into the graph before optimizing.
    Other providers always take that second way (a weight planned on the device cannot use
    a host buffer). MatMul prepacking (a packed copy of every weight) is turned off above
    PREPACK_LIMIT_BYTES of detached weights.
    """
    weights: dict[str, np.ndarray] = getattr(data, "weights", None) or {}
    if not weights:
        opts = options()
        _resolve_external_in(opts, getattr(data, "base_dir", None))
        return ort.InferenceSession(data, sess_options=opts, providers=providers)
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in weights.values()]
    prepack = sum(a.nbytes for a in weights.values()) < PREPACK_LIMIT_BYTES
    with placeholder_folder() as folder:  # every remaining reference is a placeholder

        def configured() -> ort.SessionOptions:
            opts = options()
            _resolve_external_in(opts, folder)
            if not prepack:
                opts.add_session_config_entry("session.disable_prepacking", "1")
            return opts

        session = None
        if providers[0] == PROVIDERS["cpu"]:
            shared = configured()
            for name, value in zip(weights, values, strict=True):
                shared.add_initializer(name, value)
            try:
                session = ort.InferenceSession(data, sess_options=shared, providers=providers)
            except Exception as e:  # retried below; a real defect fails there too
                logger.debug("shared weights refused (%s); copying them in", e)
        if session is None:
            opts = configured()
            opts.add_external_initializers(list(weights), values)
            session = ort.InferenceSession(data, sess_options=opts, providers=providers)
    session._onnxprune_weights = values  # the session reads these buffers until it goes
    return session


def _resolve_external_in(opts: ort.SessionOptions, base_dir: str | None) -> None:
    """Makes onnxruntime read the external data of a model given as bytes from `base_dir`.

    Without this it resolves them against the working directory, where a file of the same
    name may hold other weights. Bytes that do not say where their data is (plain bytes)
    get a folder that does not exist, so external references fail instead of reading the
    working directory.
    """
    folder = base_dir if base_dir is not None else os.path.join(os.sep, "nonexistent-onnxprune")
    opts.add_session_config_entry(_EXTERNAL_FOLDER_KEY, str(folder))
