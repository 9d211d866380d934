"""Accuracy of a variant vs fp32 on held-out text: perplexity, top-1 agreement, mean KL.

Both graphs run the same segments as one prefill each when the bundle returns logits for
every position (``logits="all"``), else in chunks of ``N`` over their own KV cache when it returns
the last ``N`` (``"tail:N"``; ``"last"`` is ``N`` = 1, slower): the same logits either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx

from llama_export.runtime.backends.base import logits_window
from llama_export.runtime.manifest import Manifest

from .data import empty_past, past_from_outputs, prefill_feed
from .graph import ort_session

T = TypeVar("T")


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
class GenreAccuracy:
    """Accuracy per genre of held-out text (prose, dialogue, code, ...), gated one by one: a
    variant that holds on one genre can lose top-1 agreement on another (issue #10 measured
    0.956 vs 0.890 for the same W8A8 graph)."""

    genres: dict[str, Accuracy]

    @property
    def pooled(self) -> Accuracy:
        """All genres' tokens together (perplexities combined through their log)."""
        accs = list(self.genres.values())
        n = sum(a.tokens for a in accs)

        def mean(f: Callable[[Accuracy], float]) -> float:
            return sum(f(a) * a.tokens for a in accs) / n

        return Accuracy(float(np.exp(mean(lambda a: np.log(a.ppl_fp32)))),
                        float(np.exp(mean(lambda a: np.log(a.ppl)))),
                        mean(lambda a: a.top1_agreement), mean(lambda a: a.mean_kl), n)

    @property
    def ppl_ratio(self) -> float:
        return self.pooled.ppl_ratio

    @property
    def top1_agreement(self) -> float:
        return self.pooled.top1_agreement

    def to_dict(self) -> dict[str, Any]:
        return {**self.pooled.to_dict(), "genres": {g: a.to_dict() for g, a in self.genres.items()}}

    def line(self) -> str:
        if len(self.genres) == 1:
            return next(iter(self.genres.values())).line()
        parts = [f"{g} {100 * (a.ppl_ratio - 1):+.2f}% / {100 * a.top1_agreement:.1f}%"
                 for g, a in self.genres.items()]
        return f"{self.pooled.line()}; per genre (ppl / top-1): {', '.join(parts)}"


@dataclass(frozen=True)
class Gate:
    max_ppl_increase: float = 0.03   # relative: 0.03 = +3 %
    min_top1: float = 0.90

    def failures(self, acc: Accuracy | GenreAccuracy) -> list[str]:
        if isinstance(acc, GenreAccuracy):
            if len(acc.genres) == 1:
                return self.failures(next(iter(acc.genres.values())))
            return [f"{genre}: {f}" for genre, a in acc.genres.items() for f in self.failures(a)]
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
    """Per-segment logits ``(seq, vocab)`` as float64: one prefill each, or chunks of the tail
    window."""
    return [np.asarray(x, dtype=np.float64) for x in iter_segment_logits(model, manifest, segments)]


def iter_segment_logits(model: onnx.ModelProto | Path, manifest: Manifest,
                        segments: np.ndarray) -> Iterator[np.ndarray]:
    """:func:`segment_logits` one segment at a time, in the graph's own output dtype (float32:
    half the bytes of float64, which :func:`compare` converts to per segment, so the figures
    are the same). A 151,936-token vocabulary makes one 128-token segment 78 MB of float32
    logits: 24 held-out segments held as float64, twice (reference and candidate), took 7.5 GB."""
    yield from genre_logits(model, manifest, {"": segments}, lambda _, logits: logits)[""]


def genre_logits(model: onnx.ModelProto | Path, manifest: Manifest, segments: dict[str, Any],
                 consume: Callable[[str, Iterator[np.ndarray]], T]) -> dict[str, T]:
    """``consume(genre, logits)`` for every genre's segments on one ONNX Runtime session (a
    graph past 2 GB is written to a temp file once, not once per genre); ``logits`` yields
    one segment's ``(seq, vocab)`` logits at a time, in the graph's output dtype."""
    window = logits_window(str(manifest.variant("fp32").get("logits", "all")))
    graph = (onnx.load(str(model), load_external_data=False) if isinstance(model, Path)
             else model).graph
    half = any(v.name.startswith("past_key_values.") and
               v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for v in graph.input)
    dtype = np.float16 if half else np.float32

    def run(sess: Any, segs: np.ndarray) -> Iterator[np.ndarray]:
        present = [o.name for o in sess.get_outputs()][1:]
        for seg in segs:
            chunk, parts = window or len(seg), []
            past = {k: v.astype(dtype) for k, v in empty_past(manifest).items()}
            for start in range(0, len(seg), chunk):
                outs = sess.run(None, prefill_feed(seg[start:start + chunk], past))
                parts.append(outs[0][0])
                past = past_from_outputs(present, outs[1:])
            yield parts[0] if len(parts) == 1 else np.concatenate(parts)

    with ort_session(model) as sess:
        return {g: consume(g, run(sess, s)) for g, s in segments.items()}


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    out: np.ndarray = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return out


def compare(ref: Iterable[np.ndarray], got: Iterable[np.ndarray],
            segments: np.ndarray) -> Accuracy:
    """Figures of ``got`` against ``ref`` (per-segment logits, any float dtype: computed in
    float64); ``got`` may be an iterator, consumed one segment at a time."""
    nll_ref = nll_got = kl = agree = 0.0
    n = 0
    for r, g, seg in zip(ref, got, segments, strict=True):
        lr = _log_softmax(np.asarray(r[:-1], dtype=np.float64))
        lg = _log_softmax(np.asarray(g[:-1], dtype=np.float64))
        del g
        tgt = seg[1:]
        rows = np.arange(len(tgt))
        nll_ref -= float(lr[rows, tgt].sum())
        nll_got -= float(lg[rows, tgt].sum())
        kl += float((np.exp(lr) * (lr - lg)).sum())
        agree += float((lr.argmax(-1) == lg.argmax(-1)).sum())
        n += len(tgt)
    return Accuracy(float(np.exp(nll_ref / n)), float(np.exp(nll_got / n)), agree / n, kl / n, n)
