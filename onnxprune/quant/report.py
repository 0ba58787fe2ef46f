"""What `onnxprune quantize` did, per layer and in all: the report it returns and prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from onnxprune.quant.config import QuantizeConfig
from onnxprune.quant.insert_qdq import QuantizedLayer

__all__ = ["LayerReport", "QuantizeReport"]


@dataclass(frozen=True)
class LayerReport(QuantizedLayer):
    """What the pass did to a layer, plus what calibration measured for it."""

    activation_range: tuple[float, float] | None = None
    activation_scale: float | None = None
    activation_zero_point: int | None = None
    range_choice: str | None = None
    smoothed: bool = False
    smooth_declined: str | None = None  # why SmoothQuant was not tried on the input
    activation_sqnr_db: float | None = None
    layer_sqnr_db: float | None = None

    def to_dict(self) -> dict[str, object]:
        out = {}
        for key, value in asdict(self).items():
            if value is None:
                continue
            if isinstance(value, float):
                value = _rounded(value)
            elif isinstance(value, tuple):
                value = [_rounded(v) for v in value]
            out[key] = value
        return out


def _rounded(v: float) -> float | str:
    return round(v, 6 if abs(v) < 1 else 3) if np.isfinite(v) else str(v)


@dataclass(frozen=True)
class QuantizeReport:
    config: QuantizeConfig
    layers: tuple[LayerReport, ...]
    float_tensors: tuple[tuple[str, str], ...] = ()  # (tensor, why it stayed float)
    batches: int = 0
    constant_bytes_before: int = 0  # initializers and Constant nodes, before and after
    constant_bytes_after: int = 0
    float_weights_kept: tuple[str, ...] = ()
    smoothing_folded: tuple[str, ...] = ()
    gelu_reordered: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def quantized(self) -> int:
        return sum(layer.quantized for layer in self.layers)

    @property
    def kept_float(self) -> int:
        return sum(not layer.quantized for layer in self.layers)

    def why_nothing(self) -> str:
        """What to tell a user whose `quantize` changed nothing: the layer report's reasons,
        most common first, each with the layers it held back."""
        held: dict[str, list[str]] = {}
        for layer in self.layers:
            if not layer.quantized:
                held.setdefault(layer.reason or "no reason recorded", []).append(layer.node)
        if not held:
            return ("nothing was quantized: the model has no MatMul/Gemm/Conv with a constant "
                    "float32 weight and no embedding table (Gather of a constant)")
        parts = []
        for reason, nodes in sorted(held.items(), key=lambda kv: -len(kv[1]))[:3]:
            names = ", ".join(f"'{n}'" for n in nodes[:3]) + (", ..." if len(nodes) > 3 else "")
            parts.append(f"{reason} ({len(nodes)} layer(s): {names})")
        more = len(held) - len(parts)
        return "nothing was quantized: " + "; ".join(parts) + (
            f"; and {more} other reason(s) (all in --report)" if more > 0 else "")

    def to_dict(self) -> dict[str, object]:
        return {
            "config": {k: list(v) if isinstance(v, tuple) else v
                       for k, v in asdict(self.config).items()},
            "quantized_layers": self.quantized,
            "float_layers": self.kept_float,
            "calibration_batches": self.batches,
            "constant_bytes_before": self.constant_bytes_before,
            "constant_bytes_after": self.constant_bytes_after,
            "float_weights_kept": list(self.float_weights_kept),
            "float_tensors": dict(self.float_tensors),
            "smoothing_folded": list(self.smoothing_folded),
            "gelu_reordered": list(self.gelu_reordered),
            "seconds": round(self.seconds, 3),
            "layers": [layer.to_dict() for layer in self.layers],
        }
