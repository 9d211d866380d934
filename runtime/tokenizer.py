"""Tokenizer (Hugging Face ``tokenizers``) plus the two streaming helpers.

* :class:`IncrementalDecoder` turns a growing list of token ids into text pieces. It decodes a
  small window (``prefix_offset``..end) and emits only what is new, holding back while the
  window ends in an incomplete UTF-8 sequence (the decoder renders it as U+FFFD). Decoding the
  window with its preceding token keeps SentencePiece's leading-space handling right.
* :class:`StopMatcher` holds back text that could be the start of a stop string, and cuts the
  text at the first stop string found (stop strings are never emitted).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from llama_export.runtime.errors import BundleError, InputError

_REPLACEMENT = "\ufffd"


class Tokenizer:
    """Encode prompts and decode ids, with the bundle's special-token settings."""

    def __init__(self, path: str | os.PathLike[str], spec: dict[str, Any]) -> None:
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad JSON
            raise BundleError(f"cannot read tokenizer {path} ({e}): re-export the bundle") from None
        self.bos_token_id: int | None = spec.get("bos_token_id")
        self.eos_token_ids: tuple[int, ...] = tuple(spec.get("eos_token_ids") or ())
        pad = spec.get("pad_token_id")
        self.pad_token_id: int = int(pad if pad is not None else (self.eos_token_ids or (0,))[0])
        self.add_bos_token = bool(spec.get("add_bos_token", False))
        self.chat_template: str | None = spec.get("chat_template")

    @classmethod
    def from_bundle(cls, bundle: Path, spec: dict[str, Any]) -> Tokenizer:
        return cls(bundle / "tokenizer.json", spec)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; BOS prepended when the bundle says so and it is not there yet.

        Chat-rendered prompts already carry their special tokens as text: encode them with
        ``add_special_tokens=False`` (what transformers' ``apply_chat_template`` does).
        """
        if not text:
            raise InputError("prompt is empty: pass some text (or a chat message)")
        ids: list[int] = self._tok.encode(text, add_special_tokens=False).ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def vocabulary(self) -> dict[str, int]:
        """Token text -> id, added tokens included."""
        return dict(self._tok.get_vocab(with_added_tokens=True))

    def token_text(self, token_id: int | None) -> str:
        """The literal text of a special token (for chat templates): ``""`` when absent."""
        if token_id is None:
            return ""
        return self._tok.id_to_token(int(token_id)) or ""

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))


class IncrementalDecoder:
    """Streaming detokenizer: feed ids one at a time, get the new text (never broken UTF-8)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start: one token before the unread ones, for context
        self._read = 0  # ids before this index have been emitted as text

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        # Hold back while the text ends mid-character. A valid character spans at most 4 byte
        # tokens, so after 4 pending tokens the U+FFFD is real (invalid bytes): let it out.
        pending = len(self._ids) - self._read
        if len(text) > len(prefix_text) and (not text.endswith(_REPLACEMENT) or pending >= 4):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is held back at the end of generation (may end in U+FFFD: truly invalid)."""
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text):]


class StopMatcher:
    """Cut text at the first stop string; hold back a tail that may begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise InputError("a stop string is empty: pass non-empty stop strings")
        self._stops = tuple(stops)
        self._pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """Text safe to emit now; sets :attr:`stopped` when a stop string was found."""
        if self.stopped or not piece:
            return ""
        if not self._stops:
            return piece
        text = self._pending + piece
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return text[:min(hits)]
        hold = self._held_tail(text)
        self._pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def flush(self) -> str:
        """At the end (EOS, max tokens): the held tail was not a stop string after all."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

    def _held_tail(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
