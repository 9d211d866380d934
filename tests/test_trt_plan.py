"""CPU tests of the TensorRT planning: profiles, trtexec lines, memory estimate, graph check.

Manifests here are written by hand in the exporter's format (tiny and SmolLM2-135M shapes) so
every expected number below is computed independently of the code under test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from llama_export.calibration.trt.compat import BuildOptions, Generation, generation
from llama_export.calibration.trt.graph_check import (
    TRT10_OPS,
    check_graph_for_tensorrt,
    op_types,
    unsupported_ops,
)
from llama_export.calibration.trt.memory import estimate_memory, tensor_bytes, weight_bytes
from llama_export.calibration.trt.profiles import Limits, limits_from_manifest, profiles_from_manifest
from llama_export.calibration.trt.trtexec import trtexec_args, trtexec_commands
from llama_export.runtime.errors import BundleError, InputError, MissingDependencyError
from llama_export.runtime.manifest import Manifest, kv_io_entries


def synth_manifest(*, layers: int = 1, kv_heads: int = 2, head_dim: int = 4, vocab: int = 10,
                   max_seq: int = 32, max_batch: int = 4, logits: str = "all",
                   dtype: str = "float32") -> Manifest:
    """A manifest shaped like the exporter's (dims opt points: 128 / 127 / 256, clipped)."""
    past, present = kv_io_entries(dtype, kv_heads, head_dim)
    inputs = [{"name": "input_ids", "dtype": "int64", "dims": ["batch", "seq"]},
              {"name": "attention_mask", "dtype": "int64", "dims": ["batch", "total"]},
              {"name": "position_ids", "dtype": "int64", "dims": ["batch", "seq"]}, *past]
    outputs = [{"name": "logits", "dtype": dtype,
                "dims": ["batch", 1 if logits == "last" else "seq", vocab]}, *present]
    name = "fp16" if dtype == "float16" else "fp32"
    data: dict[str, Any] = {
        "format_version": 1,
        "model": {"num_layers": layers, "num_heads": 2 * kv_heads, "num_kv_heads": kv_heads,
                  "head_dim": head_dim, "vocab_size": vocab},
        "dims": {"batch": {"min": 1, "opt": 1, "max": max_batch},
                 "seq": {"min": 1, "opt": min(128, max_seq), "max": max_seq},
                 "past": {"min": 0, "opt": min(128, max_seq - 1), "max": max_seq - 1},
                 "total": {"min": 1, "opt": min(256, max_seq), "max": max_seq}},
        "tokenizer": {},
        "variants": {name: {"file": "model.onnx", "data_file": None, "precision": name,
                            "logits": logits, "inputs": inputs, "outputs": outputs}},
        "engines": [], "files": {},
    }
    return Manifest(data)


def smollm2_manifest() -> Manifest:
    # SmolLM2-135M: 30 layers, 9 heads / 3 KV heads of 64, vocab 49152; exported at 2048.
    return synth_manifest(layers=30, kv_heads=3, head_dim=64, vocab=49152, max_seq=2048,
                          max_batch=8)


# ---- profiles ---------------------------------------------------------------------------------
def test_profiles_tiny_shapes_with_user_limits() -> None:
    m = synth_manifest()
    limits = limits_from_manifest(m, max_batch=2, max_prompt=8, max_context=16)
    assert limits == Limits(2, 8, 16)
    prefill, decode = profiles_from_manifest(m, "fp32", limits)
    assert (prefill.name, decode.name) == ("prefill", "decode")
    assert prefill.shapes["input_ids"] == ((1, 1), (1, 8), (2, 8))
    assert prefill.shapes["attention_mask"] == ((1, 1), (1, 8), (2, 8))
    assert prefill.shapes["past_key_values.0.key"] == ((1, 2, 0, 4), (1, 2, 0, 4), (2, 2, 0, 4))
    assert decode.shapes["input_ids"] == ((1, 1), (1, 1), (2, 1))
    assert decode.shapes["position_ids"] == ((1, 1), (1, 1), (2, 1))
    assert decode.shapes["attention_mask"] == ((1, 2), (1, 16), (2, 16))
    assert decode.shapes["past_key_values.0.value"] == ((1, 2, 1, 4), (1, 2, 15, 4), (2, 2, 15, 4))


def test_profiles_smollm2_defaults_cover_the_exported_range() -> None:
    m = smollm2_manifest()
    limits = limits_from_manifest(m)
    assert limits == Limits(max_batch=8, max_prompt=2047, max_context=2048)
    prefill, decode = profiles_from_manifest(m, "fp32", limits)
    assert len(prefill.shapes) == 3 + 60 and list(prefill.shapes) == list(decode.shapes)
    assert prefill.shapes["input_ids"] == ((1, 1), (1, 128), (8, 2047))
    assert prefill.shapes["past_key_values.29.value"] == (
        (1, 3, 0, 64), (1, 3, 0, 64), (8, 3, 0, 64))
    assert decode.shapes["past_key_values.0.key"] == (
        (1, 3, 1, 64), (1, 3, 128, 64), (8, 3, 2047, 64))
    assert decode.shapes["attention_mask"] == ((1, 2), (1, 129), (8, 2048))


@pytest.mark.parametrize(("kwargs", "flag"), [
    ({"max_batch": 9}, "--max-batch 9 is outside 1..4"),
    ({"max_context": 33}, "--max-context 33 is outside 2..32"),
    ({"max_context": 16, "max_prompt": 16}, "--max-prompt 16 is outside 1..15"),
    ({"max_batch": 0}, "--max-batch 0 is outside 1..4"),
])
def test_limits_outside_the_bundle_are_refused(kwargs: dict[str, int], flag: str) -> None:
    with pytest.raises(InputError) as e:
        limits_from_manifest(synth_manifest(), **kwargs)
    assert str(e.value).startswith(flag) and "re-export" in str(e.value)


# ---- trtexec lines ----------------------------------------------------------------------------
PRE_MIN = ("input_ids:1x1,attention_mask:1x1,position_ids:1x1,"
           "past_key_values.0.key:1x2x0x4,past_key_values.0.value:1x2x0x4")
PRE_OPT = ("input_ids:1x8,attention_mask:1x8,position_ids:1x8,"
           "past_key_values.0.key:1x2x0x4,past_key_values.0.value:1x2x0x4")
PRE_MAX = ("input_ids:2x8,attention_mask:2x8,position_ids:2x8,"
           "past_key_values.0.key:2x2x0x4,past_key_values.0.value:2x2x0x4")
DEC_MIN = ("input_ids:1x1,attention_mask:1x2,position_ids:1x1,"
           "past_key_values.0.key:1x2x1x4,past_key_values.0.value:1x2x1x4")
DEC_OPT = ("input_ids:1x1,attention_mask:1x16,position_ids:1x1,"
           "past_key_values.0.key:1x2x15x4,past_key_values.0.value:1x2x15x4")
DEC_MAX = ("input_ids:2x1,attention_mask:2x16,position_ids:2x1,"
           "past_key_values.0.key:2x2x15x4,past_key_values.0.value:2x2x15x4")
SHAPES = (f"--profile=0 --minShapes={PRE_MIN} --optShapes={PRE_OPT} --maxShapes={PRE_MAX} "
          f"--profile=1 --minShapes={DEC_MIN} --optShapes={DEC_OPT} --maxShapes={DEC_MAX}")


def _tiny_profiles() -> list[Any]:
    m = synth_manifest()
    return profiles_from_manifest(m, "fp32", limits_from_manifest(m, 2, 8, 16))


def test_trtexec_lines_for_10_and_11() -> None:
    opts = BuildOptions(precision="int8", opt_level=4, timing_cache="cache.timing", dla_core=0)
    args = ("model.int8.onnx", "engines/orin-dla0-int8.plan", _tiny_profiles(), opts)
    ten = " ".join(trtexec_args(*args, generation("10.3.0.30")))
    assert ten == (
        "trtexec --onnx=model.int8.onnx --saveEngine=engines/orin-dla0-int8.plan --stronglyTyped "
        f"{SHAPES} --builderOptimizationLevel=4 --timingCacheFile=cache.timing "
        "--useDLACore=0 --allowGPUFallback --skipInference")
    eleven = " ".join(trtexec_args(*args, generation("11.4.1")))
    assert eleven == (
        "trtexec --onnx=model.int8.onnx --saveEngine=engines/orin-dla0-int8.plan "
        f"{SHAPES} --builderOptimizationLevel=4 --timingCacheFile=cache.timing --skipInference")


def test_trtexec_compatibility_flags_and_printed_text() -> None:
    opts = BuildOptions(precision="fp16", hardware_compatible=True, version_compatible=True)
    text = trtexec_commands("model.onnx", "engines/ampere-plus-fp16.plan", _tiny_profiles(), opts)
    lines = text.splitlines()
    assert lines[0] == "# TensorRT 10.x (JetPack 6, Python 3.10): run inside the bundle folder"
    assert lines[1:4] == ["trtexec \\", "    --onnx=model.onnx \\",
                          "    --saveEngine=engines/ampere-plus-fp16.plan \\"]
    assert lines[4] == "    --stronglyTyped \\"
    assert lines[13:17] == ["    --builderOptimizationLevel=3 \\",
                            "    --hardwareCompatibilityLevel=ampere+ \\",
                            "    --versionCompatible \\", "    --skipInference"]
    assert lines[17] == "# TensorRT 11.x (JetPack 7): strong typing is always on, no --stronglyTyped"
    assert "--stronglyTyped" not in "\n".join(lines[18:])
    assert lines[-4:] == lines[13:17]


def test_generation_rules() -> None:
    assert generation("10.0.1") == Generation(10, True, True, True)
    assert generation("11.4.1.2") == Generation(11, False, False, False)
    with pytest.raises(MissingDependencyError, match=r"TensorRT 8\.6\.1 is too old"):
        generation("8.6.1")


@pytest.mark.parametrize(("kwargs", "start"), [
    ({"opt_level": 6}, "--opt-level 6 is outside 0..5"),
    ({"dla_core": 0, "precision": "fp32"}, "--dla-core needs an fp16 or int8 engine"),
    ({"dla_core": 0, "hardware_compatible": True}, "--dla-core and --hardware-compatible"),
    ({"precision": "bf16"}, "precision 'bf16' is unknown"),
])
def test_bad_build_options(kwargs: dict[str, Any], start: str) -> None:
    with pytest.raises(InputError) as e:
        BuildOptions(**kwargs)
    assert str(e.value).startswith(start)


# ---- memory -----------------------------------------------------------------------------------
def test_memory_estimate_smollm2_at_max_context() -> None:
    m = smollm2_manifest()
    est = estimate_memory(m, "fp32", Limits(1, 2047, 2048), weights=538_000_000)
    assert est.kv_cache == 2 * 30 * 1 * 3 * 2048 * 64 * 4 * 2  # K+V, layers, 2 ping-pong buffers
    assert est.kv_cache == 188_743_680
    assert est.logits == 2047 * 49152 * 4  # logits="all": prefill returns every position
    assert est.io == (2 * 2047 + 2048) * 8
    assert est.total == 538_000_000 + 188_743_680 + 402_456_576 + 49_136
    last = estimate_memory(synth_manifest(layers=30, kv_heads=3, head_dim=64, vocab=49152,
                                          max_seq=2048, logits="last", dtype="float16"),
                           "fp16", Limits(8, 512, 2048), weights=0)
    assert last.kv_cache == 2 * 30 * 8 * 3 * 2048 * 64 * 2 * 2
    assert last.logits == 8 * 1 * 49152 * 2


def test_tensor_bytes_external_and_int4() -> None:
    ext = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1000, 1000])
    ext.data_location = TensorProto.EXTERNAL
    ext.external_data.add(key="location", value="model.onnx.data")
    ext.external_data.add(key="length", value="4000000")
    assert tensor_bytes(ext) == 4_000_000
    int4 = helper.make_tensor("q", TensorProto.INT4, [3, 5], [1] * 15)
    assert tensor_bytes(int4) == 8  # 15 nibbles
    assert tensor_bytes(numpy_helper.from_array(np.zeros((7, 3), np.float16))) == 42


def test_weight_bytes_of_tiny_bundle(tiny_bundle: Path) -> None:
    model = onnx.load(str(tiny_bundle / "model.onnx"))
    expect = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    expect += sum(numpy_helper.to_array(a.t).nbytes for n in model.graph.node
                  if n.op_type == "Constant" for a in n.attribute if a.type == a.TENSOR)
    assert weight_bytes(onnx.load(str(tiny_bundle / "model.onnx"), load_external_data=False)) == expect


# ---- the graph handed to TensorRT ------------------------------------------------------------
def _input_names(bundle: Path) -> list[str]:
    return [s.name for s in Manifest.load(bundle).inputs("fp32")]


def test_exported_graph_uses_only_trt10_ops(tiny_bundle: Path) -> None:
    model = onnx.load(str(tiny_bundle / "model.onnx"), load_external_data=False)
    counts = check_graph_for_tensorrt(model, "model.onnx", _input_names(tiny_bundle))
    assert {d for d, _ in counts} == {""}
    assert {op for _, op in counts} <= TRT10_OPS
    assert ("", "Concat") in counts and ("", "Attention") not in counts  # KV concat is explicit


def test_weight_only_int4_graph_uses_only_trt10_ops(tiny_bundle: Path) -> None:
    from llama_export.calibration.weight_only import quantize_weight_only

    q, done = quantize_weight_only(onnx.load(str(tiny_bundle / "model.onnx")), bits=4)
    counts = check_graph_for_tensorrt(q, "model.int4.onnx", _input_names(tiny_bundle))
    assert counts[("", "DequantizeLinear")] == len(done) > 0
    assert unsupported_ops(counts) == []


@pytest.mark.parametrize(("domain", "op", "shown"), [
    ("com.microsoft", "MatMulNBits", "com.microsoft.MatMulNBits x1"),
    ("", "Attention", "Attention x1"),
    ("", "RotaryEmbedding", "RotaryEmbedding x1"),
])
def test_foreign_ops_are_refused(tiny_bundle: Path, domain: str, op: str, shown: str) -> None:
    model = onnx.load(str(tiny_bundle / "model.onnx"), load_external_data=False)
    model.graph.node.append(helper.make_node(op, ["input_ids"], ["extra"], domain=domain))
    with pytest.raises(BundleError) as e:
        check_graph_for_tensorrt(model, "model.onnx", _input_names(tiny_bundle))
    assert str(e.value).startswith(
        f"model.onnx uses ops TensorRT 10's ONNX parser does not build ({shown}): ")
    assert op_types(model)[(domain, op)] == 1


def test_graph_inputs_must_match_manifest(tiny_bundle: Path) -> None:
    model = onnx.load(str(tiny_bundle / "model.onnx"), load_external_data=False)
    with pytest.raises(BundleError, match=r"inputs and the manifest disagree \(extra_input\)"):
        check_graph_for_tensorrt(model, "model.onnx", [*_input_names(tiny_bundle), "extra_input"])
