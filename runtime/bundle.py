"""``load_bundle``: manifest → backend + tokenizer → a :class:`Model` that generates text.

    BUNDLE/manifest.json ──validate (version, files, sha256)──► Manifest
         ├─► Backend (ORT or TensorRT, one variant) ─┐
         └─► Tokenizer (+ chat template) ────────────┴─► Model.generate / stream / chat
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from llama_export.runtime.backends.base import Backend
from llama_export.runtime.chat import Message, render_chat
from llama_export.runtime.errors import InputError
from llama_export.runtime.generate import BatchGeneration, Completion, GenerationOptions
from llama_export.runtime.manifest import Manifest
from llama_export.runtime.sampling import SamplingOptions
from llama_export.runtime.spec_generate import Drafter, LookupDrafter, SpeculativeGeneration
from llama_export.runtime.speculative import SpeculativeOptions, VerifyCost
from llama_export.runtime.tokenizer import Tokenizer

BACKENDS = ("ort", "trt")
_SAMPLING_KEYS = frozenset(f.name for f in dataclasses.fields(SamplingOptions))
_GENERATION_KEYS = frozenset(f.name for f in dataclasses.fields(GenerationOptions)) - {"sampling"}


def make_options(base: GenerationOptions | None = None, **overrides: Any) -> GenerationOptions:
    """``GenerationOptions`` from keyword overrides (sampling keys included), validated."""
    unknown = set(overrides) - _SAMPLING_KEYS - _GENERATION_KEYS
    if unknown:
        known = ", ".join(sorted(_SAMPLING_KEYS | _GENERATION_KEYS))
        raise InputError(f"unknown generation option(s) {', '.join(sorted(unknown))}: "
                         f"use any of {known}")
    base = base or GenerationOptions()
    sampling = {k: v for k, v in overrides.items() if k in _SAMPLING_KEYS}
    general = {k: v for k, v in overrides.items() if k in _GENERATION_KEYS}
    if "stop" in general and not isinstance(general["stop"], str):
        general["stop"] = tuple(general["stop"] or ())
    return dataclasses.replace(base, sampling=dataclasses.replace(base.sampling, **sampling),
                               **general)


class Model:
    """A loaded bundle. Load once, then generate from many prompts; use as a context manager."""

    def __init__(self, path: Path, manifest: Manifest, backend: Backend,
                 tokenizer: Tokenizer) -> None:
        self.path, self.manifest, self.backend, self.tokenizer = path, manifest, backend, tokenizer
        self.last_generation: BatchGeneration | None = None  # its .stats feed the bench
        self._drafts: dict[str, Model] = {}  # draft bundles for draft-model speculation
        self._verify_cost = VerifyCost()  # what a T-token forward costs here (prompt lookup)

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for draft in self._drafts.values():
            draft.close()
        self._drafts.clear()
        self.backend.close()

    def attach_draft(self, draft: Model, key: str | None = None) -> None:
        """Use ``draft`` (closed with this model) for ``speculative=draft:<its path>`` (or
        ``key``: ``PATH@VARIANT``); its tokenizer must be this model's."""
        from llama_export.runtime.draft_model import check_same_tokenizer

        check_same_tokenizer(self, draft)
        self._drafts[key or f"{draft.path}@"] = draft

    # ---- prompts -----------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    @property
    def verify_cost(self) -> VerifyCost:
        """What a forward of T new tokens costs here, as prompt-lookup speculation learned it."""
        return self._verify_cost

    def render_chat(self, messages: Sequence[Message]) -> str:
        tok = self.tokenizer
        return render_chat(tok.chat_template, messages, bos_token=tok.token_text(tok.bos_token_id),
                           eos_token=tok.token_text((tok.eos_token_ids or (None,))[0]))

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        # The rendered template already holds BOS etc. as text (transformers does the same).
        return self.tokenizer.encode(self.render_chat(messages), add_special_tokens=False)

    # ---- generation --------------------------------------------------------------------------
    def start(self, prompt_ids: Sequence[Sequence[int]], options: GenerationOptions | None = None,
              **overrides: Any) -> BatchGeneration:
        """A generation over token-id prompts: iterate it for pieces, then read completions."""
        opts = make_options(options, **overrides)
        gen = BatchGeneration(self.backend, self.tokenizer, prompt_ids, opts) \
            if opts.speculative is None else self._speculative(prompt_ids, opts, opts.speculative)
        self.last_generation = gen
        return gen

    def _speculative(self, prompt_ids: Sequence[Sequence[int]], opts: GenerationOptions,
                     spec: SpeculativeOptions) -> BatchGeneration:
        drafter: Drafter = LookupDrafter(spec, self._verify_cost)
        if spec.mode == "draft":
            from llama_export.runtime.draft_model import DraftModelDrafter

            assert spec.draft_bundle is not None  # SpeculativeOptions checks it
            key = f"{Path(spec.draft_bundle)}@{spec.draft_variant or ''}"
            if key not in self._drafts:  # same backend settings as this model, loaded once
                draft = load_bundle(spec.draft_bundle, spec.draft_variant, **self._load_settings())
                self.attach_draft(draft, key)
            drafter = DraftModelDrafter(self, self._drafts[key])
        return SpeculativeGeneration(self.backend, self.tokenizer, prompt_ids, opts, drafter, spec)

    def _load_settings(self) -> dict[str, Any]:
        opts = getattr(self.backend, "options", None)
        if opts is None or not hasattr(opts, "provider"):  # not ONNX Runtime
            return {"backend": "trt"}
        return {"backend": "ort", "provider": opts.provider, "threads": opts.threads,
                "spin": opts.spin}

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]],
                     options: GenerationOptions | None = None, **overrides: Any) -> list[Completion]:
        gen = self.start(prompt_ids, options, **overrides)
        for _ in gen:
            pass
        return gen.completions

    def generate(self, prompt: str, options: GenerationOptions | None = None,
                 **overrides: Any) -> Completion:
        """Generate from one prompt; ``overrides``: max_new_tokens, stop, temperature, top_k,
        top_p, min_p, repetition_penalty, seed, eos_token_ids."""
        return self.generate_ids([self._encode_one(prompt)], options, **overrides)[0]

    def generate_batch(self, prompts: Sequence[str], options: GenerationOptions | None = None,
                       **overrides: Any) -> list[Completion]:
        """Several prompts at once (left-padded); each finishes on its own."""
        if isinstance(prompts, str):
            raise InputError("generate_batch takes a list of prompts: use generate() for one")
        return self.generate_ids([self._encode_one(p) for p in prompts], options, **overrides)

    def stream(self, prompt: str, options: GenerationOptions | None = None,
               **overrides: Any) -> Iterator[str]:
        """Yield text pieces as they are decoded (never broken UTF-8, stop strings withheld)."""
        for piece in self.start([self._encode_one(prompt)], options, **overrides):
            yield piece.text

    def chat(self, messages: Sequence[Message], options: GenerationOptions | None = None,
             **overrides: Any) -> Completion:
        return self.generate_ids([self.encode_chat(messages)], options, **overrides)[0]

    def stream_chat(self, messages: Sequence[Message], options: GenerationOptions | None = None,
                    **overrides: Any) -> Iterator[str]:
        for piece in self.start([self.encode_chat(messages)], options, **overrides):
            yield piece.text

    def _encode_one(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}: "
                             "use generate_batch() for several prompts, chat() for messages")
        return self.tokenizer.encode(prompt)


def load_bundle(path: str | os.PathLike[str], variant: str | None = None, backend: str = "ort",
                provider: str = "cpu", threads: int | None = None, verify: bool = True,
                *, spin: bool = True, graph: str = "auto", attention_bias: str = "auto") -> Model:
    """Load a bundle: validate the manifest (version, files, sha256) and open one variant.

    ``backend``: ``ort`` (ONNX Runtime; ``provider`` cpu | cuda | tensorrt) or ``trt``
    (TensorRT engines built by ``llama-export trt``). ``verify=False`` skips hashing the weights
    (faster start; the manifest and file presence are still checked). ``spin=False`` stops ONNX Runtime's
    worker threads busy-waiting between ops (faster when other processes share the cores).
    ``graph`` (ONNX Runtime backend): ``auto`` (the variant's ONNX-Runtime graph on CPU when it
    has one), ``standard`` or ``ort``. ``attention_bias`` (the ONNX-Runtime graph): ``auto``
    runs its unpadded form until a batch is left-padded, ``always`` the full graph
    (backends/ort.py).
    """
    bundle = Path(path)
    manifest = Manifest.load(bundle)
    name = variant or manifest.default_variant()
    chosen: str | None = None
    if backend == "ort":
        from llama_export.runtime.backends.ort import select_graph

        chosen = select_graph(manifest, name, provider, graph)
    files = [*manifest.tokenizer.get("files", ["tokenizer.json"]),
             *manifest.files_of_variant(name, chosen)]
    if verify:
        manifest.verify_files(bundle, only=files)
    else:
        manifest.verify_files(bundle, only=[f for f in files if not f.endswith((".onnx", ".data"))])
    tokenizer = Tokenizer.from_bundle(bundle, manifest.tokenizer)
    if backend == "ort":
        from llama_export.runtime.backends.ort import OrtBackend, OrtOptions

        assert chosen is not None  # set above for this backend
        opts = OrtOptions(provider=provider, threads=threads, spin=spin, graph=chosen,
                          attention_bias=attention_bias)
        return Model(bundle, manifest, OrtBackend(bundle, manifest, name, opts), tokenizer)
    return Model(bundle, manifest, _open_backend(bundle, manifest, name, backend), tokenizer)


def _open_backend(bundle: Path, manifest: Manifest, variant: str, backend: str) -> Backend:
    if backend == "trt":
        # Written by the TensorRT side against backends/base.py; imported only when asked for.
        trt = importlib.import_module("llama_export.runtime.backends.trt")
        trt_backend: Backend = trt.TrtBackend(bundle, manifest, variant)
        return trt_backend
    raise InputError(f"backend {backend!r} is unknown: use one of {', '.join(BACKENDS)}")
