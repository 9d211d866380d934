"""Prompt-lookup speculation in the serve engine: while one request runs alone it drafts from
its prompt and text and verifies the drafts in one forward of its row; the greedy text stays
token for token the plain text (solo ``generate`` and the engine without speculation), through
every ending, and across the moments a second request joins (speculation pauses) and leaves."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from llama_export.runtime import load_bundle
from llama_export.runtime.errors import InputError
from llama_export.runtime.serve.engine import Engine, EngineOptions, RequestOptions
from llama_export.runtime.spec_bench import task_texts

SPEC = EngineOptions(slots=4, prefill_chunk=16, speculative="lookup")


@pytest.fixture(scope="module")
def tiny_tail(tiny_tail_bundle: Path) -> Any:
    with load_bundle(tiny_tail_bundle) as m:
        yield m


@pytest.fixture(scope="module")
def smol(smollm2_bundle: Path) -> Any:
    with load_bundle(smollm2_bundle, verify=False) as m:
        yield m


def _solo(model: Any, ids: list[int], n: int, **kw: Any) -> Any:
    return model.generate_ids([ids], max_new_tokens=n, **kw)[0]


def test_grounded_smollm2_greedy_is_plain_and_accepts_drafts(smol: Any) -> None:
    texts = {t["name"]: t["chat"] for t in task_texts()["grounded"]}
    prompts = [smol.encode_chat([{"role": "user", "content": texts[name]}])
               for name in ("code-rename", "doc-extract")]
    with Engine(smol, SPEC) as engine:
        assert "prompt-lookup speculation (up to 8 drafts)" in engine.describe()
        for ids in prompts:  # one at a time: each runs alone, so it speculates
            text, last = engine.submit_sync(ids, RequestOptions(max_tokens=48)).text()
            ref = _solo(smol, ids, 48)
            assert (text, last.completion_tokens, last.finish_reason) == (
                ref.text, len(ref.tokens), ref.finish_reason)
        snap = engine.snapshot()
    # these prompts ask to copy from the prompt: drafts must be verified AND kept
    assert snap.draft_tokens > 0 and snap.accepted_draft_tokens > 0, snap
    # fewer forwards than tokens: decode steps = forwards after each first token
    steps = sum(snap.decode_step.counts)
    assert steps < snap.generated_tokens - len(prompts), (steps, snap.generated_tokens)


@pytest.mark.parametrize("ending", ["length", "stop", "context"])
def test_every_ending_is_the_plain_one(tiny_tail: Any, ending: str) -> None:
    prompt = tiny_tail.encode("abcabcabcabc abcabc")
    plain_ref = _solo(tiny_tail, prompt, 40, eos_token_ids=())
    opts = RequestOptions(max_tokens=40, ignore_eos=True)
    engine_opts = SPEC
    if ending == "stop":  # a stop string taken from the plain text's middle
        stop = plain_ref.text[12:15]
        opts = RequestOptions(max_tokens=40, ignore_eos=True, stop=(stop,))
    elif ending == "context":
        engine_opts = EngineOptions(slots=2, speculative="lookup", context=len(prompt) + 17)
        opts = RequestOptions(ignore_eos=True)  # until the slot's context is full
    with Engine(tiny_tail, engine_opts) as spec_engine, \
            Engine(tiny_tail, EngineOptions(slots=2, context=engine_opts.context)) as plain_engine:
        got = spec_engine.submit_sync(prompt, opts).text()
        want = plain_engine.submit_sync(prompt, opts).text()
        snap = spec_engine.snapshot()
    assert (got[0], got[1].finish_reason, got[1].completion_tokens) == (
        want[0], want[1].finish_reason, want[1].completion_tokens)
    assert got[1].finish_reason == ending
    assert snap.draft_tokens > 0  # the repeating prompt gave drafts to verify


def test_joining_and_leaving_requests_keep_every_text(tiny_tail: Any) -> None:
    """A long request speculates alone; a second joins (plain batched steps while both run)
    and leaves; the first speculates again. Both texts are their solo texts."""
    long_ids = tiny_tail.encode("abcabcabcabc abcabc")
    short_ids = tiny_tail.encode("hello hello")
    want = {"long": _solo(tiny_tail, long_ids, 60, eos_token_ids=()).text,
            "short": _solo(tiny_tail, short_ids, 6, eos_token_ids=()).text}
    got: dict[str, str] = {}
    with Engine(tiny_tail, SPEC) as engine:
        def run(name: str, ids: list[int], n: int, delay: float) -> None:
            time.sleep(delay)
            got[name] = engine.submit_sync(ids, RequestOptions(max_tokens=n, ignore_eos=True)
                                           ).text()[0]

        threads = [threading.Thread(target=run, args=a) for a in
                   (("long", long_ids, 60, 0.0), ("short", short_ids, 6, 0.02))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        snap = engine.snapshot()
    assert got == want
    assert snap.draft_tokens > 0


def test_refusals_are_one_line(tiny_tail_bundle: Path, tiny_draft_bundle: Path,
                               tiny_bundle: Path) -> None:
    with pytest.raises(InputError, match="is not available in the serve engine: use lookup"):
        EngineOptions(speculative="draft")
    with pytest.raises(InputError, match="--draft-tokens must be >= 1"):
        EngineOptions(speculative="lookup", draft_tokens=0)
    with load_bundle(tiny_draft_bundle) as last_only, \
            pytest.raises(InputError, match=r"re-export the bundle .* --logits tail:16"):
        Engine(last_only, SPEC)
    with load_bundle(tiny_bundle, graph="standard") as std, \
            pytest.raises(InputError, match="needs the row layout"):
        Engine(std, SPEC)
    with load_bundle(tiny_tail_bundle) as m:  # tail:6 caps the drafts at 5
        assert "up to 5 drafts" in Engine(m, SPEC).describe()
