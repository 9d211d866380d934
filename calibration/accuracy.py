"""Accuracy of a variant vs fp32 on held-out text: perplexity, top-1 agreement, mean KL.

Both graphs run the same segments as one prefill each when the bundle returns logits for
every position (``logits="all"``), else in chunks of ``N`` over their own KV cache when it returns
the last ``N`` (``"tail:N"``; ``"last"`` is ``N`` = 1, slower): the same logits either way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from llama_export.runtime.backends.base import logits_window
from llama_export.runtime.manifest import Manifest

from .data import empty_past, past_from_outputs, prefill_feed
from .graph import ort_session


@dataclass(frozen=True)
class Accuracy:
    ppl_fp32: float
    ppl: float
    top1_agreement: float
    mean_kl: float
    tokens: int

    @property
    def ppl_ratio(self) -> float:
        return self.ppl / self.ppl_fp32

    def to_dict(self) -> dict[str, float]:
        d: dict[str, float] = {k: round(float(v), 6) for k, v in asdict(self).items()}
        d["tokens"] = self.tokens
        d["ppl_ratio"] = round(self.ppl_ratio, 6)
        return d

    def line(self) -> str:
        return (f"ppl {self.ppl:.3f} vs fp32 {self.ppl_fp32:.3f} ({100 * (self.ppl_ratio - 1):+.2f}"
                f"%), top-1 agreement {100 * self.top1_agreement:.1f}%, mean KL "
                f"{self.mean_kl:.4f} over {self.tokens} tokens")


@dataclass(frozen=True)
class Gate:
    max_ppl_increase: float = 0.03   # relative: 0.03 = +3 %
    min_top1: float = 0.90

    def failures(self, acc: Accuracy) -> list[str]:
        out = []
        if acc.ppl_ratio - 1 > self.max_ppl_increase:
            out.append(f"perplexity +{100 * (acc.ppl_ratio - 1):.1f}% exceeds "
                       f"+{100 * self.max_ppl_increase:.1f}%")
        if acc.top1_agreement < self.min_top1:
            out.append(f"top-1 agreement {100 * acc.top1_agreement:.1f}% is below "
                       f"{100 * self.min_top1:.1f}%")
        return out


def segment_logits(model: onnx.ModelProto | Path, manifest: Manifest,
                   segments: np.ndarray) -> list[np.ndarray]:
    """Per-segment logits ``(seq, vocab)``: one prefill each, or chunks of the tail window."""
    window = logits_window(str(manifest.variant("fp32").get("logits", "all")))
    with ort_session(model) as sess:
        present = [o.name for o in sess.get_outputs()][1:]  # type: ignore[attr-defined]
        out = []
        for seg in segments:
            chunk, past, parts = window or len(seg), empty_past(manifest), []
            for start in range(0, len(seg), chunk):
                outs = sess.run(None, prefill_feed(seg[start:start + chunk], past))  # type: ignore[attr-defined]
                parts.append(outs[0][0])
                past = past_from_outputs(present, outs[1:])
            out.append(np.asarray(np.concatenate(parts), dtype=np.float64))
    return out


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    out: np.ndarray = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return out


def compare(ref: list[np.ndarray], got: list[np.ndarray], segments: np.ndarray) -> Accuracy:
    nll_ref = nll_got = kl = agree = 0.0
    n = 0
    for r, g, seg in zip(ref, got, segments, strict=True):
        lr, lg = _log_softmax(r[:-1]), _log_softmax(g[:-1])
        tgt = seg[1:]
        rows = np.arange(len(tgt))
        nll_ref -= float(lr[rows, tgt].sum())
        nll_got -= float(lg[rows, tgt].sum())
        kl += float((np.exp(lr) * (lr - lg)).sum())
        agree += float((lr.argmax(-1) == lg.argmax(-1)).sum())
        n += len(tgt)
    return Accuracy(float(np.exp(nll_ref / n)), float(np.exp(nll_got / n)), agree / n, kl / n, n)
