"""An export-ready LLaMA decoder: KV cache as graph IO, one graph for prefill and decode.

Rules this module follows (shared/DESIGN.md §5): positions and the attention mask are tensors,
no Python ints derived from data, no ``if seq_len > 1`` branches, no registered mutable buffers,
no in-place cache writes; RoPE as real cos/sin; GQA by reshape/expand with the cache at kv-head
size; norms and softmax in fp32 even in an fp16 graph. Parameter names equal transformers'
``LlamaForCausalLM`` names, so a canonical state dict loads with ``strict=True``.

``flavor="ort"`` traces the same weights into ONNX Runtime's contrib ops (packed QKV +
GroupQueryAttention, residual adds fused into SkipSimplifiedLayerNormalization; see
``ort_ops.py``). The layer loop is written for that fusion in both flavors: a layer's MLP output
is added at the next norm (``RMSNorm.skip``), which is the same arithmetic as adding it at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch idiom
from torch import Tensor, nn

from . import ort_ops
from .config import LlamaConfig

Flavor = Literal["standard", "ort"]


def rope_inv_freq(cfg: LlamaConfig) -> Tensor:
    """Inverse frequencies, with linear or llama3 scaling (as transformers computes them)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s.type == "linear":
        return inv_freq / s.factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: Tensor, half: int) -> Tensor:
    # Static slice bounds (not chunk): no Shape/Div nodes in the graph.
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # fp32 inside an fp16 graph: the sum of squares overflows fp16 (a known TensorRT failure).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def skip(self, x: Tensor, skip: Tensor | None, fused: bool) -> tuple[Tensor, Tensor]:
        """``(norm(x + skip), x + skip)``; ``fused``: one SkipSimplifiedLayerNormalization."""
        if skip is None:
            return self(x), x
        if fused:
            y, s = ort_ops.SkipRMSNorm.apply(x, skip, self.weight, self.eps)
            return y, s
        s = x + skip
        return self(s), s


class Packed(nn.Module):
    """One MatMul over concatenated projection weights (no parameters of its own: the weights
    stay in q/k/v_proj, so state dicts are unchanged). As a module it gives the traced MatMul
    the scope ``.../self_attn/qkv_proj``, hence the weight name ``...qkv_proj.weight_t``."""

    def forward(self, x: Tensor, *parts: nn.Linear) -> Tensor:
        w = torch.cat([p.weight for p in parts], dim=0)
        b = None if parts[0].bias is None else torch.cat([p.bias for p in parts], dim=0)
        return F.linear(x, w, b)


@dataclass
class StepInputs:
    """Per-forward tensors every layer shares (computed once, so the graph holds one copy).

    ``standard``: ``rope`` = (cos, sin) ``(B, 1, T, hd)``, ``mask`` ``(B, 1, 1, T, S)`` fp32.
    ``ort``: ``rope`` = (cos_cache, sin_cache) ``(max_pos, hd/2)``, ``mask`` ``(B, 1, T, S)`` in
    the model dtype, plus ``seqlens_k`` and ``total`` for GroupQueryAttention.
    """

    bts: tuple[int, int, int]
    rope: tuple[Tensor, Tensor]
    mask: Tensor | None  # None: the ``ort`` graph's unpadded form (no attention bias)
    seqlens_k: Tensor | None = None
    total: Tensor | None = None


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, flavor: Flavor = "standard") -> None:
        super().__init__()
        self.flavor = flavor
        self.n_heads, self.n_kv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        self.qkv_proj = Packed()

    def forward(self, x: Tensor, step: StepInputs, past: tuple[Tensor, Tensor]
                ) -> tuple[Tensor, Tensor, Tensor]:
        if self.flavor == "ort":
            return self._forward_ort(x, step, past)
        # (B, T, S) come from the input shapes, shared by every layer: the traced Shape/Concat
        # chains for the reshapes are identical across layers and ONNX Runtime's CSE merges them.
        B, T, S = step.bts
        cos, sin = step.rope
        mask = step.mask
        assert mask is not None  # the standard graph always masks
        past_k, past_v = past
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)     # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)     # (B, n_kv, T, hd)
        q = q * cos + rotate_half(q, self.hd // 2) * sin
        k = k * cos + rotate_half(k, self.hd // 2) * sin
        k = torch.cat([past_k, k], dim=2)                                     # (B, n_kv, S, hd)
        v = torch.cat([past_v, v], dim=2)                                     # (B, n_kv, S, hd)
        rep = self.n_heads // self.n_kv
        # GQA: query heads grouped per kv head, so K/V are never copied rep times.
        qg = q.reshape(B, self.n_kv, rep * T, self.hd)                        # (B, n_kv, rep*T, hd)
        scores = torch.matmul(qg, k.transpose(2, 3)).float()                  # (B, n_kv, rep*T, S)
        scores = scores.view(B, self.n_kv, rep, T, S) * (1.0 / math.sqrt(self.hd)) + mask
        probs = torch.softmax(scores, dim=-1).to(v.dtype)                     # fp32 softmax
        probs = probs.view(B, self.n_kv, rep * T, S)
        out = torch.matmul(probs, v)                                          # (B, n_kv, rep*T, hd)
        out = out.view(B, self.n_heads, T, self.hd).transpose(1, 2).reshape(B, T, self.n_heads * self.hd)
        return self.o_proj(out), k, v

    def _forward_ort(self, x: Tensor, step: StepInputs, past: tuple[Tensor, Tensor]
                     ) -> tuple[Tensor, Tensor, Tensor]:
        assert step.seqlens_k is not None
        assert step.total is not None
        cos_cache, sin_cache = step.rope
        qkv = self.qkv_proj(x, self.q_proj, self.k_proj, self.v_proj)         # (B, T, (H+2n_kv)*hd)
        out, k_all, v_all = ort_ops.GroupQueryAttention.apply(
            qkv, past[0], past[1], step.seqlens_k, step.total, cos_cache, sin_cache, step.mask,
            (self.n_heads, self.n_kv))                                        # (B, T, H*hd)
        return self.o_proj(out), k_all, v_all


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        b = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=b)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, flavor: Flavor = "standard") -> None:
        super().__init__()
        self.self_attn = Attention(cfg, flavor)
        self.mlp = FeedForward(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, pending: Tensor | None, step: StepInputs,
                past: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``x`` + ``pending`` (the previous layer's MLP output) is this layer's input; returns
        the residual stream and this layer's MLP output still to be added (fused into the next
        norm in the ``ort`` flavor)."""
        fused = self.self_attn.flavor == "ort"
        h, x = self.input_layernorm.skip(x, pending, fused)
        a, k, v = self.self_attn(h, step, past)
        h, x = self.post_attention_layernorm.skip(x, a, fused)
        return x, self.mlp(h), k, v


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig, flavor: Flavor = "standard") -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, flavor) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaDecoder(nn.Module):
    """``forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present)``.

    ``past`` is ``k0, v0, k1, v1, ...`` each ``(B, n_kv, P, hd)``; ``attention_mask`` is
    ``(B, P + T)`` with 0 for (left) padding. ``logits_tail`` N keeps the last ``min(T, N)``
    positions before ``lm_head`` (None: all; 1: ``--logits last``). ``attention_bias=False``
    (``ort`` flavor): no mask for GroupQueryAttention, which then masks causality and each
    row's length (``seqlens_k``) only: exact for masks without left padding, the ``ort`` graph's
    unpadded form (calibration/unpadded.py says why).
    """

    def __init__(self, cfg: LlamaConfig, *, logits_tail: int | None = None,
                 flavor: Flavor = "standard", max_positions: int | None = None,
                 attention_bias: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.logits_tail = logits_tail
        self.flavor = flavor
        self.attention_bias = attention_bias or flavor != "ort"
        self.model = LlamaModel(cfg, flavor)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._register_constants(max_positions)

    def _register_constants(self, max_positions: int | None) -> None:
        # Constants, not buffers that change: exported as initializers.
        cfg = self.cfg
        self.inv_freq: Tensor
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        if self.flavor == "ort":  # RotaryEmbedding looks positions up in (max_pos, hd/2) tables
            cos, sin = ort_ops.rope_caches(self.inv_freq, max_positions or cfg.max_position_embeddings)
            self.cos_cache: Tensor
            self.sin_cache: Tensor
            self.register_buffer("cos_cache", cos, persistent=False)
            self.register_buffer("sin_cache", sin, persistent=False)

    @classmethod
    def from_state_dict(cls, cfg: LlamaConfig, state_dict: dict[str, Tensor], *,
                        logits_tail: int | None = None, flavor: Flavor = "standard",
                        max_positions: int | None = None, attention_bias: bool = True
                        ) -> LlamaDecoder:
        """A decoder whose parameters *are* ``state_dict``'s tensors: built on the meta device
        (no random init) and assigned, so a 6 GB model is not held twice. Missing names stay
        on the meta device (callers check names first)."""
        with torch.device("meta"):
            module = cls(cfg, logits_tail=logits_tail, flavor=flavor,
                         max_positions=max_positions, attention_bias=attention_bias)
        module.load_state_dict(state_dict, strict=False, assign=True)
        if cfg.tie_word_embeddings:  # assign replaced the shared Parameter: tie again
            module.lm_head.weight = module.model.embed_tokens.weight
        module._register_constants(max_positions)
        return module

    def _mask(self, attention_mask: Tensor, T: int, S: int,
              dtype: torch.dtype = torch.float32) -> Tensor:
        """Additive mask ``(B, 1, T, S)``: causal over absolute positions plus padding."""
        q_pos = torch.arange(T, device=attention_mask.device) + (S - T)      # (T,)
        k_pos = torch.arange(S, device=attention_mask.device)                 # (S,)
        causal = k_pos[None, :] <= q_pos[:, None]                             # (T, S)
        allowed = causal[None, :, :] & attention_mask[:, None, :].bool()       # (B, T, S)
        # finfo.min, not -inf: a fully masked row (a pad query) stays finite instead of NaN.
        neg = torch.full_like(allowed, torch.finfo(dtype).min, dtype=dtype)
        zero = torch.zeros_like(neg)
        return torch.where(allowed, zero, neg)[:, None, :, :]

    def _step_inputs(self, attention_mask: Tensor, position_ids: Tensor, dtype: torch.dtype
                     ) -> StepInputs:
        B, T = position_ids.shape
        S = attention_mask.shape[1]
        if self.flavor == "ort":
            total = torch._shape_as_tensor(attention_mask)[1]                 # int64 scalar
            # Per-row length: the index of the row's LAST 1 (ort_ops.py, "seqlens: last_one").
            # Left-padded batches end in a 1, so this is total - 1 for them; a right-padded
            # row (the server's slots) writes its new token at its own length.
            k_pos = torch.arange(S, device=attention_mask.device) + 1          # (S,)
            seqlens_k = (attention_mask * k_pos[None, :]).amax(dim=1) - 1     # (B,)
            mask = self._mask(attention_mask, T, S, dtype) if self.attention_bias else None
            return StepInputs((B, T, S), (self.cos_cache.to(dtype), self.sin_cache.to(dtype)),
                              mask,
                              seqlens_k.to(torch.int32), total.to(torch.int32))
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :]  # (B, T, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :, :]                # (B, 1, T, hd)
        rope = (emb.cos().to(dtype), emb.sin().to(dtype))
        return StepInputs((B, T, S), rope, self._mask(attention_mask, T, S)[:, :, None])

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                *past: Tensor) -> tuple[Tensor, ...]:
        x = self.model.embed_tokens(input_ids)                                # (B, T, D)
        step = self._step_inputs(attention_mask, position_ids, x.dtype)
        presents: list[Tensor] = []
        pending: Tensor | None = None
        for i, layer in enumerate(self.model.layers):
            x, pending, k, v = layer(x, pending, step, (past[2 * i], past[2 * i + 1]))
            presents += [k, v]
        assert pending is not None  # num_layers >= 1
        if self.logits_tail is not None:  # ONNX Slice clamps: T < N keeps all T positions
            n = self.logits_tail
            x, pending = x[:, -n:, :], pending[:, -n:, :]
        h, _ = self.model.norm.skip(x, pending, self.flavor == "ort")
        logits = self.lm_head(h)                                              # (B, min(T,N), V)
        return (logits, *presents)
