"""The seam between the generation loop and an inference engine (DESIGN.md §6).

ONNX Runtime (:mod:`.ort`) and TensorRT (:mod:`.trt`) are interchangeable behind
:class:`Backend`. The loop only ever sees host logits; each backend owns its KV memory (host
OrtValues for ONNX Runtime with IO binding, device buffers for TensorRT) behind a
:class:`KVCache` it creates.

Polygraphy's runner pattern: the public :meth:`Backend.forward` validates its arguments against
the manifest and the cache, then calls the lean :meth:`Backend._forward_impl` that subclasses
write. Validation lives here once, so every backend raises the same one-line errors.

Left-padding semantics (what transformers does, and what every backend must honour):

* ``attention_mask`` is ``[batch, past + seq]`` int64; 0 marks a pad slot. Pad slots *stay in the
  cache* (their K/V are computed and stored); the mask keeps them out of attention for every
  later step. The caller passes the full mask each step (previous mask + ones for new tokens).
* ``position_ids`` are ``cumsum(mask) - 1`` clipped at 0, so the first real token of every row
  is position 0 whatever its padding.
"""

from __future__ import annotations

import abc
from types import TracebackType

import numpy as np

from llama_export.runtime.errors import BundleError, InputError
from llama_export.runtime.manifest import Manifest

_INT64 = np.dtype(np.int64)


class KVCache:
    """A backend's KV cache for one batch of sequences (backends subclass it to hold buffers).

    ``length`` counts the positions held (pad slots included), identical for every row.
    A backend guarantees:

    * the cache starts empty (``length == 0``);
    * each successful :meth:`Backend.forward` of ``seq`` tokens advances ``length`` by ``seq``;
      a forward that raises leaves ``length`` unchanged;
    * ``length`` never exceeds ``capacity`` (checked by :meth:`Backend.forward` before running);
    * :meth:`Backend.truncate` drops the newest positions (speculative decoding's rollback);
      the next forward continues after the kept ones as if the dropped ones never ran;
    * ``capacity`` never exceeds the manifest's max context (``dims.total.max``).
    """

    def __init__(self, batch_size: int, capacity: int) -> None:
        self.batch_size = batch_size
        self.capacity = capacity
        self.length = 0

    @property
    def remaining(self) -> int:
        """Positions still free."""
        return self.capacity - self.length

    def reset(self) -> None:
        """Forget every position (keeps buffers for reuse by a new batch of the same size)."""
        self.length = 0


class Backend(abc.ABC):
    """One loaded model variant. Use as a context manager: resources are freed on exit.

    Subclasses set ``self.manifest`` and ``self.variant`` and implement :meth:`_new_cache_impl`
    and :meth:`_forward_impl`.
    """

    manifest: Manifest
    variant: str
    logits_mode: str = "all"  # the graph's manifest ``logits`` entry: all | last | tail:N

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:  # noqa: B027 - optional hook: most backends have nothing to free
        """Free sessions / engines / device memory. Idempotent."""

    # ---- public: validate, then call the lean implementation ----------------------------------
    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``capacity`` positions."""
        dims = self.manifest.dims
        bmax = dims["batch"].max
        if not 1 <= batch_size <= bmax:
            raise InputError(
                f"batch size {batch_size} is outside 1..{bmax} this bundle was exported for: "
                f"pass at most {bmax} prompts at once or re-export with a larger --max-batch"
            )
        cmax = self.manifest.max_context
        if not 1 <= capacity <= cmax:
            raise InputError(
                f"cache capacity {capacity} is outside 1..{cmax} (the bundle's max context): "
                "shorten the prompt / max_new_tokens or re-export with a larger --max-seq-len"
            )
        return self._new_cache_impl(batch_size, capacity)

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray,
                attention_mask: np.ndarray | None, cache: KVCache) -> np.ndarray:
        """Run ``seq`` new tokens per row; return last-position logits ``[batch, vocab]`` float32.

        ``input_ids`` / ``position_ids``: int64 ``[batch, seq]``; ``attention_mask``: int64
        ``[batch, cache.length + seq]`` or ``None`` (no padding: all ones). Advances ``cache``.
        """
        return self.forward_tail(input_ids, position_ids, attention_mask, cache, 1)[:, 0]

    def verifies_in_one_forward(self, batch: int) -> bool:
        """Whether ``batch`` rows of several new tokens over a past run as one forward (what
        makes speculative verification cheap); a backend that steps them token by token says
        no, and speculation then decodes plainly."""
        return True

    def tail_limit(self, seq: int) -> int:
        """How many trailing positions' logits a forward of ``seq`` new tokens can return."""
        return logits_positions(self.logits_mode, seq)

    def forward_tail(self, input_ids: np.ndarray, position_ids: np.ndarray,
                     attention_mask: np.ndarray | None, cache: KVCache, tail: int) -> np.ndarray:
        """Like :meth:`forward`, but return the logits of the last ``tail`` new positions,
        ``[batch, tail, vocab]`` float32 (speculative verification, parity over a sequence).

        A graph exported with ``--logits last`` returns only the last position: asking it for
        more is an error naming the re-export.
        """
        ids = _as_int64_2d("input_ids", input_ids)
        pos = _as_int64_2d("position_ids", position_ids)
        batch, seq = ids.shape
        if pos.shape != ids.shape:
            raise InputError(f"position_ids shape {pos.shape} != input_ids shape {ids.shape}: "
                             "pass one position per token")
        if batch != cache.batch_size:
            raise InputError(f"input batch {batch} != cache batch {cache.batch_size}: "
                             "create the cache with new_cache(batch_size=len(prompts), ...)")
        if seq < 1:
            raise InputError("no tokens to run (seq length 0): pass at least one token")
        if not 1 <= tail <= seq:
            raise InputError(f"tail {tail} is outside 1..{seq} (the new tokens of this call)")
        if tail > self.tail_limit(seq):
            raise InputError(
                f"this {self.variant} graph returns logits of the last "
                f"{self.tail_limit(seq)} position(s) only (exported with --logits "
                f"{self.logits_mode}); {tail} positions were asked for: re-export the bundle with "
                "`llama-export onnx ... --logits tail:16` (or --logits all)")
        if seq > cache.remaining:
            raise InputError(
                f"{seq} new tokens do not fit: cache holds {cache.length} of {cache.capacity} "
                "positions; shorten the prompt or max_new_tokens, or re-export with a larger "
                "--max-seq-len"
            )
        total = cache.length + seq
        if attention_mask is None:
            mask = np.ones((batch, total), dtype=_INT64)
        else:
            mask = _as_int64_2d("attention_mask", attention_mask)
            if mask.shape != (batch, total):
                raise InputError(f"attention_mask shape {mask.shape} != {(batch, total)} "
                                 "(batch, past + seq): pass the full mask including past positions")
        logits = self._forward_impl(ids, pos, mask, cache, tail)
        cache.length = total
        return logits

    def truncate(self, cache: KVCache, length: int) -> None:
        """Keep the first ``length`` positions of ``cache`` (every row), forget the rest.

        Speculative decoding runs drafted tokens through the cache and rolls back past the
        rejected ones; the next forward writes after position ``length``.
        """
        if isinstance(length, bool) or not isinstance(length, int) or \
                not 0 <= length <= cache.length:
            raise InputError(f"cannot truncate a cache of {cache.length} positions to {length}: "
                             f"pass a length in 0..{cache.length}")
        if length < cache.length:
            self._truncate_impl(cache, length)
            cache.length = length

    # ---- what a backend implements ------------------------------------------------------------
    @abc.abstractmethod
    def _new_cache_impl(self, batch_size: int, capacity: int) -> KVCache:
        """Arguments already validated."""

    @abc.abstractmethod
    def _forward_impl(self, input_ids: np.ndarray, position_ids: np.ndarray,
                      attention_mask: np.ndarray, cache: KVCache, tail: int) -> np.ndarray:
        """Arguments already validated (contiguous int64, shapes consistent, capacity checked,
        ``tail`` within :meth:`tail_limit`).

        Must return C-contiguous float32 ``[batch, tail, vocab]`` host logits of the last
        ``tail`` positions and store the new K/V so the next call sees ``cache.length + seq`` past positions.
        Must NOT change ``cache.length`` (the caller advances it after success).
        """

    @abc.abstractmethod
    def _truncate_impl(self, cache: KVCache, length: int) -> None:
        """Make the cache's first ``length`` positions (``0 <= length < cache.length``) the
        past of the next forward. Must NOT change ``cache.length`` (the caller sets it)."""


def logits_window(mode: str) -> int | None:
    """Trailing positions a graph exported with ``--logits mode`` keeps (None: every one).

    ``all`` keeps every position; ``last`` one; ``tail:N`` the last ``min(seq, N)``, so a
    prefill pays lm_head for ``N`` positions only while a forward of up to ``N`` tokens
    (speculative verification of ``N - 1`` drafts) gets the logits of each.
    """
    if mode == "all":
        return None
    if mode == "last":
        return 1
    n = mode.removeprefix("tail:")
    if mode.startswith("tail:") and n.isdigit() and int(n) >= 1:
        return int(n)
    raise BundleError(f"the manifest's logits mode {mode!r} is unknown to this llama-export: "
                      "upgrade llama-export or re-export the bundle")


def logits_positions(mode: str, seq: int) -> int:
    """Trailing positions a graph exported with ``--logits mode`` returns for ``seq`` tokens."""
    window = logits_window(mode)
    return seq if window is None else min(seq, window)


def _as_int64_2d(name: str, a: np.ndarray) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 2:
        raise InputError(f"{name} must be 2-D [batch, seq], got shape {arr.shape}: "
                         "wrap a single sequence as [[...]]")
    if arr.dtype != _INT64:
        if not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"{name} must be integers, got {arr.dtype}: pass token ids as int64")
        arr = arr.astype(_INT64)
    return np.ascontiguousarray(arr)
