"""The bundle carries config.json + generation_config.json (issue #10: Optimum interop).

transformers reads them back here; `.ci/optimum_interop.py` runs Optimum itself on a bundle in
an environment with optimum-onnx and compares its greedy text with `llama-export generate`.
"""

from __future__ import annotations

import json
from pathlib import Path


def test_transformers_reads_the_bundle_config(tiny_bundle: Path, tiny_source: Path) -> None:
    import transformers

    from llama_export.runtime.manifest import Manifest

    manifest = Manifest.load(tiny_bundle)
    manifest.verify_files(tiny_bundle, ["config.json", "generation_config.json"])  # sha256 recorded
    ours = transformers.AutoConfig.from_pretrained(str(tiny_bundle))
    theirs = transformers.AutoConfig.from_pretrained(str(tiny_source))
    assert ours.model_type == "llama"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                "pad_token_id"):
        assert getattr(ours, key) == getattr(theirs, key), key
    gen = transformers.GenerationConfig.from_pretrained(str(tiny_bundle))
    assert (gen.eos_token_id, gen.pad_token_id, gen.do_sample) == (257, 258, False)
    assert json.loads((tiny_bundle / "config.json").read_text())["torch_dtype"] == "float32"
