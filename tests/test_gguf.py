"""GGUF sources: every quant type gguf-py can write, the K-quants and a Q4_K_M mix (llama and
qwen2 architectures), exported and compared with transformers loading the same GGUF file itself
(its own dequantization and, for llama, Q/K un-permutation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama_export.exporter.export import ExportOptions, export_bundle
from llama_export.exporter.kquants import K_QUANTS, quantize_k
from llama_export.exporter.reference import load_reference
from llama_export.exporter.sources import load_source
from llama_export.exporter.testing import GGUF_QUANTS, make_tiny_gguf
from llama_export.exporter.verify import verify_bundle

CASES = [("gqa", q) for q in GGUF_QUANTS] + [("qwen2_untied", q) for q in ("Q8_0", "Q4_K_M")]


@pytest.mark.parametrize(("variant", "quant"), CASES)
def test_gguf_quant_type_parity(variant: str, quant: str, tmp_path: Path) -> None:
    gguf_file = make_tiny_gguf(tmp_path / f"tiny-{quant}.gguf", quant=quant, variant=variant)
    reference = load_reference(gguf_file)
    src = load_source(gguf_file)
    ours, theirs = src.state_dict, reference.state_dict()
    assert set(ours) == set(theirs) - {"lm_head.weight"} or set(ours) == set(theirs)
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name].float()), name
    types = set(src.extra["gguf_tensor_types"].values())
    assert types == ({"F32"} | ({"Q4_K", "Q6_K", "Q5_0", "Q8_0"} if quant == "Q4_K_M" else {quant}))
    bundle = export_bundle(gguf_file, tmp_path / "b", ExportOptions(verify=False),
                           progress=lambda _: None)
    report = verify_bundle(bundle, gguf_file, reference=reference)
    assert report.max_abs_err <= 1e-4, report.summary()
    assert report.greedy_agreement == 1.0
    if variant == "qwen2_untied":
        assert type(reference).__name__ == "Qwen2ForCausalLM"
        assert "model.layers.0.self_attn.q_proj.bias" in ours
        assert "model.layers.0.self_attn.o_proj.bias" not in ours


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


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_k_quant_encoder_layout(qtype: str) -> None:
    """Our K-quant fixture encoder writes ggml's layout: gguf-py decodes what it encodes to the
    nearest grid point (a wrong layout scrambles values far past one step), and for the
    affine types (whose grid does not move on re-encoding) bytes survive a decode/encode trip."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((4, 512)) * 0.05).astype(np.float32)
    raw = quantize_k(w, qtype)
    assert raw.shape == (4, 2 * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1])
    back = dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(w.shape)
    step = {"Q4_K": 15, "Q5_K": 31, "Q6_K": 63}[qtype]
    span = w.reshape(-1, 32).max(1) - w.reshape(-1, 32).min(1)
    assert np.abs(back - w).reshape(-1, 32).max(1).max() <= 1.1 * (span / step).max()
    if qtype != "Q6_K":  # Q6_K's rounded extremes pick slightly different scales next time
        np.testing.assert_array_equal(quantize_k(back, qtype), raw)
