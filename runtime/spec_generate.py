"""The generation loop with speculative decoding (``BatchGeneration`` with another decode phase).

    prefill ─► first token ─┬─► drafter.propose(context, k) ─► d1..dk per row
                            │   target.forward_tail([last, d1..dk]) ─► logits at k+1 positions
                            │   verify_row per row ─► accepted a_r; m = min over live rows
                            │   emit m + 1 tokens per row; truncate the cache to the kept prefix
                            └─◄ adapt k ◄──────────────────────────────────────────────┘

Rows of a left-padded batch stay aligned (the ONNX-Runtime graph rotates RoPE by cache slot, so
a row cannot skip slots): every row advances by ``m + 1`` tokens, ``m`` the fewest drafts any
live row accepted. For each row, the token after its first ``m`` kept drafts is known from the
same logits (its next kept draft or its own correction), so greedy text is unchanged; with
sampling every emitted token is still drawn as the target would (see ``speculative.py``).

Stopping is token by token exactly as in the plain loop (EOS, stop strings, ``max_new_tokens``,
a full context), so the outputs, finish reasons and streamed pieces are the plain loop's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from llama_export.runtime.backends.base import Backend
from llama_export.runtime.errors import InputError
from llama_export.runtime.generate import (
    BatchGeneration,
    GenerationOptions,
    Piece,
    Prefilled,
    positions_from_mask,
)
from llama_export.runtime.sampling import SamplingOptions, sample
from llama_export.runtime.speculative import (
    AdaptiveDraftLength,
    LookupPlanner,
    SpeculativeOptions,
    VerifyCost,
    verify_row,
)
from llama_export.runtime.tokenizer import Tokenizer

# The target verifies at most this many drafts per forward when its graph returns logits for
# every position (a --logits tail:N graph caps it at N - 1).
UNBOUNDED_WINDOW = 1 << 30


@dataclass
class Drafts:
    """``tokens[r]``: row r's drafts; ``probs[r]``: ``[len, vocab]`` distributions they were drawn
    from (None: point masses, e.g. prompt lookup or greedy drafting)."""

    tokens: list[list[int]]
    probs: list[np.ndarray | None]


class Drafter(Protocol):
    plans_length: bool  # propose() picks each row's length (else AdaptiveDraftLength does)

    def propose(self, ids: np.ndarray, mask: np.ndarray, k: int, sampling: SamplingOptions,
                rng: np.random.Generator) -> Drafts:
        """Up to ``k`` drafts per row after the padded context ``ids`` / ``mask`` ``[batch, C]``
        (prompt + generated tokens, the last not yet in the target's cache)."""
        ...

    def begin(self, batch: int, capacity: int) -> None:
        """A new generation of ``batch`` rows whose target cache holds ``capacity`` positions."""
        ...

    def observe(self, drafted: int, accepted: dict[int, int], advanced: int,
                seconds: float) -> None:
        """After a verification of ``drafted`` drafts per row (``accepted[r]`` kept by live row
        r; every row moved ``advanced + 1`` tokens on) whose target forward took ``seconds``."""
        ...


class LookupDrafter:
    """Prompt lookup: drafts copied from where the context's suffix occurred before, one
    :class:`LookupPlanner` per row choosing the source and the length; ``cost`` (shared by the
    generations of one model) learns what a forward of T tokens costs. Sampled generations
    plan with the prior cost only, so a seed reproduces their text."""

    plans_length = True

    def __init__(self, opts: SpeculativeOptions, cost: VerifyCost | None = None) -> None:
        self.opts = opts
        self.cost = cost or VerifyCost()
        self.planners: list[LookupPlanner] = []
        self.batch = 1

    def propose(self, ids: np.ndarray, mask: np.ndarray, k: int, sampling: SamplingOptions,
                rng: np.random.Generator) -> Drafts:
        if len(self.planners) != ids.shape[0]:
            self.planners = [LookupPlanner(self.opts.max_draft_tokens, self.cost,
                                           measured=sampling.greedy, adaptive=self.opts.adaptive,
                                           min_ngram=self.opts.min_ngram,
                                           max_ngram=self.opts.max_ngram, batch=ids.shape[0])
                             for _ in range(ids.shape[0])]
        rows = [self.planners[r].propose(ids[r][mask[r] == 1], k) for r in range(ids.shape[0])]
        return Drafts(rows, [None] * len(rows))

    def begin(self, batch: int, capacity: int) -> None:
        self.planners = []  # made on the first proposal, which knows the sampling options
        self.batch = batch

    def observe(self, drafted: int, accepted: dict[int, int], advanced: int,
                seconds: float) -> None:
        self.cost.observe(self.batch, drafted + 1, seconds)
        for r, planner in enumerate(self.planners):
            planner.update(drafted, accepted.get(r, 0), advanced)


def draft_window(backend: Backend) -> int:
    """How many drafts one forward of ``backend`` can verify; refuses a last-logits graph."""
    window = backend.tail_limit(UNBOUNDED_WINDOW)
    if window < 2:
        raise InputError(
            f"speculative decoding needs the logits of several new positions, but this "
            f"{backend.variant} graph returns the last one only (exported with --logits "
            f"{backend.logits_mode}): re-export the bundle with `llama-export onnx ... "
            "--logits tail:16`")
    return window - 1


class SpeculativeGeneration(BatchGeneration):
    """:class:`BatchGeneration` whose decode phase drafts and verifies several tokens a forward."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]],
                 options: GenerationOptions, drafter: Drafter, spec: SpeculativeOptions) -> None:
        super().__init__(backend, tokenizer, prompts, options)
        self.drafter = drafter
        # a drafter that plans its own lengths gets the whole window as its budget
        self.policy = AdaptiveDraftLength(min(spec.max_draft_tokens, draft_window(backend)),
                                          spec.adaptive and not drafter.plans_length)
        # ONNX Runtime's GroupQueryAttention runs a batch > 1 over a past one token at a time:
        # verification would cost k + 1 plain steps, so such batches decode plainly.
        self.speculating = backend.verifies_in_one_forward(len(self.prompts))

    def _decode(self, state: Prefilled) -> Iterator[Piece]:
        if not self.speculating:
            yield from super()._decode(state)
            return
        opts = self.options.sampling
        self.drafter.begin(len(self.rows), state.cache.capacity)
        tokens = sample(state.logits, opts, state.rng, state.seen)
        yield from self._push(tokens, 1)
        self._note_seen(state.seen, tokens[:, None])
        hist, mask, step = state.ids, state.mask, 1
        while not (stop := self._stop_reason(state.cache.capacity, state.cache.length)):
            live = np.array([r.out.finish_reason is None for r in self.rows])
            last = np.where(live, tokens, self.tokenizer.pad_token_id)
            ctx = np.concatenate([hist, last[:, None]], axis=1)
            ctx_mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
            cols = self._verify(state, ctx, ctx_mask, live, step)
            self.stats.decode_seconds = time.perf_counter() - self._t_decode
            length = state.cache.length - cols.shape[1]  # before this verification
            for j in range(cols.shape[1]):
                step += 1
                yield from self._push(cols[:, j], step)
                if stop := self._stop_reason(state.cache.capacity, length + j + 1):
                    self.stats.decode_tokens -= cols.shape[1] - j - 1  # verified, not emitted
                    break
            if stop:
                break
            m = cols.shape[1] - 1
            hist = np.concatenate([ctx, cols[:, :m]], axis=1)
            mask = np.concatenate([ctx_mask, np.ones_like(cols[:, :m])], axis=1)
            self._note_seen(state.seen, cols)
            tokens = cols[:, m]
        if stop == "context":
            yield from self._finish_all("context")

    def _stop_reason(self, capacity: int, cache_length: int) -> str | None:
        """The plain loop's checks after a token (``cache_length``: the cache as the plain loop
        would hold it then): every row done, or no slot left to feed the token."""
        if all(r.out.finish_reason for r in self.rows):
            return "done"
        return "context" if capacity - cache_length < 1 else None

    def _verify(self, state: Prefilled, ctx: np.ndarray, ctx_mask: np.ndarray, live: np.ndarray,
                step: int) -> np.ndarray:
        """One target forward: returns the ``[batch, m + 1]`` tokens every row emits."""
        cache, opts = state.cache, self.options.sampling
        budget = min(self.policy.budget(), cache.capacity - cache.length - 1,
                     self.options.max_new_tokens - step - 1)
        drafts = Drafts([[]] * len(live), [None] * len(live))
        if budget > 0:
            drafts = self.drafter.propose(ctx, ctx_mask, budget, opts, state.rng)
        k = min(len(drafts.tokens[r]) for r in np.flatnonzero(live))
        feed = np.full((len(live), k + 1), self.tokenizer.pad_token_id, dtype=np.int64)
        feed[:, 0] = ctx[:, -1]
        for r in np.flatnonzero(live):
            feed[r, 1:] = drafts.tokens[r][:k]
        mask = np.concatenate([ctx_mask, np.ones_like(feed[:, 1:])], axis=1)
        engine0, t0 = self._engine_seconds(), time.perf_counter()
        logits = self.backend.forward_tail(feed, positions_from_mask(mask, k + 1), mask, cache,
                                           k + 1)
        forward_seconds = time.perf_counter() - t0
        verdicts = {}
        for r in np.flatnonzero(live):
            probs = drafts.probs[r]
            verdicts[r] = verify_row(logits[r], feed[r, 1:], opts, state.rng,
                                     seen=None if state.seen is None else state.seen[r],
                                     draft_probs=None if probs is None else probs[:k])
        m = min(v.accepted for v in verdicts.values())
        cols = np.full((len(live), m + 1), self.tokenizer.pad_token_id, dtype=np.int64)
        for r, v in verdicts.items():
            cols[r] = v.tokens[:m + 1]
        self.backend.truncate(cache, cache.length - k + m)
        self.policy.update(k, m)
        self.drafter.observe(k, {int(r): v.accepted for r, v in verdicts.items()}, m,
                             forward_seconds)
        s = self.stats
        s.decode_engine_seconds += self._engine_seconds() - engine0
        s.decode_steps += 1
        s.decode_tokens += m + 1
        s.drafted_tokens += k * len(verdicts)
        s.accepted_tokens += sum(v.accepted for v in verdicts.values())
        return cols

    def _engine_seconds(self) -> float:
        drafter_backend = getattr(self.drafter, "backend", None)
        return sum(getattr(b, "engine_seconds", 0.0) for b in (self.backend, drafter_backend) if b)

    def _note_seen(self, seen: np.ndarray | None, cols: np.ndarray) -> None:
        if seen is not None:
            for j in range(cols.shape[1]):
                seen[np.arange(cols.shape[0]), cols[:, j]] = True

