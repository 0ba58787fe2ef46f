"""What `onnxprune quantize` is asked to do: the options of an 8-bit QDQ run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from onnxprune.errors import InputError
from onnxprune.io.runtime import Provider
from onnxprune.quant.insert_qdq import EmbeddingLayout
from onnxprune.quant.qerror import ActDtype, Method

__all__ = ["QuantizeConfig", "AUTO_ALPHAS"]

_OPS = ("MatMul", "Gemm", "Conv")
# SmoothQuant strengths tried per tensor with smooth="auto". On MiniLM the best ones are
# high (0.8-0.9): the weights' per-channel scales absorb the outlier channels well.
AUTO_ALPHAS = (0.5, 0.7, 0.85, 1.0)


@dataclass(frozen=True)
class QuantizeConfig:
    """Options of `quantize_model`; every default works on transformers and CNNs alike.

    method: how an activation range is read from calibration (minmax; percentile of the
        values at `percentile`; entropy: TensorRT's KL threshold).
    activation_dtype: uint8 (asymmetric; what onnxruntime's x86 kernels prefer) or int8.
    weight_only: int8 weights behind DequantizeLinear, float activations (no calibration
        needed): the file shrinks ~4x, the arithmetic stays float.
    ops: which weight ops get QDQ; `exclude` globs match node, op, weight or output names.
    max_float_layers: at most this many layers are kept float for their measured output
        SQNR (worst first, and only those below `min_sqnr_db`); None or 0: none.
    smooth: SmoothQuant migration strength alpha in [0, 1] (applied per tensor wherever it
        lowers the output error), "auto" (tries AUTO_ALPHAS per tensor, applied only where it
        halves the error) or None (off).
    search_clip: also try tighter clipping ranges and keep whichever gives the lowest output
        error of the layers reading the tensor (measured on sampled calibration rows).
    quantize_embeddings: store Gather tables (word/position embeddings) in int8 too;
        `embedding_layout` says whether rows are gathered before dequantizing (fast on
        onnxruntime) or the table is dequantized first (textbook QDQ).
    activation_matmuls: also quantize MatMuls of two activations (attention scores).
    canonicalize_gelu: reorder dynamo-exported erf-GELU so onnxruntime fuses it.
    quant_format: "qdq" (portable QuantizeLinear/DequantizeLinear pairs) or "operator"
        (weight MatMuls written as com.microsoft MatMulIntegerToFloat with the bias folded
        in: onnxruntime-only, faster on its CPU provider; see quant/ort_layout.py).
    token_mask: graph input (e.g. attention_mask) whose zeros mark padding rows that must
        not shape the statistics.
    sample_rows: calibration rows kept per tensor to measure output error; `seed` fixes
        which.
    """

    method: Method = "percentile"
    percentile: float = 99.99
    activation_dtype: ActDtype = "uint8"
    weight_only: bool = False
    ops: tuple[str, ...] = _OPS
    exclude: tuple[str, ...] = ()
    max_float_layers: int | None = None
    min_sqnr_db: float = 25.0
    smooth: float | Literal["auto"] | None = "auto"
    search_clip: bool = True
    quantize_embeddings: bool = True
    embedding_layout: EmbeddingLayout = "gather-first"
    canonicalize_gelu: bool = True
    activation_matmuls: bool = False
    quant_format: Literal["qdq", "operator"] = "qdq"
    token_mask: str | None = None
    sample_rows: int = 512
    seed: int = 0
    provider: Provider = "cpu"  # where calibration batches run

    def __post_init__(self) -> None:
        if self.method not in ("minmax", "percentile", "entropy"):
            raise InputError(
                f"calibration method '{self.method}' is unknown; use minmax, percentile or entropy"
            )
        if self.activation_dtype not in ("uint8", "int8"):
            raise InputError(f"activation dtype must be uint8 or int8, got {self.activation_dtype}")
        if not 50.0 < self.percentile <= 100.0:
            raise InputError(f"percentile must be in (50, 100], got {self.percentile}")
        bad_ops = sorted(set(self.ops) - set(_OPS))
        if bad_ops:
            raise InputError(f"cannot quantize op '{bad_ops[0]}'; choose from {', '.join(_OPS)}")
        if self.max_float_layers is not None and self.max_float_layers < 0:
            raise InputError(f"max_float_layers must be >= 0, got {self.max_float_layers}")
        if self.smooth not in (None, "auto") and not (
            isinstance(self.smooth, (int, float)) and 0.0 <= self.smooth <= 1.0
        ):
            raise InputError(f"smooth (SmoothQuant alpha) must be in [0, 1], got {self.smooth}")
        if self.quant_format not in ("qdq", "operator"):
            raise InputError(f"quant format must be qdq or operator, got '{self.quant_format}'")
        if self.sample_rows < 1:
            raise InputError(f"sample_rows must be >= 1, got {self.sample_rows}")
