"""The exceptions onnxprune raises.

Every message names the file, node or tensor concerned and says what to do, because the
CLI shows it as the only line the user sees.
"""

from __future__ import annotations


class OnnxPruneError(Exception):
    """Base class of every error onnxprune raises on purpose."""


class InputError(OnnxPruneError):
    """The user gave us something we cannot use: a bad path, file, option or data."""


class UnsupportedModelError(OnnxPruneError):
    """The model is valid ONNX but outside what a pass can handle."""


class DataError(InputError):
    """Calibration or verification data does not match the model."""


class ProviderError(OnnxPruneError):
    """An onnxruntime execution provider was asked for but is not available or not used."""


class MetricError(InputError):
    """A user metric raised, or returned something that is not a finite number."""
