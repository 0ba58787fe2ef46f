"""The exceptions onnxprune raises.

Every message names the file, node or tensor concerned and says what to do, because the
CLI shows it as the only line the user sees.
"""

from __future__ import annotations

import re
from collections.abc import Callable


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


class OptionError(InputError):
    """A bad option value or combination. The message names options by their config field
    (`@max_drop`); the library shows field names, the CLI renders its flags instead."""

    def __init__(self, message: str) -> None:
        self.template = message
        super().__init__(self.render(lambda field: field))

    def render(self, name: Callable[[str], str]) -> str:
        """The message with every `@field` replaced by `name(field)`."""
        return re.sub(r"@([a-z_0-9]+)", lambda m: name(m.group(1)), self.template)


class InternalError(OnnxPruneError):
    """onnxprune's own rewriting produced something invalid: a bug to report, not bad input
    (the CLI exits 3)."""
