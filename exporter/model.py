"""An export-ready LLaMA decoder: KV cache as graph IO, one graph for prefill and decode.

Rules this module follows (shared/DESIGN.md §5): positions and the attention mask are tensors,
no Python ints derived from data, no ``if seq_len > 1`` branches, no registered mutable buffers,
no in-place cache writes; RoPE as real cos/sin; GQA by reshape/expand with the cache at kv-head
size; norms and softmax in fp32 even in an fp16 graph. Parameter names equal transformers'
``LlamaForCausalLM`` names, so a canonical state dict loads with ``strict=True``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch idiom
from torch import Tensor, nn

from .config import LlamaConfig


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


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=bias)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor,
                past: tuple[Tensor, Tensor], bts: tuple[int, int, int]
                ) -> tuple[Tensor, Tensor, Tensor]:
        # (B, T, S) come from the input shapes, shared by every layer: the traced Shape/Concat
        # chains for the reshapes are identical across layers and ONNX Runtime's CSE merges them.
        B, T, S = bts
        cos, sin = rope
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
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = FeedForward(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor,
                past: tuple[Tensor, Tensor], bts: tuple[int, int, int]
                ) -> tuple[Tensor, Tensor, Tensor]:
        h, k, v = self.self_attn(self.input_layernorm(x), rope, mask, past, bts)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaDecoder(nn.Module):
    """``forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present)``.

    ``past`` is ``k0, v0, k1, v1, ...`` each ``(B, n_kv, P, hd)``; ``attention_mask`` is
    ``(B, P + T)`` with 0 for (left) padding. ``last_logits_only`` slices before ``lm_head``.
    """

    def __init__(self, cfg: LlamaConfig, *, last_logits_only: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.last_logits_only = last_logits_only
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # A constant, not a buffer that changes: exported as an initializer.
        self.inv_freq: Tensor
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def _mask(self, attention_mask: Tensor, T: int, S: int) -> Tensor:
        """Additive fp32 mask ``(B, 1, 1, T, S)``: causal over absolute positions plus padding."""
        q_pos = torch.arange(T, device=attention_mask.device) + (S - T)      # (T,)
        k_pos = torch.arange(S, device=attention_mask.device)                 # (S,)
        causal = k_pos[None, :] <= q_pos[:, None]                             # (T, S)
        allowed = causal[None, :, :] & attention_mask[:, None, :].bool()       # (B, T, S)
        # finfo.min, not -inf: a fully masked row (a pad query) stays finite instead of NaN.
        neg = torch.full_like(allowed, torch.finfo(torch.float32).min, dtype=torch.float32)
        zero = torch.zeros_like(neg)
        return torch.where(allowed, zero, neg)[:, None, None, :, :]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                *past: Tensor) -> tuple[Tensor, ...]:
        x = self.model.embed_tokens(input_ids)                                # (B, T, D)
        B, T = input_ids.shape
        S = attention_mask.shape[1]
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :]  # (B, T, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :, :]                # (B, 1, T, hd)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = self._mask(attention_mask, T, S)
        presents: list[Tensor] = []
        for i, layer in enumerate(self.model.layers):
            x, k, v = layer(x, (cos, sin), mask, (past[2 * i], past[2 * i + 1]), (B, T, S))
            presents += [k, v]
        if self.last_logits_only:
            x = x[:, -1:, :]
        logits = self.lm_head(self.model.norm(x))                             # (B, T|1, V)
        return (logits, *presents)
