"""Token sampling, pure numpy (gpt-fast's ``logits_to_probs`` / ``sample``).

Order of operations follows transformers' ``generate`` so the same options mean the same thing:
repetition penalty → temperature → top-k → top-p → min-p → draw. ``temperature == 0`` is greedy
(argmax after the repetition penalty). Randomness comes only from the explicit
``np.random.Generator`` passed in, so a seed reproduces a generation exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llama_export.runtime.errors import InputError


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick the next token. Validated on construction (one-line errors naming the fix).

    ``temperature`` 0 = greedy; ``top_k`` 0 = off; ``top_p`` 1.0 = off; ``min_p`` 0.0 = off;
    ``repetition_penalty`` 1.0 = off (CTRL-style, as in transformers); ``seed`` None = fresh
    entropy.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"temperature must be >= 0, got {self.temperature}: "
                             "use 0 for greedy or a positive value such as 0.7")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0, got {self.top_k!r}: "
                             "use 0 to disable or a value such as 40")
        if not (0.0 < self.top_p <= 1.0):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}: "
                             "use 1.0 to disable or a value such as 0.9")
        if not (0.0 <= self.min_p <= 1.0):
            raise InputError(f"min_p must be in [0, 1], got {self.min_p}: "
                             "use 0 to disable or a value such as 0.05")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}: "
                             "use 1.0 to disable or a value such as 1.1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """Make tokens already in the sequence less likely: divide positive logits, multiply negative.

    ``logits`` ``[batch, vocab]``; ``seen`` bool ``[batch, vocab]`` (prompt + generated tokens).
    """
    if penalty == 1.0:
        return logits
    penalized = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen, penalized, logits)


def _keep_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    # argpartition keeps exactly k indices per row, even with tied logits.
    top = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
    out = np.full_like(logits, -np.inf)
    np.put_along_axis(out, top, np.take_along_axis(logits, top, axis=-1), axis=-1)
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)  # type: ignore[no-any-return]


def _keep_top_p(probs: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose total probability reaches ``p``."""
    if p >= 1.0:
        return probs
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, axis=-1)
    before = np.cumsum(sorted_p, axis=-1) - sorted_p  # mass of strictly more likely tokens
    keep_sorted = before < p  # the first token always has 0 before it, so it is always kept
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return np.where(keep, probs, 0.0)


def _keep_min_p(probs: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens less likely than ``min_p`` times the most likely one."""
    if min_p <= 0.0:
        return probs
    floor = min_p * probs.max(axis=-1, keepdims=True)
    return np.where(probs >= floor, probs, 0.0)


def logits_to_probs(logits: np.ndarray, opts: SamplingOptions) -> np.ndarray:
    """Filtered, normalised float64 probabilities ``[batch, vocab]`` (temperature > 0)."""
    scaled = logits.astype(np.float64) / opts.temperature
    probs = _softmax(_keep_top_k(scaled, opts.top_k))
    probs = _keep_min_p(_keep_top_p(probs, opts.top_p), opts.min_p)
    return probs / probs.sum(axis=-1, keepdims=True)  # type: ignore[no-any-return]


def sample(logits: np.ndarray, opts: SamplingOptions, rng: np.random.Generator,
           seen: np.ndarray | None = None) -> np.ndarray:
    """Next token per row: int64 ``[batch]`` from float logits ``[batch, vocab]``."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, opts.repetition_penalty)
    if opts.greedy:
        return np.argmax(logits, axis=-1).astype(np.int64)  # type: ignore[no-any-return]
    probs = logits_to_probs(logits, opts)
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(probs.shape[0]) * cdf[:, -1]
    # side="right" never lands on a zero-probability token: its cdf equals its predecessor's.
    picks = np.array([np.searchsorted(row, x, side="right") for row, x in zip(cdf, u, strict=True)])
    last_allowed = probs.shape[-1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=-1)
    return np.minimum(picks, last_allowed).astype(np.int64)  # type: ignore[no-any-return]
