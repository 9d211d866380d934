"""Engine metrics: plain counters and histograms the loop thread updates and any thread reads.

No dependency: the HTTP layer (``app.py``) exports :meth:`EngineMetrics.snapshot` as Prometheus
text with ``prometheus-client``; an embedding application can read the same snapshot.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

# Seconds: TTFT and request latency span ms to minutes; steps span sub-ms to a second.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


@dataclass
class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: ``le`` upper bounds, plus +Inf)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, int]]:
        """``(le, cumulative count)`` pairs ending with ``+Inf``."""
        out, acc = [], 0
        for bound, n in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            acc += n
            out.append((bound, acc))
        return out

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass
class MetricsSnapshot:
    running: int
    waiting: int
    slots: int
    requests: dict[str, int]  # by finish reason
    prompt_tokens: int
    generated_tokens: int
    ttft: Histogram
    decode_step: Histogram  # steps without a prompt chunk
    prefill_step: Histogram  # steps with one (decoders included)
    request_seconds: Histogram
    batch_size: Histogram
    kv_positions_copied: int
    draft_tokens: int = 0  # speculation (prompt lookup): drafts verified
    accepted_draft_tokens: int = 0  # ... and kept


class EngineMetrics:
    """Updated by the engine loop only; :meth:`snapshot` copies under a lock for readers."""

    def __init__(self, slots: int) -> None:
        self._lock = threading.Lock()
        self.slots = slots
        self.requests: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.decode_step = Histogram(STEP_BUCKETS)
        self.prefill_step = Histogram(STEP_BUCKETS)
        self.request_seconds = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(tuple(float(n) for n in range(1, slots + 1)))
        self.draft_tokens = 0
        self.accepted_draft_tokens = 0

    def finished(self, reason: str, seconds: float) -> None:
        with self._lock:
            self.requests[reason] = self.requests.get(reason, 0) + 1
            self.request_seconds.observe(seconds)

    def first_token(self, seconds: float, prompt_tokens: int) -> None:
        with self._lock:
            self.ttft.observe(seconds)
            self.prompt_tokens += prompt_tokens

    def step(self, seconds: float, decoders: int, prefill: bool) -> None:
        """One engine step: a prompt chunk (``prefill``) and/or one token for ``decoders``.
        Steps with a chunk are what a running stream waits for a token during an admission."""
        with self._lock:
            (self.prefill_step if prefill else self.decode_step).observe(seconds)
            if decoders:
                self.batch_size.observe(decoders)

    def speculation(self, drafted: int, accepted: int) -> None:
        """One verification forward: ``drafted`` prompt-lookup drafts, ``accepted`` kept."""
        with self._lock:
            self.draft_tokens += drafted
            self.accepted_draft_tokens += accepted

    def tokens(self, n: int) -> None:
        with self._lock:
            self.generated_tokens += n

    def snapshot(self, running: int, waiting: int, copied: int) -> MetricsSnapshot:
        def copy(h: Histogram) -> Histogram:
            c = Histogram(h.bounds)
            c.counts, c.total = list(h.counts), h.total
            return c

        with self._lock:
            return MetricsSnapshot(running, waiting, self.slots, dict(self.requests),
                                   self.prompt_tokens, self.generated_tokens, copy(self.ttft),
                                   copy(self.decode_step), copy(self.prefill_step),
                                   copy(self.request_seconds), copy(self.batch_size), copied,
                                   self.draft_tokens, self.accepted_draft_tokens)
