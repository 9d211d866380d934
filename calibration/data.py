"""Calibration / evaluation text → token segments → feed dicts (Polygraphy's data contract).

A *segment* is ``seq_len`` consecutive tokens. Calibration feeds each segment as a prefill of
its first ``seq_len - decode_steps`` tokens followed by ``decode_steps`` single-token decode
steps that carry the real ``present`` K/V forward, so the ranges cover both phases of the one
graph (decode-phase activations differ: one query row, long attention span).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from llama_export.runtime.errors import CalibrationError, InputError
from llama_export.runtime.manifest import Manifest
from llama_export.runtime.tokenizer import Tokenizer

BUILTIN_CALIBRATION = "calibration.txt"
BUILTIN_HELDOUT = "heldout.txt"
# Held-out text per genre, each gated on its own (written for the project, like the rest).
HELDOUT_GENRES = {"prose": BUILTIN_HELDOUT, "dialogue": "heldout-dialogue.txt",
                  "code": "heldout-code.txt", "technical": "heldout-technical.txt"}
Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class TextSource:
    """Loaded text with where it came from and a hash of its bytes (recorded in the manifest)."""

    text: str
    origin: str
    sha256: str


def builtin_text(name: str = BUILTIN_CALIBRATION) -> TextSource:
    """Text shipped with the package (written for the project; see calibration/data/)."""
    blob = resources.files("llama_export.calibration").joinpath("data").joinpath(name).read_bytes()
    return TextSource(blob.decode("utf-8"), f"builtin:{name}", hashlib.sha256(blob).hexdigest())


def load_text(path: str | Path | None, *, default: str = BUILTIN_CALIBRATION) -> TextSource:
    """A ``.txt`` file (used as is) or ``.jsonl`` (one ``{"text": ...}`` or string per line)."""
    if path is None:
        return builtin_text(default)
    p = Path(path)
    if not p.is_file():
        raise InputError(f"calibration data {p} not found: pass an existing .txt or .jsonl file")
    if p.suffix not in (".txt", ".jsonl"):
        raise InputError(f"calibration data {p} has suffix '{p.suffix}': use a .txt or .jsonl file")
    blob = p.read_bytes()
    try:
        raw = blob.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{p} is not UTF-8 text: convert it to UTF-8") from None
    text = _jsonl_text(raw, p) if p.suffix == ".jsonl" else raw
    if not text.strip():
        raise CalibrationError(f"calibration data {p} is empty: give it some text (a few pages)")
    return TextSource(text, str(p), hashlib.sha256(blob).hexdigest())


def _jsonl_text(raw: str, p: Path) -> str:
    parts: list[str] = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{p}:{n} is not valid JSON: one JSON object per line") from None
        text = obj if isinstance(obj, str) else obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise InputError(f'{p}:{n} has no "text" string: write {{"text": "..."}} per line')
        parts.append(text)
    return "\n\n".join(parts)


def token_segments(source: TextSource, tokenizer: Tokenizer, *, samples: int,
                   seq_len: int) -> np.ndarray:
    """Up to ``samples`` non-overlapping segments, shape ``(n, seq_len)`` int64, spread evenly
    over the whole text (a mixed-genre text is sampled in every genre, not only its start)."""
    if samples < 1 or seq_len < 8:
        raise InputError(f"--samples {samples} / --seq-len {seq_len}: use samples >= 1, "
                         "seq-len >= 8")
    ids = np.asarray(tokenizer.encode(source.text, add_special_tokens=False), dtype=np.int64)
    available = len(ids) // seq_len
    n = min(samples, available)
    if n == 0:
        raise CalibrationError(
            f"calibration data {source.origin} is too short: {len(ids)} tokens, need at least "
            f"--seq-len {seq_len}; add more text or lower --seq-len")
    picks = np.linspace(0, available - 1, n).round().astype(np.int64)
    segments: np.ndarray = ids[: available * seq_len].reshape(available, seq_len)[picks]
    return segments


def empty_past(manifest: Manifest, variant: str = "fp32") -> Feed:
    """Zero-length past K/V for a batch-1 prefill."""
    feed: Feed = {}
    for spec in manifest.inputs(variant):
        if spec.name.startswith("past_key_values."):
            shape = (1, manifest.num_kv_heads, 0, manifest.head_dim)
            feed[spec.name] = np.zeros(shape, dtype=np.float32)
    return feed


def prefill_feed(tokens: np.ndarray, past: Feed) -> Feed:
    """Feed for ``tokens`` (1-D) after ``past`` (any length) for batch 1."""
    plen = next(iter(past.values())).shape[2] if past else 0
    t = len(tokens)
    return {"input_ids": tokens[None, :].astype(np.int64),
            "attention_mask": np.ones((1, plen + t), dtype=np.int64),
            "position_ids": np.arange(plen, plen + t, dtype=np.int64)[None, :], **past}


def past_from_outputs(names: list[str], outs: list[np.ndarray]) -> Feed:
    """``present.{i}.*`` outputs renamed as the next step's ``past_key_values.{i}.*`` inputs."""
    return {"past_key_values." + n[len("present."):]: o
            for n, o in zip(names, outs, strict=True) if n.startswith("present.")}
