"""Tiny seeded random LLaMA models written as Hugging Face folders: fixtures made locally.

One variant per supported shape (GQA, MHA, MQA, untied embeddings, llama3 and linear rope
scaling, attention/MLP bias, head_dim override, Qwen2 tied and untied).
``tests/test_fixture_coverage.py`` fails when a supported feature has no variant here. The
tokenizer is byte-level (every string encodes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .kquants import K_QUANTS, quantize_k

BASE: dict[str, Any] = {
    "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
    "hidden_act": "silu", "initializer_range": 0.1,
    "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258,
}

QWEN2: dict[str, Any] = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                         "use_sliding_window": False, "sliding_window": 32, "max_window_layers": 1}

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
    # Qwen2: q/k/v bias without o_proj bias; the window is declared but off, as Qwen2.5 ships it.
    "qwen2": {**QWEN2, "rope_theta": 1000000.0},
    "qwen2_untied": {**QWEN2, "tie_word_embeddings": False, "num_key_value_heads": 1},
}

# Which manifest/config feature each variant exercises (the meta-test checks this covers all).
FEATURES = {
    "gqa": "gqa", "mha": "mha", "mqa": "mqa", "untied": "untied_embeddings",
    "llama3_rope": "rope_llama3", "linear_rope": "rope_linear", "bias": "bias",
    "head_dim": "head_dim_override", "qwen2": "qwen2", "qwen2_untied": "qwen2_untied_embeddings",
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


def _random_model(cfg: dict[str, Any], seed: int) -> Any:
    import torch

    from .config import SUPPORTED_MODEL_TYPES
    from .reference import hf_classes

    config_cls, model_cls = hf_classes(SUPPORTED_MODEL_TYPES[cfg["model_type"]])
    torch.manual_seed(seed)
    return model_cls(config_cls(**cfg)).eval()


def tiny_config(variant: str = "gqa", **overrides: Any) -> dict[str, Any]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}; choose from {sorted(VARIANTS)}")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            **BASE, **VARIANTS[variant], **overrides}


def make_tiny_hf_model(path: str | os.PathLike[str], *, variant: str = "gqa", seed: int = 0,
                       **overrides: Any) -> Path:
    """Write a seeded random ``LlamaForCausalLM`` (or ``Qwen2ForCausalLM``) folder
    (safetensors + tokenizer) to ``path``."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(variant, **overrides)
    model = _random_model(cfg, seed)
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "tokenizer.json").write_text(byte_tokenizer_json(), encoding="utf-8")
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
          "pad_token": "<pad>", "add_bos_token": False, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2), encoding="utf-8")
    return out


# GGUF quant types the tiny GGUF fixtures cover: every llama.cpp type gguf-py can *write*, the
# K-quants (written by kquants.py), and Q4_K_M's per-tensor mix (``gguf_tensor_type``).
GGUF_QUANTS = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", *K_QUANTS, "Q4_K_M")
K_SHAPES = {"hidden_size": 256, "intermediate_size": 512}  # K-quant rows: multiples of 256
GGUF_VARIANTS = ("gqa", "qwen2_untied")  # llama (Q/K permuted, tied) and qwen2 (biases, untied)
_HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
              "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def gguf_tensor_type(quant: str, gguf_name: str) -> str:
    """The type a tensor gets in a file of ``quant``; ``Q4_K_M`` mixes like llama.cpp's:
    Q4_K by default, more bits for attn_v / ffn_down / output, Q5_0 and Q8_0 as in files
    whose rows are not multiples of 256 (Qwen2.5-0.5B)."""
    if quant != "Q4_K_M":
        return quant
    layer = gguf_name.split(".")[1] if gguf_name.startswith("blk.") else ""
    mix = {"attn_v": "Q8_0" if layer == "0" else "Q6_K", "ffn_down": "Q6_K" if layer == "0" else "Q4_K",
           "attn_output": "Q5_0", "output": "Q6_K"}
    return next((t for part, t in mix.items() if f"{part}." in gguf_name + "."), "Q4_K")


def _permute_qk(w: Any, n_head: int) -> Any:
    # llama.cpp's convert_hf_to_gguf permutation (the inverse of sources.unpermute_qk)
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _gguf_tensor(v: Any, qtype_name: str) -> tuple[Any, Any]:
    """``(data, raw_dtype)`` for ``GGUFWriter.add_tensor``."""
    import gguf
    import numpy as np
    from gguf.quants import quantize

    if v.ndim == 1 or qtype_name == "F32":
        return np.ascontiguousarray(v, dtype=np.float32), None
    if qtype_name == "F16":
        return v.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType[qtype_name]
    if qtype_name in K_QUANTS:
        return quantize_k(v, qtype_name), qtype
    return quantize(v, qtype), qtype


def _write_tiny_vocab(w: Any, cfg: dict[str, Any]) -> None:
    vocab = json.loads(byte_tokenizer_json())["model"]["vocab"]
    tokens = [*sorted(vocab, key=vocab.__getitem__), "<s>", "</s>", "<pad>"]
    tokens += [f"<unused{i}>" for i in range(cfg["vocab_size"] - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * (len(tokens) - 256))
    w.add_token_scores([0.0] * len(tokens))  # no merges: transformers derives them (none)
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    w.add_pad_token_id(258)
    w.add_chat_template(CHAT_TEMPLATE)


def make_tiny_gguf(path: str | os.PathLike[str], *, quant: str = "Q8_0", seed: int = 0,
                   variant: str = "gqa") -> Path:
    """Write a tiny GGUF of ``variant`` (llama ``gqa`` or ``qwen2_untied``), weights in
    ``quant`` (K-quants and Q4_K_M get 256-wide rows), byte-level gpt2 vocabulary."""
    import gguf

    if variant not in GGUF_VARIANTS:
        raise ValueError(f"unknown tiny GGUF variant {variant!r}; choose from {GGUF_VARIANTS}")
    big_rows = quant in K_QUANTS or quant == "Q4_K_M"
    cfg = tiny_config(variant, **(K_SHAPES if big_rows else {}))
    sd = {k: v.float().numpy() for k, v in _random_model(cfg, seed).state_dict().items()}
    arch = "qwen2" if cfg["model_type"] == "qwen2" else "llama"
    out = Path(path)
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(f"tiny-{arch}-{quant}")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    _write_tiny_vocab(w, cfg)
    for k, tensor in sd.items():
        v = tensor
        if k == "lm_head.weight" and cfg["tie_word_embeddings"]:
            continue
        if k in _TOP_NAMES:
            name = _TOP_NAMES[k]
        else:
            _, _, i, *mod, kind = k.split(".")
            name = f"blk.{i}.{_HF_TO_GGUF['.'.join(mod)]}.{kind}"
        if arch == "llama" and k.endswith(("q_proj.weight", "k_proj.weight")):
            v = _permute_qk(v, cfg["num_attention_heads" if "q_proj" in k else "num_key_value_heads"])
        data, raw_dtype = _gguf_tensor(v, gguf_tensor_type(quant, name))
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# ---- greedy parity against transformers (shared by the tiny, SmolLM2 and Qwen2.5 tests) ----------
TIE = 1e-3  # 20x the worst fp32 logit error the exporter measures on SmolLM2 (~5e-5)
_GREEDY_CACHE: dict[tuple[int, int, tuple[tuple[int, ...], ...]], tuple[list[list[int]], Any]] = {}


def reference_greedy(ref: Any, prompts: list[list[int]], pad_id: int,
                     new: int) -> tuple[list[list[int]], Any]:
    """transformers' greedy tokens and logits ``[batch, new, vocab]`` for left-padded prompts,
    EOS off (memoized: several graphs compare against one run)."""
    key = (id(ref), new, tuple(tuple(p) for p in prompts))
    if key not in _GREEDY_CACHE:
        _GREEDY_CACHE[key] = _reference_greedy(ref, prompts, pad_id, new)
    return _GREEDY_CACHE[key]


def _reference_greedy(ref: Any, prompts: list[list[int]], pad_id: int,
                      new: int) -> tuple[list[list[int]], Any]:
    import torch

    from llama_export.runtime.generate import left_pad

    ids, mask = left_pad(prompts, pad_id)
    # EOS off to compare all positions. transformers 5 falls back to the model's own
    # generation config for a None passed in a copy, so set it there and restore it (the
    # reference fixture is shared with other tests).
    saved = ref.generation_config.eos_token_id
    ref.generation_config.eos_token_id = None
    try:
        with torch.inference_mode():
            out = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                               do_sample=False, max_new_tokens=new, pad_token_id=pad_id,
                               return_dict_in_generate=True, output_logits=True)
    finally:
        ref.generation_config.eos_token_id = saved
    logits = torch.stack(out.logits, dim=1).float().numpy()  # [batch, new, vocab]
    return out.sequences[:, ids.shape[1]:].tolist(), logits


def assert_greedy_matches(ours: list[int], theirs: list[int], ref_logits: Any, new: int,
                          min_agree: int) -> None:
    """Tokens identical, except that a divergence is accepted where the reference's top-2
    logits are within ``TIE`` (an fp32 near-tie either engine may break either way) after at
    least ``min_agree`` equal tokens."""
    import numpy as np

    assert len(ours) == len(theirs) == new
    diff = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
    if not diff:
        return
    i = diff[0]
    top2 = np.sort(ref_logits[i])[-2:]
    gap = float(top2[1] - top2[0])
    assert gap < TIE and i >= min_agree, (  # noqa: PT018 - one condition: an accepted tie
        f"greedy tokens diverge at step {i} (reference top-2 gap {gap:.2e} >= {TIE} or fewer "
        f"than {min_agree} tokens agreed): ours {ours[i:i + 5]} vs transformers {theirs[i:i + 5]}")
