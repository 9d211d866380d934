"""Config parsing: both transformers dialects, GGUF metadata, and refusals with one-line errors."""

from __future__ import annotations

import re

import pytest

from llama_export.exporter.config import LlamaConfig, RopeScaling, config_from_gguf, config_from_hf
from llama_export.exporter.testing import tiny_config
from llama_export.runtime.errors import ConfigError, UnsupportedModelError

LLAMA3_4X = {"rope_theta": 500000.0, "rope_scaling": {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192}}
LLAMA3_5X = {"rope_parameters": {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}


@pytest.mark.parametrize("dialect", [LLAMA3_4X, LLAMA3_5X], ids=["transformers4", "transformers5"])
def test_both_rope_dialects(dialect: dict) -> None:
    base = tiny_config("gqa")
    base.pop("rope_theta")
    cfg = config_from_hf({**base, **dialect})
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)


def test_rope_scaling_with_legacy_type_key() -> None:
    cfg = config_from_hf(tiny_config("linear_rope"))
    assert cfg.rope_scaling == RopeScaling("linear", 2.0)


def test_default_rope_in_5x_dialect() -> None:
    base = tiny_config("gqa")
    base.pop("rope_theta")
    cfg = config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling is None


def test_shapes_and_overrides() -> None:
    cfg = config_from_hf(tiny_config("head_dim"))
    assert (cfg.head_dim, cfg.num_heads, cfg.hidden_size) == (32, 4, 64)
    mqa = config_from_hf({**tiny_config("gqa"), "num_key_value_heads": None})
    assert mqa.num_kv_heads == mqa.num_heads  # missing kv heads means MHA


@pytest.mark.parametrize(("patch", "message"), [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
     "architecture 'gpt2' is not supported: llama-export exports LlamaForCausalLM-shaped"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "rope scaling type 'yarn' is not supported"),
    ({"sliding_window": 16}, "sliding_window=16 attention is not supported"),
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "sliding_window": 16,
      "use_sliding_window": True}, "sliding_window=16 attention is not supported"),
])
def test_unsupported_configs(patch: dict, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match="^" + re.escape(message)):
        config_from_hf({**tiny_config("gqa"), **patch})


def test_missing_key_and_bad_heads() -> None:
    cfg = tiny_config("gqa")
    del cfg["hidden_size"]
    with pytest.raises(ConfigError, match=r"config\.json has no 'hidden_size'"):
        config_from_hf(cfg)
    with pytest.raises(ConfigError, match="not a multiple"):
        config_from_hf({**tiny_config("gqa"), "num_key_value_heads": 3})


_GGUF_KEYS = ("block_count", "context_length", "embedding_length", "feed_forward_length",
              "attention.head_count", "attention.head_count_kv", "rope.freq_base",
              "attention.layer_norm_rms_epsilon", "vocab_size")


def _gguf_fields(arch: str, *values: float) -> dict:
    return {"general.architecture": arch,
            **{f"{arch}.{k}": v for k, v in zip(_GGUF_KEYS, values, strict=True)}}


def test_gguf_metadata() -> None:
    fields = _gguf_fields("llama", 30, 8192, 576, 1536, 9, 3, 100000.0, 1e-5, 49152)
    cfg = config_from_gguf(fields, has_output_weight=False)
    assert (cfg.num_layers, cfg.head_dim, cfg.num_kv_heads, cfg.tie_word_embeddings) == (30, 64, 3, True)
    with pytest.raises(UnsupportedModelError, match="GGUF architecture 'gemma' is not supported"):
        config_from_gguf({**fields, "general.architecture": "gemma"})


def test_qwen2_gguf_metadata() -> None:
    fields = _gguf_fields("qwen2", 24, 32768, 896, 4864, 14, 2, 1000000.0, 1e-6, 151936)
    cfg = config_from_gguf(fields, has_output_weight=True)
    assert (cfg.family, cfg.num_layers, cfg.head_dim, cfg.num_kv_heads) == ("qwen2", 24, 64, 2)
    assert (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias, cfg.tie_word_embeddings) == (True, False, False, False)
    assert cfg.rope_theta == 1e6
    assert cfg.to_hf_dict()["architectures"] == ["Qwen2ForCausalLM"]


def test_qwen2_config_biases_and_window() -> None:
    cfg = config_from_hf(tiny_config("qwen2"))  # sliding_window 32 declared, use_sliding_window off
    assert (cfg.family, cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias) == ("qwen2", True, False, False)
    llama = config_from_hf(tiny_config("bias"))
    assert (llama.family, llama.qkv_bias, llama.o_bias, llama.mlp_bias) == ("llama", True, True, True)
    hf = cfg.to_hf_dict()
    assert hf["model_type"] == "qwen2" and not hf["use_sliding_window"]
    assert "attention_bias" not in hf  # Qwen2's q/k/v bias is built into its class


def test_bias_pattern_without_reference_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="no transformers reference to verify against"):
        LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                    num_kv_heads=2, head_dim=4, max_position_embeddings=8, qkv_bias=True)


# transformers 5 takes a non-empty rope_scaling over rope_parameters (4.x reads only
# rope_scaling); a file where the two disagree is refused rather than silently resolved.
def test_rope_scaling_and_parameters_agreeing_are_accepted() -> None:
    base = {**tiny_config("gqa"), **LLAMA3_5X}
    cfg = config_from_hf({**base, **LLAMA3_4X})
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert cfg.rope_theta == 500000.0


@pytest.mark.parametrize("params", [
    {"rope_type": "default", "rope_theta": 500000.0},
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0},
    {**LLAMA3_5X["rope_parameters"], "rope_theta": 10000.0},
], ids=["default", "other-type", "other-theta"])
def test_conflicting_rope_dialects_are_refused(params: dict) -> None:
    with pytest.raises(ConfigError, match=r"^config\.json holds rope_scaling .* and rope_parameters "
                       r".*, which disagree \(transformers would silently use rope_scaling\): "
                       "delete the one that is wrong$"):
        config_from_hf({**tiny_config("gqa"), **LLAMA3_4X, "rope_parameters": params})


def test_unsupported_rope_scaling_wins_over_default_parameters() -> None:
    # What transformers 5's save_pretrained writes (rope_parameters: default) plus a hand-added
    # rope_scaling: transformers would run the rope_scaling, so that is what must be judged.
    cfg = {**tiny_config("gqa"), "rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
           "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(UnsupportedModelError, match=r"^rope scaling type 'yarn' is not supported"):
        config_from_hf(cfg)
