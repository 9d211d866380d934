"""One exception family. Every message names the problem *and* the fix.

The CLI prints ``str(err)`` on one line and exits non-zero; anything that is not a
``LlamaExportError`` is a bug and keeps its traceback.
"""

from __future__ import annotations


class LlamaExportError(Exception):
    """Base class: a user-facing error with a one-line message naming the fix."""

    exit_code = 2


class ConfigError(LlamaExportError):
    """The model folder / file has a missing or malformed config."""


class UnsupportedModelError(LlamaExportError):
    """The model is not llama-shaped (architecture, activation, rope type, ...)."""


class WeightsError(LlamaExportError):
    """Weights are missing, corrupt, or in a format we refuse to load (pickle)."""


class BundleError(LlamaExportError):
    """A bundle is missing, incomplete, altered, or of an unknown format version."""


class InputError(LlamaExportError):
    """A bad argument from the user: prompt, sampling value, shape, option."""


class ParityError(LlamaExportError):
    """The exported graph does not match the PyTorch original within tolerance."""


class CalibrationError(LlamaExportError):
    """Calibration data or the quantized variant failed a check."""


class MissingDependencyError(LlamaExportError):
    """An optional dependency (extra) is not installed."""

    def __init__(self, what: str, extra: str) -> None:
        super().__init__(f"{what} needs the '{extra}' extra: pip install 'llama-export[{extra}]'")
        self.extra = extra


class HardwareError(LlamaExportError):
    """The operation needs hardware this machine lacks (a GPU, TensorRT)."""
