"""Drafting with a smaller bundle of the same tokenizer (e.g. Qwen2.5-Coder 0.5B for the 1.5B).

The draft model keeps its own KV cache, aligned slot for slot with the target's (same left
padding, same mask), and follows the target by itself: each :meth:`DraftModelDrafter.propose`
keeps the longest cached prefix that still agrees with the context (rolling back past rejected
drafts), feeds the rest, then decodes ``k`` drafts one token at a time.
"""

from __future__ import annotations

import numpy as np

from llama_export.runtime.backends.base import KVCache
from llama_export.runtime.bundle import Model
from llama_export.runtime.errors import InputError
from llama_export.runtime.generate import positions_from_mask
from llama_export.runtime.sampling import SamplingOptions, logits_to_probs
from llama_export.runtime.spec_generate import Drafts
from llama_export.runtime.speculative import draw


def check_same_tokenizer(target: Model, draft: Model) -> None:
    """Refuse a draft bundle whose token ids mean something else (one line naming the fix)."""
    tv, dv = target.manifest.vocab_size, draft.manifest.vocab_size
    a, b = target.tokenizer.vocabulary(), draft.tokenizer.vocabulary()
    differ = sum(1 for tok, i in a.items() if b.get(tok) != i) + len(set(b) - set(a))
    special = [name for name in ("bos_token_id", "eos_token_ids", "pad_token_id")
               if getattr(target.tokenizer, name) != getattr(draft.tokenizer, name)]
    if tv != dv or differ or special:
        what = (f"vocab sizes {dv} vs {tv}" if tv != dv else
                f"{differ} token ids differ" if differ else f"{', '.join(special)} differ")
        raise InputError(f"draft bundle {draft.path} does not share the target's tokenizer "
                         f"({what}): draft with a smaller bundle of the same model family")


class DraftModelDrafter:
    """Drafts by decoding a smaller model (greedy when the target is greedy, else sampled from
    the draft's own filtered distribution, which verification then needs as ``q``). Its draft
    length is the generation's :class:`~llama_export.runtime.speculative.AdaptiveDraftLength`."""

    plans_length = False

    def __init__(self, target: Model, draft: Model) -> None:
        check_same_tokenizer(target, draft)
        self.draft = draft
        self.backend = draft.backend
        self._cache: KVCache | None = None
        self._fed = np.zeros((0, 0), dtype=np.int64)  # the tokens whose K/V the cache holds

    def begin(self, batch: int, capacity: int) -> None:
        """A fresh cache for a generation of ``batch`` rows up to ``capacity`` positions."""
        if capacity > self.backend.manifest.max_context:
            raise InputError(f"draft bundle {self.draft.path} holds {self.backend.manifest.max_context} "
                             f"positions, this generation needs {capacity}: re-export the draft "
                             "with a larger --max-seq-len, or shorten the prompt / max_new_tokens")
        self._cache = self.backend.new_cache(batch, capacity)
        self._fed = np.zeros((batch, 0), dtype=np.int64)

    def observe(self, drafted: int, accepted: dict[int, int], advanced: int,
                seconds: float) -> None:
        pass  # the cache follows the context by itself (see propose)

    def close(self) -> None:
        self._cache = None

    def _sync(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Bring the cache to ``ids`` (kept prefix + the rest fed); the last position's logits."""
        assert self._cache is not None, "begin() first"  # programming error
        width = min(self._fed.shape[1], ids.shape[1] - 1)  # the last token is always fed
        same = (self._fed[:, :width] == ids[:, :width]).all(axis=0)
        keep = width if same.all() else int(np.argmin(same))
        self.backend.truncate(self._cache, keep)
        new = np.ascontiguousarray(ids[:, keep:])
        logits = self.backend.forward(new, positions_from_mask(mask, new.shape[1]), mask,
                                      self._cache)
        self._fed = ids
        return logits

    def propose(self, ids: np.ndarray, mask: np.ndarray, k: int, sampling: SamplingOptions,
                rng: np.random.Generator) -> Drafts:
        logits = self._sync(ids, mask)
        batch = ids.shape[0]
        tokens = np.zeros((batch, k), dtype=np.int64)
        probs = None if sampling.greedy else np.zeros((batch, k, logits.shape[-1]))
        for j in range(k):
            if probs is None:
                tokens[:, j] = np.argmax(logits, axis=-1)
            else:
                probs[:, j] = logits_to_probs(logits, sampling)
                tokens[:, j] = [draw(probs[r, j], rng) for r in range(batch)]
            if j == k - 1:
                break
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            assert self._cache is not None
            logits = self.backend.forward(tokens[:, j:j + 1], positions_from_mask(mask, 1), mask,
                                          self._cache)
            self._fed = np.concatenate([self._fed, tokens[:, j:j + 1]], axis=1)
        return Drafts([list(map(int, row)) for row in tokens],
                      [None] * batch if probs is None else list(probs))
