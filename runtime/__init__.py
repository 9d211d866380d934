"""Torch-free runtime: load a bundle, generate tokens over ONNX Runtime or TensorRT.

    >>> from llama_export.runtime import load_bundle
    >>> with load_bundle("build/smollm2") as model:
    ...     print(model.generate("The capital of France is", max_new_tokens=16).text)

Exports resolve lazily (PEP 562) so ``llama-export --help``, which imports this package, stays
free of numpy / tokenizers / onnxruntime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llama_export.runtime.bundle import Model, load_bundle, make_options
    from llama_export.runtime.generate import Completion, GenerationOptions
    from llama_export.runtime.sampling import SamplingOptions

_EXPORTS = {"load_bundle": "bundle", "Model": "bundle", "make_options": "bundle",
            "Completion": "generate", "GenerationOptions": "generate",
            "SamplingOptions": "sampling"}

__all__ = ["Completion", "GenerationOptions", "Model", "SamplingOptions", "load_bundle",
           "make_options"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
