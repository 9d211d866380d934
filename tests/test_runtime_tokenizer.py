"""Streaming detokenization (never broken UTF-8), stop strings, chat template rendering."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_export.exporter.testing import CHAT_TEMPLATE, byte_tokenizer_json
from llama_export.runtime.chat import render_chat
from llama_export.runtime.errors import InputError
from llama_export.runtime.tokenizer import IncrementalDecoder, StopMatcher, Tokenizer

SPEC = {"bos_token_id": 256, "eos_token_ids": [257], "pad_token_id": 258, "add_bos_token": True,
        "chat_template": CHAT_TEMPLATE}


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(byte_tokenizer_json(), encoding="utf-8")
    return Tokenizer(path, SPEC)


TEXTS = ["plain ascii", "héllo wörld", "日本語のテキスト", "emoji 🦙🚀 end", "mixed: naïve café — 😀!"]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decoder_never_emits_a_broken_character(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode())  # byte-level: one token per byte, the hard case
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    # streamed, not all at the end: ASCII bytes come out as soon as they arrive
    assert sum(1 for p in pieces if p) > len(text) // 2


def test_incremental_decoder_lets_truly_invalid_bytes_out(tok: Tokenizer) -> None:
    lead = tok.encode("é", add_special_tokens=False)[0]  # 0xC3 alone is never completed
    dec = IncrementalDecoder(tok)
    out = [dec.push(lead) for _ in range(6)]
    assert "".join(out) + dec.flush() == "\ufffd" * 6
    assert any(out)  # not held back until the end of generation


def test_bos_added_once_and_empty_prompt_rejected(tok: Tokenizer) -> None:
    assert tok.encode("hi") == [256, ord("h"), ord("i")]
    assert tok.encode("<s>hi") == [256, ord("h"), ord("i")]
    assert tok.encode("hi", add_special_tokens=False) == [ord("h"), ord("i")]
    with pytest.raises(InputError, match="prompt is empty: pass some text"):
        tok.encode("")


def _stream(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    m = StopMatcher(stops)
    out = [m.push(p) for p in pieces]
    return [*out, m.flush()], m.stopped


def test_stop_string_split_across_pieces_is_not_emitted() -> None:
    out, stopped = _stream(["</end>"], ["Hello </", "en", "d> ignored", " more"])
    assert stopped
    assert "".join(out) == "Hello "
    assert out[0] == "Hello "  # the possible stop prefix "</" was held back


def test_held_back_prefix_is_released_when_it_is_not_a_stop() -> None:
    out, stopped = _stream(["STOP"], ["a ST", "ART b", " ST"])
    assert not stopped
    assert "".join(out) == "a START b ST"
    assert out[-2:] == [" ", "ST"]  # only the possible stop prefix waits; flush releases it


def test_earliest_of_several_stop_strings_wins() -> None:
    out, stopped = _stream(["\n\n", "User:"], ["one User: two\n\nthree"])
    assert stopped
    assert "".join(out) == "one "


def test_chat_template_renders_like_transformers() -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = render_chat(CHAT_TEMPLATE, msgs, bos_token="<s>", eos_token="</s>")
    assert text == "<|system|>Be brief.</s><|user|>Hi</s><|assistant|>"


def test_chat_errors_name_the_fix() -> None:
    with pytest.raises(InputError, match="no chat template: pass a plain prompt"):
        render_chat(None, [{"role": "user", "content": "x"}], bos_token="", eos_token="")
    with pytest.raises(InputError, match="non-empty list"):
        render_chat(CHAT_TEMPLATE, [], bos_token="", eos_token="")
    with pytest.raises(InputError, match="role 'robot': use one of system, user"):
        render_chat(CHAT_TEMPLATE, [{"role": "robot", "content": "x"}], bos_token="",
                    eos_token="")
    raising = "{{ raise_exception('only user turns') }}"
    with pytest.raises(InputError, match="chat template rejected the messages: only user turns"):
        render_chat(raising, [{"role": "user", "content": "x"}], bos_token="", eos_token="")


def test_chat_template_is_sandboxed() -> None:
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(InputError, match="rendering the chat template failed"):
        render_chat(evil, [{"role": "user", "content": "x"}], bos_token="", eos_token="")


def test_tokenizer_file_errors_name_the_fix(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(Exception, match="re-export the bundle"):
        Tokenizer(bad, SPEC)
