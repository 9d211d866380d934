"""Quantized ONNX-Runtime graphs are stored with MatMulNBits (calibration/nbits.py): the fused
node computes what the blocked DequantizeLinear + MatMul computes, bit for bit what ONNX
Runtime's own load-time fusion computes, and a bundle's quantized ORT graphs hold no DQ+MatMul
pair left for ONNX Runtime to fuse (the load-time copy cost peak RSS)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from llama_export.calibration.nbits import column_slices, fuse_matmul_nbits
from llama_export.calibration.qdq import pack_int4


def _dq_matmul(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, kind: int,
               block: int) -> onnx.ModelProto:
    k, n = q.shape
    if kind == TensorProto.INT8:
        inits = [numpy_helper.from_array(q.astype(np.int8), "w.quant")]
    else:
        inits = [helper.make_tensor("w.quant", kind, q.shape, pack_int4(q), raw=True)]
    inits.append(numpy_helper.from_array(scale.astype(np.float32), "w.scale"))
    ins = ["w.quant", "w.scale"]
    if zp is not None:
        inits.append(helper.make_tensor("w.zp", TensorProto.UINT4, zp.shape, pack_int4(zp),
                                        raw=True))
        ins.append("w.zp")
    nodes = [helper.make_node("DequantizeLinear", ins, ["w.dq"], axis=0, block_size=block),
             helper.make_node("MatMul", ["x", "w.dq"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     ["M", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _run(model: onnx.ModelProto, x: np.ndarray, optimize: bool) -> np.ndarray:
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out: np.ndarray = s.run(None, {"x": x})[0]
    return out


CASES = {  # name: (ONNX weight type, K, N, block, zero point)
    "int8": (TensorProto.INT8, 64, 24, 32, False),
    "int4": (TensorProto.INT4, 64, 24, 32, False),
    "uint4-zp": (TensorProto.UINT4, 64, 24, 16, True),
    "uint4": (TensorProto.UINT4, 64, 24, 32, False),
    "int4-k-not-blocks": (TensorProto.INT4, 40, 8, 16, False),
    "uint4-zp-odd-blocks": (TensorProto.UINT4, 48, 8, 16, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_node_computes_the_dequantized_matmul(case: str) -> None:
    kind, k, n, block, with_zp = CASES[case]
    rng = np.random.default_rng(0)
    nb = -(-k // block)
    lo, hi = {TensorProto.INT8: (-128, 128), TensorProto.INT4: (-8, 8)}.get(kind, (0, 16))
    q = rng.integers(lo, hi, size=(k, n)).astype(np.int8 if lo < 0 else np.uint8)
    scale = rng.uniform(-0.05, 0.05, size=(nb, n)).astype(np.float32)  # negative scales too
    zp = rng.integers(0, 16, size=(nb, n)).astype(np.uint8) if with_zp else None
    model = _dq_matmul(q, scale, zp, kind, block)
    x = rng.standard_normal((5, k)).astype(np.float32)
    want = _run(model, x, optimize=False)  # DequantizeLinear then MatMul, as written

    exact, count = fuse_matmul_nbits(onnx.ModelProto.FromString(model.SerializeToString()),
                                     accuracy_level=0)
    assert count == 1 and [nd.op_type for nd in exact.graph.node] == ["MatMulNBits"]
    assert {t.name for t in exact.graph.initializer}.isdisjoint({"w.quant", "w.zp"})
    np.testing.assert_allclose(_run(exact, x, optimize=False), want, rtol=1e-5, atol=1e-5)

    if k % block == 0:  # what ONNX Runtime's load-time fusion makes, at its accuracy level
        ours, _ = fuse_matmul_nbits(onnx.ModelProto.FromString(model.SerializeToString()))
        np.testing.assert_array_equal(_run(ours, x, optimize=True), _run(model, x, optimize=True))


def test_other_patterns_are_left_alone() -> None:
    q = np.ones((64, 8), np.int8)
    model = _dq_matmul(q, np.ones((2, 8), np.float32), None, TensorProto.INT8, 32)
    model.graph.node[0].attribute[0].i = 1  # axis 1: not the blocked-weight form
    assert fuse_matmul_nbits(model)[1] == 0


@pytest.mark.parametrize("case", ["int8", "int4", "uint4-zp", "uint4-zp-odd-blocks"])
def test_large_weights_split_by_columns_exactly(case: str) -> None:
    """A packed weight above ``max_bytes`` becomes column slices + Concat (a smaller load peak,
    calibration/nbits.py) computing bit for bit what one node computes, at both accuracy
    levels; slices start on multiples of 16 and cover every column once."""
    kind, k, _, block, with_zp = CASES[case]
    n = 72  # slices of 16: 16+16+16+16+8
    rng = np.random.default_rng(1)
    nb = -(-k // block)
    lo, hi = {TensorProto.INT8: (-128, 128), TensorProto.INT4: (-8, 8)}.get(kind, (0, 16))
    q = rng.integers(lo, hi, size=(k, n)).astype(np.int8 if lo < 0 else np.uint8)
    scale = rng.uniform(-0.05, 0.05, size=(nb, n)).astype(np.float32)
    zp = rng.integers(0, 16, size=(nb, n)).astype(np.uint8) if with_zp else None
    model = _dq_matmul(q, scale, zp, kind, block)
    x = rng.standard_normal((3, k)).astype(np.float32)
    for level in (0, 4):
        whole, _ = fuse_matmul_nbits(onnx.ModelProto.FromString(model.SerializeToString()),
                                     accuracy_level=level)
        split, count = fuse_matmul_nbits(onnx.ModelProto.FromString(model.SerializeToString()),
                                         accuracy_level=level, max_bytes=1)
        ops = [nd.op_type for nd in split.graph.node]
        assert count == 1 and ops == ["MatMulNBits"] * 5 + ["Concat"]
        widths = [next(a.i for a in nd.attribute if a.name == "N")
                  for nd in split.graph.node[:-1]]
        assert widths == [16, 16, 16, 16, 8]
        np.testing.assert_array_equal(_run(split, x, optimize=True),
                                      _run(whole, x, optimize=True))
    assert column_slices(49152, 28 << 20, 8 << 20) == [(0, 12288), (12288, 24576),
                                                      (24576, 36864), (36864, 49152)]
    assert column_slices(100, 10, 1 << 20) == [(0, 100)]


def test_slice_size_scales_with_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default a weight is split only above 1/16 of all packed weights (at least
    MAX_PACKED_BYTES, patched down here to keep the weights small): in a two-MatMul chain the
    small "layer" weight above the floor stays whole, the large "head" is split, and the
    result equals the unsplit graph's bit for bit."""
    from llama_export.calibration import nbits

    monkeypatch.setattr(nbits, "MAX_PACKED_BYTES", 1024)
    rng = np.random.default_rng(2)
    k, n1, n2, block = 64, 64, 1024, 32  # packed int8: 4 KB "layer", 64 KB "head"
    inits, nodes = [], []
    for name, (kk, nn), x, y in (("a", (k, n1), "x", "h"), ("b", (n1, n2), "h", "y")):
        inits += [numpy_helper.from_array(rng.integers(-128, 128, (kk, nn)).astype(np.int8),
                                          f"{name}.quant"),
                  numpy_helper.from_array(rng.uniform(0.01, 0.05, (kk // block, nn))
                                          .astype(np.float32), f"{name}.scale")]
        nodes += [helper.make_node("DequantizeLinear", [f"{name}.quant", f"{name}.scale"],
                                   [f"{name}.dq"], axis=0, block_size=block),
                  helper.make_node("MatMul", [x, f"{name}.dq"], [y], name=f"mm_{name}")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     ["M", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n2])],
                          inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    assert nbits.slice_limit(4096 + 65536) == (4096 + 65536) // 16 == 4352
    fused, count = fuse_matmul_nbits(onnx.ModelProto.FromString(model.SerializeToString()))
    widths = {nd.name: next(a.i for a in nd.attribute if a.name == "N")
              for nd in fused.graph.node if nd.op_type == "MatMulNBits"}
    assert count == 2 and widths["mm_a_nbits"] == n1  # 4096 B <= 4352 B: whole
    head = [w for name, w in widths.items() if name.startswith("mm_b_nbits_")]
    assert len(head) == 16 and sum(head) == n2  # 65536 B in slices of <= 4352 B
    whole, _ = fuse_matmul_nbits(onnx.ModelProto.FromString(model.SerializeToString()),
                                 max_bytes=1 << 30)
    x = rng.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_array_equal(_run(fused, x, optimize=True), _run(whole, x, optimize=True))
