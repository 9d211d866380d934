"""Every variant keeps its weights as page-aligned external data (issue #10, item 7).

Weights inside the protobuf cost twice their size in RAM at load (the protobuf bytes plus the
tensors built from them). Bundles written before, with weights inside the protobuf, still load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from llama_export.calibration.accuracy import Gate
from llama_export.calibration.pipeline import (
    CalibrateOptions,
    EvalOptions,
    QuantizeOptions,
    calibrate,
    quantize,
)
from llama_export.runtime import load_bundle
from llama_export.runtime.manifest import Manifest, sha256_file

LOOSE = EvalOptions(samples=2, seq_len=32, gate=Gate(max_ppl_increase=1.0, min_top1=0.0))


@pytest.fixture(scope="module")
def quantized(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ext") / "bundle"
    shutil.copytree(tiny_bundle, out)
    calibrate(out, CalibrateOptions(samples=4, seq_len=32, decode_steps=4, keep_float=0,
                                    eval=LOOSE))
    quantize(out, QuantizeOptions(bits=4, eval=LOOSE))
    return out


def _graph_files(manifest: Manifest) -> list[tuple[str, str | None]]:
    out = []
    for name in manifest.variants:
        for graph in manifest.graphs(name):
            spec = manifest.graph(name, graph)
            out.append((spec["file"], spec.get("data_file") or manifest.variant(name)["data_file"]))
    return out


def test_every_graph_keeps_its_weights_outside_the_protobuf(quantized: Path) -> None:
    manifest = Manifest.load(quantized)
    files = _graph_files(manifest)
    assert {f for f, _ in files} >= {"model.onnx", "model.ort.onnx", "model.int8.onnx",
                                     "model.int8.ort.onnx", "model.int4.onnx", "model.int4.ort.onnx"}
    for file, data in files:
        assert data is not None and (quantized / data).is_file(), file
        manifest.verify_files(quantized, [file, data])
        model = onnx.load(str(quantized / file), load_external_data=False)
        inline = [t.name for t in model.graph.initializer
                  if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) >= 1024]
        assert not inline, (file, inline[:3])
        offsets = [int(e.value) for t in model.graph.initializer for e in t.external_data
                   if e.key == "offset"]
        assert offsets and all(o % 4096 == 0 for o in offsets), file  # mappable pages


def test_in_protobuf_variants_still_load(quantized: Path, tmp_path: Path) -> None:
    """A bundle written before this change: the int4 variant's weights inside its protobuf."""
    old = tmp_path / "old"
    shutil.copytree(quantized, old)
    data = json.loads((old / "manifest.json").read_text())
    entry = data["variants"]["int4"]
    unpadded = entry["ort_graph"].pop("unpadded_file")  # it came later than in-protobuf weights
    (old / unpadded).unlink()
    data["files"].pop(unpadded)
    for spec in (entry, entry["ort_graph"]):
        model = onnx.load(str(old / spec["file"]))  # external data read in
        (old / spec["data_file"]).unlink()
        data["files"].pop(spec["data_file"])
        onnx.save_model(model, str(old / spec["file"]))
        spec["data_file"] = None
        data["files"][spec["file"]] = sha256_file(old / spec["file"])
    (old / "manifest.json").write_text(json.dumps(data))
    ids = [[5, 6, 7, 8]]
    for graph in ("standard", "ort"):
        with load_bundle(quantized, variant="int4", graph=graph) as new_m, \
                load_bundle(old, variant="int4", graph=graph) as old_m:
            a = new_m.generate_ids(ids, max_new_tokens=4, eos_token_ids=())[0].tokens
            b = old_m.generate_ids(ids, max_new_tokens=4, eos_token_ids=())[0].tokens
        assert a == b and len(a) == 4
    assert np.all([not (old / "model.int4.onnx.data").exists()])
