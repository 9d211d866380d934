"""A tiny Qwen2 (q/k/v bias without o_proj bias, untied, MQA) through every step a LLaMA bundle
takes: export with both graphs verified, INT8 W8A8 and INT4 variants (gates loosened as for
every tiny random model), the TensorRT graph check on each variant, a TensorRT dry-run plan, and
generation from every variant. The fp32/fp16 parity matrix (tied and untied Qwen2) runs in
test_export_parity.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest

from llama_export.calibration.accuracy import Gate
from llama_export.calibration.pipeline import CalibrateOptions, EvalOptions, QuantizeOptions
from llama_export.runtime.manifest import Manifest

LOOSE = EvalOptions(samples=2, seq_len=32, gate=Gate(max_ppl_increase=1.0, min_top1=0.0))


@pytest.fixture(scope="module")
def qwen_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llama_export.calibration.pipeline import calibrate, quantize
    from llama_export.exporter.export import ExportOptions, export_bundle
    from llama_export.exporter.testing import make_tiny_hf_model

    root = tmp_path_factory.mktemp("qwen2")
    src = make_tiny_hf_model(root / "hf", variant="qwen2_untied", seed=2)
    bundle = export_bundle(src, root / "bundle", ExportOptions(max_seq_len=64),
                           progress=lambda _: None)
    calibrate(bundle, CalibrateOptions(samples=4, seq_len=32, decode_steps=4, keep_float=0,
                                       eval=LOOSE))
    quantize(bundle, QuantizeOptions(bits=4, block_size=32, eval=LOOSE))
    return bundle


def test_export_records_qwen2_facts_and_parity(qwen_bundle: Path) -> None:
    m = Manifest.load(qwen_bundle)
    assert (m.model["family"], m.model["qkv_bias"], m.model["o_bias"]) == ("qwen2", True, False)
    fp32 = m.variant("fp32")
    for entry in (fp32, fp32["ort_graph"]):
        assert entry["parity"]["passed"] and entry["parity"]["max_abs_err"] <= 1e-4
    prov = m.data["provenance"]
    assert prov["export_seconds"] > 0 and prov["verify_seconds"] > 0 and prov["peak_rss_mb"] > 100
    graph = onnx.load(str(qwen_bundle / fp32["file"]), load_external_data=False)
    biases = {i.name for i in graph.graph.initializer if i.name.endswith("_proj.bias")}
    assert "model.layers.0.self_attn.q_proj.bias" in biases
    assert not any("o_proj" in b or "mlp" in b for b in biases)


@pytest.mark.parametrize("variant", ["int8", "int4"])
def test_quantized_variants_pass_the_tensorrt_check_and_generate(qwen_bundle: Path,
                                                                 variant: str) -> None:
    from llama_export.calibration.trt.graph_check import check_graph_for_tensorrt
    from llama_export.runtime import load_bundle

    m = Manifest.load(qwen_bundle)
    entry = m.variant(variant)
    model = onnx.load(str(qwen_bundle / entry["file"]))
    check_graph_for_tensorrt(model, entry["file"], [i.name for i in model.graph.input])
    for graph in ("standard", "ort"):
        with load_bundle(qwen_bundle, variant=variant, graph=graph) as lm:
            out = lm.generate_ids([lm.encode("def f(x):")], max_new_tokens=6, eos_token_ids=())
            assert len(out[0].tokens) == 6


def test_tensorrt_dry_run_plan(qwen_bundle: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    from llama_export.runtime.cli import main

    bundle = shutil.copytree(qwen_bundle, tmp_path / "b")
    main(["trt", str(bundle), "--int8", "--dry-run", "--max-batch", "1", "--max-context", "32"])
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("  variant   int8: model.int8.onnx (")
    # 2 layers x K,V x 1 kv head x 32 x 16 x 4 B x 2 buffers = 16 KiB
    assert "    KV cache  0.0 MiB (2 buffers: present -> past by pointer)" in out.splitlines()
