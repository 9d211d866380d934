"""References saved at export (DESIGN.md §6c): the PyTorch original on a fixed reference set.

    built-in prompts + chat prompt + held-out text (+ --reference-prompts FILE)
        ──tokenize (the runtime's tokenizer and chat template, as the target will)──►
        transformers LlamaForCausalLM (fp32): prefill, then greedy one-token steps with its KV
        cache ──► top-k logits per position, greedy continuation, log p(next token)
        ──► BUNDLE/references.npz + manifest "references" entry (sha256 in "files")

``llama-export parity`` later compares any variant on any backend with this file, torch-free.
The continuation always runs ``NEW_TOKENS`` steps (EOS does not stop it), so every prompt yields
the same number of compared decode positions. Items are cut to fit the bundle's context.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llama_export.runtime.chat import render_chat
from llama_export.runtime.errors import InputError
from llama_export.runtime.manifest import Manifest
from llama_export.runtime.parity.references import (
    FILE,
    ReferenceItem,
    ReferenceSet,
    save_references,
)
from llama_export.runtime.tokenizer import Tokenizer

from .reference import reference_threads
from .sources import Progress

TOP_K = 32
NEW_TOKENS = 64
HELDOUT_TOKENS = 256
MAX_PROMPT_TOKENS = 512
MAX_USER_PROMPTS = 16

BUILTIN_PROMPTS = (
    ("capital", "The capital of France is"),
    ("code", 'def is_prime(n):\n    """Return True when n is a prime number."""\n'),
    ("story", "Once upon a time, in a small village by the sea, there lived"),
)
BUILTIN_CHAT = ("chat", [{"role": "user",
                          "content": "Give me three tips for staying focused while studying."}])
# Written for this project; not part of the calibration texts (calibration/data/), so quantized
# variants are scored on text they were not fitted on.
HELDOUT = (
    "The old railway bridge across the valley was built in 1887 from iron shipped up the river "
    "on barges. For ninety years it carried coal trains to the coast; then the mines closed, "
    "the line was lifted, and the bridge stood unused, rusting quietly above the orchards. In "
    "2011 a group of volunteers began to repaint it, one span each summer, and today it carries "
    "a cycle path that joins two villages which had been an hour apart by road.\n\n"
    "A binary search finds an item in a sorted list by halving the range that can contain it:\n\n"
    "def binary_search(items, target):\n"
    "    lo, hi = 0, len(items) - 1\n"
    "    while lo <= hi:\n"
    "        mid = (lo + hi) // 2\n"
    "        if items[mid] == target:\n"
    "            return mid\n"
    "        if items[mid] < target:\n"
    "            lo = mid + 1\n"
    "        else:\n"
    "            hi = mid - 1\n"
    "    return -1\n\n"
    "Each step discards half of what is left, so a list of a million items needs at most twenty "
    "comparisons. The price is that the list must be kept sorted, which makes inserting new "
    "items slower than appending them to the end of an unsorted list.\n\n"
    "Autumn came early that year. By the middle of September the swallows had gone, the "
    "mornings smelled of wood smoke, and the children walked to school through fog so thick "
    "that the church tower seemed to float above the houses."
)


@dataclass(frozen=True)
class Prompt:
    name: str
    kind: str        # prompt | chat | heldout
    ids: list[int]
    text: str


def write_references(bundle: Path, manifest: Manifest, reference: Any,
                     prompts_file: str | os.PathLike[str] | None, progress: Progress) -> None:
    """Run ``reference`` over the reference set; write ``references.npz`` into ``bundle`` and
    record it (entry + sha256) in ``manifest`` (saved later by the caller)."""
    tok = Tokenizer.from_bundle(bundle, manifest.tokenizer)
    prompts = reference_prompts(tok, prompts_file)
    max_ctx = manifest.max_context
    progress(f"running the PyTorch original on {len(prompts)} reference items (greedy "
             f"continuations of {NEW_TOKENS} tokens, top-{TOP_K} logits) for `llama-export parity`")
    t0 = time.perf_counter()
    items = []
    with reference_threads(reference):
        for p in prompts:
            item = _run_item(reference, p, max_ctx)
            if item is None:
                progress(f"reference '{p.name}' skipped: {len(p.ids)} prompt tokens leave no room "
                         f"in the bundle's context of {max_ctx}")
                continue
            items.append(item)
    import transformers

    refs = ReferenceSet(tuple(items), min(TOP_K, manifest.vocab_size), {
        "reference": f"transformers {type(reference).__name__} (fp32, eager attention)",
        "transformers_version": transformers.__version__, "torch_version": torch.__version__,
        "new_tokens": NEW_TOKENS})
    save_references(bundle / FILE, refs)
    manifest.data["references"] = refs.manifest_entry()
    manifest.record_file(bundle, FILE)
    positions = sum(it.positions for it in items)
    progress(f"saved PyTorch references: {len(items)} items, {positions} positions, top-{TOP_K} "
             f"logits ({(bundle / FILE).stat().st_size / 1024:.0f} KiB) in "
             f"{time.perf_counter() - t0:.1f} s")


def reference_prompts(tok: Tokenizer, prompts_file: str | os.PathLike[str] | None) -> list[Prompt]:
    """The built-in set (plain prompts, a chat prompt when the tokenizer has a template, the
    held-out text) followed by the user's prompts."""
    out = [Prompt(name, "prompt", tok.encode(text), text) for name, text in BUILTIN_PROMPTS]
    if tok.chat_template:
        out.append(_chat_prompt(tok, BUILTIN_CHAT[0], BUILTIN_CHAT[1]))
    out.append(Prompt("heldout", "heldout", tok.encode(HELDOUT)[:HELDOUT_TOKENS], HELDOUT[:80]))
    if prompts_file is not None:
        out += user_prompts(tok, Path(prompts_file))
    return out


def _chat_prompt(tok: Tokenizer, name: str, messages: list[dict[str, Any]]) -> Prompt:
    text = render_chat(tok.chat_template, messages, bos_token=tok.token_text(tok.bos_token_id),
                       eos_token=tok.token_text((tok.eos_token_ids or (None,))[0]))
    return Prompt(name, "chat", tok.encode(text, add_special_tokens=False), text)


def user_prompts(tok: Tokenizer, path: Path) -> list[Prompt]:
    """The prompts of ``--reference-prompts FILE``, tokenized."""
    out = []
    for n, (kind, value) in enumerate(read_prompts_file(path), 1):
        if kind == "chat":
            p = _chat_prompt(tok, f"user-{n}", value)  # type: ignore[arg-type]
        else:
            p = Prompt(f"user-{n}", "prompt", tok.encode(str(value)), str(value))
        if len(p.ids) > MAX_PROMPT_TOKENS:
            raise InputError(f"{path}: prompt {n} is {len(p.ids)} tokens long: keep reference "
                             f"prompts under {MAX_PROMPT_TOKENS} tokens")
        out.append(p)
    return out


def read_prompts_file(path: str | os.PathLike[str]) -> list[tuple[str, Any]]:
    """``--reference-prompts FILE`` as ``(kind, text or messages)``, checked before the export
    starts: ``.txt`` (one prompt per non-empty line) or ``.jsonl`` (per line a string,
    ``{"prompt": ...}``, or ``{"messages": [...]}`` rendered with the chat template)."""
    path = Path(path)
    if not path.is_file() or path.suffix not in (".txt", ".jsonl"):
        raise InputError(f"--reference-prompts {path}: pass an existing .txt (one prompt per "
                         "line) or .jsonl file")
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError:
        raise InputError(f"--reference-prompts {path} is not UTF-8 text: convert it") from None
    if not lines or len(lines) > MAX_USER_PROMPTS:
        raise InputError(f"--reference-prompts {path} has {len(lines)} prompts: give 1 to "
                         f"{MAX_USER_PROMPTS} (parity stays quick on the target)")
    if path.suffix == ".txt":
        return [("prompt", line) for line in lines]
    return [_json_prompt(path, n, line) for n, line in enumerate(lines, 1)]


def _json_prompt(path: Path, n: int, line: str) -> tuple[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        raise InputError(f"{path}:{n} is not valid JSON: one JSON value per line") from None
    if isinstance(obj, str) and obj:
        return "prompt", obj
    if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and obj["prompt"]:
        return "prompt", obj["prompt"]
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list) and obj["messages"]:
        return "chat", obj["messages"]
    raise InputError(f'{path}:{n}: write a string, {{"prompt": "..."}} or '
                     '{"messages": [{"role": "user", "content": "..."}]} per line')


def _run_item(reference: Any, p: Prompt, max_ctx: int) -> ReferenceItem | None:
    if p.kind == "heldout":
        ids = p.ids[:max_ctx + 1]  # n - 1 positions are fed
        if len(ids) < 2:
            return None
        with torch.inference_mode():
            logits = reference(input_ids=torch.tensor([ids[:-1]])).logits[0].float()
        return _item(p, ids, len(ids), logits)
    new = min(NEW_TOKENS, max_ctx + 1 - len(p.ids))
    if new < 1:
        return None
    ids, logits = _greedy(reference, p.ids, new)
    return _item(p, ids, len(p.ids), logits)


def _greedy(reference: Any, prompt: list[int], new: int) -> tuple[list[int], torch.Tensor]:
    """The original's greedy continuation with its own KV cache, and the logits of every fed
    position (the prompt's from the prefill, then one row per decode step)."""
    ids = list(prompt)
    # transformers 5.24 renamed past_key_values to cache (the old name warns, then goes in 5.40)
    name = "cache" if "cache" in inspect.signature(reference.forward).parameters \
        else "past_key_values"
    with torch.inference_mode():
        out = reference(input_ids=torch.tensor([ids]), use_cache=True)
        rows = [out.logits[0].float()]
        for step in range(new):
            ids.append(int(rows[-1][-1].argmax()))
            if step == new - 1:
                break
            out = reference(input_ids=torch.tensor([[ids[-1]]]), use_cache=True,
                            **{name: getattr(out, name)})
            rows.append(out.logits[0].float())
    return ids, torch.cat(rows)


def _item(p: Prompt, ids: list[int], prompt_tokens: int, logits: torch.Tensor) -> ReferenceItem:
    target = torch.tensor(ids[1:])
    logprobs = torch.log_softmax(logits, dim=-1)[torch.arange(len(target)), target]
    top = torch.topk(logits, min(TOP_K, logits.shape[-1]), dim=-1)
    return ReferenceItem(p.name, p.kind, np.asarray(ids, dtype=np.int64),
                         min(prompt_tokens, len(ids)), top.indices.numpy().astype(np.int32),
                         top.values.numpy(), logprobs.numpy(), p.text)
