"""KV slot layouts: where each request's K/V live and how one engine step runs the backend.

Two layouts, one interface (:class:`Layout`). The scheduler (``engine.py``) decides *what* runs
(one prompt chunk of one admitting request, one next token for every decoding request); a layout
decides *how*, and returns last-position logits for both.

:class:`RowSlots` (ONNX-Runtime graph on CPU, bundles whose manifest says ``seqlens: last_one``)::

    per layer K and V: numpy [slots, kv_heads, capacity, head_dim], wrapped once as OrtValues
    slot 0 │ req A: prompt ........ generated ....│            <- decode batch = rows 0..n-1,
    slot 1 │ req B: prompt .... generated .│                       each row its own length
    slot n │ req C (prefilling): chunk 1 ..│                    <- batch-1 prefill, seq = chunk
           └ position 0 = slot position 0 for every row: a row holds exactly what a solo run holds

  A decode step feeds ``[n, 1]`` tokens and a mask whose row ``b`` is 1 on ``[0, len_b]``: the
  graph's ``seqlens_k`` is each row's last 1, so GroupQueryAttention writes row ``b``'s new K/V at
  ``len_b`` and attends to ``[0, len_b]`` -- the same positions, the same arithmetic as a solo
  run (checked bitwise on SmolLM2 fp32, see the tests). Decoding rows stay compacted in
  ``0..n-1`` (the prefilling row, if any, at ``n``): when a row leaves, the last row moves into
  the hole, copying only its used positions.

:class:`AlignedSlots` (the standard graph: TensorRT, ``--graph standard``, or an ONNX-Runtime
graph exported before ``seqlens``) uses only :meth:`Backend.forward`: all ``slots`` rows share one
timeline of ``L`` columns with left-padding semantics (mask 0 = ignore; ``position_ids =
cumsum(mask) - 1``). A request joins with ONE forward of ``seq = chunk`` for the whole batch::

    joining row : [ 0 0 0 (old occupant, masked) | p1 p2 p3 p4 ]   mask 0..0 | 1 1 1 1
    decoding row: [ its history ................ | pad pad pad t ]  mask ...  | 0 0 0 1
    idle row    : [ junk ....................... | pad pad pad pad ] mask 0..0 | 0 0 0 1

so one call is the newcomer's prefill chunk and a decode step for everyone, with no cache
surgery. Correct because masked columns never enter attention (pads and the previous occupant's
junk alike) and positions come from the mask; wasteful because every step computes all
``slots`` rows and a join computes ``chunk`` columns for every row. When the timeline cannot
hold what running requests still need, admissions wait; once the batch drains the cache resets.
Every row ends in a 1 (idle rows attend to their own pad), so both graph generations read the
same lengths.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from llama_export.runtime.backends.base import Backend, KVCache
from llama_export.runtime.generate import positions_from_mask


@dataclass(eq=False)  # identity: two requests with equal lengths are still two requests
class SlotState:
    """What a layout needs to know about a request (the engine's ``Seq`` subclasses it).

    ``length``: positions this request holds in the KV cache (prompt prefilled so far plus the
    generated tokens fed back); ``slot``: its row, -1 when it holds none.
    """

    length: int = 0
    slot: int = -1


@dataclass
class StepPlan:
    """One engine step: an optional prompt chunk for the prefilling request and one next token
    for every decoding request (``tokens[i]`` for ``layout.decoding[i]``)."""

    chunk: list[int]
    tokens: list[int]


class Layout(abc.ABC):
    """Slot bookkeeping + the backend calls of one step.

    At most one request prefills at a time (:attr:`prefilling`); :meth:`promote` moves it to
    :attr:`decoding` once its prompt is in the cache.
    """

    def __init__(self, backend: Backend, slots: int, capacity: int) -> None:
        self.backend, self.slots, self.capacity = backend, slots, capacity
        self.decoding: list[SlotState] = []
        self.prefilling: SlotState | None = None

    @property
    def used(self) -> int:
        """Rows in use."""
        return len(self.decoding) + (self.prefilling is not None)

    def admit(self, seq: SlotState, prompt_len: int, max_new: int) -> bool:
        """Give ``seq`` a row and make it the prefilling request now (True), or not yet."""
        if self.prefilling is not None or self.used >= self.slots:
            return False
        if not self._admit(seq, prompt_len, max_new):
            return False
        seq.length, self.prefilling = 0, seq
        return True

    def promote(self, seq: SlotState) -> None:
        """The prefilling request's prompt is in the cache: it decodes from the next step on."""
        assert seq is self.prefilling
        self.prefilling = None
        self.decoding.append(seq)

    def release(self, seq: SlotState) -> None:
        """``seq`` left (finished or cancelled): free its row."""
        if seq is self.prefilling:
            self.prefilling = None
        else:  # the last decoder takes the leaver's place (row order carries no meaning)
            i, last = self.decoding.index(seq), self.decoding.pop()
            if last is not seq:
                self.decoding[i] = last
        self._release(seq)
        seq.slot = -1

    @abc.abstractmethod
    def _admit(self, seq: SlotState, prompt_len: int, max_new: int) -> bool:
        """Set ``seq.slot`` (True) or refuse for now (False)."""

    @abc.abstractmethod
    def _release(self, seq: SlotState) -> None:
        """Called after ``seq`` left :attr:`decoding` / :attr:`prefilling`."""

    @abc.abstractmethod
    def run(self, plan: StepPlan) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Run ``plan``: last-position logits ``[vocab]`` of the prefill chunk (None without
        one) and ``[len(decoding), vocab]`` of the decoders (None without any). Advances each
        request's ``length``."""


class RowSlots(Layout):
    """Per-row lengths over shared host buffers (ONNX-Runtime graph, CPU): see the module doc."""

    def __init__(self, backend: Backend, slots: int, capacity: int) -> None:
        super().__init__(backend, slots, capacity)
        m = backend.manifest
        shape = (slots, m.num_kv_heads, capacity, m.head_dim)
        dtype = np.float16 if m.kv_dtype(backend.variant) == "float16" else np.float32
        # np.zeros maps fresh pages lazily: memory grows with positions actually written.
        self.buffers = [np.zeros(shape, dtype) for _ in range(2 * m.num_layers)]
        self._views: dict[tuple[int, int], KVCache] = {}
        self.copied_positions = 0  # compaction cost, for metrics

    def _cache(self, lo: int, hi: int) -> KVCache:
        """The backend cache over rows ``lo:hi`` (made once per range, reused every step)."""
        view = self._views.get((lo, hi))
        if view is None:
            view = self.backend.cache_over([b[lo:hi] for b in self.buffers])  # type: ignore[attr-defined]
            self._views[(lo, hi)] = view
        return view

    def _admit(self, seq: SlotState, prompt_len: int, max_new: int) -> bool:
        seq.slot = len(self.decoding)  # right after the decoders
        return True

    def _release(self, seq: SlotState) -> None:
        # Keep decoders in 0..n-1 and the prefilling row at n: at most two row copies (the last
        # decoder into the hole, the prefilling row down one).
        for i, row in enumerate(self.decoding):
            if row.slot != i:
                self._move(row, i)
        if self.prefilling is not None and self.prefilling.slot != len(self.decoding):
            self._move(self.prefilling, len(self.decoding))

    def _move(self, seq: SlotState, to: int) -> None:
        n, src = seq.length, seq.slot
        for b in self.buffers:
            b[to, :, :n] = b[src, :, :n]
        seq.slot = to
        self.copied_positions += n

    def run(self, plan: StepPlan) -> tuple[np.ndarray | None, np.ndarray | None]:
        first = None
        if self.prefilling is not None and plan.chunk:
            first = self._row_forward(self.prefilling, plan.chunk)
        if not self.decoding:
            return first, None
        lens = np.array([s.length for s in self.decoding], dtype=np.int64)
        width = int(lens.max()) + 1
        mask = (np.arange(width)[None, :] <= lens[:, None]).astype(np.int64)  # 1 on [0, len_b]
        cache = self._cache(0, len(self.decoding))
        cache.length = width - 1  # per-row lengths live in the mask; this is its width - 1
        ids = np.array(plan.tokens, dtype=np.int64)[:, None]
        logits = self.backend.forward(ids, lens[:, None], mask, cache)
        for s in self.decoding:
            s.length += 1
        return first, logits

    def verify(self, seq: SlotState, feed: list[int]) -> np.ndarray:
        """Speculation: one forward of ``feed`` (the row's next token, then drafts) on ``seq``'s
        row alone, logits at every fed position ``[len(feed), vocab]``. ``seq.length`` grows by
        ``len(feed)``; the caller sets it back past the rejected drafts (positions beyond a
        row's length are never attended to, and the next forward overwrites them)."""
        return self._row_forward(seq, feed, tail=len(feed))

    def _row_forward(self, seq: SlotState, tokens: list[int], tail: int | None = None
                     ) -> np.ndarray:
        """``tokens`` on top of ``seq``'s row alone: last-position logits ``[vocab]``, or those
        of the last ``tail`` positions ``[tail, vocab]``."""
        cache = self._cache(seq.slot, seq.slot + 1)
        cache.length = seq.length
        total = seq.length + len(tokens)
        ids = np.array([tokens], dtype=np.int64)
        pos = np.arange(seq.length, total, dtype=np.int64)[None, :]
        mask = np.ones((1, total), np.int64)
        logits = (self.backend.forward(ids, pos, mask, cache) if tail is None else
                  self.backend.forward_tail(ids, pos, mask, cache, tail))
        seq.length = total
        row: np.ndarray = logits[0]
        return row


class AlignedSlots(Layout):
    """One left-padded timeline for all rows, plain :meth:`Backend.forward`: see the module doc."""

    def __init__(self, backend: Backend, slots: int, capacity: int) -> None:
        super().__init__(backend, slots, capacity)
        self.cache = backend.new_cache(slots, capacity)
        self.mask = np.zeros((slots, 0), dtype=np.int64)
        self.rows: list[SlotState | None] = [None] * slots
        # Timeline columns each row's request may still add: its prompt left, its tokens left.
        self.prompt_left: dict[int, int] = {}
        self.decode_left: dict[int, int] = {}

    def _admit(self, seq: SlotState, prompt_len: int, max_new: int) -> bool:
        if not any(self.rows) and self.cache.length:
            self.cache.reset()  # drained: start a fresh timeline
            self.mask = np.zeros((self.slots, 0), dtype=np.int64)
        # Each prompt chunk adds columns to everyone's timeline, each decode step one column:
        # admit only if every running request (and this one) can still finish in the cache.
        prompts = sum(self.prompt_left.values()) + prompt_len
        decode = max([max_new, *self.decode_left.values()])
        if self.cache.length + prompts + decode > self.capacity:
            return False
        slot = self.rows.index(None)
        self.rows[slot], seq.slot = seq, slot
        self.prompt_left[slot], self.decode_left[slot] = prompt_len, max_new
        self.mask[slot] = 0  # the previous occupant's columns stay in the cache, masked out
        return True

    def _release(self, seq: SlotState) -> None:
        self.rows[seq.slot] = None
        self.prompt_left.pop(seq.slot, None)
        self.decode_left.pop(seq.slot, None)

    def run(self, plan: StepPlan) -> tuple[np.ndarray | None, np.ndarray | None]:
        joining = self.prefilling if plan.chunk else None
        width = len(plan.chunk) if joining is not None else 1
        ids = np.zeros((self.slots, width), dtype=np.int64)  # pad id: masked, any id will do
        new = np.zeros((self.slots, width), dtype=np.int64)
        new[:, -1] = 1  # every row ends in a 1 (idle rows attend to their own pad)
        if joining is not None:
            ids[joining.slot], new[joining.slot] = plan.chunk, 1
        for seq, token in zip(self.decoding, plan.tokens, strict=True):
            ids[seq.slot, -1] = token
        mask = np.concatenate([self.mask, new], axis=1)
        logits = self.backend.forward(ids, positions_from_mask(mask, width), mask, self.cache)
        self.mask = mask
        first = None
        if joining is not None:
            joining.length += width
            self.prompt_left[joining.slot] -= width
            first = logits[joining.slot]
        for seq in self.decoding:
            seq.length += 1
            self.decode_left[seq.slot] -= 1
        rows = [s.slot for s in self.decoding]
        return first, (logits[rows] if rows else None)
