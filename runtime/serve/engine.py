"""The serving engine: one backend, N KV slots, continuous batching, no HTTP.

    submit() ──► waiting (bounded FIFO) ──admit──► prefilling (≤ 1, chunked) ──► decoding (≤ N)
                      │ QueueFullError                  each step: one prompt chunk        │
                      ▼                                 + one token for every decoder ◄────┘
                                                        leave: EOS / stop / max_tokens / context / cancel

One loop thread owns the backend (:meth:`Engine.start` / :meth:`Engine.stop`; a host process
or a Ray replica can own the lifecycle). Callers only enqueue and read: :meth:`Engine.submit`
returns an async iterator of :class:`Chunk` objects, :meth:`Engine.submit_sync` a blocking one.
Each step: drop cancelled requests, admit the next waiting request if a slot is free and no
other request is prefilling, run one ``prefill_chunk``-token chunk of its prompt and one decode
step for every decoding request (``slots.py`` says how, per KV layout), then sample each row
with its own options and generator and stream the text through the same detokenizer and stop
logic as :func:`~llama_export.runtime.generate` (``TextRow``).

Prefill is chunked: a running stream waits at most one chunk per step (``--prefill-chunk``),
and a long prompt does not hold every other stream for its whole prefill.

Contract: a request's greedy tokens do not depend on what else runs. On the row layout each row
computes exactly what a solo run computes (its K/V at the same positions, the same attention
span), and ONNX Runtime's CPU kernels were measured batch-invariant here (fp32 and int8 logits
of a row bitwise equal at batch 1..8); tests check it end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from llama_export.runtime.bundle import Model
from llama_export.runtime.errors import InputError, LlamaExportError
from llama_export.runtime.generate import TextRow
from llama_export.runtime.sampling import SamplingOptions, sample
from llama_export.runtime.serve.metrics import EngineMetrics, MetricsSnapshot
from llama_export.runtime.serve.slots import AlignedSlots, Layout, RowSlots, SlotState, StepPlan
from llama_export.runtime.spec_generate import draft_window
from llama_export.runtime.speculative import LookupPlanner, VerifyCost, verify_row

FinishReason = Literal["eos", "stop", "length", "context", "cancelled", "error"]
LAYOUTS = ("auto", "rows", "aligned")
_UNUSED_RNG = np.random.default_rng(0)  # greedy verification draws nothing


class QueueFullError(LlamaExportError):
    """Every slot is busy and the waiting queue is full: retry later."""


class EngineStoppedError(LlamaExportError):
    """The engine is not running (not started yet, or stopping)."""


class EngineFailureError(LlamaExportError):
    """The backend failed while running a request (a bug or a broken device): see the log."""


@dataclass(frozen=True)
class EngineOptions:
    """``slots``: requests decoded together (KV rows); ``max_queue``: requests allowed to wait
    for a slot; ``prefill_chunk``: prompt tokens per step; ``context``: KV positions per slot
    (None = the bundle's max context); ``layout``: auto | rows | aligned (see ``slots.py``)."""

    slots: int = 8
    max_queue: int = 64
    prefill_chunk: int = 64
    context: int | None = None
    layout: str = "auto"
    speculative: str | None = None  # "lookup": prompt-lookup drafts while one request runs
    draft_tokens: int = 8

    def __post_init__(self) -> None:
        for name in ("slots", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise InputError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.context is not None and self.context < 2:
            raise InputError(f"--context must be >= 2, got {self.context}")
        if self.layout not in LAYOUTS:
            raise InputError(f"layout {self.layout!r} is unknown: use one of {', '.join(LAYOUTS)}")
        if self.speculative not in (None, "lookup"):
            raise InputError(f"--speculative {self.speculative} is not available in the serve "
                             "engine: use lookup (draft-model speculation is for generate and "
                             "bench)")
        if self.draft_tokens < 1:
            raise InputError(f"--draft-tokens must be >= 1, got {self.draft_tokens}")


@dataclass(frozen=True)
class RequestOptions:
    """Per request. ``max_tokens`` None = until EOS, a stop string or the slot's context;
    ``min_tokens``: EOS is not sampled before this many tokens; ``ignore_eos``: EOS never ends
    the request (benchmarks fix lengths with it)."""

    max_tokens: int | None = None
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InputError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise InputError(f"min_tokens must be in 0..max_tokens, got {self.min_tokens}")
        if isinstance(self.stop, str):
            raise InputError("stop must be a sequence of strings, not one string: pass ('...',)")


@dataclass(frozen=True)
class Chunk:
    """A streamed piece of one request. The last one has ``finish_reason`` set and the usage
    (``completion_tokens`` counts every sampled token, the EOS that ended it included)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class Seq(SlotState):
    """One request's explicit state: prompt, tokens so far, cache length (``SlotState``)."""

    prompt: list[int] = field(default_factory=list)
    options: RequestOptions = field(default_factory=RequestOptions)
    sink: Callable[[Chunk], None] = field(default=lambda chunk: None)
    text: TextRow | None = None
    rng: np.random.Generator | None = None
    seen: np.ndarray | None = None  # bool [1, vocab] for the repetition penalty
    eos: frozenset[int] = frozenset()
    max_new: int = 0
    prefilled: int = 0
    tokens: list[int] = field(default_factory=list)  # every sampled token, EOS included
    drafts: LookupPlanner | None = None  # speculation: this request's drafting
    cancelled: bool = False
    done: bool = False
    t_submit: float = 0.0


def choose_layout(model: Model, opts: EngineOptions, capacity: int) -> Layout:
    """Per-row slots where the graph supports them (see ``slots.py``), else the aligned path."""
    backend = model.backend
    row_lengths = bool(getattr(backend, "row_lengths", False))
    rows_ok = row_lengths and getattr(getattr(backend, "options", None), "provider", None) == "cpu"
    if opts.layout == "aligned" and row_lengths:
        # Its joins feed masked pads on top of a past, which such a graph cannot place.
        raise InputError("the aligned layout needs the standard graph with this bundle's "
                         "ONNX-Runtime graph (per-row lengths): add --graph standard, or use "
                         "--layout rows")
    if opts.layout == "rows" and not rows_ok:
        raise InputError("the row layout needs the ONNX-Runtime graph on CPU from a bundle "
                         "exported with per-row lengths: re-export the bundle with "
                         "`llama-export onnx`, or use --layout aligned")
    if opts.layout == "rows" or (opts.layout == "auto" and rows_ok):
        return RowSlots(backend, opts.slots, capacity)
    return AlignedSlots(backend, opts.slots, capacity)


class Engine:
    """Continuous batching over one loaded :class:`Model`. ``start()`` before submitting."""

    def __init__(self, model: Model, options: EngineOptions | None = None,
                 metrics: EngineMetrics | None = None) -> None:
        """``metrics``: a subclass that also forwards them (a Ray replica) or None."""
        self.model, self.options = model, options or EngineOptions()
        ctx = model.manifest.max_context
        self.capacity = min(self.options.context or ctx, ctx)
        self.layout = choose_layout(model, self.options, self.capacity)
        self.metrics = metrics or EngineMetrics(self.options.slots)
        self._cv = threading.Condition()
        self._waiting: deque[Seq] = deque()
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._drain = True
        self._vocab = model.manifest.vocab_size
        self._draft_max = 0  # 0: no speculation
        self._verify_cost = VerifyCost()  # what a lone row's T-token forward costs (lookup plans)
        if self.options.speculative:
            if not isinstance(self.layout, RowSlots):
                raise InputError("speculation in the serve engine needs the row layout (the "
                                 "ONNX-Runtime graph on CPU): drop --speculative, or serve "
                                 "with --graph ort --provider cpu")
            self._draft_max = min(self.options.draft_tokens, draft_window(model.backend))

    @property
    def layout_name(self) -> str:
        return "rows" if isinstance(self.layout, RowSlots) else "aligned"

    def kv_bytes(self) -> int:
        """Host memory the KV slots may take. ONNX Runtime's GroupQueryAttention (CPU) was
        measured touching a slot's whole capacity once a request used it, so plan for all of it
        (16 slots x 4096 positions of SmolLM2 fp32: 3.0 GB); ``--context`` bounds it."""
        m = self.model.backend.manifest
        item = 2 if m.kv_dtype(self.model.backend.variant) == "float16" else 4
        return 2 * m.num_layers * self.options.slots * m.num_kv_heads * self.capacity * m.head_dim * item

    def describe(self) -> str:
        """One line for logs: what serves, and how."""
        b = self.model.backend
        graph = getattr(b, "graph", None)
        line = (f"{b.variant} {('(' + graph + ' graph) ') if graph else ''}"
                f"{self.options.slots} slots x {self.capacity} positions, {self.layout_name} "
                f"layout, prefill chunk {self.options.prefill_chunk}, KV cache up to "
                f"{self.kv_bytes() / 2**30:.2f} GiB (--slots x --context)")
        if self._draft_max:
            line += (f", prompt-lookup speculation (up to {self._draft_max} drafts) while one "
                     "request runs alone")
        if self.layout_name == "aligned" and graph == "ort":
            line += ("; this bundle's ONNX-Runtime graph predates per-row lengths: re-export it "
                     "(`llama-export onnx`) for the faster row layout")
        return line

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> Engine:
        with self._cv:
            if self._thread is not None:
                return self
            self._accepting = True
            self._thread = threading.Thread(target=self._loop, name="llama-export-engine",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; finish the running and waiting ones (``drain``) or cancel
        them; after ``timeout`` seconds of draining, cancel what is left. Idempotent."""
        with self._cv:
            self._accepting, self._drain = False, self._drain and drain
            self._cv.notify_all()
            thread = self._thread
        if thread is None:
            return
        thread.join(timeout)
        if thread.is_alive():
            with self._cv:
                self._drain = False
                self._cv.notify_all()
            thread.join()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(drain=False)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._accepting

    # ---- submitting ----------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], options: RequestOptions | None = None
               ) -> RequestStream:
        """Enqueue a request from inside a running asyncio loop; iterate the result."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Chunk] = asyncio.Queue()

        def sink(chunk: Chunk) -> None:
            with contextlib.suppress(RuntimeError):  # the caller's loop is gone: nobody listens
                loop.call_soon_threadsafe(q.put_nowait, chunk)

        return RequestStream(self, self._enqueue(prompt_ids, options or RequestOptions(), sink), q)

    def submit_sync(self, prompt_ids: Sequence[int], options: RequestOptions | None = None
                    ) -> SyncStream:
        """Enqueue a request from any thread; iterate the result (blocking)."""
        q: queue.SimpleQueue[Chunk] = queue.SimpleQueue()
        return SyncStream(self, self._enqueue(prompt_ids, options or RequestOptions(), q.put), q)

    def check_prompt(self, prompt_len: int, max_tokens: int | None) -> int:
        """Tokens the request may generate; InputError naming the limit if it does not fit."""
        cap = self.capacity
        if prompt_len < 1:
            raise InputError("the prompt is empty: pass some text")
        if prompt_len >= cap:
            raise InputError(f"the prompt has {prompt_len} tokens but the context is {cap} tokens "
                             "(room for at least one new token is needed): shorten the prompt")
        if max_tokens is not None and prompt_len + max_tokens > cap:
            raise InputError(f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) "
                             f"exceeds the context of {cap} tokens: lower max_tokens to at most "
                             f"{cap - prompt_len}")
        return cap - prompt_len if max_tokens is None else max_tokens

    def _enqueue(self, prompt_ids: Sequence[int], opts: RequestOptions,
                 sink: Callable[[Chunk], None]) -> Seq:
        prompt = [int(t) for t in prompt_ids]
        if any(not 0 <= t < self._vocab for t in prompt):
            raise InputError(f"a prompt token id is outside 0..{self._vocab - 1}: pass ids from "
                             "this model's tokenizer")
        tok = self.model.tokenizer
        seq = Seq(prompt=prompt, options=opts, sink=sink, t_submit=time.perf_counter(),
                  text=TextRow(tok, opts.stop, len(prompt)), rng=opts.sampling.rng(),
                  max_new=self.check_prompt(len(prompt), opts.max_tokens),
                  eos=frozenset() if opts.ignore_eos else frozenset(tok.eos_token_ids))
        if opts.sampling.repetition_penalty != 1.0:
            seq.seen = np.zeros((1, self._vocab), dtype=bool)
            seq.seen[0, prompt] = True
        with self._cv:
            if not self._accepting:
                raise EngineStoppedError("the engine is not running (stopped or not started): "
                                         "start it, or retry against a running server")
            # Requests wait here before taking a free slot too: free slots add to the bound.
            if len(self._waiting) >= self.options.max_queue + self.options.slots - self.layout.used:
                raise QueueFullError(f"all {self.options.slots} slots are busy and "
                                     f"{len(self._waiting)} requests wait: retry later")
            self._waiting.append(seq)
            self._cv.notify()
        return seq

    def cancel(self, seq: Seq) -> None:
        """Cancel a request: its slot is freed at the next step."""
        if not seq.done:
            seq.cancelled = True
            with self._cv:
                self._cv.notify()

    def snapshot(self) -> MetricsSnapshot:
        copied = getattr(self.layout, "copied_positions", 0)
        return self.metrics.snapshot(self.layout.used, len(self._waiting), copied)

    # ---- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self.layout.used) and self._accepting:
                    self._cv.wait()
                if not self._accepting and (not self._drain or not (self._waiting or self.layout.used)):
                    break
            try:
                self._step()
            except Exception as e:  # a backend failure must not leave streams hanging
                self._fail_all(e)
        self._cancel_all()

    def _live(self) -> list[Seq]:
        pre = [self.layout.prefilling] if self.layout.prefilling else []
        return [*self.layout.decoding, *pre]  # type: ignore[list-item]

    def _step(self) -> None:
        for seq in [s for s in self._live() if s.cancelled]:
            self._finish(seq, "cancelled")
        with self._cv:
            for seq in [s for s in self._waiting if s.cancelled]:
                self._waiting.remove(seq)
                self._finish(seq, "cancelled")
            if self._waiting and self.layout.admit(self._waiting[0], len(self._waiting[0].prompt),
                                                   self._waiting[0].max_new):
                self._waiting.popleft()
        pre = self.layout.prefilling
        assert pre is None or isinstance(pre, Seq)
        chunk = pre.prompt[pre.prefilled:pre.prefilled + self.options.prefill_chunk] if pre else []
        decoders: list[Seq] = list(self.layout.decoding)  # type: ignore[arg-type]
        if self._draft_max and pre is None and len(decoders) == 1 and not self._waiting \
                and self._speculate(decoders[0]):
            return
        if not chunk and not decoders:
            return
        t0 = time.perf_counter()
        first, logits = self.layout.run(StepPlan(chunk, [s.tokens[-1] for s in decoders]))
        dt = time.perf_counter() - t0
        self.metrics.step(dt, len(decoders), prefill=bool(chunk))
        if self._draft_max:
            self._plain_step_seen(decoders, dt, prefill=bool(chunk))
        if logits is not None:
            for seq, token in zip(decoders, self._sample(decoders, logits), strict=True):
                self._accept(seq, int(token))
        if pre is not None:
            pre.prefilled += len(chunk)
            if first is not None and pre.prefilled == len(pre.prompt):
                self.metrics.first_token(time.perf_counter() - pre.t_submit, len(pre.prompt))
                self.layout.promote(pre)
                self._accept(pre, int(self._sample([pre], first[None])[0]))

    def _plain_step_seen(self, decoders: list[Seq], seconds: float, *, prefill: bool) -> None:
        """Speculation's bookkeeping after a plain step: a lone row's step time is what a
        verification competes with, and every row moved one token on (where its last copy
        would continue)."""
        if not prefill and len(decoders) == 1:
            self._verify_cost.observe(1, 1, seconds)
        for seq in decoders:
            if seq.drafts is not None:
                seq.drafts.update(0, 0)

    def _speculate(self, seq: Seq) -> bool:
        """One prompt-lookup step for the only running request: draft from its prompt and
        text, verify every draft in one forward of its row, keep the agreeing prefix plus one
        token of the model's own (``speculative.verify_row``: greedy text unchanged, sampling by
        the rejection rule), roll the row back past the rest. False (nothing ran): no draft, or
        the request still bans EOS (``min_tokens``); the plain step runs instead.

        Only while one request runs: a lone stream leaves the weight reads of a step to one
        token, which verification fills; with two or more, batching already shares them and a
        row's verification would stall the others."""
        if len(seq.tokens) < seq.options.min_tokens and seq.eos:
            return False
        if seq.drafts is None:
            seq.drafts = LookupPlanner(self._draft_max, self._verify_cost,
                                       measured=seq.options.sampling.greedy)
        budget = min(self.capacity - seq.length - 1, seq.max_new - len(seq.tokens) - 1)
        draft = seq.drafts.propose([*seq.prompt, *seq.tokens], budget) if budget > 0 else []
        if not draft:
            return False
        assert isinstance(self.layout, RowSlots)
        t0, before = time.perf_counter(), seq.length
        logits = self.layout.verify(seq, [seq.tokens[-1], *draft])
        dt = time.perf_counter() - t0
        verdict = verify_row(logits, draft, seq.options.sampling, seq.rng or _UNUSED_RNG,
                             seen=None if seq.seen is None else seq.seen[0])
        seq.length = before + 1 + verdict.accepted  # the fed token and the kept drafts
        seq.drafts.update(len(draft), verdict.accepted)
        self._verify_cost.observe(1, len(draft) + 1, dt)
        self.metrics.step(time.perf_counter() - t0, 1, prefill=False)
        self.metrics.speculation(len(draft), verdict.accepted)
        for token in verdict.tokens:  # token by token: stops and limits exactly as plain
            self._accept(seq, token)
            if seq.done:
                break
        return True

    def _sample(self, seqs: Sequence[Seq], logits: np.ndarray) -> np.ndarray:
        out = np.argmax(logits, axis=-1)
        for i, s in enumerate(seqs):
            opts = s.options
            early = len(s.tokens) < opts.min_tokens and s.eos
            if opts.sampling.greedy and s.seen is None and not early:
                continue  # the argmax above
            row = logits[i:i + 1]
            if early:
                row = row.copy()
                row[0, list(s.eos)] = -np.inf
            assert s.rng is not None
            out[i] = sample(row, opts.sampling, s.rng, s.seen)[0]
        return out  # type: ignore[no-any-return]

    def _accept(self, seq: Seq, token: int) -> None:
        assert seq.text is not None
        seq.tokens.append(token)
        if seq.seen is not None:
            seq.seen[0, token] = True
        self.metrics.tokens(1)
        piece = seq.text.push(token, seq.eos)
        reason: FinishReason | None = seq.text.out.finish_reason
        if reason is None and len(seq.tokens) >= seq.max_new:
            cap_bound = seq.options.max_tokens is None or seq.max_new < seq.options.max_tokens
            reason = "context" if cap_bound else "length"
            piece += seq.text.finish(reason)
        if reason is None:
            seq.sink(Chunk(piece, (token,)))
            return
        self._finish(seq, reason, piece, (token,))

    def _finish(self, seq: Seq, reason: FinishReason, piece: str = "",
                token_ids: tuple[int, ...] = (), error: str | None = None) -> None:
        if seq.slot >= 0:
            self.layout.release(seq)
        seq.done = True
        self.metrics.finished(reason, time.perf_counter() - seq.t_submit)
        seq.sink(Chunk(piece, token_ids, reason, len(seq.prompt), len(seq.tokens), error))

    def _fail_all(self, e: Exception) -> None:
        msg = f"{type(e).__name__}: {e}"
        for seq in self._live():
            self._finish(seq, "error", error=msg)

    def _cancel_all(self) -> None:
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        for seq in [*self._live(), *waiting]:
            self._finish(seq, "cancelled")


class RequestStream:
    """Async iterator of one request's :class:`Chunk` objects; :meth:`cancel` frees its slot."""

    def __init__(self, engine: Engine, seq: Seq, q: asyncio.Queue[Chunk]) -> None:
        self._engine, self._seq, self._queue, self._ended = engine, seq, q, False

    @property
    def prompt_tokens(self) -> int:
        return len(self._seq.prompt)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._ended:
            raise StopAsyncIteration
        chunk = await self._queue.get()
        self._ended = chunk.finish_reason is not None
        return chunk

    def cancel(self) -> None:
        self._engine.cancel(self._seq)


class SyncStream:
    """Blocking iterator of one request's :class:`Chunk` objects (any thread)."""

    def __init__(self, engine: Engine, seq: Seq, q: queue.SimpleQueue[Chunk]) -> None:
        self._engine, self._seq, self._queue = engine, seq, q

    def __iter__(self) -> Iterator[Chunk]:
        try:
            while True:
                chunk = self._queue.get()
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            self.cancel()  # abandoned early: free the slot

    def cancel(self) -> None:
        self._engine.cancel(self._seq)

    def text(self) -> tuple[str, Chunk]:
        """Collect everything: the whole text and the final chunk (finish reason, usage)."""
        parts, last = [], None
        for last in self:
            parts.append(last.text)
        assert last is not None
        return "".join(parts), last


def engine_stats(engine: Engine) -> dict[str, Any]:
    """A small JSON-able status (``/health`` detail)."""
    snap = engine.snapshot()
    return {"layout": engine.layout_name, "slots": snap.slots, "running": snap.running,
            "waiting": snap.waiting, "context": engine.capacity}
