"""``references.npz``: what the PyTorch original answered at export, read back without torch.

One numpy ``.npz`` (read with ``allow_pickle=False``: plain arrays only, never objects), listed
with its sha256 in the manifest like every bundle file. Per reference item ``i``:

    ids.{i}          int64 [n]      prompt tokens, then the original's greedy continuation
    topk_ids.{i}     int32 [n-1, k] the original's top-k token ids after ids[:t+1], best first
    topk_values.{i}  float32 [n-1, k] their logits
    logprobs.{i}     float32 [n-1]  the original's log p(ids[t+1] | ids[:t+1]) (full softmax)
    meta             uint8          UTF-8 JSON: format, top_k, items [{name, kind,
                                    prompt_tokens, text}], provenance

Row ``t`` belongs to the position that reads ``ids[t]`` and predicts ``ids[t+1]``: the last
token is never fed. ``kind`` is ``prompt`` or ``chat`` (a continuation follows the prompt) or
``heldout`` (teacher-forced text only: its log-probs give the perplexity).
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llama_export.runtime.errors import BundleError
from llama_export.runtime.manifest import Manifest

FORMAT = 1
FILE = "references.npz"
KINDS = ("prompt", "chat", "heldout")


@dataclass(frozen=True)
class ReferenceItem:
    name: str
    kind: str
    ids: np.ndarray          # int64 [n]
    prompt_tokens: int       # == n for heldout text
    topk_ids: np.ndarray     # int32 [n-1, k]
    topk_values: np.ndarray  # float32 [n-1, k]
    logprobs: np.ndarray     # float32 [n-1]
    text: str = ""           # the prompt (or the text's start), for reports

    @property
    def positions(self) -> int:
        """Positions compared: every token but the last is fed."""
        return len(self.ids) - 1

    @property
    def new_tokens(self) -> int:
        """Length of the original's greedy continuation (0 for held-out text)."""
        return len(self.ids) - self.prompt_tokens

    @property
    def continuation_rows(self) -> slice:
        """Rows whose next token is the greedy continuation."""
        return slice(self.prompt_tokens - 1, self.positions)


@dataclass(frozen=True)
class ReferenceSet:
    items: tuple[ReferenceItem, ...]
    top_k: int
    provenance: dict[str, Any] = field(default_factory=dict)

    def manifest_entry(self) -> dict[str, Any]:
        """The manifest's ``references`` entry (a summary; the file is the source of truth)."""
        held = [it for it in self.items if it.kind == "heldout"]
        entry: dict[str, Any] = {
            "file": FILE, "format": FORMAT, "top_k": self.top_k,
            "positions": sum(it.positions for it in self.items),
            "items": [{"name": it.name, "kind": it.kind, "prompt_tokens": it.prompt_tokens,
                       "new_tokens": it.new_tokens} for it in self.items],
            **self.provenance}
        if held:
            entry["heldout_ppl"] = round(reference_ppl(held), 6)
        return entry


def reference_ppl(items: list[ReferenceItem]) -> float:
    lp = np.concatenate([it.logprobs for it in items]).astype(np.float64)
    return float(np.exp(-lp.mean()))


def save_references(path: str | os.PathLike[str], refs: ReferenceSet) -> None:
    """Write ``refs`` to ``path`` (the caller writes into a temp folder and renames)."""
    meta = {"format": FORMAT, "top_k": refs.top_k, "provenance": refs.provenance,
            "items": [{"name": it.name, "kind": it.kind, "prompt_tokens": it.prompt_tokens,
                       "text": it.text} for it in refs.items]}
    arrays: dict[str, np.ndarray] = {
        "meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)}
    for i, it in enumerate(refs.items):
        arrays[f"ids.{i}"] = np.asarray(it.ids, dtype=np.int64)
        arrays[f"topk_ids.{i}"] = np.asarray(it.topk_ids, dtype=np.int32)
        arrays[f"topk_values.{i}"] = np.asarray(it.topk_values, dtype=np.float32)
        arrays[f"logprobs.{i}"] = np.asarray(it.logprobs, dtype=np.float32)
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)  # type: ignore[arg-type]


def missing_references_error(bundle: str | os.PathLike[str]) -> BundleError:
    return BundleError(
        f"{bundle} has no saved PyTorch references (exported before llama-export saved them, "
        f"or with --no-references): re-export it with `llama-export onnx [MODEL] -o {bundle} "
        "--force`, then rebuild its variants")


def load_references(bundle: str | os.PathLike[str], manifest: Manifest) -> ReferenceSet:
    """The bundle's references, checked against the manifest's sha256 and their own shapes."""
    entry = manifest.data.get("references")
    if not entry:
        raise missing_references_error(bundle)
    if entry.get("format") != FORMAT:
        raise BundleError(f"references format {entry.get('format')!r} is not supported by this "
                          f"llama-export (knows {FORMAT}): upgrade llama-export or re-export")
    rel = str(entry.get("file", FILE))
    manifest.verify_files(bundle, only=[rel])
    path = Path(bundle) / rel
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
        items = tuple(_item(arrays, i, m, int(meta["top_k"])) for i, m in enumerate(meta["items"]))
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
        raise BundleError(f"{path} is not a valid references file ({type(e).__name__}: {e}): "
                          "re-export the bundle") from None
    return ReferenceSet(items, int(meta["top_k"]), dict(meta.get("provenance", {})))


def _item(arrays: dict[str, np.ndarray], i: int, meta: dict[str, Any], k: int) -> ReferenceItem:
    ids = arrays[f"ids.{i}"].astype(np.int64)
    item = ReferenceItem(str(meta["name"]), str(meta["kind"]), ids, int(meta["prompt_tokens"]),
                         arrays[f"topk_ids.{i}"].astype(np.int64),
                         arrays[f"topk_values.{i}"].astype(np.float32),
                         arrays[f"logprobs.{i}"].astype(np.float32), str(meta.get("text", "")))
    n = len(ids) - 1
    shapes_ok = (item.topk_ids.shape == (n, k) and item.topk_values.shape == (n, k)
                 and item.logprobs.shape == (n,) and ids.ndim == 1)
    last = len(ids) if item.kind == "heldout" else n  # a prompt leaves room for a continuation
    if not shapes_ok or item.kind not in KINDS or not 1 <= item.prompt_tokens <= last or n < 1:
        raise ValueError(f"item {i} ({item.name}) has inconsistent arrays")
    return item
