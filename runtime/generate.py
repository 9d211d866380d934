"""Prefill / decode loop (llama2.c's loop: it only wires backend, sampler and tokenizer).

Batches are left-padded: ``attention_mask`` 0 on pad slots, ``position_ids = cumsum(mask) - 1``
clipped at 0 (what transformers does), pad slots kept in the KV cache. Each row finishes on its
own (EOS, stop string, max new tokens); finished rows keep being fed a pad token, whose output is
ignored, until every row is done or the context is full.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from llama_export.runtime.backends.base import Backend, KVCache
from llama_export.runtime.errors import InputError
from llama_export.runtime.sampling import SamplingOptions, sample
from llama_export.runtime.speculative import SpeculativeOptions
from llama_export.runtime.tokenizer import IncrementalDecoder, StopMatcher, Tokenizer

FinishReason = Literal["eos", "stop", "length", "context"]


@dataclass(frozen=True)
class GenerationOptions:
    """``max_new_tokens`` ≥ 1; ``stop``: strings that end a sequence (never emitted);
    ``eos_token_ids``: None = the bundle's EOS ids; ``speculative``: draft and verify several
    tokens per forward (same greedy text, same sampling distribution), None = off."""

    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    eos_token_ids: tuple[int, ...] | None = None
    speculative: SpeculativeOptions | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got "
                             f"{self.max_new_tokens!r}: pass e.g. max_new_tokens=128")
        if isinstance(self.stop, str):
            raise InputError("stop must be a list of strings, not one string: pass stop=['...']")
        if isinstance(self.speculative, str):  # "lookup" / "draft:BUNDLE", as on the CLI
            object.__setattr__(self, "speculative", SpeculativeOptions.parse(self.speculative))


@dataclass
class Completion:
    """One sequence's result. ``tokens`` are the generated ids (EOS excluded)."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class Piece:
    """A streamed text piece of sequence ``index`` (never a broken UTF-8 character)."""

    index: int
    text: str


@dataclass
class GenerationStats:
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # prefill end → last decode step end (all loop overhead)
    decode_engine_seconds: float = 0.0  # inside the engine call only
    decode_steps: int = 0  # forwards after the prompt's
    decode_tokens: int = 0  # tokens per row after the first (> decode_steps when speculating)
    prompt_tokens: int = 0  # padded batch x prompt length
    drafted_tokens: int = 0  # speculation: drafts verified, summed over rows
    accepted_tokens: int = 0  # speculation: drafts the target agreed with

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None

    @property
    def tokens_per_forward(self) -> float | None:
        return self.decode_tokens / self.decode_steps if self.decode_steps else None


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` and ``attention_mask`` ``[batch, longest]`` int64, pads on the left."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    return ids, mask


def positions_from_mask(mask: np.ndarray, seq: int) -> np.ndarray:
    """Position ids of the last ``seq`` slots: ``cumsum(mask) - 1`` clipped at 0."""
    pos = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    return np.ascontiguousarray(pos[:, -seq:])


@dataclass
class Prefilled:
    """The state after the prompt's forward: padded prompts, mask, cache, last logits."""

    ids: np.ndarray
    mask: np.ndarray
    cache: KVCache
    logits: np.ndarray
    seen: np.ndarray | None  # tokens per row, for the repetition penalty (None when off)
    rng: np.random.Generator


class TextRow:
    """One sequence's text side: incremental detokenizer, stop strings and its
    :class:`Completion` (shared by :class:`BatchGeneration` and the server's engine)."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str], prompt_len: int) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.stopper = StopMatcher(stops)
        self.out = Completion(prompt_tokens=prompt_len)

    def finish(self, reason: FinishReason) -> str:
        self.out.finish_reason = reason
        tail = "" if reason == "stop" else self.stopper.push(self.decoder.flush())
        tail += self.stopper.flush()
        self.out.text += tail
        return tail

    def push(self, token: int, eos: frozenset[int]) -> str:
        if token in eos:
            return self.finish("eos")
        self.out.tokens.append(token)
        piece = self.stopper.push(self.decoder.push(token))
        self.out.text += piece
        if self.stopper.stopped:
            self.finish("stop")
        return piece


class BatchGeneration:
    """Iterate to stream :class:`Piece` objects; :attr:`completions` holds the results."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer,
                 prompts: Sequence[Sequence[int]], options: GenerationOptions) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InputError("a prompt is empty: pass some text for every prompt")
        longest, ctx = max(len(p) for p in prompts), backend.manifest.max_context
        if longest >= ctx:
            raise InputError(f"prompt has {longest} tokens but the bundle's context is {ctx} "
                             "(room for at least one new token needed): shorten the prompt or "
                             "re-export with a larger --max-seq-len")
        self.backend, self.tokenizer, self.options = backend, tokenizer, options
        self.prompts = [list(p) for p in prompts]
        self.rows = [TextRow(tokenizer, options.stop, len(p)) for p in prompts]
        eos = options.eos_token_ids
        self.eos = frozenset(tokenizer.eos_token_ids if eos is None else eos)
        self.stats = GenerationStats()
        # The last sampled token is never fed back, hence the -1.
        self.capacity = min(ctx, longest + options.max_new_tokens - 1) or 1

    @property
    def completions(self) -> list[Completion]:
        return [r.out for r in self.rows]

    def __iter__(self) -> Iterator[Piece]:
        yield from self._decode(self._prefill())

    def _prefill(self) -> Prefilled:
        ids, mask = left_pad(self.prompts, self.tokenizer.pad_token_id)
        seen = self._seen_init(ids, mask)
        cache = self.backend.new_cache(len(self.prompts), max(self.capacity, ids.shape[1]))
        t0 = time.perf_counter()
        logits = self.backend.forward(ids, positions_from_mask(mask, ids.shape[1]), mask, cache)
        self.stats.prefill_seconds = time.perf_counter() - t0
        self.stats.prompt_tokens = ids.size
        self._t_decode = time.perf_counter()
        return Prefilled(ids, mask, cache, logits, seen, self.options.sampling.rng())

    def _decode(self, state: Prefilled) -> Iterator[Piece]:
        opts, cache, mask, seen, logits = (self.options.sampling, state.cache, state.mask,
                                           state.seen, state.logits)
        for step in range(1, self.options.max_new_tokens + 1):
            tokens = sample(logits, opts, state.rng, seen)
            yield from self._push(tokens, step)
            if all(r.out.finish_reason for r in self.rows):
                return
            if cache.remaining < 1:
                yield from self._finish_all("context")
                return
            mask, seen = self._advance(mask, seen, tokens)
            logits = self._decode_step(cache, tokens, mask)

    def _push(self, tokens: np.ndarray, step: int) -> Iterator[Piece]:
        for i, row in enumerate(self.rows):
            if row.out.finish_reason:
                continue
            piece = row.push(int(tokens[i]), self.eos)
            if not row.out.finish_reason and step == self.options.max_new_tokens:
                piece += row.finish("length")
            if piece:
                yield Piece(i, piece)

    def _finish_all(self, reason: FinishReason) -> Iterator[Piece]:
        for i, row in enumerate(self.rows):
            if not row.out.finish_reason and (piece := row.finish(reason)):
                yield Piece(i, piece)

    def _seen_init(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
        if self.options.sampling.repetition_penalty == 1.0:
            return None
        vocab = self.backend.manifest.vocab_size
        seen = np.zeros((ids.shape[0], vocab), dtype=bool)
        for row in range(ids.shape[0]):
            seen[row, ids[row][mask[row] == 1]] = True
        return seen

    def _advance(self, mask: np.ndarray, seen: np.ndarray | None,
                 tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=np.int64)], axis=1)
        if seen is not None:
            seen[np.arange(len(tokens)), tokens] = True
        return mask, seen

    def _decode_step(self, cache: KVCache, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        done = np.array([r.out.finish_reason is not None for r in self.rows])
        feed = np.where(done, self.tokenizer.pad_token_id, tokens).astype(np.int64)[:, None]
        engine0 = getattr(self.backend, "engine_seconds", 0.0)
        logits = self.backend.forward(feed, positions_from_mask(mask, 1), mask, cache)
        # Wall time since prefill: sampling, detokenizing and the consumer's work all count.
        self.stats.decode_seconds = time.perf_counter() - self._t_decode
        self.stats.decode_engine_seconds += getattr(self.backend, "engine_seconds", 0.0) - engine0
        self.stats.decode_steps += 1
        self.stats.decode_tokens += 1
        return logits
