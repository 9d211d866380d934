"""Accuracy gates on SmolLM2-135M (slow): the figures the issue asks for, measured each run.

INT8 (SmoothQuant W8A8 Q/DQ, searched alpha, sensitive projections kept float): perplexity within
3 % of fp32 and top-1 agreement >= 90 % on the built-in held-out text. INT4 (blocks of 32,
weight-only, offset format): perplexity within 8 % (in fact within 2 %: exact Q4_1
blocks). Plain W8A8 without SmoothQuant is measured for contrast and
must be clearly worse (the benefit is measured, not assumed).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from llama_export.calibration.accuracy import Gate
from llama_export.calibration.data import HELDOUT_GENRES
from llama_export.calibration.pipeline import (
    CalibrateOptions,
    EvalOptions,
    QuantizeOptions,
    calibrate,
    quantize,
)
from llama_export.runtime.errors import CalibrationError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(smollm2_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smol_calib") / "bundle"
    shutil.copytree(smollm2_bundle, out)
    return out


def _per_genre(name: str, acc: dict[str, Any]) -> None:
    """Print the figures per genre and assert the gate on each one (issue #10)."""
    print(f"\n{name}: pooled ppl x{acc['ppl_ratio']:.4f}, top-1 {acc['top1_agreement']:.3f}")
    assert set(acc["genres"]) == set(HELDOUT_GENRES)
    for genre, a in acc["genres"].items():
        print(f"  {genre:10s} ppl x{a['ppl_ratio']:.4f}  top-1 {a['top1_agreement']:.3f}  "
              f"KL {a['mean_kl']:.4f}")
        assert a["top1_agreement"] >= 0.90, genre


def test_int8_smoothquant_meets_gate(bundle: Path) -> None:
    entry = calibrate(bundle, CalibrateOptions())
    acc = entry["accuracy"]
    print(f"\nint8 SmoothQuant kept float: {entry['quantization']['excluded']}")
    _per_genre("int8 W8A8 (standard graph)", acc)
    assert acc["ppl_ratio"] <= 1.03
    assert acc["top1_agreement"] >= 0.90
    ort_acc = entry["ort_graph"]["accuracy"]  # int8 weight-only blocks (measured +0.35 %)
    _per_genre("int8 ort graph", ort_acc)
    assert ort_acc["ppl_ratio"] <= 1.03 and ort_acc["top1_agreement"] >= 0.90


def test_plain_w8a8_is_clearly_worse(bundle: Path) -> None:
    opts = CalibrateOptions(smoothquant=None, keep_float=0,
                            eval=EvalOptions(gate=Gate(max_ppl_increase=100.0, min_top1=0.0)))
    plain = calibrate(bundle, opts)["accuracy"]
    print(f"\nplain W8A8: {plain}")
    assert plain["ppl_ratio"] > 1.10


def test_gate_refuses_plain_w8a8(bundle: Path) -> None:
    with pytest.raises(CalibrationError, match="fails the accuracy gate"):
        calibrate(bundle, CalibrateOptions(smoothquant=None, keep_float=0))


def test_int4_block32_within_8_percent(bundle: Path) -> None:
    """The default offset format reproduces the GGUF's Q4_1 blocks, so both graphs stay far
    inside the 8 % gate (measured: +0.18 % standard graph, +0.62 % ONNX-Runtime graph, whose
    MatMulNBits quantizes activations to int8 inside the kernel)."""
    entry = quantize(bundle, QuantizeOptions(bits=4, block_size=32))
    acc, ort_acc = entry["accuracy"], entry["ort_graph"]["accuracy"]
    _per_genre("int4 (standard graph)", acc)
    _per_genre("int4 ort graph", ort_acc)
    assert acc["ppl_ratio"] <= 1.08 and ort_acc["ppl_ratio"] <= 1.08
    assert acc["ppl_ratio"] <= 1.02 and ort_acc["ppl_ratio"] <= 1.02


def test_quantized_ort_graph_holds_no_weight_above_the_slice_size(bundle: Path) -> None:
    """SmolLM2's 8-bit lm_head (49152 x 576, 28 MB packed) is stored as column slices of at
    most ``slice_limit`` (8 MB for a model this small) + one Concat giving ``logits``
    (calibration/nbits.py: ONNX Runtime's load peak is one largest weight above its resident
    size); no per-layer weight is split."""
    import numpy as np
    import onnx

    from llama_export.calibration.nbits import MAX_PACKED_BYTES, slice_limit
    from llama_export.runtime.manifest import Manifest

    entry = Manifest.load(bundle).variant("int4")["ort_graph"]  # made by the test above
    model = onnx.load(str(bundle / entry["file"]), load_external_data=False)
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    sizes = [int(np.prod(dims[n.input[1]])) for n in nbits]
    assert max(sizes) <= slice_limit(sum(sizes)) == MAX_PACKED_BYTES
    concat = next(n for n in model.graph.node if "logits" in n.output)
    assert concat.op_type == "Concat" and len(concat.input) == 4
    heads = [n for n in nbits if n.output[0] in concat.input]
    assert sum(next(a.i for a in n.attribute if a.name == "N") for n in heads) == 49152
    assert len(nbits) - len(heads) == 5 * 30  # qkv, o, gate, up, down: each one node
