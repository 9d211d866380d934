"""One backend over the stored references → one scored row. Knows nothing of ORT or TensorRT.

    item ids ──feed_schedule (tail_limit)──► Backend.forward_tail calls ──► ItemTrace (our logits
    at the original's top-k ids, our argmax, our log p of the next token) ──► ItemScore ──► Row

Every position's logits are needed. A graph that returns all positions takes the prompt (or the
held-out text) in one prefill call; a ``--logits last`` graph (or an engine whose prefill profile
is shorter than the prompt) is fed one token per call. Either way the continuation runs as
one-token decode steps, which is what a deployment runs.

Greedy divergence comes from the same teacher-forced run: until the runtime's first different
token its own greedy sequence *is* the original's, so the first position where our argmax
differs from the stored continuation is where free-running generation would diverge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llama_export.runtime.backends.base import Backend
from llama_export.runtime.errors import InputError

from .references import ReferenceItem, ReferenceSet
from .tolerances import Tolerance

Progress = Callable[[str], None]


def feed_schedule(fed: int, prompt_tokens: int, tail_limit: Callable[[int], int],
                  max_seq: int) -> list[int]:
    """Sizes of consecutive forward calls covering ``fed`` tokens, each call returning the
    logits of all its tokens: the prompt in one call when the backend allows, then one token
    per call."""
    first = min(prompt_tokens, fed)
    if 1 < first <= max_seq and tail_limit(first) >= first:
        return [first] + [1] * (fed - first)
    return [1] * fed


@dataclass(frozen=True)
class ItemTrace:
    """What a backend answered on one reference item, kept compact (no full-vocab rows)."""

    at_ref: np.ndarray    # float32 [n-1, k]: our logits at the original's top-k ids
    argmax: np.ndarray    # int64 [n-1]
    logprob: np.ndarray   # float64 [n-1]: our log p(next reference token)


def trace_item(backend: Backend, item: ReferenceItem) -> ItemTrace:
    fed = item.positions
    if fed > backend.manifest.max_context:
        raise InputError(
            f"reference '{item.name}' needs {fed} positions but this {backend.variant} backend "
            f"holds at most {backend.manifest.max_context}: rebuild the TensorRT engine with "
            f"`llama-export trt ... --max-context {fed}` (or more)")
    sizes = feed_schedule(fed, item.prompt_tokens, backend.tail_limit,
                          backend.manifest.dims["seq"].max)
    at_ref = np.empty(item.topk_ids.shape, dtype=np.float32)
    argmax = np.empty(fed, dtype=np.int64)
    logprob = np.empty(fed, dtype=np.float64)
    cache = backend.new_cache(1, fed)
    start = 0
    for size in sizes:
        rows = slice(start, start + size)
        ids = item.ids[None, rows]
        pos = np.arange(start, start + size, dtype=np.int64)[None, :]
        logits = backend.forward_tail(ids, pos, None, cache, size)[0].astype(np.float64)
        at_ref[rows] = np.take_along_axis(logits, item.topk_ids[rows], axis=1)
        argmax[rows] = logits.argmax(axis=-1)
        top = logits.max(axis=-1, keepdims=True)
        lse = (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))[:, 0]
        logprob[rows] = logits[np.arange(size), item.ids[start + 1:start + size + 1]] - lse
        start += size
    return ItemTrace(at_ref, argmax, logprob)


@dataclass(frozen=True)
class ItemScore:
    name: str
    kind: str
    error_by_position: np.ndarray  # max |Δlogit| over the top-k, per position
    abs_sum: float                 # sum of |Δlogit| over positions x k (for the mean)
    abs_count: int
    top1_hits: int
    kl: np.ndarray                 # per position
    greedy_tokens: int | None      # tokens reproduced before the first divergence
    divergence_margin: float | None  # the original's top-2 gap where we diverged
    new_tokens: int
    logprob: np.ndarray            # ours, per position
    ref_logprob: np.ndarray


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    out: np.ndarray = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return out


def score_item(item: ReferenceItem, trace: ItemTrace) -> ItemScore:
    ref = item.topk_values.astype(np.float64)
    diff = np.abs(trace.at_ref - ref)
    lp, lq = _log_softmax(ref), _log_softmax(trace.at_ref.astype(np.float64))
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    greedy, margin = None, None
    if item.kind != "heldout":
        rows = item.continuation_rows
        miss = np.flatnonzero(trace.argmax[rows] != item.ids[item.prompt_tokens:])
        greedy = int(miss[0]) if miss.size else item.new_tokens
        if miss.size:
            row = rows.start + int(miss[0])
            margin = float(ref[row, 0] - ref[row, 1])
    return ItemScore(item.name, item.kind, diff.max(axis=-1), float(diff.sum()), diff.size,
                     int((trace.argmax == item.topk_ids[:, 0]).sum()), kl, greedy, margin,
                     item.new_tokens, trace.logprob, item.logprobs.astype(np.float64))


@dataclass(frozen=True)
class RowLabel:
    variant: str
    precision: str
    graph: str            # standard | ort | the engine file
    backend: str          # e.g. "ort:cpu", "trt"


@dataclass
class Row:
    """One (variant, graph or engine, backend) line of the parity table."""

    label: RowLabel
    tolerance: Tolerance
    max_abs: float
    mean_abs: float
    top1: float
    kl: float
    ppl: float | None
    ppl_ref: float | None
    greedy: dict[str, int]       # prompt name -> tokens before the first divergence
    new_tokens: dict[str, int]
    greedy_gated: float          # the share ``greedy`` is judged on (near-ties forgiven)
    positions: int
    failures: list[str] = field(default_factory=list)
    scores: list[ItemScore] = field(default_factory=list, repr=False)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def greedy_worst(self) -> str:
        """``reproduced/continuation`` of the prompt that diverged earliest (``-``: none)."""
        worst = min(self.greedy, key=lambda k: self.greedy[k] / self.new_tokens[k], default=None)
        return "-" if worst is None else f"{self.greedy[worst]}/{self.new_tokens[worst]}"

    @property
    def ppl_increase(self) -> float | None:
        return None if self.ppl is None or self.ppl_ref is None else self.ppl / self.ppl_ref - 1

    def to_dict(self) -> dict[str, Any]:
        keys = ("max_abs", "mean_abs", "top1", "kl", "ppl", "ppl_ref", "greedy", "new_tokens",
                "greedy_gated", "positions", "failures")
        out: dict[str, Any] = {**vars(self.label), **{k: getattr(self, k) for k in keys}}
        out["ppl_increase"] = self.ppl_increase
        out["greedy_worst"] = self.greedy_worst
        out["passed"] = self.passed
        out["tolerance"] = dict(vars(self.tolerance))
        return out


def _greedy_share(s: ItemScore, tie: float) -> float:
    assert s.greedy_tokens is not None  # prompt items only
    if s.divergence_margin is not None and s.divergence_margin < tie:
        return 1.0  # a near-tie in the original: either pick is right
    return s.greedy_tokens / s.new_tokens


def make_row(label: RowLabel, scores: list[ItemScore], tol: Tolerance) -> Row:
    """Aggregate item scores into a row and judge it."""
    n = sum(len(s.kl) for s in scores)
    held = [s for s in scores if s.kind == "heldout"]
    prompts = [s for s in scores if s.kind != "heldout"]
    ppl = ppl_ref = None
    if held:
        ppl = float(np.exp(-np.concatenate([s.logprob for s in held]).mean()))
        ppl_ref = float(np.exp(-np.concatenate([s.ref_logprob for s in held]).mean()))
    row = Row(label, tolerance=tol,
              max_abs=float(max(s.error_by_position.max() for s in scores)),
              mean_abs=sum(s.abs_sum for s in scores) / sum(s.abs_count for s in scores),
              top1=sum(s.top1_hits for s in scores) / n,
              kl=float(np.concatenate([s.kl for s in scores]).mean()), ppl=ppl, ppl_ref=ppl_ref,
              greedy={s.name: int(s.greedy_tokens or 0) for s in prompts},
              new_tokens={s.name: s.new_tokens for s in prompts},
              greedy_gated=min((_greedy_share(s, tol.tie) for s in prompts), default=1.0),
              positions=n, scores=scores)
    row.failures = judge(row, tol)
    return row


def judge(row: Row, tol: Tolerance) -> list[str]:
    """One phrase per broken limit (empty: the row passes). Non-finite logits always fail."""
    out = []
    values = (row.max_abs, row.mean_abs, row.kl, row.ppl_increase)
    if not all(v is None or np.isfinite(v) for v in values):
        return ["non-finite logits (NaN or inf)"]
    checks = [("max |dlogit|", row.max_abs, tol.max_abs, False),
              ("mean |dlogit|", row.mean_abs, tol.mean_abs, False),
              ("top-1", row.top1, tol.top1, True), ("KL", row.kl, tol.kl, False),
              ("ppl increase", row.ppl_increase, tol.ppl, False),
              ("greedy", row.greedy_gated, tol.greedy, True)]
    for name, value, limit, at_least in checks:
        if value is None or limit is None:
            continue
        if (value < limit) if at_least else (value > limit):
            out.append(f"{name} {value:.4g} {'<' if at_least else '>'} {limit:.4g}")
    return out


def compare_backend(backend: Backend, refs: ReferenceSet, label: RowLabel,
                    tol: Tolerance, progress: Progress = lambda _: None) -> Row:
    """Run ``backend`` over every reference item and score it (the one comparison path: ORT,
    its CUDA/TensorRT providers and TensorRT engines differ only in the backend object)."""
    scores = []
    for i, item in enumerate(refs.items, 1):
        progress(f"{label.variant} ({label.graph}, {label.backend}): {item.name} "
                 f"({i}/{len(refs.items)}, "
                 f"{item.positions} positions)")
        scores.append(score_item(item, trace_item(backend, item)))
    return make_row(label, scores, tol)
