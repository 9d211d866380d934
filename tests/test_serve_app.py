"""The ASGI app in-process (Starlette's TestClient) on the tiny bundle: lifecycle answers
(503 while loading, 429 when full), CORS, API-key files, SSE framing."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from llama_export.runtime import load_bundle
from llama_export.runtime.errors import InputError
from llama_export.runtime.serve.app import ServeSettings, create_app
from llama_export.runtime.serve.engine import Engine, EngineOptions, RequestOptions
from llama_export.runtime.serve.server import is_loopback, read_api_keys


@pytest.fixture(scope="module")
def tiny(tiny_bundle: Path) -> Any:
    with load_bundle(tiny_bundle) as m:
        yield m


def test_not_started_engine_is_503(tiny: Any) -> None:
    client = TestClient(create_app(Engine(tiny)))
    assert client.get("/health").status_code == 503
    r = client.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "service_unavailable"


def test_full_queue_is_429_with_retry_after(tiny: Any, hold_forwards: Any) -> None:
    with Engine(tiny, EngineOptions(slots=1, max_queue=0)) as engine:
        answered = threading.Event()
        with hold_forwards(engine, answered.is_set):  # the slot stays busy until the 429
            busy = engine.submit_sync(tiny.encode("ab"), RequestOptions(max_tokens=120,
                                                                        ignore_eos=True))
            deadline = time.monotonic() + 10
            while engine.snapshot().running == 0:
                assert time.monotonic() < deadline
                time.sleep(0.001)
            try:
                r = TestClient(create_app(engine)).post("/v1/completions",
                                                        json={"prompt": "hi", "max_tokens": 2})
            finally:
                busy.cancel()
                answered.set()
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"


def test_engine_with_settings_guards_without_loading(tiny: Any) -> None:
    """``create_app(engine, settings)`` (a Ray replica): the caller's engine serves, the settings'
    key, body limit and model name guard it, and the bundle path in them is never loaded."""
    settings = ServeSettings(bundle="/nonexistent/never-loaded", api_keys=("k",),
                             model_name="smol", max_body_bytes=200)
    with Engine(tiny, EngineOptions(slots=1)) as engine:
        with TestClient(create_app(engine, settings)) as client:
            assert client.get("/health").json()["model"] == "smol"
            assert client.post("/v1/completions", json={"prompt": "hi"}).status_code == 401
            key = {"Authorization": "Bearer k"}
            big = client.post("/v1/completions", headers=key, json={"prompt": "x" * 300})
            assert big.status_code == 413
            r = client.post("/v1/completions", headers=key,
                            json={"model": "smol", "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200 and r.json()["model"] == "smol"
        assert engine.running  # the app's shutdown never stops an engine it does not own
    with pytest.raises(TypeError, match="pass the settings once"):
        create_app(settings, settings)


def test_settings_app_loads_in_background_cors_and_keys(tiny_bundle: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("\nfirst-key\n  second-key  \n")
    settings = ServeSettings(bundle=str(tiny_bundle), api_keys=read_api_keys((), str(keys)),
                             cors_origins=("http://app.test",),
                             engine=EngineOptions(slots=2))
    app = create_app(settings)
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pre = client.options("/v1/completions", headers={
            "Origin": "http://app.test", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "http://app.test"
        denied = client.post("/v1/completions", json={"prompt": "hi"},
                             headers={"Origin": "http://app.test"})
        assert denied.status_code == 401
        assert denied.headers["access-control-allow-origin"] == "http://app.test"
        r = client.post("/v1/completions", headers={"Authorization": "Bearer second-key"},
                        json={"prompt": "hi", "max_tokens": 3, "stream": True, "temperature": 0,
                              "stream_options": {"include_usage": True}})
    events = [ln[6:] for ln in r.text.split("\n\n") if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-2]["choices"][0]["finish_reason"] in ("length", "stop")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == \
        chunks[-1]["usage"]["prompt_tokens"] + chunks[-1]["usage"]["completion_tokens"]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == \
        load_bundle(tiny_bundle).generate("hi", max_new_tokens=3).text


def test_key_file_and_host_checks(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read --api-key-file"):
        read_api_keys((), str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n \n")
    with pytest.raises(InputError, match="holds no key"):
        read_api_keys((), str(tmp_path / "empty"))
    with pytest.raises(InputError, match="--api-key is empty"):
        read_api_keys(("",), None)
    assert read_api_keys(("a",), None) == ("a",)
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")
