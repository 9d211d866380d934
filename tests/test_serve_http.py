"""`llama-export serve` on SmolLM2 fp32, driven over loopback like a user would: the official
`openai` client (sync and async, streamed and not) for answers, httpx for errors and metrics.

One server process for the module (8 slots, an API key); the last test sends it SIGTERM
mid-stream and checks the stream completes and the process exits 0.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llama_export.runtime import load_bundle

KEY = "test-key-123"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]
PROMPTS = ["The history of the Roman Empire", "Hello, my name is", "def fibonacci(n):",
           "Paris is the capital of", "Once upon a time", "The best way to learn Python is",
           "List three colors:", "In 1969, astronauts"]


@pytest.fixture(scope="module")
def server(smollm2_bundle: Path, start_server: Any) -> Any:
    return start_server(smollm2_bundle, "--slots", "8", "--api-key", KEY,
                        "--max-body-bytes", "65536", "--served-model-name", "smol")


@pytest.fixture(scope="module")
def model(smollm2_bundle: Path) -> Any:
    with load_bundle(smollm2_bundle, verify=False) as m:
        yield m


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def _http(server: Any) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                        timeout=60)


def metrics(server: Any) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _wait_idle(server: Any, cancelled_at_least: float = 0, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        done = m.get('llama_export_requests_total{finish_reason="cancelled"}', 0)
        if (m["llama_export_requests_running"] == 0 and m["llama_export_requests_waiting"] == 0
                and done >= cancelled_at_least):
            return m
        assert time.monotonic() < deadline, f"slots not freed: {m}"
        time.sleep(0.1)


def test_chat_equals_runtime_streamed_and_not(client: openai.OpenAI, model: Any) -> None:
    want = model.chat(QUESTION, max_new_tokens=24)
    r = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=24,
                                       temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(
        model="smol", messages=QUESTION, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == r.usage
    prompt_tokens = len(model.encode_chat(QUESTION))
    generated = len(want.tokens) + (want.finish_reason == "eos")  # the EOS is a sampled token
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, generated)


def test_completion_equals_runtime_with_stop_strings(client: openai.OpenAI, model: Any) -> None:
    prompt = "The three primary colors are"
    texts = []
    for stop in (None, [","], [" and", "."]):
        want = model.generate(prompt, max_new_tokens=20, stop=tuple(stop or ()))
        r = client.completions.create(model="smol", prompt=prompt, max_tokens=20, temperature=0,
                                      stop=stop)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="smol", prompt=prompt, max_tokens=20, temperature=0, stop=stop, stream=True))
        assert r.choices[0].text == streamed == want.text
        assert r.choices[0].finish_reason == ("stop" if want.finish_reason in ("stop", "eos")
                                              else "length")
        assert r.usage.prompt_tokens == len(model.encode(prompt))
        texts.append(r.choices[0].text)
    assert "," in texts[0] and texts[0].startswith(texts[1]) and "," not in texts[1]


def test_async_client_and_n(server: Any, model: Any) -> None:
    async def run() -> tuple[Any, list[Any]]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY,
                                      max_retries=0) as c:
            whole = await c.completions.create(model="smol", prompt="Hello, my name is",
                                               max_tokens=12, temperature=0, n=2)
            stream = await c.chat.completions.create(model="smol", messages=QUESTION,
                                                     max_tokens=12, temperature=0, stream=True)
            return whole, [chunk async for chunk in stream]

    whole, chunks = asyncio.run(run())
    want = model.generate("Hello, my name is", max_new_tokens=12).text
    assert [c.text for c in whole.choices] == [want, want] and whole.choices[1].index == 1
    assert whole.usage.completion_tokens == 24
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        model.chat(QUESTION, max_new_tokens=12).text


def test_continuous_batching_is_exact(server: Any, model: Any) -> None:
    """8 different prompts streamed concurrently, arriving 0.1 s apart: each text equals the
    prompt's solo greedy generation."""
    want = [model.generate(p, max_new_tokens=32, eos_token_ids=()).text for p in PROMPTS]

    async def one(c: openai.AsyncOpenAI, i: int) -> str:
        await asyncio.sleep(0.1 * i)
        stream = await c.completions.create(model="smol", prompt=PROMPTS[i], max_tokens=32,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY,
                                      max_retries=0) as c:
            return await asyncio.gather(*(one(c, i) for i in range(len(PROMPTS))))

    before = metrics(server)
    got = asyncio.run(run())
    after = metrics(server)
    assert got == want
    shared = [after[f'llama_export_batch_occupancy_bucket{{le="{n}.0"}}']
              - before[f'llama_export_batch_occupancy_bucket{{le="{n}.0"}}'] for n in (3, 8)]
    assert shared[1] - shared[0] > 0  # steps decoded 4 or more streams together


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server: Any) -> None:
    long_prompt = "word " * 3000
    cases: list[tuple[str, Any, int, str]] = [
        ("/v1/chat/completions", {"messages": QUESTION, "temperature": 5}, 400, "temperature"),
        ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/chat/completions", {"messages": QUESTION, "n": 0}, 400, "n"),
        ("/v1/chat/completions", {"messages": QUESTION, "top_p": 0}, 400, "top_p"),
        ("/v1/chat/completions", {"messages": QUESTION, "stop": list("abcde")}, 400, "stop"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
        ("/v1/chat/completions", {}, 400, "messages"),
        ("/v1/chat/completions", {"messages": QUESTION, "logprobs": True}, 400, "logprobs"),
        ("/v1/chat/completions", {"messages": QUESTION, "model": "gpt-4"}, 404, "gpt-4"),
        ("/v1/completions", {"prompt": long_prompt[:60000]}, 400, "context is 2048 tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}, 400, "lower max_tokens"),
        ("/v1/completions", {"prompt": [999999]}, 400, "outside"),
        ("/v1/completions", {"prompt": "x" * 70000}, 413, "exceeds 65536 bytes"),
        ("/v1/completions", "{not json", 400, "not valid JSON"),
        ("/v1/nothing", {}, 404, "Not Found"),
    ]
    with _http(server) as http:
        for path, body, status, text in cases:
            if isinstance(body, str):
                r = http.post(path, content=body, headers={"Content-Type": "application/json"})
            else:
                r = http.post(path, json=body)
            assert r.status_code == status, (body if len(str(body)) < 200 else path, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and text in err["message"] + \
                str(err["param"]), (text, err)
        ok = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                                "unknown_field": {"x": 1}})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_api_key(server: Any) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200  # open
    with _http(server) as http:
        models = http.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "smol"
    assert "access-control-allow-origin" not in httpx.options(
        f"{server.url}/v1/models", headers={"Origin": "http://example.test",
                                            "Access-Control-Request-Method": "GET"}).headers


def test_dropped_streams_and_requests_free_their_slots(server: Any) -> None:
    base = _wait_idle(server).get('llama_export_requests_total{finish_reason="cancelled"}', 0)
    body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with _http(server) as http, http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert metrics(server)["llama_export_requests_running"] == 1
    _wait_idle(server, base + 1)
    with pytest.raises(httpx.ReadTimeout), httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5) as http:
        http.post("/v1/completions", json={**body, "stream": False})
    _wait_idle(server, base + 2)


def test_bounded_load_no_errors_no_leaks_flat_memory(server: Any) -> None:
    """32 concurrent streams, every 4th dropped mid-way, twice: no errors, slots all freed,
    server RSS after the second round within 32 MB of the first."""

    async def stream(c: httpx.AsyncClient, i: int) -> str:
        body = {"prompt": f"Story {i}: once upon a time", "max_tokens": 16, "ignore_eos": True,
                "stream": True, "temperature": 0.7, "seed": i}
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            n = 0
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    n += 1
                    if i % 4 == 0 and n == 3:
                        return "dropped"
                if line == "data: [DONE]":
                    return "done"
        return "truncated"

    async def round_() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     headers={"Authorization": f"Bearer {KEY}"}) as c:
            return await asyncio.gather(*(stream(c, i) for i in range(32)))

    rss = []
    for _ in range(2):
        results = asyncio.run(round_())
        assert results.count("done") == 24 and results.count("dropped") == 8
        _wait_idle(server)
        rss.append(_rss_mb(server.proc.pid))
    assert rss[1] - rss[0] < 32, rss


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match
    return int(match.group(1)) / 1024


def test_sigterm_drains_the_running_stream_and_exits_0(server: Any) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 48, "ignore_eos": True, "stream": True}
    with _http(server) as http, http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        server.proc.send_signal(signal.SIGTERM)
        rest = list(lines)
    events = [ln for ln in rest if ln.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and '"finish_reason":"length"' in events[-2]
    assert server.proc.wait(60) == 0
