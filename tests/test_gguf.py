"""GGUF sources: every quant type gguf-py can write, exported and compared with transformers
loading the same GGUF file itself (its own dequantization and Q/K un-permutation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama_export.exporter.export import ExportOptions, export_bundle
from llama_export.exporter.reference import load_reference
from llama_export.exporter.sources import load_source
from llama_export.exporter.testing import GGUF_QUANTS, make_tiny_gguf
from llama_export.exporter.verify import verify_bundle


@pytest.mark.parametrize("quant", GGUF_QUANTS)
def test_gguf_quant_type_parity(quant: str, tmp_path: Path) -> None:
    gguf_file = make_tiny_gguf(tmp_path / f"tiny-{quant}.gguf", quant=quant)
    reference = load_reference(gguf_file)
    ours = load_source(gguf_file).state_dict
    theirs = reference.state_dict()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name].float()), name
    bundle = export_bundle(gguf_file, tmp_path / "b", ExportOptions(verify=False),
                           progress=lambda _: None)
    report = verify_bundle(bundle, gguf_file, reference=reference)
    assert report.max_abs_err <= 1e-4, report.summary()
    assert report.greedy_agreement == 1.0


def test_gguf_tokenizer_is_self_contained(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    gguf_file = make_tiny_gguf(tmp_path / "tiny.gguf", quant="F32")
    bundle = export_bundle(gguf_file, tmp_path / "b", ExportOptions(verify=False),
                           progress=lambda _: None)
    ours = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=gguf_file.name)
    for text in ["hello world", "ünïcode 🦙", "<s>special</s>"]:
        assert ours.encode(text).ids == ref(text)["input_ids"], text
    assert ours.decode(ours.encode("ünïcode 🦙").ids) == "ünïcode 🦙"
