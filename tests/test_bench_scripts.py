"""benchmarks/compare_peers.py's summary lines (the figures quoted in the README come from it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _compare_peers() -> object:
    path = Path(__file__).parents[1] / "benchmarks" / "compare_peers.py"
    spec = importlib.util.spec_from_file_location("compare_peers", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pairwise_ratios_are_per_round_medians_at_the_same_precision() -> None:
    cp = _compare_peers()
    results = {"ours-fp32": [(60.0, 3.6), (80.0, 3.3), (70.0, 3.6)],
               "ours-int4": [(70.0, 16.0), (70.0, 20.0), (70.0, 15.0)],
               "genai-fp32": [(60.0, 3.6), (40.0, 3.0), (70.0, 4.0)],
               "genai-int8": [(50.0, 10.0)] * 3,
               "torch-eager": [(10.0, 1.0)] * 3}
    rss = dict.fromkeys(results, 100.0)
    lines = cp.pairwise(results, rss)  # type: ignore[attr-defined]
    assert len(lines) == 1  # int4 has no genai peer here; torch is no peer
    line = lines[0]
    assert line.startswith("ours-fp32 / genai-fp32: decode 1.000x (rounds 1.00, 1.10, 0.90)")
    assert "prefill 1.00x" in line and "peak RSS 100 / 100 MB" in line
    with pytest.raises(ValueError, match="shorter"):  # rounds must pair up
        cp.pairwise({"ours-fp32": [(1.0, 1.0)], "genai-fp32": []}, rss)  # type: ignore[attr-defined]
