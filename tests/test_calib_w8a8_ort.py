"""``calibrate --ort-int8 w8a8``: the int8 ONNX-Runtime graph carrying the W8A8 standard graph's
numbers (calibration/w8a8_ort.py), on a tiny bundle: the same int8 weights, activation scales and
smoothed norms as the standard graph; ONNX Runtime runs it as MatMulIntegerToFloat; the float-kept
projections (here lm_head) quantized per row with a few float channels (row_quantized), or as
int8 blocks when that fails the gate; logits close to the standard graph's; greedy speculation
identical to plain decoding on it; the refusals."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from llama_export.calibration.accuracy import Gate
from llama_export.calibration.graph import GraphIndex
from llama_export.calibration.pipeline import (
    CalibrateOptions,
    EvalOptions,
    calibrate,
    refuse_if_failing,
)
from llama_export.calibration.w8a8_ort import standard_weights
from llama_export.runtime import load_bundle
from llama_export.runtime.errors import CalibrationError, InputError
from llama_export.runtime.manifest import Manifest, sha256_file

LOOSE = EvalOptions(samples=2, seq_len=32, gate=Gate(max_ppl_increase=1.0, min_top1=0.0))
W8A8 = CalibrateOptions(samples=4, seq_len=32, decode_steps=4, keep_float=0, eval=LOOSE,
                        ort_int8="w8a8")


@pytest.fixture(scope="module")
def bundle(tiny_tail_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("w8a8_ort") / "bundle"
    shutil.copytree(tiny_tail_bundle, out)
    calibrate(out, W8A8)
    return out


def _graphs(bundle: Path) -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, Any]]:
    manifest = Manifest.load(bundle)
    entry = manifest.variant("int8")
    std = onnx.load(str(bundle / entry["file"]))
    ortg = onnx.load(str(bundle / entry["ort_graph"]["file"]))
    return std, ortg, entry


def test_ort_graph_holds_the_standard_graphs_int8_numbers(bundle: Path) -> None:
    std, ortg, entry = _graphs(bundle)
    og = entry["ort_graph"]
    assert og["form"] == "w8a8" and og["w8a8_projections"] == 2 * 5
    assert og["kept_float_as"] == "rows" and og["row_projections"] == 1  # lm_head
    assert og["accuracy"]["ppl_ratio"] > 0
    assert Manifest.load(bundle).data["files"][og["file"]] == sha256_file(bundle / og["file"])
    ops = [n.op_type for n in ortg.graph.node]
    assert ops.count("GroupQueryAttention") == 2
    assert ops.count("QuantizeLinear") == 10 and ops.count("MatMulNBits") == 0
    assert ops.count("MatMulInteger") == 1  # lm_head, per-row activations
    ref = standard_weights(std, bundle)
    idx = GraphIndex(ortg)
    seen = normed = 0
    for n in ortg.graph.node:
        if n.op_type != "MatMul":
            continue
        if idx.const_name(n.input[1]) is not None:  # lm_head's float channels
            assert idx.producer[n.input[0]].op_type == "Gather"
            assert "lm_head" in n.input[1]
            continue
        # attention is GroupQueryAttention here: every other MatMul is int8
        wdq, xdq = idx.producer[n.input[1]], idx.producer[n.input[0]]
        assert (wdq.op_type, xdq.op_type) == ("DequantizeLinear", "DequantizeLinear")
        name = wdq.input[0].removesuffix(".quant")
        parts = ([name.replace("qkv_proj", p) for p in ("q_proj", "k_proj", "v_proj")]
                 if "qkv_proj" in name else [name])
        w8 = [ref[p].weight for p in parts]
        want_q = np.concatenate([w.q for w in w8], axis=1)  # type: ignore[union-attr]
        want_s = np.concatenate([w.scale for w in w8])  # type: ignore[union-attr]
        np.testing.assert_array_equal(idx.array(wdq.input[0]), want_q)
        np.testing.assert_array_equal(idx.array(wdq.input[1]), want_s)
        act = float(idx.array(xdq.input[1]))
        want_act = max(w.act_scale for w in w8)  # type: ignore[union-attr]
        assert act == pytest.approx(want_act, rel=1e-5)
        # SmoothQuant folded its factors into the norm before: the ort graph's norm has them
        norm = idx.producer[idx.producer[xdq.input[0]].input[0]]  # Q's input's producer
        want_norm = ref[parts[0]].norm
        if want_norm is not None:  # q/k/v and gate/up (o_proj, down_proj read no norm)
            gamma = next(idx.array(i) for i in norm.input if idx.is_float_const(i, 1))
            np.testing.assert_array_equal(gamma, want_norm)
            normed += 1
        seen += 1
    assert seen == 10 and normed == 2 * 3  # qkv, gate, up per layer


def test_onnx_runtime_runs_it_as_int8_gemm(bundle: Path, tmp_path: Path) -> None:
    """Each Q→DQ→MatMul←DQ unit fuses into MatMulIntegerToFloat (ONNX Runtime's int8 GEMM, the
    point of this form); nothing is left as a float MatMul on a weight."""
    _, _, entry = _graphs(bundle)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(bundle / entry["ort_graph"]["file"]), so,
                         providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    ops = [n.op_type for n in optimized.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 10, sorted(set(ops))
    assert ops.count("MatMulInteger") == 1 and "MatMulNBits" not in ops
    assert ops.count("MatMul") == 1  # lm_head's few float channels (a Gather's output)


def test_logits_close_to_the_standard_int8_graph(bundle: Path) -> None:
    """Same quantization as the standard graph: the only differences are lm_head's int8 rows
    (float there) and the fused kernels' rounding. Left-padded batch included."""
    ids = np.array([[0, 0, 5, 9, 14, 3, 7, 22], [11, 4, 8, 15, 2, 6, 30, 12]])
    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    out = {}
    for variant, graph in (("fp32", "standard"), ("int8", "standard"), ("int8", "ort")):
        with load_bundle(bundle, variant=variant, graph=graph) as m:
            cache = m.backend.new_cache(2, 16)
            # the last 6 positions (the bundle's logits window): row 0's padding is before them
            out[(variant, graph)] = m.backend.forward_tail(ids, pos, mask, cache, 6)
    std, w8, fp = out[("int8", "standard")], out[("int8", "ort")], out[("fp32", "standard")]
    assert std.shape == w8.shape == (2, 6, Manifest.load(bundle).vocab_size)
    diff = float(np.abs(w8 - std).max())
    quant_err = float(np.abs(std - fp).max())
    assert diff < 0.2 * quant_err, (diff, quant_err)  # measured 0.022 vs 0.58
    assert (w8.argmax(-1) == std.argmax(-1)).mean() >= 0.9


def test_greedy_speculation_is_identical_on_it(bundle: Path) -> None:
    """Static activation scales: a row's result does not depend on the other rows of the
    forward, so verifying T tokens computes what T decode steps compute."""
    prompts = ["abcabcabcabc", "the cat sat on the mat; the cat sat on", "x",
               "0123456789012345"]
    rng = np.random.default_rng(3)
    prompts += ["".join(chr(c) for c in rng.integers(97, 123, int(rng.integers(1, 30))))
                for _ in range(8)]
    drafted = 0
    with load_bundle(bundle, variant="int8") as model:
        assert model.backend.graph == "ort"
        for p in prompts:
            plain = model.generate(p, max_new_tokens=40, temperature=0.0, eos_token_ids=())
            spec = model.generate(p, max_new_tokens=40, temperature=0.0, eos_token_ids=(),
                                  speculative="lookup")
            assert (spec.tokens, spec.text) == (plain.tokens, plain.text), p
            drafted += model.last_generation.stats.drafted_tokens
    assert drafted > 50


@dataclasses.dataclass(frozen=True)
class _FailsOnce(Gate):
    """Passes every graph but the n-th it is asked about (counted across calls)."""

    n: int = 2
    calls: list[int] = dataclasses.field(default_factory=list)

    def failures(self, acc: Any) -> list[str]:
        self.calls.append(1)
        return ["made to fail"] if len(self.calls) == self.n else []


def test_rows_failing_the_gate_fall_back_to_int8_blocks(tiny_tail_bundle: Path,
                                                       tmp_path: Path) -> None:
    """Gate calls: the standard graph (passes), the ort graph with lm_head in int8 rows (made
    to fail), then with lm_head in int8 blocks (passes): the blocks are written."""
    out = tmp_path / "bundle"
    shutil.copytree(tiny_tail_bundle, out)
    gate = _FailsOnce()
    calibrate(out, dataclasses.replace(W8A8, eval=dataclasses.replace(LOOSE, gate=gate)))
    assert len(gate.calls) == 3
    _, ortg, entry = _graphs(out)
    og = entry["ort_graph"]
    assert og["kept_float_as"] == "blocks" and og["weight_only_projections"] == 1
    ops = [n.op_type for n in ortg.graph.node]
    assert ops.count("MatMulNBits") == 1 and "MatMulInteger" not in ops
    # asked for: no activation statistics, no rows candidate (one ort-graph gate call)
    gate = _FailsOnce(n=99)
    calibrate(out, dataclasses.replace(W8A8, ort_int8="w8a8-blocks",
                                       eval=dataclasses.replace(LOOSE, gate=gate)))
    assert len(gate.calls) == 2
    _, ortg, entry = _graphs(out)
    assert entry["ort_graph"]["form"] == "w8a8"
    assert entry["ort_graph"]["kept_float_as"] == "blocks"
    assert [n.op_type for n in ortg.graph.node].count("MatMulNBits") == 1


def test_unknown_form_and_failing_gate_advice(bundle: Path) -> None:
    with pytest.raises(InputError, match=r"^--ort-int8 w4a4 is unknown: use weight-only, "
                                         r"w8a8 or w8a8-blocks$"):
        calibrate(bundle, dataclasses.replace(W8A8, ort_int8="w4a4"))
    from llama_export.calibration.accuracy import Accuracy, GenreAccuracy

    acc = GenreAccuracy({"code": Accuracy(10.0, 11.0, 0.8, 0.1, 100)})
    with pytest.raises(CalibrationError, match=r"ONNX-Runtime graph \(W8A8\) fails the "
                                               r"accuracy gate .* Try --ort-int8 weight-only"):
        refuse_if_failing(acc, Gate(0.03, 0.90), W8A8, ort_graph=True)


def _row_session(w: np.ndarray, amax: np.ndarray) -> Any:
    """One MatMul ``x (B, T, K) @ w`` rewritten by row_quantized, as an ONNX Runtime session."""
    from onnx import TensorProto, helper, numpy_helper

    from llama_export.calibration.qdq import NodeInserter
    from llama_export.calibration.w8a8_ort import _RowConsts, row_quantized

    k, n = w.shape
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", n])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    ins = NodeInserter(model)
    row_quantized(model, ins, GraphIndex(model), model.graph.node[0], w, amax,
                  _RowConsts(model))
    ins.commit()
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_row_quantized_projection_is_accurate_and_row_independent() -> None:
    """Per-row int8 activations x per-channel int8 weights with a channel outlier: close to the
    float product (far closer than plain per-row int8 of the same numbers), and every row's
    result bit-identical whether computed alone or inside a batch of 9 (speculation needs it)."""
    rng = np.random.default_rng(0)
    k, n = 256, 96
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    x = rng.standard_normal((3, 9, k)).astype(np.float32)
    x[..., 7] *= 60.0   # an activation outlier channel
    w[19] *= 40.0       # a weight row that smoothing made large
    amax = np.abs(x).max(axis=(0, 1))
    sess = _row_session(w, amax)
    y = sess.run(None, {"x": x})[0]
    ref = x @ w
    err = float(np.abs(y - ref).max() / np.abs(ref).max())
    # plain per-row int8 x per-channel int8, no float channels, no re-balancing
    s = np.abs(x).max(-1, keepdims=True) / 127
    wq, ws = np.clip(np.rint(w / (np.abs(w).max(0) / 127)), -127, 127), np.abs(w).max(0) / 127
    plain = (np.clip(np.rint(x / s), -127, 127) * s) @ (wq * ws)
    plain_err = float(np.abs(plain - ref).max() / np.abs(ref).max())
    assert err < 0.005 and err < 0.1 * plain_err, (err, plain_err)  # measured 0.0012 vs 0.26
    for b in range(3):
        for t in range(9):
            alone = sess.run(None, {"x": x[b:b + 1, t:t + 1]})[0]
            np.testing.assert_array_equal(alone[0, 0], y[b, t])
