"""CPU tests of engine manifest entries, the compatibility check and TrtBackend's pure parts.

No engine is built or run here (no GPU): the plan bytes written below are a labelled
placeholder exercising the file/manifest plumbing, never loaded as an engine.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from llama_export.calibration.trt.build import BuildResult
from llama_export.calibration.trt.compat import BuildOptions
from llama_export.calibration.trt.gpu import parse_nvidia_smi
from llama_export.calibration.trt.pipeline import EngineInfo, TrtRequest, make_plan, write_engine
from llama_export.runtime.backends.trt import IoPlan, TrtKVCache, _checked_plan
from llama_export.runtime.engines import (
    GpuInfo,
    Limits,
    engine_view,
    gpu_slug,
    incompatibility,
    select_engine,
    select_profile,
)
from llama_export.runtime.errors import BundleError, HardwareError, InputError
from llama_export.runtime.manifest import Manifest, kv_io_entries

RTX4090 = GpuInfo("NVIDIA GeForce RTX 4090", (8, 9), 24 * 2**30)
A100 = GpuInfo("NVIDIA A100-SXM4-80GB", (8, 0))
T4 = GpuInfo("Tesla T4", (7, 5))
PLACEHOLDER = b"placeholder bytes, not a TensorRT engine"


def entry(**over: Any) -> dict[str, Any]:
    e = {"path": "engines/rtx-4090-int8.plan", "variant": "int8", "precision": "int8",
         "tensorrt_version": "10.3.0", "version_compatible": False,
         "hardware_compatibility": "none",
         "gpu": {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}}
    return {**e, **over}


# ---- compatibility ----------------------------------------------------------------------------
def test_matching_engine_is_compatible() -> None:
    assert incompatibility(entry(), RTX4090, "10.3.0.26") is None  # build number does not matter


def test_other_gpu_is_refused() -> None:
    assert incompatibility(entry(), A100, "10.3.0") == (
        "it was built for NVIDIA GeForce RTX 4090 (SM 8.9), this GPU is NVIDIA A100-SXM4-80GB "
        "(SM 8.0)")


def test_other_tensorrt_version_is_refused() -> None:
    assert incompatibility(entry(), RTX4090, "10.4.0") == (
        "it was built with TensorRT 10.3.0, this is TensorRT 10.4.0")


def test_version_and_hardware_compatible_engines() -> None:
    vc = entry(version_compatible=True)
    assert incompatibility(vc, RTX4090, "10.7.0") is None
    assert incompatibility(vc, RTX4090, "10.2.0") is not None
    assert "runs on TensorRT 10.x >= 10.3.0 only, not 11.4.1" in str(
        incompatibility(vc, RTX4090, "11.4.1"))
    hc = entry(hardware_compatibility="ampere_plus")
    assert incompatibility(hc, A100, "10.3.0") is None
    assert incompatibility(hc, T4, "10.3.0") == (
        "it was built for Ampere or newer GPUs (SM >= 8.0), this Tesla T4 is SM 7.5")


def test_select_engine_messages() -> None:
    with pytest.raises(BundleError) as e:
        select_engine([], "int8", RTX4090, "10.3.0", "b")
    assert str(e.value) == ("bundle has no TensorRT engine for variant 'int8' (engines for: none): "
                            "build one on this machine with `llama-export trt b --int8`")
    with pytest.raises(HardwareError) as e2:
        select_engine([entry()], "int8", A100, "10.3.0", "b")
    assert str(e2.value) == (
        "no 'int8' engine in the bundle runs here (engines/rtx-4090-int8.plan: it was built for "
        "NVIDIA GeForce RTX 4090 (SM 8.9), this GPU is NVIDIA A100-SXM4-80GB (SM 8.0)): rebuild "
        "it on this machine with `llama-export trt b --int8` (engines are tied to the GPU and "
        "TensorRT version that built them)")
    other = entry(path="engines/a100-int8.plan",
                  gpu={"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"})
    assert select_engine([entry(), other], "int8", A100, "10.3.0")["path"] == other["path"]


@pytest.mark.parametrize(("name", "slug"), [
    ("NVIDIA GeForce RTX 4090", "rtx-4090"), ("Orin (nvgpu)", "orin"),
    ("NVIDIA Jetson AGX Orin", "jetson-agx-orin"), ("NVIDIA A100-SXM4-80GB", "a100-sxm4-80gb"),
])
def test_gpu_slug(name: str, slug: str) -> None:
    assert gpu_slug(GpuInfo(name, (8, 0))) == slug
    assert gpu_slug(GpuInfo(name, (8, 7)), dla_core=1) == slug + "-dla1"


def test_gpu_slug_special_cases() -> None:
    assert gpu_slug(None) == "target"
    assert gpu_slug(RTX4090, "ampere_plus") == "ampere-plus"


def test_parse_nvidia_smi() -> None:
    assert parse_nvidia_smi("NVIDIA GeForce RTX 4090, 8.9, 24564\n") == GpuInfo(
        "NVIDIA GeForce RTX 4090", (8, 9), 24564 * 2**20)
    assert parse_nvidia_smi("Orin (nvgpu), 8.7, [N/A]") is None
    assert parse_nvidia_smi("") is None


# ---- runtime-side pure parts ------------------------------------------------------------------
def _manifest(logits: str = "all") -> Manifest:
    past, present = kv_io_entries("float16", 2, 8)
    ids = {"name": "input_ids", "dtype": "int64", "dims": ["batch", "seq"]}
    return Manifest({
        "format_version": 1, "model": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8,
                                       "vocab_size": 100},
        "dims": {"batch": {"min": 1, "opt": 1, "max": 8}, "seq": {"min": 1, "opt": 128, "max": 256},
                 "past": {"min": 0, "opt": 128, "max": 255},
                 "total": {"min": 1, "opt": 256, "max": 256}},
        "tokenizer": {}, "files": {},
        "variants": {"fp16": {"file": "model.onnx", "logits": logits, "inputs": [ids, *past],
                              "outputs": [{"name": "logits", "dtype": "float16",
                                           "dims": ["batch", "seq", 100]}, *present]}}})


def test_io_plan_layout_and_tail_logits_copy() -> None:
    plan = IoPlan.from_manifest(_manifest(), "fp16", Limits(4, 32, 64))
    assert plan.past == ("past_key_values.0.key", "past_key_values.0.value",
                         "past_key_values.1.key", "past_key_values.1.value")
    assert plan.present[0] == "present.0.key" and plan.kv_itemsize == 2
    layout = plan.static_layout()
    assert layout["input_ids"] == (0, 4 * 32 * 8)
    assert layout["position_ids"] == (1024, 1024)
    assert layout["attention_mask"] == (2048, 4 * 64 * 8)
    assert layout["logits"] == (4096, 4 * 32 * 100 * 2)
    assert all(off % 256 == 0 for off, _ in layout.values())
    # logits="all": row b of the last position starts at (b * seq + seq - 1) * vocab elements
    assert plan.tail_logits_copy(batch=3, seq=5, tail=1) == (4 * 200, 5 * 200, 200, 3)
    # the last 3 positions of each row: 3 contiguous positions from position 2 of 5
    assert plan.tail_logits_copy(batch=3, seq=5, tail=3) == (2 * 200, 5 * 200, 3 * 200, 3)
    last = IoPlan.from_manifest(_manifest("last"), "fp16", Limits(4, 32, 64))
    assert last.tail_logits_copy(batch=3, seq=5, tail=1) == (0, 200, 200, 3)
    assert last.static_layout()["logits"][1] == 4 * 1 * 100 * 2
    assert plan.kv_tensor_bytes(2, 10) == 768  # 2 x 2 heads x 10 x 8 x 2 B = 640, aligned to 256


def test_kv_cache_ping_pong_pointers() -> None:
    memory = SimpleNamespace(ptr=1 << 20)
    cache = TrtKVCache(2, 16, memory, count=4, tensor_bytes=512)  # type: ignore[arg-type]
    past, present = cache.halves()
    assert past == [1048576, 1049088, 1049600, 1050112]
    assert present == [1050624, 1051136, 1051648, 1052160]
    cache.flip ^= 1  # what a successful forward does
    assert cache.halves() == (present, past)
    cache.length = 5
    cache.reset()
    assert cache.halves() == (past, present) and cache.length == 0


def test_profile_selection() -> None:
    lim = Limits(max_batch=2, max_prompt=8, max_context=16)
    assert select_profile(lim, 2, 8, 0) == 0
    assert select_profile(lim, 1, 1, 15) == 1
    for args, start in [((3, 1, 0), "batch 3 exceeds the engine's max batch 2"),
                        ((1, 9, 0), "prompt of 9 tokens exceeds the engine's max prompt 8"),
                        ((1, 1, 16), "17 positions exceed the engine's max context 16"),
                        ((1, 2, 4), "2 tokens after 4 cached positions")]:
        with pytest.raises(InputError) as e:
            select_profile(lim, *args)
        assert str(e.value).startswith(start)


def test_engine_view_narrows_dims() -> None:
    view = engine_view(_manifest(), Limits(2, 32, 64))
    assert view.max_context == 64
    assert (view.dims["batch"].max, view.dims["seq"].max, view.dims["past"].max) == (2, 32, 63)
    assert view.dims["seq"].opt == 32 and _manifest().max_context == 256  # original untouched


# ---- manifest entries written by the builder --------------------------------------------------
@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out


def test_engine_entry_written_with_manifest_last(bundle_copy: Path) -> None:
    m = Manifest.load(bundle_copy)
    opts = BuildOptions(precision="fp32", opt_level=2, version_compatible=True)
    plan = make_plan(bundle_copy, m, TrtRequest(bundle_copy, opts, 2, 16, 32), RTX4090)
    assert plan.engine_file == "engines/rtx-4090-fp32.plan"
    path = write_engine(bundle_copy, plan, BuildResult(PLACEHOLDER, None),
                        EngineInfo("10.3.0.26", RTX4090, opts, 12.5))
    assert path.read_bytes() == PLACEHOLDER
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    data = json.loads((bundle_copy / "manifest.json").read_text())
    (e,) = data["engines"]
    assert e["path"] == "engines/rtx-4090-fp32.plan" and e["variant"] == "fp32"
    assert e["tensorrt_version"] == "10.3.0.26"
    assert e["gpu"] == {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}
    assert e["limits"] == {"max_batch": 2, "max_prompt": 16, "max_context": 32}
    assert [p["name"] for p in e["profiles"]] == ["prefill", "decode"]
    assert e["profiles"][1]["shapes"]["attention_mask"] == {"min": [1, 2], "opt": [1, 32],
                                                           "max": [2, 32]}
    assert e["build_options"]["opt_level"] == 2 and e["build_options"]["strongly_typed"] is True
    assert e["version_compatible"] is True and e["hardware_compatibility"] == "none"
    assert e["source_file"] == "model.onnx"
    assert e["source_sha256"] == data["files"]["model.onnx"]
    assert e["sha256"] == data["files"]["engines/rtx-4090-fp32.plan"]
    assert e["build_seconds"] == 12.5 and e["built_at"].endswith("Z")
    # a rebuild replaces the entry instead of adding a second one
    write_engine(bundle_copy, plan, BuildResult(PLACEHOLDER + b"!", None),
                 EngineInfo("10.3.0.26", RTX4090, opts, 1.0))
    m2 = Manifest.load(bundle_copy)
    assert len(m2.engines) == 1
    found = select_engine(m2.engines, "fp32", RTX4090, "10.5.0")  # version-compatible
    assert _checked_plan(bundle_copy, m2, found, verify=True) == path
    path.write_bytes(b"truncated")
    with pytest.raises(BundleError, match="does not match its sha256"):
        _checked_plan(bundle_copy, m2, found, verify=True)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt installed")
def test_trt_backend_without_tensorrt(tiny_bundle: Path) -> None:
    from llama_export.runtime import load_bundle
    from llama_export.runtime.errors import MissingDependencyError

    with pytest.raises(MissingDependencyError) as e:
        load_bundle(tiny_bundle, backend="trt")
    assert str(e.value) == ("the TensorRT backend (module 'tensorrt' not found) needs the 'gpu' "
                            "extra: pip install 'llama-export[gpu]'")
