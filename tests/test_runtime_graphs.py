"""The runtime's two graphs of one variant: which one runs, and that they compute the same thing.

The ONNX-Runtime graph keeps the KV cache in capacity-sized buffers bound as past AND present
(GroupQueryAttention writes new K/V in place); the standard graph grows a new cache each step.
Stated tolerance between the two: logits within 1e-4 max-abs (both fp32; measured ~1e-6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llama_export.runtime import load_bundle
from llama_export.runtime.backends.ort import select_graph
from llama_export.runtime.errors import BundleError, InputError
from llama_export.runtime.generate import left_pad, positions_from_mask
from llama_export.runtime.manifest import Manifest

ATOL = 1e-4


@pytest.fixture(scope="module")
def pair(tiny_bundle: Path) -> Any:
    with load_bundle(tiny_bundle, graph="ort") as fast, \
            load_bundle(tiny_bundle, graph="standard") as std:
        yield fast, std


def test_select_graph(tiny_bundle: Path, tmp_path: Path) -> None:
    m = Manifest.load(tiny_bundle)
    assert select_graph(m, "fp32", "cpu") == "ort"
    assert select_graph(m, "fp32", "cuda") == "standard"      # GQA's CUDA kernels: fp16 only
    assert select_graph(m, "fp32", "tensorrt") == "standard"  # the TensorRT EP takes no contrib ops
    assert select_graph(m, "fp32", "cuda", "ort") == "ort"    # asked for explicitly
    with pytest.raises(InputError, match="--graph fast is unknown: use one of auto, standard, ort"):
        select_graph(m, "fp32", "cpu", "fast")
    del m.data["variants"]["fp32"]["ort_graph"]
    assert select_graph(m, "fp32", "cpu") == "standard"
    with pytest.raises(BundleError, match=r"no ONNX Runtime graph: re-export .* \(--graph standard\)"):
        select_graph(m, "fp32", "cpu", "ort")


def test_default_is_ort_graph_with_shared_cache(pair: Any) -> None:
    fast, std = pair
    assert fast.backend.graph == "ort" and std.backend.graph == "standard"
    cache = fast.backend.new_cache(2, 40)
    assert cache.shared and not std.backend.new_cache(2, 40).shared
    m = fast.manifest
    assert cache.values[0].shape() == [2, m.num_kv_heads, 40, m.head_dim]


def _run(model: Any, cache: Any, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return model.backend.forward(ids, positions_from_mask(mask, ids.shape[1]), mask, cache)


def test_graphs_agree_on_chunked_prefill_and_interleaved_caches(pair: Any) -> None:
    """Left-padded batch, a 2-chunk prefill (seq > 1 with a past), decode steps, and two live
    caches used in turns (the shared-buffer binding must follow the cache it is given)."""
    fast, std = pair
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, 9).tolist(), rng.integers(0, 256, 5).tolist()]
    ids, mask = left_pad(prompts, fast.tokenizer.pad_token_id)
    other = rng.integers(0, 256, (1, 4))
    feed_a, feed_b = rng.integers(0, 256, (3, 2, 1)), rng.integers(0, 256, (3, 1, 1))
    results = []
    for model in (fast, std):
        a, b = model.backend.new_cache(2, 32), model.backend.new_cache(1, 32)
        out = [_run(model, a, ids[:, :6], mask[:, :6]), _run(model, a, ids[:, 6:], mask),
               _run(model, b, other, np.ones((1, 4), dtype=np.int64))]
        mask_a = mask
        for step in range(3):
            mask_a = np.concatenate([mask_a, np.ones((2, 1), dtype=np.int64)], axis=1)
            out.append(_run(model, a, feed_a[step], mask_a))
            out.append(_run(model, b, feed_b[step], np.ones((1, b.length + 1), dtype=np.int64)))
        results.append(out)
    for got, want in zip(*results, strict=True):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_cache_reuse_after_reset_is_clean(pair: Any) -> None:
    """A reset shared cache is overwritten from slot 0: stale K/V from a longer earlier
    sequence never leaks into the next one."""
    fast, _ = pair
    ids_long = np.arange(1, 21, dtype=np.int64)[None]
    ids_short = np.arange(30, 34, dtype=np.int64)[None]
    cache = fast.backend.new_cache(1, 32)
    _run(fast, cache, ids_long, np.ones((1, 20), dtype=np.int64))
    cache.reset()
    reused = _run(fast, cache, ids_short, np.ones((1, 4), dtype=np.int64))
    fresh = _run(fast, fast.backend.new_cache(1, 32), ids_short, np.ones((1, 4), dtype=np.int64))
    np.testing.assert_array_equal(reused, fresh)


def test_generate_same_text_on_both_graphs(pair: Any) -> None:
    fast, std = pair
    prompts = ["hello there", "a much longer prompt to pad the others", "x"]
    a = fast.generate_batch(prompts, max_new_tokens=24, eos_token_ids=())
    b = std.generate_batch(prompts, max_new_tokens=24, eos_token_ids=())
    assert [c.tokens for c in a] == [c.tokens for c in b]


@pytest.mark.parametrize("batch", [1, 2])
def test_forward_tail_returns_each_new_position(pair: Any, batch: int) -> None:
    """``forward_tail`` gives the logits of every asked-for new position, equal to stepping the
    same tokens one at a time (batch 2 with a past also covers the ORT graph's per-token path)."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 256, (batch, 9))
    for model in pair:
        backend = model.backend
        stepped_cache, tail_cache = backend.new_cache(batch, 16), backend.new_cache(batch, 16)
        for cache in (stepped_cache, tail_cache):
            backend.forward(ids[:, :4], np.arange(4)[None].repeat(batch, 0), None, cache)
        stepped = np.stack([backend.forward(ids[:, t:t + 1], np.full((batch, 1), t), None,
                                            stepped_cache) for t in range(4, 9)], axis=1)
        tail = backend.forward_tail(ids[:, 4:], np.arange(4, 9)[None].repeat(batch, 0), None,
                                    tail_cache, 3)
        assert tail.shape == (batch, 3, model.manifest.vocab_size) and tail.dtype == np.float32
        np.testing.assert_allclose(tail, stepped[:, 2:], atol=ATOL, rtol=0)
        assert tail_cache.length == 9


def test_forward_tail_on_a_last_logits_graph_names_the_reexport(pair: Any) -> None:
    backend = pair[0].backend
    cache = backend.new_cache(1, 8)
    backend.logits_mode = "last"  # as a bundle exported with --logits last records it
    try:
        with pytest.raises(InputError, match=r"re-export the bundle .* --logits all"):
            backend.forward_tail(np.ones((1, 3), np.int64), np.arange(3)[None], None, cache, 2)
        assert cache.length == 0
    finally:
        backend.logits_mode = "all"


# ---- the ONNX-Runtime graph's unpadded form (calibration/unpadded.py) ------------------------
# Stated tolerance between the unpadded graph and the full one: 1e-5 max-abs on fp32 logits
# (the full graph adds a bias of zeros to the same scores).
UNPADDED_ATOL = 1e-5


def _decode(model: Any, cache: Any, prompt: np.ndarray, steps: int, verify: int
            ) -> list[np.ndarray]:
    """Prefill ``prompt`` (one row), greedy decode ``steps`` tokens, then one forward of
    ``verify`` tokens (a speculative verification's shape); every forward's logits."""
    backend = model.backend
    out = [backend.forward(prompt, np.arange(prompt.shape[1])[None], None, cache)]
    for _ in range(steps):
        nxt = out[-1].argmax(-1)[:, None]
        out.append(backend.forward(nxt, np.array([[cache.length]]), None, cache))
    ids = np.arange(3, 3 + verify)[None]
    out.append(backend.forward_tail(ids, cache.length + np.arange(verify)[None], None, cache,
                                    verify))
    return out


def test_unpadded_graph_runs_until_left_padding_and_matches_the_full_graph(
        tiny_bundle: Path) -> None:
    prompt = np.array([[5, 9, 2, 7, 11, 3]])
    with load_bundle(tiny_bundle, graph="ort") as lean, \
            load_bundle(tiny_bundle, graph="ort", attention_bias="always") as full:
        assert lean.backend.attention_bias is False and full.backend.attention_bias is True
        assert lean.backend.session._model_path.endswith("model.ort.unpadded.onnx")
        got = _decode(lean, lean.backend.new_cache(1, 32), prompt, 4, 3)
        want = _decode(full, full.backend.new_cache(1, 32), prompt, 4, 3)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, atol=UNPADDED_ATOL, rtol=0)
        assert lean.backend.attention_bias is False  # batch 1 never needed the bias

        # right padding (the server's slots: each row ends at its own length) needs none either
        mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
        ids = np.array([[5, 9, 2, 7, 11, 3], [4, 8, 6, 0, 0, 0]])
        pos = np.tile(np.arange(6), (2, 1))
        right = [m.backend.forward_tail(ids, pos, mask, m.backend.new_cache(2, 16), 6)
                 for m in (lean, full)]
        np.testing.assert_allclose(right[0][0], right[1][0], atol=UNPADDED_ATOL, rtol=0)
        np.testing.assert_allclose(right[0][1, :3], right[1][1, :3], atol=UNPADDED_ATOL, rtol=0)
        assert lean.backend.attention_bias is False

        # a left-padded batch loads the full graph in its place, and it stays
        ids, mask = left_pad([[5, 9, 2, 7], [4, 8]], 0)
        cache = lean.backend.new_cache(2, 16)
        padded = _run(lean, cache, ids, mask)
        assert lean.backend.attention_bias is True
        assert lean.backend.session._model_path.endswith("model.ort.onnx")
        np.testing.assert_allclose(
            padded, _run(full, full.backend.new_cache(2, 16), ids, mask), atol=UNPADDED_ATOL,
            rtol=0)
        again = _decode(lean, lean.backend.new_cache(1, 32), prompt, 4, 3)
        for g, w in zip(again, want, strict=True):
            np.testing.assert_allclose(g, w, atol=UNPADDED_ATOL, rtol=0)


def test_attention_bias_option_is_checked(tiny_bundle: Path) -> None:
    with pytest.raises(InputError, match="attention_bias 'never' is unknown: use auto or always"):
        load_bundle(tiny_bundle, graph="ort", attention_bias="never")


def test_left_padded_detects_a_zero_before_a_one() -> None:
    from llama_export.runtime.backends.ort import left_padded

    assert not left_padded(np.ones((1, 7), np.int64))
    assert not left_padded(np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]))  # right padding
    assert left_padded(np.array([[1, 1, 1, 1], [0, 0, 1, 1]]))                    # left padding
    assert left_padded(np.array([[1, 0, 1, 1]]))                                  # a hole
