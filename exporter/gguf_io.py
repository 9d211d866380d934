"""GGUF reading: metadata, lazily dequantized tensors, and a self-contained ``tokenizer.json``.

Dequantization uses the ``gguf`` package, so every quant type it supports (F32, F16, BF16,
Q8_0, Q4_0, Q4_1, K-quants, ...) works. The tokenizer is rebuilt from the GGUF vocabulary with
transformers' GGUF tokenizer builders (the same ones its ``from_pretrained(gguf_file=...)`` uses),
so the bundle's tokenizer and the PyTorch reference's tokenizer agree.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llama_export.runtime.errors import UnsupportedModelError, WeightsError

TensorLoader = Callable[[], np.ndarray]


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, TensorLoader]]:
    """``(metadata, {tensor name: loader})``; loaders dequantize to float32 in HF orientation."""
    import gguf
    from gguf.quants import dequantize

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError, TypeError) as e:
        raise WeightsError(f"{path} is not a readable GGUF file ({e}): it is truncated or corrupt, "
                           "download it again") from None
    fields: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            fields[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError):
            continue  # an undecodable optional field is not worth failing over

    def loader(t: Any) -> TensorLoader:
        def load() -> np.ndarray:
            try:
                w = dequantize(t.data, t.tensor_type)
            except NotImplementedError:
                raise WeightsError(f"GGUF tensor {t.name} uses quant type {t.tensor_type.name}, "
                                   "which the gguf package cannot dequantize: upgrade gguf or "
                                   "convert the file to another type") from None
            return np.asarray(w, dtype=np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))
        return load

    return fields, {t.name: loader(t) for t in reader.tensors}


def tokenizer_from_gguf(fields: dict[str, Any]) -> tuple[dict[str, bytes], dict[str, Any]]:
    """``({file name: bytes}, tokenizer info)`` for the bundle, built from GGUF metadata."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    tokens = fields.get("tokenizer.ggml.tokens")
    if not tokens:
        raise UnsupportedModelError("the GGUF file has no tokenizer vocabulary: use a GGUF with "
                                    "tokenizer.ggml.* metadata, or export from a HF folder")
    tok_dict = {name: fields[f"tokenizer.{key}"]
                for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
                if f"tokenizer.{key}" in fields}
    try:
        backend, _ = convert_gguf_tokenizer(str(fields.get("general.architecture")), tok_dict)
    except (KeyError, ValueError, NotImplementedError) as e:
        raise UnsupportedModelError(
            f"GGUF tokenizer '{tok_dict.get('tokenizer_type')}' cannot be converted ({e}): "
            "export from a HF folder with tokenizer.json instead") from None

    def tok(key: str) -> int | None:
        v = fields.get(f"tokenizer.ggml.{key}")
        return int(v) if v is not None else None

    bos, eos, pad = tok("bos_token_id"), tok("eos_token_id"), tok("padding_token_id")
    add_bos = fields.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:  # llama.cpp adds BOS to sentencepiece vocabularies that do not say
        add_bos = tok_dict.get("tokenizer_type") == "llama"
    if add_bos and bos is not None:
        from tokenizers import processors

        backend.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B",
            special_tokens=[(tokens[bos], bos)])
    template = fields.get("tokenizer.chat_template")

    def name(i: int | None) -> str | None:
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(bos),
          "eos_token": name(eos), "pad_token": name(pad if pad is not None else eos),
          "unk_token": name(tok("unknown_token_id")), "add_bos_token": bool(add_bos),
          "chat_template": template}
    files = {"tokenizer.json": backend.to_str().encode("utf-8"),
             "tokenizer_config.json": (json.dumps(tc, indent=2) + "\n").encode("utf-8")}
    info = {"bos_token_id": bos, "eos_token_ids": [eos] if eos is not None else [],
            "pad_token_id": pad if pad is not None else eos, "add_bos_token": bool(add_bos),
            "chat_template": template}
    return files, info
