"""GPU tests (``-m gpu``): real engines, parity with ONNX Runtime on the same variant, bench.

Skipped with a reason unless ``tensorrt`` imports and CUDA (or nvidia-smi) reports a GPU.
Each build is the real ``llama-export trt`` path (variant made first when missing).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def _gpu_skip_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (pip install 'llama-export[gpu]')"
    from llama_export.calibration.trt.gpu import detect_gpu

    if detect_gpu(0) is None:
        return "no NVIDIA GPU visible (CUDA / nvidia-smi)"
    return None


_REASON = _gpu_skip_reason()
needs_gpu = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

# Parity budgets per precision: max |logit diff| over max |logit| of the ORT run, and the
# share of greedy tokens (16 generated) that must agree. fp32 must match token for token.
BUDGET = {"fp32": (1e-3, 1.0), "fp16": (2e-2, 0.9), "int8": (1e-1, 0.8), "int4": (1e-1, 0.8)}


def _writable(bundle: Path, tmp: Path) -> Path:
    out = tmp / bundle.name
    shutil.copytree(bundle, out)
    return out


def _build(bundle: Path, precision: str) -> Path:
    from llama_export.calibration.trt.compat import BuildOptions
    from llama_export.calibration.trt.pipeline import TrtRequest, run_trt

    path = run_trt(TrtRequest(bundle, BuildOptions(precision=precision), max_batch=2,
                              max_prompt=64, max_context=128))
    assert path is not None and path.is_file()
    return path


def _parity(bundle: Path, variant: str) -> None:
    from llama_export.runtime import load_bundle

    prompt = "The capital of France is"
    with load_bundle(bundle, variant=variant, backend="ort") as ref, \
            load_bundle(bundle, variant=variant, backend="trt") as got:
        ids = ref.encode(prompt)
        a = ref.generate_ids([ids], max_new_tokens=16, temperature=0.0)[0]
        b = got.generate_ids([ids], max_new_tokens=16, temperature=0.0)[0]
        # first-step logits, straight from the backends
        logits = []
        for m in (ref, got):
            cache = m.backend.new_cache(1, len(ids) + 1)
            arr = np.asarray([ids], dtype=np.int64)
            pos = np.arange(len(ids), dtype=np.int64)[None]
            logits.append(m.backend.forward(arr, pos, None, cache))
    rel, agree = BUDGET[variant]
    err = float(np.abs(logits[0] - logits[1]).max() / np.abs(logits[0]).max())
    same = np.mean([x == y for x, y in zip(a.tokens, b.tokens, strict=False)])
    print(f"{bundle.name} {variant}: rel logits err {err:.2e}, greedy agreement {same:.0%}")
    assert err <= rel
    assert same >= agree


@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_tiny_engine_parity(tiny_bundle: Path, tmp_path: Path, precision: str) -> None:
    bundle = _writable(tiny_bundle, tmp_path)
    _build(bundle, precision)
    _parity(bundle, precision)


@needs_gpu
def test_tiny_fp16_engine_parity(tiny_fp16_bundle: Path, tmp_path: Path) -> None:
    bundle = _writable(tiny_fp16_bundle, tmp_path)
    _build(bundle, "fp16")
    _parity(bundle, "fp16")


@pytest.fixture(scope="module")
def smollm2_work(smollm2_bundle: Path, smollm2_gguf: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Writable SmolLM2 bundles: the fp32 one (int8/int4 are made in it) and an fp16 export."""
    from llama_export.exporter.export import ExportOptions, export_bundle

    tmp = tmp_path_factory.mktemp("smollm2_trt")
    fp16 = export_bundle(smollm2_gguf, tmp / "fp16", ExportOptions(
        dtype="fp16", max_seq_len=2048, verify=False), progress=lambda _: None)
    return {"fp32": _writable(smollm2_bundle, tmp), "fp16": fp16}


@needs_gpu
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_smollm2_engine_parity_and_bench(smollm2_work: dict[str, Path], precision: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from llama_export.runtime.cli import main

    bundle = smollm2_work["fp16" if precision == "fp16" else "fp32"]
    _build(bundle, precision)
    _parity(bundle, precision)
    with capsys.disabled():  # the bench table is the point: decode tok/s, TensorRT vs ORT
        for backend in ("ort", "trt"):
            code = 0
            try:
                main(["bench", str(bundle), "--variant", precision, "--backend", backend,
                      "--prompt-len", "32", "--gen-len", "64", "--runs", "3"])
            except SystemExit as e:
                code = int(e.code or 0)
            assert code == 0
