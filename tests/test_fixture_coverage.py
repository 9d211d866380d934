"""Meta-test: every supported model feature has a tiny fixture variant, and each variant's
config really exercises the feature it claims (so a renamed knob cannot silently drop coverage)."""

from __future__ import annotations

from llama_export.exporter.config import (
    GGUF_ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    SUPPORTED_ROPE_TYPES,
    config_from_hf,
)
from llama_export.exporter.kquants import K_QUANTS
from llama_export.exporter.testing import (
    FEATURES,
    GGUF_QUANTS,
    GGUF_VARIANTS,
    VARIANTS,
    tiny_config,
)

SUPPORTED_FEATURES = {"gqa", "mha", "mqa", "untied_embeddings", "rope_llama3", "rope_linear",
                      "bias", "head_dim_override", "qwen2", "qwen2_untied_embeddings"}
# The GGUF types of a Q4_K_M file: each must be covered by a tiny GGUF fixture.
Q4_K_M_TYPES = {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}


def test_every_supported_feature_has_a_fixture() -> None:
    assert set(FEATURES) == set(VARIANTS)
    assert set(FEATURES.values()) == SUPPORTED_FEATURES
    rope_features = {f.removeprefix("rope_") for f in SUPPORTED_FEATURES if f.startswith("rope_")}
    assert rope_features == set(SUPPORTED_ROPE_TYPES) - {"default"}


def test_each_fixture_exercises_its_feature() -> None:
    checks = {
        "gqa": lambda c: 1 < c.num_kv_heads < c.num_heads,
        "mha": lambda c: c.num_kv_heads == c.num_heads,
        "mqa": lambda c: c.num_kv_heads == 1,
        "untied_embeddings": lambda c: not c.tie_word_embeddings,
        "rope_llama3": lambda c: c.rope_scaling is not None and c.rope_scaling.type == "llama3",
        "rope_linear": lambda c: c.rope_scaling is not None and c.rope_scaling.type == "linear",
        "bias": lambda c: c.qkv_bias and c.o_bias and c.mlp_bias,
        "head_dim_override": lambda c: c.head_dim * c.num_heads != c.hidden_size,
        "qwen2": lambda c: (c.family == "qwen2" and c.qkv_bias and not c.o_bias
                            and c.tie_word_embeddings and 1 < c.num_kv_heads < c.num_heads),
        "qwen2_untied_embeddings": lambda c: c.family == "qwen2" and not c.tie_word_embeddings,
    }
    for variant, feature in FEATURES.items():
        assert checks[feature](config_from_hf(tiny_config(variant))), variant


def test_every_family_and_gguf_type_has_a_fixture() -> None:
    families = {config_from_hf(tiny_config(v)).family for v in VARIANTS}
    assert families == set(SUPPORTED_MODEL_TYPES.values())
    gguf_families = {config_from_hf(tiny_config(v)).family for v in GGUF_VARIANTS}
    assert gguf_families == set(GGUF_ARCHITECTURES)
    assert set(K_QUANTS) | Q4_K_M_TYPES <= set(GGUF_QUANTS)
