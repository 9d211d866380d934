"""Every difference between the transformers versions we support, in one place.

Supported: transformers 4.57 (the newest 4.x; Hugging Face Optimum pins ``< 4.58``) through 5.x,
each tested by ``.ci/transformers-matrix``. Older releases are refused in one line
(:func:`check_transformers`): 4.45, the previous floor, loads SmolLM2's GGUF into a model of the
wrong shape (measured), and a release we do not test is a release we do not support.

What moved between 4.57 and 5.x:

- :func:`no_init_weights`: ``transformers.modeling_utils`` (4.x), ``transformers.initialization``.
- :func:`gguf_tokenizer_api`: ``transformers.integrations.ggml`` (4.x),
  ``transformers.integrations.gguf.gguf_tokenizer_mapping``.
- :func:`forward_cached`: the cache is ``forward(past_key_values=)`` in 4.x and ``forward(cache=)``
  in 5.x, where the old keyword is deprecated (removed in 5.40). Passing a ``DynamicCache``
  under the keyword the model's ``forward`` declares works in both.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from llama_export.runtime.errors import MissingDependencyError

MIN_VERSION = (4, 57)


def check_transformers() -> Any:
    """The ``transformers`` module, or one line naming the version to install."""
    try:
        transformers = importlib.import_module("transformers")
    except ModuleNotFoundError:
        raise MissingDependencyError("exporting and verifying", "export") from None
    from packaging.version import Version  # a transformers dependency

    if Version(transformers.__version__).release < MIN_VERSION:
        raise MissingDependencyError(
            f"transformers {transformers.__version__} is too old (llama-export supports "
            f"{'.'.join(map(str, MIN_VERSION))} and newer)", "export")
    return transformers


def no_init_weights() -> AbstractContextManager[Any]:
    """transformers' context that skips random weight initialisation (every weight is loaded)."""
    try:
        module = importlib.import_module("transformers.initialization")  # 5.x
    except ModuleNotFoundError:
        module = importlib.import_module("transformers.modeling_utils")  # 4.x
    ctx: AbstractContextManager[Any] = module.no_init_weights()
    return ctx


def gguf_tokenizer_api() -> tuple[dict[str, dict[str, str]], Callable[..., Any]]:
    """``(GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)``: transformers' GGUF tokenizer
    builders, the ones its ``from_pretrained(gguf_file=...)`` uses."""
    try:
        module = importlib.import_module("transformers.integrations.gguf.gguf_tokenizer_mapping")
    except ModuleNotFoundError:
        module = importlib.import_module("transformers.integrations.ggml")  # 4.x
    return module.GGUF_TOKENIZER_MAPPING, module.convert_gguf_tokenizer


def _cache_kwarg(model: Any) -> str:
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model: Any) -> Any:
    """An empty ``DynamicCache`` for ``model`` (updated in place by each cached forward)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # releases whose DynamicCache takes no config
        return DynamicCache()


def forward_cached(model: Any, input_ids: Any, cache: Any) -> Any:
    """``model(input_ids)`` continuing ``cache`` (from :func:`new_cache`), which it extends in
    place; returns the logits. The keyword naming the cache differs across versions."""
    out = model(input_ids=input_ids, use_cache=True, **{_cache_kwarg(model): cache})
    return out.logits
