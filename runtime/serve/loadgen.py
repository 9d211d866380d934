"""``llama-export bench-serve``: drive any OpenAI-compatible server with streaming requests.

Per concurrency level ``c``, ``c`` workers send streaming ``/v1/completions`` requests back to
back until the level's requests are done (closed loop). Lengths are fixed the way llama-server
and vLLM allow (``ignore_eos``, ``min_tokens`` = ``max_tokens`` = gen-len, temperature 0); each
prompt starts with its own request number, so no server can reuse another request's prompt
cache. Prompts are sized to ``prompt_len`` tokens with the server's own tokenizer, read back
from ``usage.prompt_tokens`` (a few calibration requests, which also warm the server up).

Figures per level: aggregate tok/s = all generated tokens / the level's wall time (prefills
included); per-stream tok/s = (tokens - 1) / (last token - first token), median over requests;
TTFT p50/p95 (send → first text); errors; the server's peak RSS when ``--pid`` names a local
process (``VmHWM`` from ``/proc``).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llama_export.runtime.errors import InputError, MissingDependencyError

_FILLER = ("the history of the roman empire spans many centuries from the founding of the city "
           "to the fall of constantinople and its law roads and language shaped europe")
_WORDS = _FILLER.split()


@dataclass(frozen=True)
class LoadOptions:
    url: str
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16)
    prompt_len: int = 128
    gen_len: int = 128
    requests: int | None = None  # per level; None = 2 x concurrency (at least 4)
    model: str | None = None  # None = the server's first /v1/models entry
    api_key: str | None = None
    pid: int | None = None
    timeout: float = 600.0

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise InputError("--concurrency needs positive integers, e.g. 1,2,4,8")
        if self.prompt_len < 1 or self.gen_len < 1:
            raise InputError("--prompt-len and --gen-len must be >= 1")
        if self.requests is not None and self.requests < 1:
            raise InputError("--requests must be >= 1")

    def count(self, c: int) -> int:
        return self.requests if self.requests is not None else max(2 * c, 4)


@dataclass
class RequestResult:
    ok: bool
    tokens: int = 0
    ttft: float = 0.0
    stream_tok_s: float = 0.0
    error: str = ""


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    aggregate_tok_s: float
    stream_tok_s: float
    ttft_p50: float
    ttft_p95: float
    server_rss_mb: float | None
    server_peak_rss_mb: float | None
    error_samples: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def process_rss_mb(pid: int) -> tuple[float, float]:
    """``(VmRSS, VmHWM)`` of a local process, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(rest.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def prompt_text(index: int, words: int) -> str:
    body = " ".join(_WORDS[i % len(_WORDS)] for i in range(words))
    return f"Request {index}: {body}"


class LoadGenerator:
    def __init__(self, opts: LoadOptions) -> None:
        try:
            import httpx
        except ImportError:
            raise MissingDependencyError("`llama-export bench-serve`", "serve") from None
        self.opts = opts
        headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
        limits = httpx.Limits(max_connections=max(opts.concurrency) + 4)
        self.client = httpx.AsyncClient(base_url=opts.url.rstrip("/"), headers=headers,
                                        timeout=opts.timeout, limits=limits)
        self.model = opts.model
        self.words = opts.prompt_len

    async def prepare(self) -> None:
        """Find the model name and the word count giving ``prompt_len`` prompt tokens."""
        if self.model is None:
            r = await self.client.get("/v1/models")
            r.raise_for_status()
            self.model = r.json()["data"][0]["id"]
        for _ in range(6):
            r = await self.client.post("/v1/completions", json=self._body(0, 1))
            r.raise_for_status()
            got = int(r.json()["usage"]["prompt_tokens"])
            if got == self.opts.prompt_len:
                return
            self.words = max(1, self.words + (self.opts.prompt_len - got))

    def _body(self, index: int, max_tokens: int) -> dict[str, Any]:
        return {"model": self.model, "prompt": prompt_text(index, self.words), "stream": False,
                "max_tokens": max_tokens, "temperature": 0.0}

    async def one(self, index: int) -> RequestResult:
        body = {**self._body(index, self.opts.gen_len), "stream": True, "ignore_eos": True,
                "min_tokens": self.opts.gen_len, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        first = last = 0.0
        pieces, usage = 0, None
        try:
            async with self.client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return RequestResult(False, error=f"HTTP {r.status_code}: "
                                         f"{(await r.aread())[:200]!r}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if data.get("usage"):
                        usage = data["usage"]
                    if any(c.get("text") for c in data.get("choices", [])):
                        last = time.perf_counter()
                        first = first or last
                        pieces += 1
        except Exception as e:  # any transport failure is one error of this level
            return RequestResult(False, error=f"{type(e).__name__}: {e}")
        tokens = int(usage["completion_tokens"]) if usage else pieces
        if not first:
            return RequestResult(False, tokens, error="no text streamed")
        rate = (tokens - 1) / (last - first) if last > first else 0.0
        return RequestResult(True, tokens, first - t0, rate)

    async def level(self, c: int, start_index: int) -> LevelResult:
        n = self.opts.count(c)
        todo = iter(range(start_index, start_index + n))
        results: list[RequestResult] = []

        async def worker() -> None:
            for i in todo:
                results.append(await self.one(i))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        wall = time.perf_counter() - t0
        ok = [r for r in results if r.ok]
        rss = process_rss_mb(self.opts.pid) if self.opts.pid else (None, None)
        return LevelResult(
            c, n, n - len(ok), wall, sum(r.tokens for r in ok) / wall,
            statistics.median([r.stream_tok_s for r in ok]) if ok else 0.0,
            percentile([r.ttft for r in ok], 50), percentile([r.ttft for r in ok], 95),
            rss[0], rss[1], [r.error for r in results if not r.ok][:3])

    async def run(self) -> list[LevelResult]:
        try:
            await self.prepare()
            out, index = [], 1
            for c in self.opts.concurrency:
                out.append(await self.level(c, index))
                index += self.opts.count(c)
            return out
        finally:
            await self.client.aclose()


def run_load(opts: LoadOptions) -> list[LevelResult]:
    return asyncio.run(LoadGenerator(opts).run())


def format_levels(levels: list[LevelResult]) -> str:
    lines = [f"{'conc':>4s} {'reqs':>5s} {'errors':>6s} {'agg tok/s':>10s} {'stream tok/s':>12s} "
             f"{'TTFT p50 s':>10s} {'TTFT p95 s':>10s} {'server RSS MB':>13s}"]
    for lv in levels:
        rss = f"{lv.server_peak_rss_mb:.0f}" if lv.server_peak_rss_mb is not None else "-"
        lines.append(f"{lv.concurrency:4d} {lv.requests:5d} {lv.errors:6d} "
                     f"{lv.aggregate_tok_s:10.1f} {lv.stream_tok_s:12.1f} {lv.ttft_p50:10.3f} "
                     f"{lv.ttft_p95:10.3f} {rss:>13s}")
        lines += [f"     error: {e}" for e in lv.error_samples]
    return "\n".join(lines)


def levels_json(opts: LoadOptions, levels: list[LevelResult]) -> str:
    return json.dumps({"options": {**asdict(opts), "api_key": None},
                       "levels": [asdict(lv) for lv in levels]}, indent=2)
