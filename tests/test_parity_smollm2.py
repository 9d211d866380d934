"""``llama-export parity`` on SmolLM2-135M-Instruct with the default tolerances: every ONNX
Runtime variant (fp32, fp16, int4 here; int8 in the slow test: its calibration takes minutes),
both graphs each, against the references saved when the session bundle was exported."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llama_export.runtime.manifest import Manifest
from llama_export.runtime.parity.references import FILE, load_references
from llama_export.runtime.parity.run import ParityOptions, ParityResult, format_table, run_parity


@pytest.fixture(scope="module")
def smollm2_work(smollm2_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable copy of the session bundle (variants are added to it)."""
    out = tmp_path_factory.mktemp("smol_parity") / "bundle"
    shutil.copytree(smollm2_bundle, out)
    return out


def _check(result: ParityResult, variants: list[str]) -> None:
    print("\n" + format_table(result))
    assert [(r.label.variant, r.label.graph) for r in result.rows] == [
        (v, g) for v in variants for g in ("standard", "ort")]
    for r in result.rows:
        assert r.passed, (r.label, r.failures)


def test_references_are_small_and_complete(smollm2_bundle: Path) -> None:
    m = Manifest.load(smollm2_bundle)
    refs = load_references(smollm2_bundle, m)
    assert (smollm2_bundle / FILE).stat().st_size < 5 * 1024**2
    assert [(it.name, it.kind) for it in refs.items] == [
        ("capital", "prompt"), ("code", "prompt"), ("story", "prompt"), ("chat", "chat"),
        ("heldout", "heldout")]
    assert all(it.new_tokens == 64 for it in refs.items[:4]) and refs.top_k == 32
    chat = refs.items[3]
    assert chat.text.startswith("<|im_start|>") and chat.text.endswith("<|im_start|>assistant\n")
    assert 200 <= refs.items[4].positions <= 256
    assert 5 < m.data["references"]["heldout_ppl"] < 50


def test_saved_continuation_is_transformers_gguf_generate(smollm2_bundle: Path,
                                                          smollm2_reference: Any) -> None:
    """Export-time references (built from our GGUF reading) equal transformers' own GGUF
    loading + generate() on the chat prompt: the stored answers are the original's."""
    import torch

    item = load_references(smollm2_bundle, Manifest.load(smollm2_bundle)).items[3]
    prompt = torch.tensor([item.ids[:item.prompt_tokens].tolist()])
    saved = smollm2_reference.generation_config.eos_token_id
    smollm2_reference.generation_config.eos_token_id = None  # 64 tokens, past EOS by design
    # An explicit mask: without one generate() takes the prompt's <|im_end|> (id 2, also the
    # pad id) for padding and masks it out (it then diverges after 11 tokens).
    try:
        with torch.inference_mode():
            gen = smollm2_reference.generate(prompt, do_sample=False, max_new_tokens=64,
                                             pad_token_id=2,
                                             attention_mask=torch.ones_like(prompt))
    finally:
        smollm2_reference.generation_config.eos_token_id = saved
    assert gen[0].tolist() == item.ids.tolist()
    assert np.all(np.diff(item.topk_values, axis=1) <= 0)  # best first


def test_smollm2_fp32_and_int4_pass(smollm2_work: Path) -> None:
    from llama_export.calibration.pipeline import QuantizeOptions, quantize

    quantize(smollm2_work, QuantizeOptions(bits=4))
    _check(run_parity(smollm2_work, ParityOptions(variant="fp32")), ["fp32"])
    _check(run_parity(smollm2_work, ParityOptions(variant="int4")), ["int4"])


def test_smollm2_fp16_passes(smollm2_gguf: Path, tmp_path: Path) -> None:
    from llama_export.exporter.export import ExportOptions, export_bundle

    bundle = export_bundle(smollm2_gguf, tmp_path / "fp16", ExportOptions(
        dtype="fp16", max_seq_len=2048, verify=False), progress=lambda _: None)
    _check(run_parity(bundle), ["fp16"])


@pytest.mark.slow
def test_smollm2_int8_passes(smollm2_work: Path) -> None:
    from llama_export.calibration.pipeline import CalibrateOptions, calibrate

    calibrate(smollm2_work, CalibrateOptions())
    _check(run_parity(smollm2_work, ParityOptions(variant="int8")), ["int8"])
