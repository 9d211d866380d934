"""Pure-numpy quantization math: int8 scales, fake quantization, activation range methods.

Everything is symmetric with zero-point 0 (TensorRT's Q/DQ rule). Weights are ``(K, N)``
(``MatMul`` B layout): per-channel means one scale per output column ``N``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Method = Literal["minmax", "percentile", "entropy"]
METHODS: tuple[Method, ...] = ("minmax", "percentile", "entropy")
QMAX = 127.0
_TINY = 1e-12


def weight_scales(w: np.ndarray) -> np.ndarray:
    """Per-output-channel int8 scales ``(N,)`` of a ``(K, N)`` weight."""
    out: np.ndarray = np.maximum(np.abs(w).max(axis=0), _TINY).astype(np.float32) / QMAX
    return out.astype(np.float32)


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8: ``(q (K, N) int8, scale (N,) float32)``."""
    scale = weight_scales(w)
    q = np.clip(np.rint(w / scale), -QMAX, QMAX).astype(np.int8)
    return q, scale


def fake_quant(x: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
    """Quantize-dequantize round trip (what a Q/DQ pair computes). One temporary, worked on in
    place: the same values as ``clip(rint(x / scale)) * scale`` without three more (K, N)
    arrays per call (SmoothQuant's alpha search calls it for every weight and candidate)."""
    q: np.ndarray = np.divide(x, scale)
    np.rint(q, out=q)
    np.clip(q, -128, QMAX, out=q)
    q *= scale
    return q


def activation_amax(rows: np.ndarray, method: Method, percentile: float = 99.99) -> float:
    """The clipping range of a per-tensor activation from sampled rows."""
    a = np.abs(rows).ravel()
    amax = float(a.max(initial=0.0))
    if amax == 0.0 or method == "minmax":
        return max(amax, _TINY)
    if method == "percentile":
        return max(float(np.percentile(a, percentile)), _TINY)
    return entropy_amax(a, amax)


def entropy_amax(a: np.ndarray, amax: float, bins: int = 2048, qbins: int = 128,
                 stride: int = 16) -> float:
    """TensorRT's entropy calibration: the threshold minimising KL(P || Q) of |x| histograms."""
    hist, edges = np.histogram(a, bins=bins, range=(0.0, amax))
    hist = hist.astype(np.float64)
    best, best_i = np.inf, bins
    for i in range(qbins, bins + 1, stride):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()  # clipped outliers land in the last kept bin
        q = _expand(_merge(hist[:i], qbins), hist[:i] > 0, i, qbins)
        kl = _kl(p, q)
        if kl < best:
            best, best_i = kl, i
    return float(edges[best_i])


def _merge(h: np.ndarray, qbins: int) -> np.ndarray:
    idx = (np.arange(len(h)) * qbins) // len(h)
    return np.bincount(idx, weights=h, minlength=qbins)


def _expand(merged: np.ndarray, nonzero: np.ndarray, n: int, qbins: int) -> np.ndarray:
    idx = (np.arange(n) * qbins) // n
    counts = np.bincount(idx, weights=nonzero.astype(np.float64), minlength=qbins)
    per = np.divide(merged, counts, out=np.zeros_like(merged), where=counts > 0)
    return np.where(nonzero, per[idx], 0.0)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p = p / max(p.sum(), _TINY)
    q = q / max(q.sum(), _TINY)
    m = p > 0
    return float(np.sum(p[m] * np.log(p[m] / np.maximum(q[m], _TINY))))


def matmul_error(x: np.ndarray, weights: list[np.ndarray],
                 act_amax: float) -> tuple[float, float]:
    """W8A8 product vs fp32 on sample rows ``x``: (relative Frobenius error, RMS abs error)."""
    xq = fake_quant(x, act_amax / QMAX)
    num = den = 0.0
    count = 0
    for w in weights:
        ref = x @ w
        got = xq @ fake_quant(w, weight_scales(w))
        num += float(np.sum((got - ref) ** 2))
        den += float(np.sum(ref**2))
        count += ref.size
    return float(np.sqrt(num / max(den, _TINY))), float(np.sqrt(num / max(count, 1)))


BLOCK_QMAX = {4: 7.0, 8: 127.0}


def quantize_blocked(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric blocked quantization along K: ``(q (K, N) int8 holding int4/int8, scale)``."""
    k, n = w.shape
    nb = -(-k // block)
    pad = np.zeros((nb * block, n), dtype=np.float32)
    pad[:k] = w
    blocks = pad.reshape(nb, block, n)
    qmax = BLOCK_QMAX[bits]
    scale = np.maximum(np.abs(blocks).max(axis=1), 1e-12) / qmax         # (nb, N)
    q = np.clip(np.rint(blocks / scale[:, None, :]), -qmax - 1, qmax)
    return q.reshape(nb * block, n)[:k].astype(np.int8), scale.astype(np.float32)


def dequantize_blocked(q: np.ndarray, scale: np.ndarray, block: int,
                       zero_point: np.ndarray | None = None) -> np.ndarray:
    zp = 0 if zero_point is None else np.repeat(zero_point.astype(np.float32), block,
                                                axis=0)[: q.shape[0]]
    out: np.ndarray = (q.astype(np.float32) - zp) * np.repeat(scale, block, axis=0)[: q.shape[0]]
    return out
