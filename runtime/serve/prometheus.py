"""``/metrics``: the engine's :class:`~.metrics.MetricsSnapshot` as Prometheus text
(``prometheus-client``; a custom collector reads one snapshot per scrape)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from llama_export.runtime.serve.engine import Engine
from llama_export.runtime.serve.metrics import Histogram, MetricsSnapshot

PREFIX = "llama_export"


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(f"{PREFIX}_{name}", doc, buckets=h.buckets(), sum_value=h.total)


def families(s: MetricsSnapshot) -> Iterator[Any]:
    yield GaugeMetricFamily(f"{PREFIX}_requests_running", "Requests holding a KV slot "
                            "(prefilling or decoding).", value=s.running)
    yield GaugeMetricFamily(f"{PREFIX}_requests_waiting", "Requests waiting for a slot.",
                            value=s.waiting)
    yield GaugeMetricFamily(f"{PREFIX}_slots", "KV slots (requests decoded together).",
                            value=s.slots)
    done = CounterMetricFamily(f"{PREFIX}_requests", "Finished requests by finish reason.",
                               labels=["finish_reason"])
    for reason, n in sorted(s.requests.items()):
        done.add_metric([reason], n)
    yield done
    yield CounterMetricFamily(f"{PREFIX}_prompt_tokens", "Prompt tokens prefilled.",
                              value=s.prompt_tokens)
    yield CounterMetricFamily(f"{PREFIX}_generation_tokens", "Tokens generated.",
                              value=s.generated_tokens)
    yield CounterMetricFamily(f"{PREFIX}_kv_positions_copied", "KV positions moved to keep "
                              "decoding slots compact.", value=s.kv_positions_copied)
    yield CounterMetricFamily(f"{PREFIX}_draft_tokens", "Speculative drafts (prompt lookup) "
                              "verified.", value=s.draft_tokens)
    yield CounterMetricFamily(f"{PREFIX}_draft_accepted_tokens", "Speculative drafts the model "
                              "agreed with (kept).", value=s.accepted_draft_tokens)
    yield _histogram("time_to_first_token_seconds", "Submit to first token.", s.ttft)
    yield _histogram("decode_step_seconds", "Engine steps without a prompt chunk (one token "
                     "for every decoding request).", s.decode_step)
    yield _histogram("prefill_step_seconds", "Engine steps with a prompt chunk (decoders "
                     "included): what a running stream waits while a request joins.",
                     s.prefill_step)
    yield _histogram("request_seconds", "Submit to finish.", s.request_seconds)
    yield _histogram("batch_occupancy", "Requests decoded per step.", s.batch_size)


class _Collector:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        yield from families(self.engine.snapshot())


def metrics_text(engine: Engine | None) -> tuple[bytes, str]:
    """Prometheus exposition of ``engine`` (empty while it loads)."""
    registry = CollectorRegistry(auto_describe=False)
    if engine is not None:
        registry.register(_Collector(engine))
    return generate_latest(registry), CONTENT_TYPE_LATEST
