"""The serving engine without HTTP: continuous batching is exact on both KV layouts, and the
scheduler's edges (cancel, queue bound, context fill, drain, per-request sampling) hold.

"Exact" means token for token equal to a solo :func:`Model.generate` run (greedy). On the row
layout each row computes what a solo run computes, bit for bit (asserted on logits below);
the aligned layout is checked on the tokens.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llama_export.runtime import load_bundle
from llama_export.runtime.errors import InputError
from llama_export.runtime.sampling import SamplingOptions
from llama_export.runtime.serve.engine import (
    Engine,
    EngineOptions,
    EngineStoppedError,
    QueueFullError,
    RequestOptions,
)
from llama_export.runtime.serve.slots import AlignedSlots, RowSlots, SlotState, StepPlan

PROMPTS = ["hello there", "abc", "a much longer prompt that spans a few prefill chunks", "x",
           "the quick brown fox", "0123456789", "zz top", "ok"]


@pytest.fixture(scope="module")
def tiny(tiny_bundle: Path) -> Any:
    with load_bundle(tiny_bundle) as m:
        yield m


@pytest.fixture(scope="module")
def tiny_standard(tiny_bundle: Path) -> Any:
    with load_bundle(tiny_bundle, graph="standard") as m:
        yield m


def _staggered(engine: Engine, prompts: list[list[int]], opts: RequestOptions,
               gap: float = 0.01) -> list[Any]:
    out: list[Any] = [None] * len(prompts)

    def run(i: int) -> None:
        time.sleep(gap * i)
        out[i] = engine.submit_sync(prompts[i], opts).text()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


@pytest.mark.parametrize(("layout", "chunk"), [("rows", 4), ("aligned", 4), ("aligned", 64)])
def test_continuous_batching_equals_solo(tiny: Any, tiny_standard: Any, layout: str,
                                         chunk: int) -> None:
    tiny = tiny if layout == "rows" else tiny_standard  # aligned: the TensorRT-style graph
    prompts = [tiny.encode(p) for p in PROMPTS]
    solo = [tiny.generate_ids([p], max_new_tokens=12, eos_token_ids=())[0] for p in prompts]
    with Engine(tiny, EngineOptions(slots=3, prefill_chunk=chunk, layout=layout)) as engine:
        assert isinstance(engine.layout, RowSlots if layout == "rows" else AlignedSlots)
        got = _staggered(engine, prompts, RequestOptions(max_tokens=12, ignore_eos=True),
                         gap=0.001)
        snap = engine.snapshot()
    for (text, last), ref in zip(got, solo, strict=True):
        assert text == ref.text
        assert (last.finish_reason, last.completion_tokens) == ("length", 12)
    assert snap.running == 0 and snap.requests == {"length": len(PROMPTS)}
    assert sum(snap.batch_size.counts[1:]) > 0  # rows were decoded together
    if layout == "rows":  # right-padded slots never need the full graph's attention bias
        assert tiny.backend.attention_bias is False


def test_layout_choice(tiny: Any, tiny_standard: Any) -> None:
    assert Engine(tiny).layout_name == "rows"
    assert Engine(tiny_standard).layout_name == "aligned"
    with pytest.raises(InputError, match="aligned layout needs the standard graph"):
        Engine(tiny, EngineOptions(layout="aligned"))
    with pytest.raises(InputError, match="row layout needs the ONNX-Runtime graph"):
        Engine(tiny_standard, EngineOptions(layout="rows"))



def test_kv_reservation_is_stated(tiny: Any) -> None:
    """describe() states the KV bytes the slots may take: the row layout's buffers exactly."""
    engine = Engine(tiny, EngineOptions(slots=3, context=24))
    assert isinstance(engine.layout, RowSlots)
    assert engine.kv_bytes() == sum(b.nbytes for b in engine.layout.buffers)
    assert f"KV cache up to {engine.kv_bytes() / 2**30:.2f} GiB" in engine.describe()


def _solo_logits(backend: Any, prompt: list[int], feed: list[int]) -> list[np.ndarray]:
    """Logits after the prompt and after each fed token, batch 1."""
    cache = backend.new_cache(1, 32)
    out = [backend.forward(np.array([prompt]), np.arange(len(prompt))[None], None, cache)[0]]
    for tok in feed:
        out.append(backend.forward(np.array([[tok]]), np.array([[cache.length]]), None, cache)[0])
    return out


def test_row_layout_logits_are_bitwise_solo(tiny: Any) -> None:
    """Rows of different lengths, one joining while the other decodes: every logit equals the
    solo run's bit for bit."""
    a, b = tiny.encode("hello there"), tiny.encode("abc")
    layout = RowSlots(tiny.backend, 2, 32)
    ra, rb = SlotState(), SlotState()
    assert layout.admit(ra, len(a), 4)
    first_a, _ = layout.run(StepPlan(a, []))
    layout.promote(ra)
    ta = int(np.argmax(first_a))
    assert layout.admit(rb, len(b), 4)
    first_b, dec = layout.run(StepPlan(b, [ta]))  # b's prefill beside a's decode step
    layout.promote(rb)
    assert first_b is not None and dec is not None
    ta2, tb = int(np.argmax(dec[0])), int(np.argmax(first_b))
    _, dec2 = layout.run(StepPlan([], [ta2, tb]))
    assert dec2 is not None
    ref_a, ref_b = _solo_logits(tiny.backend, a, [ta, ta2]), _solo_logits(tiny.backend, b, [tb])
    for got, want in [(first_a, ref_a[0]), (dec[0], ref_a[1]), (dec2[0], ref_a[2]),
                      (first_b, ref_b[0]), (dec2[1], ref_b[1])]:
        np.testing.assert_array_equal(got, want)
    layout.release(ra)  # the last decoder moves into the hole, with its K/V
    assert rb.slot == 0 and layout.copied_positions == len(b) + 1 and layout.used == 1


def test_cancel_frees_the_slot(tiny: Any, hold_forwards: Any) -> None:
    with Engine(tiny, EngineOptions(slots=1, max_queue=4)) as engine:
        cancelled = [False]
        with hold_forwards(engine, lambda: cancelled[0], free=1):  # prefill only, then wait
            long = engine.submit_sync(tiny.encode("abc"),
                                      RequestOptions(max_tokens=100, ignore_eos=True))
            it = iter(long)
            next(it)
            it.close()  # abandoning the iterator cancels
            cancelled[0] = True
        _, last = engine.submit_sync(tiny.encode("abc"), RequestOptions(max_tokens=3)).text()
        snap = engine.snapshot()
    assert last.finish_reason in ("length", "eos")
    assert snap.requests.get("cancelled") == 1 and snap.running == 0


def test_queue_bound_and_stopped_engine(tiny: Any) -> None:
    engine = Engine(tiny, EngineOptions(slots=1, max_queue=1))
    with pytest.raises(EngineStoppedError, match="not running"):
        engine.submit_sync([1, 2], RequestOptions(max_tokens=2))
    # Not started: requests pile up in the queue, nothing takes them.
    engine._accepting = True
    engine.submit_sync([1, 2], RequestOptions(max_tokens=2))
    engine.submit_sync([1, 2], RequestOptions(max_tokens=2))  # the free slot's share
    with pytest.raises(QueueFullError, match="all 1 slots are busy and 2 requests wait"):
        engine.submit_sync([1, 2], RequestOptions(max_tokens=2))


def test_limits_name_the_context(tiny: Any) -> None:
    with Engine(tiny, EngineOptions(slots=2, context=16)) as engine:
        with pytest.raises(InputError, match="the prompt has 16 tokens but the context is 16"):
            engine.submit_sync(list(range(1, 17)))
        with pytest.raises(InputError, match=r"plus max_tokens \(8\) exceeds the context of 16 "
                                             "tokens: lower max_tokens to at most 6"):
            engine.submit_sync(list(range(1, 11)), RequestOptions(max_tokens=8))
        with pytest.raises(InputError, match="prompt token id is outside"):
            engine.submit_sync([10**6])
        _, last = engine.submit_sync(list(range(1, 11)), RequestOptions(ignore_eos=True)).text()
    assert (last.finish_reason, last.completion_tokens) == ("context", 6)


def test_drain_finishes_running_requests(tiny: Any) -> None:
    engine = Engine(tiny, EngineOptions(slots=2)).start()
    streams = [engine.submit_sync(tiny.encode(p), RequestOptions(max_tokens=20, ignore_eos=True))
               for p in ("ab", "cd", "ef")]
    engine.stop(drain=True)
    assert [s.text()[1].finish_reason for s in streams] == ["length"] * 3
    assert not engine.running


def test_stop_without_drain_cancels(tiny: Any, hold_forwards: Any) -> None:
    engine = Engine(tiny, EngineOptions(slots=1)).start()
    with hold_forwards(engine, lambda: not engine.running):  # nothing ends before stop()
        streams = [engine.submit_sync(tiny.encode(p),
                                      RequestOptions(max_tokens=100, ignore_eos=True))
                   for p in ("ab", "cd")]
        engine.stop(drain=False)
    assert {s.text()[1].finish_reason for s in streams} == {"cancelled"}


def test_seeded_sampling_and_min_tokens_do_not_depend_on_the_batch(tiny: Any) -> None:
    opts = RequestOptions(max_tokens=10, min_tokens=10,
                          sampling=SamplingOptions(temperature=0.9, top_k=20, seed=7,
                                                   repetition_penalty=1.2))
    with Engine(tiny, EngineOptions(slots=4)) as engine:
        alone = engine.submit_sync(tiny.encode("seeded"), opts).text()
        crowd = _staggered(engine, [tiny.encode(p) for p in ("seeded", "other", "more", "seeded")],
                           opts, gap=0.0)
    assert crowd[0][0] == crowd[3][0] == alone[0]
    assert alone[1].completion_tokens == 10


def test_engine_needs_no_http_stack() -> None:
    code = ("import sys\n"
            "import llama_export.runtime.serve.engine, llama_export.runtime.serve\n"
            "bad = [m for m in ('fastapi', 'starlette', 'uvicorn', 'pydantic', 'httpx', "
            "'prometheus_client', 'torch') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_row_length_graph_refuses_masked_tokens_on_a_past(tiny: Any) -> None:
    """Such a graph would write a masked new token at its row's last 1: refused, one line."""
    backend = tiny.backend
    assert backend.row_lengths
    cache = backend.new_cache(2, 16)
    backend.forward(np.ones((2, 3), np.int64), np.tile(np.arange(3), (2, 1)), None, cache)
    mask = np.ones((2, 5), np.int64)
    mask[1, 3] = 0
    with pytest.raises(InputError, match="a batched chunk on top of a past holds masked tokens"):
        backend.forward(np.ones((2, 2), np.int64), np.full((2, 2), 3), mask, cache)
