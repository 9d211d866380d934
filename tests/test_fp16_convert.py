"""fp16 variant from the fp32 ONNX graphs without torch (issue #10, item 4).

`llama-export quantize BUNDLE --fp16` (and `trt --fp16`, which makes it on the spot) converts
both fp32 graphs, gates them against fp32 on held-out text, and the result also passes the
exporter's own fp16 parity check against transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from llama_export.calibration.fp16 import convert_to_fp16, fp32_nodes
from llama_export.runtime.cli import main
from llama_export.runtime.manifest import Manifest


@pytest.fixture(scope="module")
def fp16_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fp16") / "bundle"
    shutil.copytree(tiny_bundle, out)
    main(["quantize", str(out), "--fp16"])
    return out


def test_norms_softmax_and_rope_angles_stay_fp32(tiny_bundle: Path) -> None:
    model = onnx.load(str(tiny_bundle / "model.onnx"))
    keep = {n.name: n.op_type for n in model.graph.node if n.name in fp32_nodes(model)}
    ops = set(keep.values())
    assert {"Pow", "ReduceMean", "Sqrt", "Softmax", "Cos", "Sin", "Where"} <= ops
    assert "MatMul" not in ops and "Gather" not in ops
    half = convert_to_fp16(model)
    inits = {t.name: t.data_type for t in half.graph.initializer}
    matmul_weights = [n.input[1] for n in half.graph.node
                      if n.op_type == "MatMul" and n.input[1] in inits]
    assert matmul_weights and all(inits[w] == onnx.TensorProto.FLOAT16 for w in matmul_weights)
    norm_weights = [w for w in inits if w.endswith("layernorm.weight") or w == "model.norm.weight"]
    assert norm_weights and all(inits[w] == onnx.TensorProto.FLOAT for w in norm_weights)
    types = {v.name: v.type.tensor_type.elem_type for v in [*half.graph.input, *half.graph.output]}
    assert types["logits"] == types["past_key_values.0.key"] == onnx.TensorProto.FLOAT16


def test_quantize_fp16_writes_a_gated_variant(fp16_bundle: Path) -> None:
    manifest = Manifest.load(fp16_bundle)
    entry = manifest.variant("fp16")
    assert manifest.graphs("fp16") == ["standard", "ort"]
    assert entry["precision"] == "fp16" and entry["scheme"] == "fp16-from-fp32-onnx"
    assert manifest.kv_dtype("fp16") == "float16"
    assert {o["name"]: o["dtype"] for o in entry["outputs"]}["logits"] == "float16"
    for acc in (entry["accuracy"], entry["ort_graph"]["accuracy"]):
        assert acc["top1_agreement"] >= 0.97 and abs(acc["ppl_ratio"] - 1) < 0.01
    assert entry["data_file"] == "model.fp16.onnx.data"
    manifest.verify_files(fp16_bundle, manifest.files_of_variant("fp16"))


@pytest.mark.parametrize("graph", ["standard", "ort"])
def test_converted_fp16_passes_the_exporters_parity_check(fp16_bundle: Path, tiny_source: Path,
                                                         graph: str) -> None:
    from llama_export.exporter.verify import verify_bundle

    report = verify_bundle(fp16_bundle, tiny_source, variant="fp16", graph=graph)
    assert report.passed and report.tolerance < 0.05


def test_runtime_generates_from_the_converted_variant(fp16_bundle: Path) -> None:
    from llama_export.runtime import load_bundle

    for graph in ("standard", "ort"):
        with load_bundle(fp16_bundle, variant="fp16", graph=graph) as m:
            assert m.manifest.kv_dtype("fp16") == "float16"  # fp16 IO end to end
            done = m.generate_ids([[5, 6, 7]], max_new_tokens=4, eos_token_ids=())[0]
        assert len(done.tokens) == 4


def test_trt_fp16_makes_the_variant_on_the_spot(tiny_bundle: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from llama_export.calibration.trt.pipeline import NO_GPU, NO_TENSORRT

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    with pytest.raises(SystemExit) as e:
        main(["trt", str(bundle), "--fp16"])
    out, err = capsys.readouterr()
    assert e.value.code != 0
    assert "bundle has no fp16 variant: creating it first with `llama-export quantize --fp16`" in err
    assert out.startswith("fp16: model.fp16.onnx (fp16-from-fp32-onnx)")  # the quantize report
    assert err.splitlines()[-1].removeprefix("error: ") in (NO_TENSORRT, NO_GPU)
    assert "fp16" in json.loads((bundle / "manifest.json").read_text())["variants"]
    assert np.isfinite(Manifest.load(bundle).variant("fp16")["accuracy"]["ppl"])
