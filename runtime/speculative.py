"""Speculative decoding, the per-row core: plan a prompt-lookup draft, verify, learn from it.

    context ──propose──► draft d1..dk ──target forward of [last, d1..dk] (one weight read)──►
        logits at k+1 positions ──accept──► d1..da + one token of the target's own ──► emit a+1

Everything here is pure numpy and works on one row at a time, so a batched loop
(``spec_generate.py``) and a continuous-batching engine (per-row slots) can both drive it.

Exactness. Greedy: a draft token is kept only if it is the target's argmax at its position,
and the token after the kept ones is the target's argmax there, so the text is the plain greedy
text whatever the drafts were. Sampling: the standard rejection rule (Leviathan et al. 2023,
Chen et al. 2023): keep draft ``x`` with probability ``min(1, p(x) / q(x))``, else draw from
``norm(max(p - q, 0))``; every emitted token is then distributed as ``p`` given the tokens before
it, ``p`` being exactly what plain sampling draws from (same temperature / top-k / top-p / min-p
/ repetition penalty). Prompt lookup's ``q`` is a point mass on its draft.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llama_export.runtime.errors import InputError
from llama_export.runtime.sampling import SamplingOptions, apply_repetition_penalty, logits_to_probs

MODES = ("lookup", "draft")


@dataclass(frozen=True)
class SpeculativeOptions:
    """``mode``: ``lookup`` (n-gram match against the prompt and the text so far) or ``draft``
    (a smaller bundle with the same tokenizer, ``draft_bundle``, its ``draft_variant``).
    ``max_draft_tokens``: the most drafts verified per forward (also capped by the graph's
    logits window); ``adaptive``: shrink and grow the draft length with the acceptance seen so
    far (else always the most).
    ``min_ngram``..``max_ngram``: how long the suffix matched by prompt lookup is."""

    mode: str = "lookup"
    draft_bundle: str | None = None
    draft_variant: str | None = None  # None: the draft bundle's default variant
    max_draft_tokens: int = 8
    adaptive: bool = True
    min_ngram: int = 1
    max_ngram: int = 8

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"--speculative {self.mode} is unknown: use lookup or draft:BUNDLE")
        if (self.mode == "draft") != bool(self.draft_bundle):
            raise InputError("draft-model speculation needs a bundle: pass --speculative "
                             "draft:PATH_TO_SMALLER_BUNDLE (lookup takes none)")
        if isinstance(self.max_draft_tokens, bool) or not isinstance(self.max_draft_tokens, int) \
                or self.max_draft_tokens < 1:
            raise InputError(f"--draft-tokens must be an integer >= 1, got "
                             f"{self.max_draft_tokens!r}: use e.g. 8")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise InputError(f"n-gram sizes {self.min_ngram}..{self.max_ngram} are invalid: "
                             "use 1 <= min_ngram <= max_ngram")

    @classmethod
    def parse(cls, spec: str, draft_tokens: int = 8) -> SpeculativeOptions:
        """``lookup`` or ``draft:BUNDLE[@VARIANT]`` (the CLI's ``--speculative`` value)."""
        mode, _, bundle = spec.partition(":")
        path, _, variant = bundle.rpartition("@") if "@" in bundle else (bundle, "", "")
        return cls(mode=mode, draft_bundle=path or None, draft_variant=variant or None,
                   max_draft_tokens=draft_tokens)


# ---- drafting by prompt lookup --------------------------------------------------------------
def lookup_candidates(tokens: Sequence[int] | np.ndarray, *, min_ngram: int = 2,
                      max_ngram: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Where a draft could be copied from: ``(starts, lengths)``, one entry per earlier position
    whose preceding tokens agree with the context's suffix for ``lengths`` (>= ``min_ngram``,
    capped at ``max_ngram``) tokens; the draft starts at ``starts`` (ascending)."""
    seq = np.asarray(tokens, dtype=np.int64)
    n = len(seq)
    none = np.zeros(0, dtype=np.int64)
    if n < min_ngram + 1:
        return none, none
    cand = np.flatnonzero(seq[:-1] == seq[-1])  # match ends here; the draft starts after it
    if len(cand) == 0:
        return none, none
    length = np.ones(len(cand), dtype=np.int64)
    alive = np.ones(len(cand), dtype=bool)
    for back in range(1, max_ngram):
        ok = alive & (cand - back >= 0)
        idx = np.where(ok, cand - back, 0)
        ok &= seq[idx] == seq[n - 1 - back]
        length += ok
        alive = ok
        if not alive.any():
            break
    keep = length >= min_ngram
    return cand[keep] + 1, length[keep]


def lookup_draft(tokens: Sequence[int] | np.ndarray, k: int, *, min_ngram: int = 2,
                 max_ngram: int = 8) -> list[int]:
    """Up to ``k`` tokens that followed the longest earlier match of the context's suffix.

    Candidates are earlier positions holding the context's last token; each is scored by how
    many tokens before it also agree with the context (up to ``max_ngram``). The longest match
    of at least ``min_ngram`` wins; among equals, one with ``k`` tokens after it before one
    running into the end of the context (in a repeating run the latest match is one step
    back), then the most recent (the likeliest to be where a rewrite currently is). Empty when
    nothing matches.
    """
    if k < 1:
        return []
    starts, length = lookup_candidates(tokens, min_ngram=min_ngram, max_ngram=max_ngram)
    if len(starts) == 0:
        return []
    n = len(tokens)
    score = length * (k + 1) + np.minimum(n - starts, k)
    start = int(starts[np.flatnonzero(score == score.max())[-1]])
    return [int(t) for t in tokens[start:start + k]]


class VerifyCost:
    """What one forward of ``T`` new tokens costs, in plain decode steps (``T = 1`` costs 1).

    Prior: ``1 + PRIOR_SLOPE * (T - 1)`` (measured on a 2-core AVX2 CPU: 1.09 / 1.42 / 2.11 at
    T = 2 / 5 / 9 for the Qwen2.5 1.5B ``--ort-int8 w8a8`` graph, 2.2 at 9 for SmolLM2's and
    2.5 with ``w8a8-blocks``, 3.1 for the 1.5B's ``w8a8-blocks``; a GPU or an fp32 graph, bound
    by weight reads, is flatter). :meth:`observe`
    learns the real times per (batch, T) as they come: a moving average per point, linear in
    between, the prior's slope past the last point measured (so a longer draft gets tried and
    measured). ``measured=False`` reads the prior only: the clock then never changes a
    decision, and a seeded sampled text is reproducible.
    """

    PRIOR_SLOPE = 0.15
    DECAY = 0.8  # weight of the previous average per new sample

    def __init__(self) -> None:
        self._ms: dict[tuple[int, int], float] = {}

    def observe(self, batch: int, tokens: int, seconds: float) -> None:
        key = (batch, tokens)
        old = self._ms.get(key)
        ms = seconds * 1e3
        self._ms[key] = ms if old is None else self.DECAY * old + (1 - self.DECAY) * ms

    def measured_steps(self, batch: int = 1) -> dict[int, float]:
        """The points learned so far, ``{T: steps}`` (empty before a plain step is timed)."""
        one = self._ms.get((batch, 1))
        if not one:
            return {}
        return {t: ms / one for (b, t), ms in sorted(self._ms.items()) if b == batch}

    def curve(self, upto: int, batch: int = 1, measured: bool = True) -> np.ndarray:
        """``[steps(1), ..., steps(upto)]``: the points measured, linear in between, the prior's
        slope past the last one; the prior alone when nothing is measured or ``measured=False``."""
        t = np.arange(1, upto + 1, dtype=np.float64)
        points = self.measured_steps(batch) if measured else {}
        if len(points) < 2:
            out: np.ndarray = 1.0 + self.PRIOR_SLOPE * (t - 1)
            return out
        xs, ys = np.array(list(points), dtype=np.float64), np.array(list(points.values()))
        out = np.interp(t, xs, ys)
        past = t > xs[-1]
        out[past] = ys[-1] + self.PRIOR_SLOPE * (t[past] - xs[-1])
        return out

    def steps(self, tokens: int, batch: int = 1, measured: bool = True) -> float:
        return float(self.curve(tokens, batch, measured)[-1])


class LookupPlanner:
    """Prompt-lookup drafting for one row: which earlier text to copy, and how much of it.

    *Where from.* The candidates of :func:`lookup_candidates` (a 1-token match is enough). The
    one continuing the last copy (its start is just past the last draft's kept tokens) wins
    unless it runs into the end of the context sooner than another; then the longest match,
    the one with the most tokens after it, the nearest after the last copy (a rewrite walks its
    source forwards), the most recent.

    *How much.* Each draft token is kept with a probability ``p`` estimated per match length
    (1, 2, 3, 4+ tokens, or a continuation of the last copy) from the verifications seen so far
    (a moving average from a prior per bucket, :attr:`PRIOR_KEEP`). Drafting ``k`` tokens then
    yields ``1 + p + ... + p^k`` tokens for ``cost.steps(k + 1)`` steps; the planner drafts
    the ``k`` with the most tokens per step, 0 (a plain step) when none beats it. So text the
    context does not predict decodes plainly, while a long copy drafts as far as the forward
    stays cheap. An estimate that drafting stopped using drifts back towards its prior, so a
    later copy is found again.
    ``adaptive=False``: always the best candidate's full ``k``.
    """

    # Keep rate before any evidence, per bucket, as 2 pseudo-trials: about what the 1.5B and
    # SmolLM2 showed on the built-in grounded and chat prompts (0.19-0.36, 0.33-0.74,
    # 0.73-0.81, 0.86-0.92, 0.58-0.94). A long match starting optimistic matters where a forward of
    # several tokens is dear: at p = 1/2 nothing would be drafted, so nothing learned.
    PRIOR_KEEP = (0.3, 0.55, 0.7, 0.85, 0.85)
    PRIOR_WEIGHT = 2.0
    DECAY = 0.9  # per verified draft position
    RELAX = 0.98  # per plain step chosen over an available draft
    BUCKETS = 5  # match lengths 1, 2, 3, 4+; index 4: the continuation of the last copy

    def __init__(self, max_k: int, cost: VerifyCost, *, measured: bool = True,
                 adaptive: bool = True, min_ngram: int = 1, max_ngram: int = 8,
                 batch: int = 1) -> None:
        self.max_k, self.cost, self.measured, self.adaptive = max_k, cost, measured, adaptive
        self.min_ngram, self.max_ngram, self.batch = min_ngram, max_ngram, batch
        self._prior_kept = np.array(self.PRIOR_KEEP) * self.PRIOR_WEIGHT
        self._kept = self._prior_kept.copy()
        self._tried = np.full(self.BUCKETS, self.PRIOR_WEIGHT)
        self._copy_end: int | None = None  # where the last copy would continue
        self._source: tuple[int, int] | None = None  # (start, bucket) of the pending draft

    def keep_rate(self, bucket: int) -> float:
        return float(self._kept[bucket] / self._tried[bucket])

    def propose(self, tokens: Sequence[int] | np.ndarray, k: int) -> list[int]:
        """Up to ``k`` (<= ``max_k``) drafts after ``tokens`` (the row's whole context)."""
        self._source = None
        k = min(k, self.max_k)
        if k < 1:
            return []
        starts, length = lookup_candidates(tokens, min_ngram=self.min_ngram,
                                           max_ngram=self.max_ngram)
        if len(starts) == 0:
            return []
        n, end = len(tokens), self._copy_end
        room = np.minimum(n - starts, k)
        full = room == room.max()  # e.g. not the latest match in a repeating run
        carry_on = full & (starts == end) if end is not None else np.zeros(len(starts), bool)
        ahead = np.where(starts >= end, starts - end, n) if end is not None else np.full_like(starts, n)
        # best last: continues the copy, match length, room, nearness after the copy, recency
        pick = int(np.lexsort((np.arange(len(starts)), -ahead, room, length, carry_on))[-1])
        start = int(starts[pick])
        bucket = self.BUCKETS - 1 if carry_on[pick] else min(int(length[pick]), 4) - 1
        size = int(room[pick]) if not self.adaptive else self._best_size(bucket, int(room[pick]))
        if size == 0:  # a plain step: let the unused estimate drift back towards the prior
            self._kept[bucket] = (self.RELAX * self._kept[bucket]
                                  + (1 - self.RELAX) * self._prior_kept[bucket])
            self._tried[bucket] = (self.RELAX * self._tried[bucket]
                                   + (1 - self.RELAX) * self.PRIOR_WEIGHT)
            return []
        self._source = (start, bucket)
        return [int(t) for t in tokens[start:start + size]]

    def _best_size(self, bucket: int, room: int) -> int:
        """The k in 0..room with the most expected tokens per step (0: a plain step)."""
        expected = np.cumsum(self.keep_rate(bucket) ** np.arange(room + 1))  # 1 + p + ... + p^k
        rate = expected / self.cost.curve(room + 1, self.batch, self.measured)
        return int(np.argmax(rate))  # the first of equals: the shorter draft

    def update(self, drafted: int, accepted: int, advanced: int | None = None) -> None:
        """After a verification of ``drafted`` of this planner's drafts (0: a plain step), of
        which the target kept ``accepted``; the row then moved ``advanced + 1`` tokens on
        (default ``accepted``; fewer when a batch keeps only what every row accepted)."""
        advanced = accepted if advanced is None else advanced
        if drafted == 0 or self._source is None:
            if self._copy_end is not None:
                self._copy_end += advanced + 1
            return
        start, bucket = self._source
        if self.adaptive:
            tried = accepted + (accepted < drafted)
            self._kept[bucket] = self._kept[bucket] * self.DECAY ** tried + accepted
            self._tried[bucket] = self._tried[bucket] * self.DECAY ** tried + tried
        self._copy_end = start + advanced + 1
        self._source = None


# ---- verification -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """``tokens``: the kept drafts then one token of the target's own (``accepted`` + 1)."""

    tokens: list[int]
    accepted: int


def _penalized(logits: np.ndarray, seen: np.ndarray | None, opts: SamplingOptions) -> np.ndarray:
    if seen is None:
        return logits
    row: np.ndarray = apply_repetition_penalty(logits[None], seen[None], opts.repetition_penalty)[0]
    return row


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    cdf = np.cumsum(probs)
    pick = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return min(pick, int(np.flatnonzero(probs > 0)[-1]))  # never a zero-probability token


def verify_row(logits: np.ndarray, draft: Sequence[int] | np.ndarray, opts: SamplingOptions,
               rng: np.random.Generator, *, seen: np.ndarray | None = None,
               draft_probs: np.ndarray | None = None) -> Verdict:
    """Accept a prefix of ``draft`` against the target's ``logits`` ``[len(draft) + 1, vocab]``
    (position j scores the token after ``draft[:j]``).

    ``seen`` (bool ``[vocab]``, repetition penalty only) holds the row's tokens before the
    draft; ``draft_probs`` ``[len(draft), vocab]`` is the distribution each draft token was
    drawn from (None: a point mass, as prompt lookup's drafts are).
    """
    if logits.shape[0] != len(draft) + 1:
        raise ValueError(f"{logits.shape[0]} logits rows for {len(draft)} drafts")
    seen = None if seen is None or opts.repetition_penalty == 1.0 else seen.copy()
    for j, x in enumerate(draft):
        q = None if draft_probs is None else draft_probs[j]
        own = _judge(_penalized(logits[j], seen, opts), int(x), q, opts, rng)
        if own is not None:
            return Verdict([*map(int, draft[:j]), own], j)
        if seen is not None:
            seen[x] = True
    last = _penalized(logits[-1], seen, opts)
    bonus = int(np.argmax(last)) if opts.greedy else draw(logits_to_probs(last[None], opts)[0], rng)
    return Verdict([*map(int, draft), bonus], len(draft))


def _judge(scores: np.ndarray, x: int, q: np.ndarray | None, opts: SamplingOptions,
           rng: np.random.Generator) -> int | None:
    """None if draft ``x`` stands, else the token the target puts in its place."""
    if opts.greedy:
        best = int(np.argmax(scores))
        return None if best == x else best
    p = logits_to_probs(scores[None], opts)[0]
    q_x = 1.0 if q is None else float(q[x])
    if q_x > 0 and rng.random() < min(1.0, float(p[x]) / q_x):
        return None
    if q is None:  # max(p - onehot(x), 0): p without x
        residual = p.copy()
        residual[x] = 0.0
    else:
        residual = np.maximum(p - q, 0.0)
    if residual.sum() <= 0:  # p == q up to rounding: cannot happen with exact arithmetic
        residual = p
    return draw(residual / residual.sum(), rng)


# ---- adaptive draft length ------------------------------------------------------------------
class AdaptiveDraftLength:
    """How many tokens to draft next, from the acceptance seen so far (deterministic: it never
    looks at the clock, so a seed reproduces a sampled text).

    All drafts accepted: draft two more next time (up to ``max_k``). A rejection: draft one
    more than were accepted. Drafts rejected outright twice in a row: stop drafting for a
    pause that doubles on each further miss (up to 64 steps), so text the context does not
    predict runs at plain-decode speed; any acceptance ends the pause schedule.
    """

    MAX_PAUSE = 64

    def __init__(self, max_k: int, adaptive: bool = True) -> None:
        self.max_k = max_k
        self.adaptive = adaptive
        self.k = max_k if not adaptive else min(max_k, 4)
        self._misses = 0
        self._pause = 0
        self._next_pause = 4

    def budget(self) -> int:
        """Drafts to ask for at this step (0: decode one token plainly)."""
        if self._pause > 0:
            self._pause -= 1
            return 0
        return self.k

    def update(self, drafted: int, accepted: int) -> None:
        if not self.adaptive or drafted == 0:
            return
        if accepted == drafted:
            self.k = min(self.max_k, self.k + 2)
        else:
            self.k = max(1, min(self.max_k, accepted + 1))
        if accepted:
            self._misses, self._next_pause = 0, 4
            return
        self._misses += 1
        if self._misses >= 2:
            self._pause, self._misses = self._next_pause, 0
            self._next_pause = min(2 * self._next_pause, self.MAX_PAUSE)
