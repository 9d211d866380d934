"""``config.json`` and ``generation_config.json`` in the bundle: what Hugging Face tools read.

With them, Optimum's ``ORTModelForCausalLM.from_pretrained(BUNDLE, file_name="model.onnx")``
runs the standard graph as it is (the IO names are Optimum's) and generates the same greedy text
as ``llama-export generate`` (checked by ``.ci/optimum_interop.py`` in an environment with
optimum-onnx). The manifest stays the contract for our own tools; these files only mirror it.
"""

from __future__ import annotations

import json
from typing import Any

from .config import LlamaConfig

HF_FILES = ("config.json", "generation_config.json")


def hf_config_files(config: LlamaConfig, tokenizer_info: dict[str, Any],
                    dtype: str) -> dict[str, bytes]:
    """``{file name: bytes}`` for the two files, from the exported config and token ids."""
    eos = list(tokenizer_info.get("eos_token_ids") or [])
    ids = {"bos_token_id": tokenizer_info.get("bos_token_id"),
           "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
           "pad_token_id": tokenizer_info.get("pad_token_id")}
    cfg = {**config.to_hf_dict(), **ids, "use_cache": True,
           "torch_dtype": "float16" if dtype == "fp16" else "float32"}
    gen = {**ids, "do_sample": False}  # the runtime's default is greedy too

    def dump(d: dict[str, Any]) -> bytes:
        return (json.dumps(d, indent=2) + "\n").encode("utf-8")

    return {"config.json": dump(cfg), "generation_config.json": dump(gen)}
