"""Calibration on tiny bundles: Q/DQ structure, SmoothQuant folding, INT4, cache, manifest.

The tiny random models have near-uniform next-token distributions, so accuracy gates are loosened
here; the real accuracy gates run on SmolLM2 in ``test_calib_smollm2.py`` (slow).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from llama_export.calibration.accuracy import Gate, segment_logits
from llama_export.calibration.collect import collect_stats
from llama_export.calibration.data import load_text, token_segments
from llama_export.calibration.graph import GraphIndex, find_groups, find_projections, is_lm_head
from llama_export.calibration.pipeline import (
    CACHE_FILE,
    CalibrateOptions,
    EvalOptions,
    QuantizeOptions,
    calibrate,
    quantize,
)
from llama_export.calibration.smoothquant import plan_smoothing
from llama_export.calibration.trt_cache import read_cache
from llama_export.runtime.manifest import Manifest, sha256_file
from llama_export.runtime.tokenizer import Tokenizer

LOOSE = EvalOptions(samples=2, seq_len=32, gate=Gate(max_ppl_increase=1.0, min_top1=0.0))
FAST = CalibrateOptions(samples=4, seq_len=32, decode_steps=4, keep_float=0, eval=LOOSE)


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("calib") / "bundle"
    shutil.copytree(tiny_bundle, out)
    calibrate(out, FAST)
    quantize(out, QuantizeOptions(bits=4, block_size=32, eval=LOOSE))
    return out


def _load(bundle: Path, variant: str) -> onnx.ModelProto:
    return onnx.load(str(bundle / Manifest.load(bundle).variant(variant)["file"]))


def _feed(manifest: Manifest, seq: int) -> dict[str, np.ndarray]:
    from llama_export.calibration.data import empty_past, prefill_feed

    ids = np.arange(3, 3 + seq, dtype=np.int64) % manifest.vocab_size
    return prefill_feed(ids, empty_past(manifest))


def test_int8_graph_is_valid_and_runs(int8_bundle: Path) -> None:
    model = _load(int8_bundle, "int8")
    onnx.checker.check_model(model, full_check=True)
    manifest = Manifest.load(int8_bundle)
    sess = ort.InferenceSession(str(int8_bundle / "model.int8.onnx"),
                                providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], _feed(manifest, 7))[0]
    assert logits.shape == (1, 7, manifest.vocab_size)
    assert np.isfinite(logits).all()


def test_every_projection_quantized_lm_head_and_norms_float(int8_bundle: Path) -> None:
    model = _load(int8_bundle, "int8")
    idx = GraphIndex(model)
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    quantized = [n for n in matmuls
                 if all(idx.producer.get(i) is not None
                        and idx.producer[i].op_type == "DequantizeLinear" for i in n.input)]
    # 2 layers x (q, k, v, o, gate, up, down); the attention MatMuls (Q.K, P.V) stay float
    assert len(quantized) == 14
    for n in quantized:
        act_dq, w_dq = idx.producer[n.input[0]], idx.producer[n.input[1]]
        q = idx.producer[act_dq.input[0]]
        assert q.op_type == "QuantizeLinear"
        assert idx.array(w_dq.input[0]).dtype == np.int8
        assert all(not np.any(idx.array(z)) for z in (*q.input[2:], *w_dq.input[2:]))  # zp 0
        assert idx.array(act_dq.input[1]).shape == ()                # per-tensor activation
        assert idx.array(w_dq.input[1]).ndim == 1                    # per-channel weight
    (head,) = [p for p in find_projections(model) if is_lm_head(idx, p)]
    assert idx.array(head.weight).dtype == np.float32               # lm_head stays float
    assert idx.producer[head.input].op_type == "Mul"
    for n in model.graph.node:
        if n.op_type in ("Softmax", "Sqrt", "ReduceMean", "Pow"):
            assert all(idx.producer.get(i) is None or idx.producer[i].op_type not in
                       ("DequantizeLinear", "QuantizeLinear") for i in n.input)


def test_smoothquant_folding_keeps_fp32_outputs(tiny_bundle: Path) -> None:
    manifest = Manifest.load(tiny_bundle)
    fp32 = onnx.load(str(tiny_bundle / "model.onnx"))
    tok = Tokenizer.from_bundle(tiny_bundle, manifest.tokenizer)
    segs = token_segments(load_text(None), tok, samples=2, seq_len=32)
    groups = find_groups(fp32)
    assert {g.fold.kind for g in groups if g.fold} == {"norm", "matmul"}
    stats = collect_stats(copy.deepcopy(fp32), manifest, segs,
                          row_tensors=[g.input for g in groups], decode_steps=4)
    for alpha in (0.5, 0.85):
        folded = copy.deepcopy(fp32)
        plans, tensors = plan_smoothing(folded, find_groups(folded), stats, method="minmax",
                                        alpha=alpha)
        assert sum(p.alpha is not None for p in plans) == 6  # qkv, gate/up, down per layer
        tensors.apply(folded)
        ref = segment_logits(fp32, manifest, segs)
        got = segment_logits(folded, manifest, segs)
        for r, g in zip(ref, got, strict=True):
            np.testing.assert_allclose(g, r, atol=1e-4, rtol=0)


def test_int4_graph_blocked_dq_runs(int8_bundle: Path) -> None:
    """Default INT4 (offset format): every projection behind a signed-INT4 blocked DQ with no
    zero-point (TensorRT's rule), plus its per-block offset term ``(X @ P) @ O``; one block
    sum per activation; lm_head at 8 bits."""
    model = _load(int8_bundle, "int4")
    onnx.checker.check_model(model)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 21
    idx = GraphIndex(model)
    dqs = {idx.consumers[n.output[0]][0].name: n for n in model.graph.node
           if n.op_type == "DequantizeLinear"}
    assert len(dqs) == 15  # 14 projections + lm_head (8-bit)
    types = {}
    for consumer, n in dqs.items():
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs == {"axis": 0, "block_size": 32}
        assert len(n.input) == 2  # no zero-point
        assert idx.nodes[consumer].op_type == "MatMul"
        types[consumer] = idx.inits[n.input[0]].data_type
    eight = {k for k, t in types.items() if t == onnx.TensorProto.INT8}
    assert {k.split("/")[-2] for k in eight} == {"lm_head"}
    assert all(t == onnx.TensorProto.INT4 for k, t in types.items() if k not in eight)
    sums = [n for n in model.graph.node if n.op_type == "MatMul" and "block_sum" in n.input[1]]
    assert len(sums) == 2 * 4  # per layer: attention input, o_proj, gate/up, down_proj inputs
    offsets = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[0] in
               {s.output[0] for s in sums}]
    assert len(offsets) == 14
    manifest = Manifest.load(int8_bundle)
    assert manifest.variant("int4")["quantization"]["format"] == "offset"
    sess = ort.InferenceSession(str(int8_bundle / "model.int4.onnx"),
                                providers=["CPUExecutionProvider"])
    assert np.isfinite(sess.run(["logits"], _feed(manifest, 5))[0]).all()


def _snap_to_q4_1(model: onnx.ModelProto) -> onnx.ModelProto:
    """Projection weights put on a GGUF Q4_1 grid: ``d * q + m`` per block of 32 along K with
    ``q`` in 1..14 (not the full range) and ``m / d`` not an integer."""
    from llama_export.calibration.graph import set_initializer

    model = copy.deepcopy(model)
    idx = GraphIndex(model)
    rng = np.random.default_rng(7)
    for p in find_projections(model):
        k, n = idx.array(p.weight).shape
        d = rng.uniform(0.01, 0.05, size=(k // 32, 1, n)).astype(np.float32)
        m = (-d * rng.uniform(3.3, 9.7, size=d.shape)).astype(np.float32)
        q = rng.integers(1, 15, size=(k // 32, 32, n)).astype(np.float32)
        set_initializer(model, p.weight, (d * q + m).reshape(k, n))
    return model


def test_offset_int4_reproduces_q4_1_weights_exactly(tiny_bundle: Path) -> None:
    """The offset format represents GGUF Q4_1 blocks exactly (the zero-point format cannot:
    its offset must be an integer number of steps). Unoptimized ONNX Runtime (plain DQ +
    MatMul, no int8 activation kernel) must then give the fp32 logits."""
    from llama_export.calibration.weight_only import quantize_weight_only

    manifest = Manifest.load(tiny_bundle)
    fp32 = _snap_to_q4_1(onnx.load(str(tiny_bundle / "model.onnx")))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feed = _feed(manifest, 7)

    def logits(m: onnx.ModelProto) -> np.ndarray:
        sess = ort.InferenceSession(m.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        return np.asarray(sess.run(["logits"], feed)[0])

    want = logits(fp32)
    err = {}
    for fmt in ("offset", "zero-point", "symmetric"):
        q, done = quantize_weight_only(fp32, bits=4, fmt=fmt)
        assert len(done) == 14
        err[fmt] = float(np.abs(logits(q) - want).max())
    assert err["offset"] < 1e-4 * float(np.abs(want).max())
    assert err["zero-point"] > 100 * err["offset"]
    assert err["symmetric"] > 100 * err["offset"]


def test_offset_int4_partial_block_graph_matches_its_weights(tiny_bundle: Path) -> None:
    """Blocks of 128 on K = 64 / 128: a partial block's offset term sums only its real rows.
    The offset graph computes exactly the fp32 graph holding the reconstructed ``s*q + o``."""
    from llama_export.calibration.graph import set_initializer
    from llama_export.calibration.weight_only import quantize_blocked_offset, quantize_weight_only

    manifest = Manifest.load(tiny_bundle)
    fp32 = onnx.load(str(tiny_bundle / "model.onnx"))
    recon = copy.deepcopy(fp32)
    idx = GraphIndex(recon)
    for p in find_projections(recon):
        if is_lm_head(idx, p):
            continue
        w = idx.array(p.weight)
        q, scale, offset = quantize_blocked_offset(w, 128)
        k = w.shape[0]
        set_initializer(recon, p.weight, q * np.repeat(scale, 128, axis=0)[:k]
                        + np.repeat(offset, 128, axis=0)[:k])
    quant, done = quantize_weight_only(fp32, bits=4, block=128, fmt="offset")
    assert len(done) == 14
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feed = _feed(manifest, 6)
    got, want = (ort.InferenceSession(m.SerializeToString(), so,
                                      providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
                 for m in (quant, recon))
    np.testing.assert_allclose(got, want, atol=1e-4 * float(np.abs(want).max()), rtol=0)


def test_int4_ort_graph_quantized_like_the_standard_graph(int8_bundle: Path) -> None:
    """The int4 variant's ONNX-Runtime graph: every projection behind a blocked DQ, contrib
    attention kept, and it computes what the standard int4 graph computes (the packed q|k|v
    quantizes column by column like q, k, v apart; logits within 1 % of their range)."""
    manifest = Manifest.load(int8_bundle)
    entry = manifest.variant("int4")["ort_graph"]
    assert entry["file"] == "model.int4.ort.onnx" and entry["kv_buffer"] == "shared"
    assert entry["eight_bit"] == ["lm_head"]
    assert entry["accuracy"]["ppl_ratio"] > 0
    model = onnx.load(str(int8_bundle / entry["file"]))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == 2
    idx = GraphIndex(model)
    plain = [n for n in model.graph.node if n.op_type == "MatMul" and idx.const_name(n.input[1])
             and not n.input[1].startswith("block_sum") and not n.input[1].endswith(".offset")]
    assert not plain  # no float weight left but the offset terms
    # stored fused (calibration/nbits.py): qkv, o, gate, up, down per layer + lm_head (8-bit)
    assert "DequantizeLinear" not in ops and entry["matmul_nbits"] == ops.count("MatMulNBits")
    bits = [a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name == "bits"]
    assert sorted(bits) == [4] * (2 * 5) + [8]
    feed = _feed(manifest, 5)
    got = ort.InferenceSession(str(int8_bundle / entry["file"]),
                               providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
    want = ort.InferenceSession(str(int8_bundle / "model.int4.onnx"),
                                providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
    assert np.abs(got - want).max() <= 0.01 * (want.max() - want.min())


def test_manifest_records_variants_and_cache(int8_bundle: Path) -> None:
    manifest = Manifest.load(int8_bundle)
    manifest.verify_files(int8_bundle)
    v = manifest.variant("int8")
    assert v["inputs"] == manifest.variant("fp32")["inputs"]
    assert v["outputs"] == manifest.variant("fp32")["outputs"]
    assert v["calibration"]["data_sha256"] == load_text(None).sha256
    assert v["quantization"]["method"] == "minmax"
    assert set(v["accuracy"]) >= {"ppl_fp32", "ppl", "top1_agreement", "mean_kl"}
    assert manifest.variant("int4")["quantization"]["block_size"] == 32
    assert sha256_file(int8_bundle / CACHE_FILE) == manifest.data["files"][CACHE_FILE]
    _version, scales = read_cache(int8_bundle / CACHE_FILE)
    graph_tensors = {o for n in _load(int8_bundle, "fp32").graph.node for o in n.output}
    assert scales
    assert set(scales) <= graph_tensors
    assert all(s > 0 for s in scales.values())


def test_fitted_block_divides_k() -> None:
    from llama_export.calibration.weight_only import fitted_block

    assert [fitted_block(k, 128) for k in (1536, 8960, 576, 896, 4864, 64, 96, 100)] == \
        [128, 128, 64, 128, 128, 64, 32, 128]
    assert fitted_block(576, 32) == 32 and fitted_block(8960, 512) == 256


def test_int8_ort_graph_is_weight_only_int8(int8_bundle: Path) -> None:
    """The calibrated int8 variant's ONNX-Runtime graph: every projection behind an int8
    blocked DQ (ONNX Runtime's MatMulNBits form), lm_head included, no activation Q/DQ,
    contrib attention kept, gated and recorded; the runtime picks it on CPU."""
    from llama_export.runtime.bundle import load_bundle

    manifest = Manifest.load(int8_bundle)
    entry = manifest.variant("int8")["ort_graph"]
    assert entry["file"] == "model.int8.ort.onnx" and entry["lm_head"] == "int8"
    assert entry["accuracy"]["ppl_ratio"] > 0
    assert manifest.data["files"]["model.int8.ort.onnx"] == sha256_file(
        int8_bundle / "model.int8.ort.onnx")
    model = onnx.load(str(int8_bundle / entry["file"]))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == 2 and "QuantizeLinear" not in ops
    # stored fused (calibration/nbits.py): qkv, o, gate, up, down per layer + lm_head
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert "DequantizeLinear" not in ops and len(nbits) == 2 * 5 + 1 == entry["matmul_nbits"]
    assert all(a.i == 8 for n in nbits for a in n.attribute if a.name == "bits")
    # blocks of 128 where K allows (the tiny model's K is 64 or 128: both kinds are here)
    blocks = {(a["K"], a["block_size"]) for a in (
        {x.name: x.i for x in n.attribute} for n in nbits)}
    assert blocks == {(64, 64), (128, 128)}, blocks
    assert "128" in entry["weights"]
    with load_bundle(int8_bundle, variant="int8") as m:
        assert m.backend.graph == "ort"


def test_runtime_loads_quantized_variants(int8_bundle: Path) -> None:
    from llama_export.runtime.bundle import load_bundle

    for variant, graph in (("int8", "standard"), ("int8", "ort"), ("int4", "ort"),
                           ("int4", "standard")):
        with load_bundle(int8_bundle, variant=variant, graph=graph) as model:
            assert model.backend.graph == graph
            out = model.generate("Hello", max_new_tokens=4, temperature=0.0)
            assert out.finish_reason is not None
            assert out.prompt_tokens > 0


@pytest.mark.parametrize("weights", ["int8", "float"])
def test_keep_float_leaves_sensitive_projections_unquantized(tiny_bundle: Path, tmp_path: Path,
                                                             weights: str) -> None:
    """Kept-out projections read float activations; their weights are float (the default)
    or int8 blocks (weight-only, ``--excluded-weights int8``)."""
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    entry = calibrate(out, CalibrateOptions(samples=4, seq_len=32, decode_steps=4,
                                            keep_float=2, excluded_weights=weights, eval=LOOSE))
    q = entry["quantization"]
    assert len(q["sensitivity"]) == 2
    assert q["quantized"] + len(q["excluded"]) == 14
    assert q["excluded_weights"].startswith(weights)
    model = _load(out, "int8")
    idx = GraphIndex(model)
    by_label = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.name.split("/")[-2] in ("q_proj", "k_proj", "v_proj",
                                                               "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"):
            by_label["model." + n.name.removeprefix("/").rsplit("/", 1)[0].replace("/", ".")] = n
    assert len(by_label) == 14
    for label, n in by_label.items():
        act = idx.producer.get(n.input[0])
        w_dq = idx.producer.get(n.input[1])
        act_quantized = act is not None and act.op_type == "DequantizeLinear"
        assert act_quantized == (label not in q["excluded"]), label
        if label in q["excluded"] and weights == "float":
            assert idx.array(str(idx.const_name(n.input[1]))).dtype == np.float32
        else:
            assert w_dq is not None and w_dq.op_type == "DequantizeLinear"
            assert idx.array(w_dq.input[0]).dtype == np.int8
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in w_dq.attribute}
            assert attrs == ({"axis": 0, "block_size": 32} if label in q["excluded"]
                             else {"axis": 1})
    sess = ort.InferenceSession(str(out / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    assert np.isfinite(sess.run(["logits"], _feed(Manifest.load(out), 5))[0]).all()


def test_int8_weight_only_variant(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    entry = quantize(out, QuantizeOptions(bits=8, block_size=64, lm_head=False, eval=LOOSE))
    assert entry["file"] == "model.int8wo.onnx"
    assert entry["quantization"]["excluded"] == ["lm_head"]
    model = _load(out, "int8wo")
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 14
    idx = GraphIndex(model)
    assert all(idx.inits[n.input[0]].data_type == onnx.TensorProto.INT8 for n in dqs)
    assert entry["accuracy"]["ppl_ratio"] < 1.01  # 8-bit weights barely move the tiny model


def test_int8_lm_head_weight_only_option(tiny_bundle: Path, tmp_path: Path) -> None:
    """``lm_head="int8"``: lm_head's weight in int8 blocks, its input still float (no Q/DQ on
    the activation); recorded in the manifest; the default keeps it float."""
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    entry = calibrate(out, CalibrateOptions(samples=4, seq_len=32, decode_steps=4, keep_float=0,
                                            lm_head="int8", eval=LOOSE))
    q = entry["quantization"]
    assert q["lm_head"].startswith("int8 weight-only") and "lm_head" not in q["float"]
    model = _load(out, "int8")
    idx = GraphIndex(model)
    (head,) = [n for n in model.graph.node if n.op_type == "MatMul" and "lm_head" in n.name]
    w_dq = idx.producer[head.input[1]]
    assert w_dq.op_type == "DequantizeLinear" and idx.array(w_dq.input[0]).dtype == np.int8
    assert {a.name: onnx.helper.get_attribute_value(a) for a in w_dq.attribute} == \
        {"axis": 0, "block_size": 32}
    assert idx.producer[head.input[0]].op_type != "DequantizeLinear"
    sess = ort.InferenceSession(str(out / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    assert np.isfinite(sess.run(["logits"], _feed(Manifest.load(out), 5))[0]).all()


def test_evaluator_keeps_float32_references_and_streams_candidates(
        tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reference logits are kept in the graph's float32 (Qwen2.5's 151,936-token vocabulary:
    24 held-out segments as float64 were 3.7 GB, and the candidate's as many again); the
    candidate's logits reach ``compare`` one segment at a time from one session for every
    genre; the figures are exactly those of the float64, all-at-once computation."""
    from collections.abc import Iterator

    from llama_export.calibration import accuracy, pipeline
    from llama_export.calibration.accuracy import compare
    from llama_export.calibration.pipeline import Evaluator

    manifest = Manifest.load(tiny_bundle)
    fp32_file = tiny_bundle / manifest.variant("fp32")["file"]
    fp32 = onnx.load(str(fp32_file))
    tok = Tokenizer.from_bundle(tiny_bundle, manifest.tokenizer)
    segs = token_segments(load_text(None), tok, samples=4, seq_len=24)
    genres = {"a": segs[:2], "b": segs[2:]}
    cand = copy.deepcopy(fp32)
    w = next(t for t in cand.graph.initializer if len(t.dims) == 2 and t.dims[0] > 16)
    arr = onnx.numpy_helper.to_array(w)
    w.CopyFrom(onnx.numpy_helper.from_array(arr * np.float32(1.05), w.name))
    want = {g: compare(segment_logits(fp32, manifest, s), segment_logits(cand, manifest, s), s)
            for g, s in genres.items()}

    ev = Evaluator(manifest, genres).start(fp32_file)
    assert all(r.dtype == np.float32 for refs in ev.ref.values() for r in refs)
    sessions, seen = [], []
    real_session, real_compare = accuracy.ort_session, pipeline.compare

    def counting_session(*a: object, **k: object) -> object:
        sessions.append(1)
        return real_session(*a, **k)  # type: ignore[arg-type]

    def checking_compare(ref: object, got: object, s: np.ndarray) -> object:
        seen.append(isinstance(got, Iterator))
        return real_compare(ref, got, s)  # type: ignore[arg-type]

    monkeypatch.setattr(accuracy, "ort_session", counting_session)
    monkeypatch.setattr(pipeline, "compare", checking_compare)
    got = ev.score(cand)
    assert seen == [True, True] and len(sessions) == 1
    assert got.genres == want
    assert got.genres["a"].ppl_ratio != 1.0


def test_collect_stats_on_the_bundle_file_equals_in_memory(tiny_bundle: Path) -> None:
    """Statistics collected on the bundle's own file (its graph only loaded, the weights read
    by ONNX Runtime from the data file) equal those of the in-memory graph; no temp file is
    left in the bundle."""
    manifest = Manifest.load(tiny_bundle)
    path = tiny_bundle / manifest.variant("fp32")["file"]
    fp32 = onnx.load(str(path))
    tok = Tokenizer.from_bundle(tiny_bundle, manifest.tokenizer)
    segs = token_segments(load_text(None), tok, samples=2, seq_len=32)
    groups = [g.input for g in find_groups(fp32)]
    before = sorted(p.name for p in tiny_bundle.iterdir())
    a = collect_stats(fp32, manifest, segs, row_tensors=groups, decode_steps=4)
    b = collect_stats(path, manifest, segs, row_tensors=groups, decode_steps=4)
    assert sorted(p.name for p in tiny_bundle.iterdir()) == before
    assert len(fp32.graph.output) == 1 + 2 * manifest.num_layers  # extra outputs removed
    for t in groups:
        assert a[t].amax == b[t].amax
        np.testing.assert_array_equal(a[t].channel_amax, b[t].channel_amax)
        np.testing.assert_array_equal(a[t].rows, b[t].rows)


def test_calibrate_never_copies_the_whole_model(tiny_bundle: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The W8A8 candidates are built without a deep copy of the fp32 graph (the quantized
    weights are read from it one at a time; Qwen2.5-Coder-0.5B's calibration ran out of 24 GB
    holding fp32 + SmoothQuant edits + a deep copy per candidate), and the int8 graph is the
    one a deep copy gave (same weights, Q/DQ and scales: checked through its logits)."""
    from llama_export.calibration import pipeline
    from llama_export.calibration.graph import lean_copy
    from llama_export.calibration.pipeline import build_int8
    from llama_export.calibration.smoothquant import Tensors

    real = copy.deepcopy

    def no_model_copies(x: object, *a: object) -> object:
        assert not isinstance(x, onnx.ModelProto), "deep copy of a whole model"
        return real(x, *a)

    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    monkeypatch.setattr(copy, "deepcopy", no_model_copies)
    calibrate(out, FAST)
    monkeypatch.undo()

    fp32 = _load(tiny_bundle, "fp32")
    manifest = Manifest.load(tiny_bundle)
    tok = Tokenizer.from_bundle(tiny_bundle, manifest.tokenizer)
    segs = token_segments(load_text(None), tok, samples=2, seq_len=32)
    stats = collect_stats(copy.deepcopy(fp32), manifest, segs,
                          row_tensors=[g.input for g in find_groups(fp32)], decode_steps=4)
    plans, tensors = plan_smoothing(fp32, find_groups(fp32), stats, method="minmax", alpha=0.5)
    exclude = [plans[0].group.projections[0].label]
    lean = build_int8(fp32, plans, tensors, exclude)
    deep = copy.deepcopy(fp32)  # what build_int8 did before: everything copied, then replaced
    own = Tensors(deep)
    own.edits = dict(tensors.edits)
    pipeline.insert_w8a8(deep, plans, own, exclude)
    feed = _feed(manifest, 12)
    got, want = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                 .run(None, feed)[0] for m in (lean, deep))
    np.testing.assert_array_equal(got, want)
    assert {t.name for t in fp32.graph.initializer} == {t.name for t in _load(tiny_bundle, "fp32")
                                                       .graph.initializer}  # fp32 untouched
    holes = lean_copy(fp32, frozenset({fp32.graph.initializer[0].name}))
    assert not holes.graph.initializer[0].raw_data and holes.graph.node == fp32.graph.node


def test_upgrade_opset_in_place_keeps_the_weights_where_they_are(tiny_bundle: Path) -> None:
    """In place, the converted graph replaces the model's and its weights are not copied (the
    model returned is the one given); otherwise the model given stays intact. Both compute the
    fp32 logits."""
    from llama_export.calibration.weight_only import BLOCK_OPSET, upgrade_opset

    fp32 = _load(tiny_bundle, "fp32")
    before = fp32.SerializeToString()
    copied = upgrade_opset(fp32)
    assert fp32.SerializeToString() == before and copied is not fp32
    target = _load(tiny_bundle, "fp32")
    moved = upgrade_opset(target, in_place=True)
    assert moved is target
    for m in (copied, moved):
        assert next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) == \
            BLOCK_OPSET
        assert all(len(t.raw_data) or t.float_data or t.int64_data or t.int32_data
                   for t in m.graph.initializer)
    feed = _feed(Manifest.load(tiny_bundle), 9)
    want, a, b = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                  .run(None, feed)[0] for m in (fp32, copied, moved))
    np.testing.assert_array_equal(a, want)
    np.testing.assert_array_equal(b, want)


def test_weight_only_reads_external_weights_one_at_a_time(tiny_bundle: Path) -> None:
    """A graph loaded without its external data quantizes in place to the same graph as a
    fully loaded one: each weight read from the data file when quantized, the float ones
    loaded at the end (protobuf never frees a loaded model's bytes before the whole model)."""
    from llama_export.calibration.weight_only import quantize_weight_only

    path = tiny_bundle / "model.onnx"
    full, _ = quantize_weight_only(onnx.load(str(path)), bits=4)
    src = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in src.graph.initializer)
    lazy, _ = quantize_weight_only(src, bits=4, in_place=True, base_dir=tiny_bundle)
    assert lazy is src
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in lazy.graph.initializer)
    feed = _feed(Manifest.load(tiny_bundle), 9)
    a, b = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            .run(None, feed)[0] for m in (full, lazy))
    np.testing.assert_array_equal(a, b)


def test_quantized_ort_graphs_have_their_own_unpadded_form(int8_bundle: Path) -> None:
    """Each quantized variant's ONNX-Runtime graph gets its unpadded companion (no attention
    bias; calibration/unpadded.py): its own file over the variant's own weights, listed and
    hashed, and its logits equal the full graph's on an unpadded prompt (stated tolerance:
    1e-5 max-abs; the full graph adds a bias of zeros)."""
    from llama_export.calibration.unpadded import strip_attention_bias

    manifest = Manifest.load(int8_bundle)
    fp32_unpadded = manifest.variant("fp32")["ort_graph"]["unpadded_file"]
    for name in ("int8", "int4"):
        entry = manifest.variant(name)["ort_graph"]
        assert entry["unpadded_file"] == f"model.{name}.ort.unpadded.onnx" != fp32_unpadded
        assert "unpadded_parity" not in entry  # the fp32 graph's check is not this one's
        assert manifest.data["files"][entry["unpadded_file"]] == sha256_file(
            int8_bundle / entry["unpadded_file"])
        lean = onnx.load(str(int8_bundle / entry["unpadded_file"]), load_external_data=False)
        assert {e.value for t in lean.graph.initializer for e in t.external_data
                if e.key == "location"} == {entry["data_file"]}
        assert strip_attention_bias(lean) == 0  # nothing left to strip
        feed = _feed(manifest, 6)
        got, want = (ort.InferenceSession(str(int8_bundle / f), providers=["CPUExecutionProvider"])
                     .run(["logits"], feed)[0] for f in (entry["unpadded_file"], entry["file"]))
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
