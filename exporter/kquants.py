"""K-quant encoders (Q4_K, Q5_K, Q6_K) in numpy, for tiny GGUF fixtures.

gguf-py dequantizes K-quants but cannot write them, so K-quant test files could not be made
locally. These encoders pack codes into ggml's exact block layouts (super-blocks of 256; the
inverse of gguf-py's ``dequantize_blocks``) with a plain round-to-nearest choice of scales,
not llama.cpp's error-minimizing search: the fixtures test *reading* the format, and any
valid codes do. Layouts per super-block:

* Q4_K (144 B): d, dmin (fp16) | 12 B of 6-bit scales/mins for 8 sub-blocks of 32 | 128 B of
  4-bit codes. ``w = d*sc[j]*q - dmin*m[j]``.
* Q5_K (176 B): as Q4_K plus 32 B holding each code's fifth bit.
* Q6_K (210 B): 128 B low nibbles | 64 B high 2 bits | 16 int8 scales (sub-blocks of 16) | d.
  ``w = d*sc[j]*(q - 32)``.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")


def _f16(x: np.ndarray) -> np.ndarray:
    """A super-block scale as stored (fp16), kept above fp16's smallest normal (no zero)."""
    return np.maximum(x, 1e-4).astype(np.float16)


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(n, 8) 6-bit scales and mins → (n, 12) bytes (the layout ``Q4_K.get_scale_min`` reads)."""
    lo = (sc[:, :4] | ((sc[:, 4:] >> 4) << 6)).astype(np.uint8)
    mlo = (m[:, :4] | ((m[:, 4:] >> 4) << 6)).astype(np.uint8)
    mix = ((sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)).astype(np.uint8)
    return np.concatenate([lo, mlo, mix], axis=1)


def _affine(blocks: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Sub-blocks of 32 as ``d*sc*q - dmin*m`` with 6-bit ``sc``/``m`` and ``q`` in 0..levels."""
    n = blocks.shape[0]
    sub = blocks.reshape(n, 8, 32)
    lo = np.minimum(sub.min(axis=2), 0.0)                      # the offset is -dmin*m <= 0
    scale = (sub.max(axis=2) - lo) / levels
    d = _f16(scale.max(axis=1) / 63)
    dmin = _f16((-lo).max(axis=1) / 63)
    sc = np.clip(np.rint(scale / d.astype(np.float32)[:, None]), 1, 63).astype(np.uint8)
    m = np.clip(np.rint(-lo / dmin.astype(np.float32)[:, None]), 0, 63).astype(np.uint8)
    step = (d.astype(np.float32)[:, None] * sc)[:, :, None]
    off = (dmin.astype(np.float32)[:, None] * m)[:, :, None]
    q = np.clip(np.rint((sub + off) / step), 0, levels).astype(np.uint8)  # (n, 8, 32)
    return d, dmin, sc, m, q


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 8, 32) codes → (n, 128): sub-block 2c in the low, 2c+1 in the high nibble."""
    n = q.shape[0]
    pairs = q.reshape(n, 4, 2, 32) & 0xF
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128).astype(np.uint8)


def quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _affine(blocks, 15)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                           _pack_scales(sc, m), _nibbles(q)], axis=1)


def quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _affine(blocks, 31)
    high = ((q >> 4) & 1).astype(np.uint8)                      # (n, 8, 32): bit j of qh[l]
    qh = (high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1).astype(np.uint8)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                           _pack_scales(sc, m), qh, _nibbles(q)], axis=1)


def quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    ext = np.take_along_axis(sub, np.abs(sub).argmax(axis=2)[:, :, None], axis=2)[:, :, 0]
    scale = ext / -32                                           # the extreme lands on -32
    d = _f16(np.abs(scale).max(axis=1) / 127)
    sc = np.clip(np.rint(scale / d.astype(np.float32)[:, None]), -128, 127).astype(np.int8)
    step = (d.astype(np.float32)[:, None] * sc)[:, :, None]
    safe = np.where(step == 0, 1.0, step)
    u = (np.clip(np.rint(sub / safe), -32, 31) + 32).astype(np.uint8).reshape(n, 2, 128)
    ql = (u[:, :, :64] & 0xF) | ((u[:, :, 64:] & 0xF) << 4)     # (n, 2, 64)
    hi = (u >> 4).reshape(n, 2, 4, 32)
    qh = (hi << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(axis=2)
    return np.concatenate([ql.reshape(n, 128).astype(np.uint8), qh.reshape(n, 64).astype(np.uint8),
                           sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1)


_ENCODERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def quantize_k(w: np.ndarray, qtype: str) -> np.ndarray:
    """``w`` (rows, K) float → (rows, K/256 * type size) uint8 in ggml's ``qtype`` layout."""
    rows, k = w.shape
    if k % QK_K:
        raise ValueError(f"{qtype} needs rows of a multiple of {QK_K} values, got {k}")
    blocks = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, QK_K)
    return _ENCODERS[qtype](blocks).reshape(rows, -1)
