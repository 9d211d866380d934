"""Tiny seeded random LLaMA models written as Hugging Face folders: fixtures made locally.

One variant per supported shape (GQA, MHA, MQA, untied embeddings, llama3 and linear rope
scaling, attention/MLP bias, head_dim override). ``tests/test_fixture_coverage.py`` fails when a
supported feature has no variant here. The tokenizer is byte-level (every string encodes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

BASE: dict[str, Any] = {
    "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
    "hidden_act": "silu", "initializer_range": 0.1,
    "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258,
}

VARIANTS: dict[str, dict[str, Any]] = {
    "gqa": {},
    "mha": {"num_key_value_heads": 4},
    "mqa": {"num_key_value_heads": 1},
    "untied": {"tie_word_embeddings": False},
    "llama3_rope": {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}},
    "linear_rope": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    "bias": {"attention_bias": True, "mlp_bias": True},
    "head_dim": {"head_dim": 32},
}

# Which manifest/config feature each variant exercises (the meta-test checks this covers all).
FEATURES = {
    "gqa": "gqa", "mha": "mha", "mqa": "mqa", "untied": "untied_embeddings",
    "llama3_rope": "rope_llama3", "linear_rope": "rope_linear", "bias": "bias",
    "head_dim": "head_dim_override",
}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_tokenizer_json() -> str:
    """A byte-level BPE tokenizer: 256 byte tokens + <s>, </s>, <pad> (ids 256-258)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=_byte_of))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<s>", "</s>", "<pad>")])
    return tok.to_str()


def _byte_of(ch: str) -> int:
    # GPT-2's byte->unicode map: printable bytes map to themselves, the rest to 256 + n.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    if ord(ch) in printable:
        return ord(ch)
    missing = [b for b in range(256) if b not in printable]
    return missing[ord(ch) - 256]


def tiny_config(variant: str = "gqa", **overrides: Any) -> dict[str, Any]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}; choose from {sorted(VARIANTS)}")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            **BASE, **VARIANTS[variant], **overrides}


def make_tiny_hf_model(path: str | os.PathLike[str], *, variant: str = "gqa", seed: int = 0,
                       **overrides: Any) -> Path:
    """Write a seeded random ``LlamaForCausalLM`` folder (safetensors + tokenizer) to ``path``."""
    import torch
    import transformers

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(variant, **overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "tokenizer.json").write_text(byte_tokenizer_json(), encoding="utf-8")
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
          "pad_token": "<pad>", "add_bos_token": False, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2), encoding="utf-8")
    return out
