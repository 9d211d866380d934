"""Generation behaviour on the tiny bundle: streaming, seeds, stop conditions, batching, the
Backend protocol, and the torch-free promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llama_export.runtime import load_bundle
from llama_export.runtime.errors import InputError


@pytest.fixture(scope="module")
def model(tiny_bundle: Path) -> Any:
    with load_bundle(tiny_bundle) as m:
        yield m


def test_stream_pieces_join_to_generate_text(model: Any) -> None:
    kw = {"max_new_tokens": 40, "temperature": 0.9, "top_p": 0.95, "seed": 3}
    pieces = list(model.stream("Once upon a time", **kw))
    assert len(pieces) > 1
    assert "".join(pieces) == model.generate("Once upon a time", **kw).text


def test_same_seed_same_text_other_seed_differs(model: Any) -> None:
    kw = {"max_new_tokens": 32, "temperature": 1.0, "top_k": 50}
    a = model.generate("seed test", seed=11, **kw).tokens
    assert a == model.generate("seed test", seed=11, **kw).tokens
    assert a != model.generate("seed test", seed=12, **kw).tokens


def test_tiny_temperature_equals_greedy(model: Any) -> None:
    greedy = model.generate("abc", max_new_tokens=24, eos_token_ids=()).tokens
    cold = model.generate("abc", max_new_tokens=24, eos_token_ids=(), temperature=1e-5, seed=0)
    assert cold.tokens == greedy


def _greedy(model: Any, prompt: str, n: int = 40) -> Any:
    return model.generate(prompt, max_new_tokens=n, eos_token_ids=())


def test_stop_string_ends_generation_and_is_not_emitted(model: Any) -> None:
    # Sampled (seeded) text of the random tiny model has enough printable characters.
    kw = {"max_new_tokens": 60, "eos_token_ids": (), "temperature": 1.0, "seed": 5}
    full = model.generate("stop strings", **kw)
    start = next(i for i in range(4, len(full.text) - 2)
                 if "\ufffd" not in full.text[i:i + 2] and full.text.index(full.text[i:i + 2]) == i)
    stop = full.text[start:start + 2]
    out = model.generate("stop strings", stop=[stop, "zzzz"], **kw)
    assert out.finish_reason == "stop"
    assert out.text == full.text[:start]
    assert len(out.tokens) < len(full.tokens)
    streamed = "".join(model.stream("stop strings", stop=[stop], **kw))
    assert streamed == full.text[:start]


def test_any_of_several_eos_ids_stops(model: Any) -> None:
    full = _greedy(model, "eos ids")
    eos = full.tokens[5]
    first = full.tokens.index(eos)
    out = model.generate("eos ids", max_new_tokens=40, eos_token_ids=(99999, eos))
    assert out.finish_reason == "eos"
    assert out.tokens == full.tokens[:first]


def test_max_new_tokens_and_context_full(model: Any) -> None:
    out = _greedy(model, "length", n=7)
    assert (len(out.tokens), out.finish_reason) == (7, "length")
    ctx = model.manifest.max_context
    prompt = "p" * (ctx - 10)
    out = model.generate(prompt, max_new_tokens=50, eos_token_ids=())
    assert out.finish_reason == "context"
    # every cache slot used: prompt + fed tokens == ctx, plus the last sampled (never fed) one
    assert out.prompt_tokens + len(out.tokens) == ctx + 1


def test_each_sequence_finishes_on_its_own(model: Any) -> None:
    prompts = ["first prompt", "the second, longer prompt", "third"]
    solo = [_greedy(model, p).tokens for p in prompts]
    eos = next(t for t in solo[0][2:] if t not in solo[1])  # ends row 0 only, row 1 runs on
    batch = model.generate_batch(prompts, max_new_tokens=40, eos_token_ids=(eos,))
    assert batch[0].finish_reason == "eos"
    assert batch[1].finish_reason == "length"
    for p, b in zip(prompts, batch, strict=True):
        alone = model.generate(p, max_new_tokens=40, eos_token_ids=(eos,))
        assert (b.tokens, b.text, b.finish_reason) == (alone.tokens, alone.text,
                                                       alone.finish_reason)


def test_repetition_penalty_changes_a_repetitive_greedy_output(model: Any) -> None:
    plain = _greedy(model, "aaaa", n=30).tokens
    penalized = model.generate("aaaa", max_new_tokens=30, eos_token_ids=(),
                               repetition_penalty=1.5).tokens
    assert len(set(penalized)) > len(set(plain))


def test_backend_protocol_cache_and_validation(model: Any) -> None:
    backend = model.backend
    cache = backend.new_cache(batch_size=2, capacity=6)
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    logits = backend.forward(ids, np.array([[0, 1, 2]] * 2), None, cache)
    assert logits.shape == (2, model.manifest.vocab_size)
    assert logits.dtype == np.float32
    assert cache.length == 3
    with pytest.raises(InputError, match=r"attention_mask shape \(2, 3\) != \(2, 4\)"):
        backend.forward(ids[:, :1], np.array([[3], [3]]), np.ones((2, 3), np.int64), cache)
    with pytest.raises(InputError, match="4 new tokens do not fit: cache holds 3 of 6"):
        backend.forward(np.ones((2, 4), np.int64), np.ones((2, 4), np.int64), None, cache)
    assert cache.length == 3  # failed calls do not advance the cache
    with pytest.raises(InputError, match="input batch 1 != cache batch 2"):
        backend.forward(ids[:1, :1], np.array([[3]]), None, cache)
    with pytest.raises(InputError, match="cache capacity 100000 is outside"):
        backend.new_cache(1, 100_000)


def test_decode_steps_match_a_full_recompute(model: Any) -> None:
    """The KV cache carried in OrtValues gives the same logits as recomputing from scratch."""
    backend, ids = model.backend, np.array([[10, 20, 30, 40, 50]])
    cache = backend.new_cache(1, 5)
    backend.forward(ids[:, :3], np.array([[0, 1, 2]]), None, cache)
    backend.forward(ids[:, 3:4], np.array([[3]]), None, cache)
    stepped = backend.forward(ids[:, 4:], np.array([[4]]), None, cache)
    full = backend.forward(ids, np.arange(5)[None], None, backend.new_cache(1, 5))
    np.testing.assert_allclose(stepped, full, atol=1e-4, rtol=0)


def test_generation_never_imports_torch(tiny_bundle: Path) -> None:
    code = (
        "import sys\n"
        "from llama_export.runtime import load_bundle\n"
        f"with load_bundle({str(tiny_bundle)!r}) as m:\n"
        "    list(m.stream('hi', max_new_tokens=8))\n"
        "    m.generate_batch(['a', 'bc'], max_new_tokens=4, temperature=0.8, seed=1)\n"
        "    m.chat([{'role': 'user', 'content': 'hi'}], max_new_tokens=4)\n"
        "bad = [n for n in ('torch', 'transformers', 'llama_export.exporter') if n in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/", timeout=120)
