"""The model spec, parsed once into a frozen dataclass from ``config.json`` or GGUF metadata.

Both config dialects are read: transformers 4.x (``rope_theta`` + ``rope_scaling`` with ``type``
or ``rope_type``; most checkpoints in the wild) and 5.x (``rope_parameters``). When a file holds
both and they disagree, it is refused: transformers would silently take ``rope_scaling``.
Two families are llama-shaped: LLaMA (and Mistral without a sliding window) and Qwen2 (q/k/v
bias, no o_proj bias). Anything else is refused with a one-line message naming what is
unsupported. Parsing reads only config facts, so it runs before any tokenizer or weight file is
touched (cheap, decisive checks first).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from llama_export.runtime.errors import ConfigError, UnsupportedModelError

# architecture / model_type -> family; a family picks the transformers reference class.
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
                           "Qwen2ForCausalLM": "qwen2"}
SUPPORTED_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
GGUF_ARCHITECTURES = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    type: str  # "linear" | "llama3"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    # Bias per projection group: LLaMA's attention_bias sets q/k/v and o, Qwen2 has q/k/v only.
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    family: str = "llama"  # "llama" | "qwen2": which transformers class is the reference
    name: str = "llama"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of num_key_value_heads "
                f"({self.num_kv_heads}): fix config.json"
            )
        biases = (self.qkv_bias, self.o_bias, self.mlp_bias)
        expressible = {"llama": self.qkv_bias == self.o_bias, "qwen2": biases == (True, False, False)}
        if not expressible.get(self.family, False):
            raise UnsupportedModelError(
                f"a {self.family} model with q/k/v bias={self.qkv_bias}, o_proj bias={self.o_bias}, "
                f"mlp bias={self.mlp_bias} has no transformers reference to verify against: "
                "export a LLaMA or Qwen2 checkpoint as published")

    def to_manifest(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d

    def to_hf_dict(self) -> dict[str, Any]:
        """transformers ``LlamaConfig`` / ``Qwen2Config`` kwargs (4.x dialect; 5.x reads it too)."""
        scaling = None
        if self.rope_scaling is not None:
            s = self.rope_scaling
            scaling = {"rope_type": s.type, "factor": s.factor}
            if s.type == "llama3":
                scaling.update(low_freq_factor=s.low_freq_factor,
                               high_freq_factor=s.high_freq_factor,
                               original_max_position_embeddings=s.original_max_position_embeddings)
        common = {
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": scaling, "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
        }
        if self.family == "qwen2":  # q/k/v bias is built into Qwen2; no sliding window here
            return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **common,
                    "use_sliding_window": False, "sliding_window": None}
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
                "attention_bias": self.qkv_bias, "mlp_bias": self.mlp_bias}


def _parse_rope(scaling: Mapping[str, Any] | None, theta: float) -> tuple[float, RopeScaling | None]:
    if not scaling:
        return theta, None
    theta = float(scaling.get("rope_theta") or theta)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type '{rope_type}' is not supported (supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}): use a model with default, linear or llama3 rope"
        )
    if rope_type == "default":
        return theta, None
    factor = float(scaling.get("factor", 1.0))
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor)
    return theta, RopeScaling(
        "llama3", factor,
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
    )


def _rope_from_hf(cfg: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """transformers' precedence: a non-empty ``rope_scaling`` (4.x) wins over ``rope_parameters``
    (5.x), whose own ``rope_theta`` wins over the top-level one. transformers 5 takes
    ``rope_scaling`` without a word when both are present; a file where they disagree is
    refused instead, because one of them is wrong and only its author knows which."""
    theta = float(cfg.get("rope_theta") or 10000.0)
    legacy, params = cfg.get("rope_scaling"), cfg.get("rope_parameters")
    if not isinstance(params, Mapping):
        params = None
    if not legacy:
        return _parse_rope(params, theta)
    if not isinstance(legacy, Mapping):
        raise ConfigError(f"config.json rope_scaling is {legacy!r}, not a mapping: fix config.json")
    chosen = _parse_rope(legacy, theta)
    if params:
        try:
            other = _parse_rope(params, theta)
        except UnsupportedModelError:
            other = None
        if other != chosen:
            raise ConfigError(
                f"config.json holds rope_scaling {dict(legacy)} and rope_parameters {dict(params)}, "
                "which disagree (transformers would silently use rope_scaling): delete the one "
                "that is wrong")
    return chosen


def _family(cfg: Mapping[str, Any]) -> str:
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    family = SUPPORTED_MODEL_TYPES.get(str(model_type)) or next(
        (SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if family is None:
        what = model_type or (archs[0] if archs else "unknown")
        raise UnsupportedModelError(
            f"architecture '{what}' is not supported: llama-export exports LlamaForCausalLM-shaped "
            "decoders (Llama 2/3, TinyLlama, SmolLM2, Mistral without sliding window, Qwen2/2.5)"
        )
    return family


def _check_llama_shaped(cfg: Mapping[str, Any], family: str) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(
            f"hidden_act '{act}' is not supported: llama-export supports the silu (SwiGLU) MLP only"
        )
    window = cfg.get("sliding_window")
    max_pos = cfg.get("max_position_embeddings", 0)
    # Mistral slides whenever a window is set; Qwen2 only with use_sliding_window (default off).
    sliding = cfg.get("use_sliding_window", family != "qwen2")
    if window is not None and sliding and window < max_pos:
        raise UnsupportedModelError(
            f"sliding_window={window} attention is not supported: export a model without a sliding "
            f"window (use_sliding_window: false), or one whose window covers "
            f"max_position_embeddings ({max_pos})"
        )


def _req(cfg: Mapping[str, Any], key: str) -> Any:
    if key not in cfg:
        raise ConfigError(f"config.json has no '{key}': it is incomplete, fix or re-download it")
    return cfg[key]


def config_from_hf(cfg: Mapping[str, Any], name: str = "llama") -> LlamaConfig:
    """Parse a Hugging Face ``config.json`` dict (transformers 4.x or 5.x dialect)."""
    family = _family(cfg)
    _check_llama_shaped(cfg, family)
    hidden = int(_req(cfg, "hidden_size"))
    heads = int(_req(cfg, "num_attention_heads"))
    theta, scaling = _rope_from_hf(cfg)
    attention_bias = family == "qwen2" or bool(cfg.get("attention_bias", False))
    return LlamaConfig(
        vocab_size=int(_req(cfg, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_req(cfg, "intermediate_size")),
        num_layers=int(_req(cfg, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias,
        o_bias=attention_bias and family == "llama",
        mlp_bias=family == "llama" and bool(cfg.get("mlp_bias", False)),
        family=family,
        name=name,
    )


def config_from_gguf(fields: Mapping[str, Any], name: str = "llama",
                     has_output_weight: bool = True) -> LlamaConfig:
    """Parse GGUF metadata (``{key: value}``, values already decoded): ``llama`` or ``qwen2``."""
    arch = fields.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture '{arch}' is not supported: llama-export reads "
            f"{' and '.join(GGUF_ARCHITECTURES)} GGUF files"
        )

    def get(key: str, default: Any = None) -> Any:
        v = fields.get(f"{arch}.{key}", default)
        if v is None:
            raise ConfigError(f"GGUF metadata has no '{arch}.{key}': the file is incomplete")
        return v

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    scaling = None
    stype = fields.get(f"{arch}.rope.scaling.type")
    if stype not in (None, "none"):
        if stype != "linear":
            raise UnsupportedModelError(
                f"GGUF rope scaling type '{stype}' is not supported: use linear or none"
            )
        scaling = RopeScaling("linear", float(get("rope.scaling.factor")))
    vocab = fields.get(f"{arch}.vocab_size") or len(fields.get("tokenizer.ggml.tokens") or [])
    qwen2 = arch == "qwen2"
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(fields.get(f"{arch}.attention.head_count_kv") or heads),
        head_dim=int(fields.get(f"{arch}.attention.key_length") or hidden // heads),
        max_position_embeddings=int(get("context_length", 2048)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        tie_word_embeddings=not has_output_weight,
        qkv_bias=qwen2,
        family=str(arch),
        name=name,
    )
