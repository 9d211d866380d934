"""A > 2 GB export: external data in one ``model.onnx.data`` file, loadable from another cwd.

Slow (random 580M-parameter model, ~2.3 GB fp32): runs in ``make test-slow``, which prints the
wall time and peak RSS of the export.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import onnx
import pytest

from llama_export.exporter import onnx_tidy
from llama_export.exporter.export import ExportOptions, export_bundle
from llama_export.exporter.testing import make_tiny_hf_model
from llama_export.runtime.manifest import Manifest

BIG = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
       "num_hidden_layers": 10, "num_attention_heads": 16, "num_key_value_heads": 4,
       "tie_word_embeddings": False, "initializer_range": 0.02}


@pytest.mark.slow
def test_export_over_2gb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_tiny_hf_model(tmp_path / "big", **BIG)
    # its 262 MB lm_head in 2 column slices (real ones start above 256 MiB): a > 2 GB trace
    # stores a file per weight, which the split reads from
    monkeypatch.setattr(onnx_tidy, "HEAD_SLICE_BYTES", 200 << 20)
    t0 = time.perf_counter()
    bundle = export_bundle(src, tmp_path / "bundle", ExportOptions(max_seq_len=512))
    seconds = time.perf_counter() - t0
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"\n>2GB export: {seconds:.1f} s wall, peak RSS {rss_gb:.2f} GiB (incl. model creation)")
    m = Manifest.load(bundle)
    v = m.variant("fp32")
    assert v["data_file"] == "model.onnx.data"
    assert (bundle / "model.onnx.data").stat().st_size > 2 * 1024**3
    assert sorted(p.name for p in bundle.iterdir()) == [
        "config.json", "generation_config.json", "manifest.json", "model.onnx",
        "model.onnx.data", "model.ort.onnx", "model.ort.unpadded.onnx", "references.npz",
        "tokenizer.json", "tokenizer_config.json"]
    assert v["parity"]["passed"] and v["parity"]["max_abs_err"] <= 1e-4
    assert v["ort_graph"]["parity"]["passed"] and v["ort_graph"]["parity"]["max_abs_err"] <= 1e-4
    # three traces of > 2 GB, each writing a file per weight: none may overwrite another's
    unpadded = v["ort_graph"]["unpadded_parity"]
    assert unpadded["passed"] and unpadded["max_abs_err"] <= 1e-4
    m.verify_files(bundle)
    for file in ("model.ort.onnx", "model.ort.unpadded.onnx"):
        g = onnx.load(str(bundle / file), load_external_data=False)
        assert sorted(t.name for t in g.graph.initializer if ".cols" in t.name) == [
            "lm_head.weight_t.cols0_16000", "lm_head.weight_t.cols16000_32000"]
    import onnxruntime as ort

    monkeypatch.chdir(tmp_path)  # external data resolves relative to the model, not the cwd
    for file in ("model.onnx", "model.ort.onnx"):  # both read the one shared data file
        sess = ort.InferenceSession(str(bundle / file), providers=["CPUExecutionProvider"])
        assert len(sess.get_outputs()) == 1 + 2 * BIG["num_hidden_layers"]
