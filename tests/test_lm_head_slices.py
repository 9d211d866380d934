"""A large float lm_head in column slices in the ONNX-Runtime graphs (exporter/onnx_tidy.py:
``split_lm_head``; it lowers ONNX Runtime's load peak) and made whole again by calibration
(calibration/graph.py: ``merge_lm_head_slices``). The tiny model's lm_head is split by lowering
the threshold: the same code path as a 1.5B model's 934 MB one."""

from __future__ import annotations

import itertools
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from llama_export.calibration.bundle_io import load_ort_graph
from llama_export.calibration.graph import merge_lm_head_slices
from llama_export.calibration.pipeline import QuantizeOptions, quantize
from llama_export.exporter import onnx_tidy
from llama_export.exporter.onnx_tidy import find_lm_head
from llama_export.runtime import load_bundle
from llama_export.runtime.manifest import Manifest, column_slices

from .test_calib_bundle import LOOSE


@pytest.fixture(scope="module")
def sliced_bundle(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_source`` exported with its lm_head (64 x 320 fp32, 80 KB) above the threshold."""
    from llama_export.exporter.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("sliced") / "bundle"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_tidy, "HEAD_SLICE_BYTES", 30_000)
        return export_bundle(tiny_source, out, ExportOptions(max_seq_len=128),
                             progress=lambda _: None)  # export checks parity: raises if off


def _graph(bundle: Path, kind: str) -> onnx.ModelProto:
    m = Manifest.load(bundle)
    spec = m.graph("fp32", "ort") if kind != "standard" else m.variant("fp32")
    file = spec["unpadded_file"] if kind == "unpadded" else spec["file"]
    return onnx.load(str(bundle / file))


def test_column_slices_cover_the_columns_on_tiles() -> None:
    for n, parts in [(151936, 4), (320, 3), (100, 7), (17, 1), (16, 5)]:
        s = column_slices(n, parts * 1000 - 1, 1000)  # bytes just under `parts` x the limit
        assert s[0][0] == 0 and s[-1][1] == n and len(s) <= parts
        assert all(b == c for (_, b), (c, _) in itertools.pairwise(s))
        assert all(a % 16 == 0 and b > a for a, b in s)


def test_export_slices_the_ort_graphs_lm_head_only(sliced_bundle: Path, tiny_bundle: Path) -> None:
    std = _graph(tiny_bundle, "standard")
    w = numpy_helper.to_array(next(t for t in std.graph.initializer
                                   if t.name == "lm_head.weight_t"))  # (64, 320)
    for kind in ("ort", "unpadded"):
        g = _graph(sliced_bundle, kind)
        heads = [n for n in g.graph.node if n.op_type == "MatMul" and ".cols" in n.input[1]]
        assert len(heads) == 3 and find_lm_head(g) is None  # no whole float lm_head left
        concat = [n for n in g.graph.node if list(n.input) == [h.output[0] for h in heads]]
        assert [n.op_type for n in concat] == ["Concat"]
        parts = {t.name: numpy_helper.to_array(t) for t in g.graph.initializer}
        np.testing.assert_array_equal(np.concatenate([parts[h.input[1]] for h in heads], 1), w)
    assert find_lm_head(_graph(sliced_bundle, "standard")) is not None  # TensorRT's stays whole
    # both ONNX-Runtime graphs read the same slices: stored once (+ one lm_head, + alignment)
    data = Manifest.load(sliced_bundle).variant("fp32")["file"] + ".data"
    grown = (sliced_bundle / data).stat().st_size - (tiny_bundle / data).stat().st_size
    assert w.nbytes <= grown <= w.nbytes + 4 * 4096


def _logits(bundle: Path, ids: list[list[int]]) -> Any:
    with load_bundle(bundle, verify=False) as model:
        be = model.backend
        cache = be.new_cache(len(ids), 32)
        x = np.array(ids, dtype=np.int64)
        pos = np.tile(np.arange(x.shape[1], dtype=np.int64), (len(ids), 1))
        first = be.forward(x, pos, None, cache)
        step = be.forward(x[:, -1:], pos[:, -1:] + 1, None, cache)
        return np.stack([first, step])


def test_sliced_graph_computes_the_same_logits(sliced_bundle: Path, tiny_bundle: Path) -> None:
    ids = [[5, 9, 33, 100, 7, 8], [1, 2, 3, 4, 5, 6]]
    np.testing.assert_allclose(_logits(sliced_bundle, ids), _logits(tiny_bundle, ids),
                               rtol=0, atol=1e-5)


def test_calibration_merges_the_slices_back(sliced_bundle: Path, tiny_bundle: Path) -> None:
    manifest = Manifest.load(sliced_bundle)
    for external in (True, False):
        g = load_ort_graph(sliced_bundle, manifest, external=external)
        assert g is not None
        head = find_lm_head(g)
        assert head is not None and head.input[1] == "lm_head.weight_t"
        assert head.name == "/lm_head/MatMul"
        assert not any(".cols" in t.name for t in g.graph.initializer)
        assert not any(n.op_type == "Concat" and "logits" in n.output for n in g.graph.node)
    plain = load_ort_graph(tiny_bundle, Manifest.load(tiny_bundle))
    merged = load_ort_graph(sliced_bundle, manifest)
    assert plain is not None and merged is not None
    by_name = {t.name: t for t in plain.graph.initializer}
    np.testing.assert_array_equal(
        numpy_helper.to_array(next(t for t in merged.graph.initializer
                                   if t.name == "lm_head.weight_t")),
        numpy_helper.to_array(by_name["lm_head.weight_t"]))
    assert [n.op_type for n in merged.graph.node] == [n.op_type for n in plain.graph.node]
    assert merge_lm_head_slices(plain) == 0  # nothing to merge: left alone


def test_quantized_graphs_equal_the_unsliced_exports(sliced_bundle: Path, tiny_bundle: Path,
                                                     tmp_path: Path) -> None:
    graphs = []
    for src in (sliced_bundle, tiny_bundle):
        out = tmp_path / src.parent.name
        shutil.copytree(src, out)
        quantize(out, QuantizeOptions(bits=4, block_size=32, eval=LOOSE))
        m = Manifest.load(out)
        graphs.append(onnx.load(str(out / m.graph("int4", "ort")["file"])))
    a, b = graphs
    assert Counter(n.op_type for n in a.graph.node) == Counter(n.op_type for n in b.graph.node)
    ta = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    tb = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert ta.keys() == tb.keys()
    for k, value in ta.items():
        np.testing.assert_array_equal(value, tb[k], err_msg=k)


def test_only_slices_that_tile_the_columns_from_0_are_merged() -> None:
    from llama_export.calibration.graph import _sliced_weight

    w = "lm_head.weight_t"
    assert _sliced_weight([f"{w}.cols0_16", f"{w}.cols16_40"]) == w
    assert _sliced_weight([f"{w}.cols16_32", f"{w}.cols32_40"]) is None  # not from column 0
    assert _sliced_weight([f"{w}.cols0_16", f"{w}.cols32_40"]) is None  # a gap
    assert _sliced_weight([f"{w}.cols0_16", "other.cols16_40"]) is None  # two weights
    assert _sliced_weight([f"{w}.cols0_16", w]) is None  # not a slice
