"""Unit tests of the pure-numpy calibration pieces (no bundle needed, fast)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llama_export.calibration.collect import TensorStats
from llama_export.calibration.quant import (
    activation_amax,
    dequantize_blocked,
    entropy_amax,
    fake_quant,
    quantize_blocked,
    quantize_weight,
)
from llama_export.calibration.smoothquant import smoothing_factors
from llama_export.calibration.trt_cache import format_cache, hex_to_scale, parse_cache
from llama_export.runtime.errors import CalibrationError


def test_trt_cache_round_trip_is_exact() -> None:
    rng = np.random.default_rng(0)
    amax = {f"/layers.{i}/mlp/Mul_1_output_0": float(a)
            for i, a in enumerate(rng.uniform(1e-3, 200, 50))}
    text = format_cache(amax, trt_version=100300)
    assert text.splitlines()[0] == "TRT-100300-EntropyCalibration2"
    version, scales = parse_cache(text)
    assert version == 100300
    assert list(scales) == list(amax)
    for name, a in amax.items():  # the cache stores IEEE single floats: exact after rounding
        assert scales[name] == float(np.float32(a / 127.0))
    assert parse_cache(format_cache_from(scales)) == (100300, scales)  # parse → write → parse
    assert hex_to_scale("3f800000") == 1.0  # big-endian IEEE 754: 1.0


def format_cache_from(scales: dict[str, float]) -> str:
    return format_cache({k: v * 127.0 for k, v in scales.items()}, trt_version=100300)


def test_trt_cache_rejects_garbage() -> None:
    with pytest.raises(CalibrationError, match="TRT-<version>"):
        parse_cache("hello\nx: 3f800000\n")
    with pytest.raises(CalibrationError, match="line 2"):
        parse_cache("TRT-100300-EntropyCalibration2\nx: zz\n")


def test_weight_quantization_is_symmetric_per_channel() -> None:
    w = np.random.default_rng(1).normal(size=(64, 8)).astype(np.float32)
    w[:, 3] *= 100  # one loud output channel must not cost the others their precision
    q, s = quantize_weight(w)
    assert q.dtype == np.int8
    assert s.shape == (8,)
    assert np.abs(q).max() == 127
    err = np.abs(q * s - w).max(axis=0)
    assert np.all(err <= s / 2 + 1e-6)
    assert err[0] < err[3] / 50


def test_blocked_int4_round_trip_error_bounded() -> None:
    w = np.random.default_rng(2).normal(size=(70, 5)).astype(np.float32)  # K not a multiple
    q, s = quantize_blocked(w, bits=4, block=32)
    assert s.shape == (3, 5)
    assert q.min() >= -8
    assert q.max() <= 7
    back = dequantize_blocked(q, s, 32)
    assert np.all(np.abs(back - w) <= np.repeat(s, 32, axis=0)[:70] / 2 + 1e-6)


def test_range_methods_clip_outliers() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4096, 16)).astype(np.float32)
    x[0, 0] = 80.0
    assert activation_amax(x, "minmax") == pytest.approx(80.0)
    assert 3.0 < activation_amax(x, "percentile", 99.9) < 6.0
    ent = entropy_amax(np.abs(x).ravel(), 80.0)
    assert ent < 20.0
    # the clipped range gives a lower error than minmax on the bulk of the data
    bulk = x[1:]
    e_min = np.abs(fake_quant(bulk, 80.0 / 127) - bulk).mean()
    e_ent = np.abs(fake_quant(bulk, ent / 127) - bulk).mean()
    assert e_ent < e_min


def test_smoothing_factors_balance_ranges() -> None:
    act = np.array([100.0, 1.0, 1.0], dtype=np.float32)
    w = np.ones((3, 4), dtype=np.float32)
    s = smoothing_factors(act, [w], 0.5)
    np.testing.assert_allclose(s, [10.0, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(act / s, np.abs(w * s[:, None]).max(axis=1), rtol=1e-6)


def test_int4_packing_matches_onnx() -> None:
    from onnx import TensorProto, helper, numpy_helper

    from llama_export.calibration.qdq import pack_int4

    q = np.array([[-8, 7, 0], [3, -1, 5]], dtype=np.int8)
    t = helper.make_tensor("w", TensorProto.INT4, q.shape, pack_int4(q), raw=True)
    np.testing.assert_array_equal(numpy_helper.to_array(t).astype(np.int8), q)


def test_asymmetric_int4_beats_symmetric_and_reproduces_a_4bit_grid() -> None:
    from llama_export.calibration.weight_only import quantize_blocked_asym

    rng = np.random.default_rng(4)
    w = rng.normal(size=(64, 6)).astype(np.float32) + 0.3
    q, s, z = quantize_blocked_asym(w, 32)
    assert q.dtype == np.uint8
    assert q.max() <= 15
    assert z.max() <= 15
    asym = np.linalg.norm(dequantize_blocked(q, s, 32, z) - w)
    qs, ss = quantize_blocked(w, 4, 32)
    assert asym < np.linalg.norm(dequantize_blocked(qs, ss, 32) - w)
    # weights already on an integer-offset 4-bit grid come back exactly
    grid = (rng.integers(0, 16, size=(64, 6)) - 5).astype(np.float32) * 0.25
    grid[0], grid[32] = -1.25, -1.25  # every block spans the full 0..15 range
    grid[1], grid[33] = 2.5, 2.5
    q, s, z = quantize_blocked_asym(grid, 32)
    np.testing.assert_allclose(dequantize_blocked(q, s, 32, z), grid, atol=1e-6)


def test_offset_int4_round_trip_and_formats() -> None:
    """``w = s*q + o``: q in -8..7, positive steps, exact on a 4-bit grid with a fractional
    offset; on Gaussian weights at least as close as the zero-point form; symmetric puts each
    block's extreme exactly on -8 or 7 with a positive scale."""
    from llama_export.calibration.weight_only import (
        quantize_blocked_asym,
        quantize_blocked_offset,
        quantize_blocked_symmetric,
    )

    rng = np.random.default_rng(5)
    d = rng.uniform(0.01, 0.1, size=(2, 1, 6)).astype(np.float32)
    m = -d * np.float32(4.37)
    grid = (d * rng.integers(2, 14, size=(2, 32, 6)) + m).reshape(64, 6).astype(np.float32)
    q, s, o = quantize_blocked_offset(grid, 32)
    assert q.dtype == np.int8 and q.min() >= -8 and q.max() <= 7 and (s > 0).all()
    back = q.astype(np.float32) * np.repeat(s, 32, axis=0) + np.repeat(o, 32, axis=0)
    np.testing.assert_allclose(back, grid, atol=1e-6)
    qa, sa, za = quantize_blocked_asym(grid, 32)
    assert np.abs(dequantize_blocked(qa, sa, 32, za) - grid).max() > 100 * np.abs(back - grid).max()

    w = rng.normal(size=(64, 40)).astype(np.float32)
    q, s, o = quantize_blocked_offset(w, 32)
    off_err = np.linalg.norm(q * np.repeat(s, 32, axis=0) + np.repeat(o, 32, axis=0) - w)
    qa, sa, za = quantize_blocked_asym(w, 32)
    assert off_err <= 1.05 * np.linalg.norm(dequantize_blocked(qa, sa, 32, za) - w)
    # K not a multiple of the block: the last partial block is exact too
    q, s, o = quantize_blocked_offset(grid[:40], 32)
    assert q.shape == (40, 6) and s.shape == o.shape == (2, 6)
    back = q * np.repeat(s, 32, axis=0)[:40] + np.repeat(o, 32, axis=0)[:40]
    np.testing.assert_allclose(back, grid[:40], atol=1e-6)

    qs, ss = quantize_blocked_symmetric(w, 32)
    assert (ss > 0).all() and qs.min() >= -8 and qs.max() <= 7
    blocks = w.reshape(2, 32, 40)
    ext = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None, :], axis=1)[:, 0]
    np.testing.assert_allclose(np.where(ext < 0, -8, 7) * ss, ext, rtol=1e-6)
    qn, sn = quantize_blocked_symmetric(w, 32, negative_scales=True)  # ONNX Runtime's rule
    np.testing.assert_allclose(-8 * sn, ext, rtol=1e-6)
    assert (np.sign(sn) == -np.sign(ext)).all()
    neg_err = np.linalg.norm(dequantize_blocked(qn, sn, 32) - w)
    assert neg_err < np.linalg.norm(dequantize_blocked(qs, ss, 32) - w)


def _gguf_round_trip(w: np.ndarray, qtype: str) -> np.ndarray:
    """``w`` (N, K) through a GGUF ``qtype`` and back, transposed to the graph's (K, N)."""
    import gguf
    from gguf.quants import dequantize, quantize

    from llama_export.exporter.kquants import K_QUANTS, quantize_k

    t = gguf.GGMLQuantizationType[qtype]
    raw = quantize_k(w, qtype) if qtype in K_QUANTS else quantize(w, t)
    return np.ascontiguousarray(dequantize(raw, t).reshape(w.shape).T)


def test_offset_int4_reproduces_gguf_4bit_blocks_exactly() -> None:
    """A Q4_K sub-block is ``d*sc*q - dmin*m`` over 32 weights (q in 0..15, the 6-bit sc and m
    scaling two fp16 super-block scales): one float step and one float offset per block of 32,
    which the offset format stores, so codes are reproduced exactly and values to float32
    rounding (as Q4_0 and Q4_1). Q5_0 / Q6_K / Q8_0 blocks have 32..256 levels: not 4-bit exact."""
    from llama_export.calibration.weight_only import EXACT_INT4_SOURCES, quantize_blocked_offset

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((48, 512)) * 0.05).astype(np.float32)
    for qtype in (*EXACT_INT4_SOURCES, "Q5_0", "Q6_K", "Q8_0"):
        src = _gguf_round_trip(w, qtype)                                   # (K, N)
        q, s, o = quantize_blocked_offset(src, 32)
        back = q * np.repeat(s, 32, axis=0) + np.repeat(o, 32, axis=0)
        rel = np.abs(back - src).max() / np.abs(src).max()
        if qtype in EXACT_INT4_SOURCES:
            assert rel < 1e-6, qtype                                       # float32 rounding only
        else:
            assert rel > 1e-3, qtype                                       # real 4-bit rounding


def test_source_eight_bit_labels_follow_gguf_types() -> None:
    from llama_export.calibration.weight_only import source_eight_bit_labels

    labels = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
              "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    types = {"model.layers.0.self_attn.q_proj.weight": "Q4_K",
             "model.layers.0.self_attn.v_proj.weight": "Q6_K",
             "model.layers.0.mlp.down_proj.weight": "Q5_0",
             "model.layers.1.mlp.down_proj.weight": "Q4_1", "lm_head.weight": "Q8_0"}
    assert source_eight_bit_labels(labels, types) == [
        "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj", "lm_head"]


def test_ort_session_past_2gb_keeps_the_callers_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past 2 GB the session goes through a temp file with external data, which moves the
    weights out of the in-memory model; the model must come back whole (calibration quantizes
    it afterwards). The 2 GB test is faked: a 2 GB model here would cost minutes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from llama_export.calibration import graph

    w = np.arange(4096, dtype=np.float32).reshape(64, 64) / 4096
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        initializer=[numpy_helper.from_array(w, "w")]), opset_imports=[helper.make_opsetid("", 17)])
    monkeypatch.setattr(graph, "fits_protobuf", lambda _: False)
    x = np.ones((1, 64), dtype=np.float32)
    with graph.ort_session(model) as sess:
        y = sess.run(None, {"x": x})[0]  # type: ignore[attr-defined]
    np.testing.assert_allclose(y, x @ w, rtol=1e-6)
    t = model.graph.initializer[0]
    assert t.data_location == onnx.TensorProto.DEFAULT
    np.testing.assert_array_equal(numpy_helper.to_array(t), w)


def test_tensor_stats_sample_is_bounded_uniform_and_exact() -> None:
    """Calibration memory does not grow with the data: the row sample stays at ``max_rows``
    rows while statistics over every row stay exact, and the sample is uniform over the
    stream (a sample kept from the first chunks only, or the last, fails)."""
    rng = np.random.default_rng(1)
    st = TensorStats(max_rows=256)
    chunks = [rng.standard_normal((1, 64, 8)).astype(np.float32) for _ in range(100)]
    for i, c in enumerate(chunks):
        c[..., 0] = i  # column 0 tells which chunk a row came from
        st.update(c, keep_rows=True)
        assert st.rows is not None and len(st.rows) <= 256
    st.finish()
    allrows = np.concatenate([c.reshape(-1, 8) for c in chunks])
    assert st.amax == float(np.abs(allrows).max())
    np.testing.assert_array_equal(st.channel_amax, np.abs(allrows).max(axis=0))
    assert st.rows is not None and st.rows.shape == (256, 8)
    origin = st.rows[:, 0]
    assert (np.diff(origin) >= 0).all()  # stream order kept
    # every sampled row is a row of the input, unchanged
    assert {r.tobytes() for r in st.rows} <= {r.tobytes() for r in allrows}
    # uniform over 100 chunks: mean chunk index 49.5 (sd of the mean ~1.8), both halves sampled
    assert abs(origin.mean() - 49.5) < 8 and (origin < 20).sum() > 25 and (origin >= 80).sum() > 25


def test_tensor_stats_keeps_the_sample_when_no_new_row_makes_it() -> None:
    """A full sample is not copied again by a chunk none of whose rows wins a place (late in
    a long run, almost every chunk), and the rows kept never alias the caller's array."""

    class Keys:  # the sampling keys: what a chunk draws decides whether it enters the sample
        def __init__(self) -> None:
            self.next = 0.5

        def random(self, n: int) -> np.ndarray:
            return np.full(n, self.next)

    keys = Keys()
    st = TensorStats(max_rows=4, rng=keys)  # type: ignore[arg-type]
    first = np.ones((1, 4, 3), np.float32)
    st.update(first, keep_rows=True)
    first[:] = 7  # ORT reuses output buffers: the sample must not change with them
    assert st.rows is not None and (st.rows == 1).all()
    kept = st.rows
    keys.next = 0.9  # above every kept key: no row enters
    st.update(np.full((1, 2, 3), -5, np.float32), keep_rows=True)
    assert st.rows is kept and st.amax == 5.0  # statistics still see every row
    keys.next = 0.1  # below every kept key: both rows enter, two old ones leave
    st.update(np.full((1, 2, 3), 2, np.float32), keep_rows=True)
    assert st.rows is not kept and sorted(st.rows[:, 0].tolist()) == [1, 1, 2, 2]


def test_save_model_leaves_the_model_untouched_and_unduplicated(tmp_path: Path) -> None:
    """save_model writes large tensors from the model without moving their bytes out and back:
    protobuf frees none of a message's bytes until the whole message goes, so putting them
    back kept a second copy in the model (the 1.5B calibration ran out of memory writing)."""
    import gc

    import onnx

    from llama_export.calibration.graph import save_model

    def rss_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20

    w = np.arange(64 * 2**20, dtype=np.float32).reshape(-1, 1024)  # 256 MB
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, w.shape[0]])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1024])
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                   [x], [y], [onnx.numpy_helper.from_array(w, "w")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    del w
    gc.collect()
    before, size = rss_mb(), model.ByteSize()
    data = save_model(model, tmp_path / "m.onnx")
    gc.collect()
    assert rss_mb() - before < 64  # was +256 MB: the weight put back into the model
    assert model.ByteSize() == size and model.graph.initializer[0].raw_data[:4] == bytes(4)
    back = onnx.load(str(tmp_path / "m.onnx"))
    assert (tmp_path / data).stat().st_size >= 2**28
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(back.graph.initializer[0])[1, :3],
                                  [1024, 1025, 1026])
