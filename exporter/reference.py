"""The PyTorch original: transformers' ``LlamaForCausalLM`` (``Qwen2ForCausalLM`` for the Qwen2
family) holding the same weights.

For a GGUF source, transformers loads the GGUF itself (its own dequantization and Q/K
un-permutation), so parity also checks our GGUF reading. For a HF folder it loads the
safetensors through ``from_pretrained``. Never ``trust_remote_code``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import LlamaConfig
from .sources import builtin_gguf_path, load_source


def hf_classes(family: str) -> tuple[Any, Any]:
    """``(config class, model class)`` of transformers for a config family."""
    from .hf_compat import check_transformers

    transformers = check_transformers()

    if family == "qwen2":
        return transformers.Qwen2Config, transformers.Qwen2ForCausalLM
    return transformers.LlamaConfig, transformers.LlamaForCausalLM


def load_reference(model: str | os.PathLike[str] | None, config: LlamaConfig | None = None) -> Any:
    """transformers ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` in fp32, eval mode, eager attention."""
    import torch
    from transformers.utils import logging as hf_logging

    from .hf_compat import check_transformers

    check_transformers()
    hf_logging.set_verbosity_error()
    path = builtin_gguf_path() if model is None else Path(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path.is_file():  # GGUF
            from .gguf_io import read_gguf

            family = str(read_gguf(path)[0].get("general.architecture"))
            ref = hf_classes(family)[1].from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32,
                attn_implementation="eager")
        else:
            cfg = config if config is not None else load_source(path).config
            config_cls, model_cls = hf_classes(cfg.family)
            hf_cfg = config_cls(**cfg.to_hf_dict())
            ref = model_cls.from_pretrained(
                str(path), config=hf_cfg, dtype=torch.float32, use_safetensors=True,
                attn_implementation="eager")
    return ref.eval()


def reference_from_state_dict(config: LlamaConfig, state_dict: dict[str, Any]) -> Any:
    """transformers' model built around an already-loaded canonical state dict, sharing its
    tensors (``assign``: no second copy of the weights in memory).

    Used by the export-time check (the source was just read; reading it again through
    transformers would double the export time). The independent load path is covered by
    ``load_reference`` in the tests.
    """
    from .hf_compat import no_init_weights

    config_cls, model_cls = hf_classes(config.family)
    hf_cfg = config_cls(**config.to_hf_dict())
    hf_cfg._attn_implementation = "eager"

    with no_init_weights():  # every weight is overwritten below; random init would cost seconds
        ref = model_cls(hf_cfg)
    missing, _ = ref.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing:
        raise RuntimeError(f"reference model did not receive {missing[:3]}")
    if config.tie_word_embeddings:
        ref.lm_head.weight = ref.model.embed_tokens.weight
    return ref.eval()


# Below this many parameters (the tiny test models) one torch thread beats two that spin on
# short sequences; above it the forward is matmul-bound and two threads win. Measured on this
# 2-core machine, greedy decode step 1 → 2 threads: SmolLM2-135M 0.069 → 0.042 s,
# Qwen2.5-0.5B 0.16 → 0.11 s, Qwen2.5-1.5B 0.56 → 0.27 s (full b2×18 recompute 2.2 → 0.83 s).
SINGLE_THREAD_MAX_PARAMS = 20_000_000


@contextmanager
def reference_threads(reference: Any) -> Iterator[None]:
    """torch's thread count for running ``reference``: one for tiny models, else unchanged."""
    import torch

    params = sum(p.numel() for p in reference.parameters())
    threads = torch.get_num_threads()
    if params < SINGLE_THREAD_MAX_PARAMS:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
