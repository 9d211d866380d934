"""ONNX Runtime contrib ops for the ``ort`` graph flavor, emitted straight from the trace.

The standard graph spells attention out in ~35 ONNX ops per layer (reshapes, RoPE halves,
the KV concat, two matmuls, the mask add, softmax): portable, and what TensorRT builds. On
ONNX Runtime each op costs a kernel launch and a buffer; for a 135M model at batch 1 that
overhead shows (SmolLM2 fp32 decode measured 1.15x faster on this graph, ``bench --graph
both``). The ``ort`` flavor traces the same decoder but lets each layer's attention core become
one contrib op and each residual add join the next RMSNorm (onnxruntime-genai's graph shape;
333 nodes for SmolLM2 instead of 1,427)::

    x ─► MatMul(W_q ‖ W_k ‖ W_v) ─► GroupQueryAttention(do_rotary, cos/sin cache, past K/V,
                                      seqlens_k, total length, attention_bias) ─► out
                                                                 ├─► present.key
                                                                 └─► present.value
    x + skip ─► SkipSimplifiedLayerNormalization ─► norm(x + skip), x + skip


Graph IO is unchanged (same names, shapes, left padding), and the same graph also runs with
past/present bound to one preallocated buffer per layer (GroupQueryAttention's shared-buffer
mode: no per-step copy of the cache; the runtime uses it).

Left padding stays exact, by two facts. (1) The padding part of the mask goes in as
``attention_bias``, and a left-padded row ends in a 1, so its length (``seqlens_k`` = the
index of the row's last 1, ``"seqlens": "last_one"`` in the manifest) is ``total - 1``: every row
is treated as ``total`` long and GroupQueryAttention's own right-padding never applies; it adds
causality itself. (A right-padded row, e.g. a server slot, gets its own shorter length: it
writes its new K/V at that index and attends to ``[0, length]``. The eager ``forward`` below
models the left-padded case only.)
(2) RoPE inside the op rotates each slot by its *slot* index, while the standard graph uses
``position_ids`` = slot minus the row's padding. RoPE scores depend only on the difference of
the two positions, and a row's offset is the same for every slot, so attention is identical
(checked by the export-time parity run, left-padded batch included). ``position_ids`` is still
a graph input; this graph requires it to be ``cumsum(attention_mask) - 1``, the manifest's
contract, and records ``"rope_positions": "slots"``.

Each op is a ``torch.autograd.Function`` whose ``forward`` is the reference math in eager mode
(a test compares the eager ``ort`` decoder with the standard one on a left-padded batch) and
whose ``symbolic`` emits the contrib op. Only the TorchScript exporter (``dynamo=False``) reads
``symbolic``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

MS_DOMAIN = "com.microsoft"
CONTRIB_OPS = ("GroupQueryAttention", "SkipSimplifiedLayerNormalization")
GQA_HEAD_MULTIPLE = 16  # ONNX Runtime's CPU GroupQueryAttention refuses other head sizes


def ort_graph_unsupported(head_dim: int) -> str | None:
    """Why this model cannot have the ``ort`` graph (None: it can)."""
    if head_dim % GQA_HEAD_MULTIPLE:
        return (f"head_dim {head_dim} is not a multiple of {GQA_HEAD_MULTIPLE}, which ONNX "
                "Runtime's GroupQueryAttention requires")
    return None


def _rope_slots(x: Tensor, cos_cache: Tensor, sin_cache: Tensor, start: int) -> Tensor:
    """Rotate ``(B, n, T, hd)`` at slot positions ``start .. start+T-1`` (non-interleaved)."""
    T, half = x.shape[2], cos_cache.shape[1]
    cos = cos_cache[start:start + T][None, None]                               # (1, 1, T, hd/2)
    sin = sin_cache[start:start + T][None, None]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class GroupQueryAttention(torch.autograd.Function):
    """Causal GQA with RoPE over packed QKV ``(B, T, (H + 2*n_kv)*hd)`` and ``past ++ new`` K/V.

    ``past_*`` ``(B, n_kv, P, hd)``; ``bias`` ``(B, 1, T, P+T)`` (0 or a large negative);
    ``seqlens_k`` int32 ``(B,)`` = P+T-1; ``total`` int32 scalar = P+T. Returns the attention
    output ``(B, T, H*hd)`` and the presents ``(B, n_kv, P+T, hd)``.
    """

    @staticmethod
    def forward(ctx: Any, qkv: Tensor, past_k: Tensor, past_v: Tensor, seqlens_k: Tensor,
                total: Tensor, cos_cache: Tensor, sin_cache: Tensor, bias: Tensor | None,
                heads: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        num_heads, kv_heads = heads
        B, T, _ = qkv.shape
        P, hd = past_k.shape[2], past_k.shape[3]
        rep = num_heads // kv_heads
        if torch.jit.is_tracing():
            # Under the ONNX trace only output shapes and dtypes matter (``symbolic`` replaces
            # the body), and the JIT's peephole pass fails on any body that derives the outputs
            # from the inputs when n_kv == 1 (MQA): "Argument passed to at() was not in the map".
            return (qkv.new_zeros(B, T, num_heads * hd), past_k.new_zeros(B, kv_heads, P + T, hd),
                    past_v.new_zeros(B, kv_heads, P + T, hd))
        q, k, v = qkv.split([num_heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
        q = _rope_slots(q.view(B, T, num_heads, hd).transpose(1, 2), cos_cache, sin_cache, P)
        k = _rope_slots(k.view(B, T, kv_heads, hd).transpose(1, 2), cos_cache, sin_cache, P)
        k = torch.cat([past_k, k], dim=2)                                     # (B, n_kv, S, hd)
        v = torch.cat([past_v, v.view(B, T, kv_heads, hd).transpose(1, 2)], dim=2)
        S = k.shape[2]
        qg = q.view(B, kv_heads, rep, T, hd)                                  # (B, n_kv, rep, T, hd)
        scores = torch.matmul(qg.float(), k[:, :, None].float().transpose(-1, -2)) / math.sqrt(hd)
        causal = torch.ones(T, S, dtype=torch.bool).tril(S - T)
        scores = scores.masked_fill(~causal, torch.finfo(torch.float32).min)
        if bias is not None:  # None: the unpadded form (no left padding to mask)
            scores = scores + bias[:, :, None].float()                      # (B, n_kv, rep, T, S)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v[:, :, None])                              # (B, n_kv, rep, T, hd)
        out = out.view(B, num_heads, T, hd).transpose(1, 2).reshape(B, T, num_heads * hd)
        return out, k, v

    @staticmethod
    def symbolic(g: Any, qkv: Any, past_k: Any, past_v: Any, seqlens_k: Any, total: Any,
                 cos_cache: Any, sin_cache: Any, bias: Any, heads: tuple[int, int]) -> Any:
        from torch.onnx.symbolic_helper import _is_none
        from torch.onnx.symbolic_helper import _optional_input_placeholder_tensor as absent

        # key/value empty: packed QKV. position_ids empty: RoPE at slot positions (see above).
        out, present_k, present_v = g.op(
            f"{MS_DOMAIN}::GroupQueryAttention", qkv, absent(g), absent(g), past_k, past_v,
            seqlens_k, total, cos_cache, sin_cache, *([] if _is_none(bias) else [absent(g), bias]),
            num_heads_i=heads[0],
            kv_num_heads_i=heads[1], do_rotary_i=1, outputs=3)
        return _typed_like(out, qkv, 3), _typed_like(present_k, past_k, 4), \
            _typed_like(present_v, past_v, 4)


class SkipRMSNorm(torch.autograd.Function):
    """``(rmsnorm(x + skip) * w, x + skip)``: the residual add fused into the next norm."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, skip: Tensor, weight: Tensor, eps: float
                ) -> tuple[Tensor, Tensor]:
        s = x + skip
        sf = s.float()
        y = sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * y.to(s.dtype), s

    @staticmethod
    def symbolic(g: Any, x: Any, skip: Any, weight: Any, eps: float) -> Any:
        y, _mean, _inv_std, s = g.op(f"{MS_DOMAIN}::SkipSimplifiedLayerNormalization", x, skip,
                                     weight, epsilon_f=eps, outputs=4)
        return _typed_like(y, x, 3), _typed_like(s, x, 3)


def _typed_like(value: Any, like: Any, rank: int) -> Any:
    """Give a contrib op's output the dtype of ``like`` and ``rank`` unknown dims: the exporter
    cannot infer contrib ops' types (and warns about it once per node otherwise)."""
    value.setType(like.type().with_sizes([None] * rank))
    return value


def rope_caches(inv_freq: Tensor, positions: int) -> tuple[Tensor, Tensor]:
    """``cos_cache``, ``sin_cache`` ``(positions, hd/2)`` fp32, as GroupQueryAttention wants."""
    freqs = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()
