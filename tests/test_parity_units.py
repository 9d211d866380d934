"""Parity logic on CPU without any engine: a fake Backend stands in for ONNX Runtime and TensorRT.

The fake "model" is a lookup table (logits of position t depend on the token there and on t), so
references are built exactly like the exporter builds them (greedy continuation, top-k, log-probs)
and every metric has a known value. The same rows come out whichever backend name the run is
given: the TensorRT path is the ORT path apart from the backend object.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llama_export.runtime.backends.base import Backend, KVCache
from llama_export.runtime.errors import BundleError, InputError
from llama_export.runtime.manifest import FORMAT_VERSION, Manifest
from llama_export.runtime.parity.compare import feed_schedule
from llama_export.runtime.parity.references import (
    FILE,
    ReferenceItem,
    ReferenceSet,
    load_references,
    save_references,
)
from llama_export.runtime.parity.run import ParityOptions, format_table, plan_rows, run_parity
from llama_export.runtime.parity.tolerances import DEFAULTS, parse_overrides, tolerance_for

V, K, NEW = 50, 8, 12
TABLE = np.random.default_rng(0).normal(0, 3, (V, V)).astype(np.float32)


def true_logits(ids: np.ndarray, start: int) -> np.ndarray:
    """[len(ids), V]: the fake model's logits for tokens at positions start, start+1, ..."""
    pos = np.arange(start, start + len(ids), dtype=np.float32)[:, None]
    return TABLE[ids] + 0.01 * np.sin(pos * np.arange(V, dtype=np.float32)[None, :])


def make_item(name: str, kind: str, prompt: list[int]) -> ReferenceItem:
    ids = list(prompt)
    while kind != "heldout" and len(ids) < len(prompt) + NEW:
        ids.append(int(true_logits(np.array(ids), 0)[-1].argmax()))
    arr = np.array(ids, dtype=np.int64)
    logits = true_logits(arr[:-1], 0).astype(np.float64)
    top = np.argsort(-logits, axis=1)[:, :K]
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    logprobs = logits[np.arange(len(arr) - 1), arr[1:]] - lse
    return ReferenceItem(name, kind, arr, len(prompt) if kind != "heldout" else len(arr), top,
                         np.take_along_axis(logits, top, 1).astype(np.float32),
                         logprobs.astype(np.float32), name)


REFS = ReferenceSet((make_item("a", "prompt", [1, 2, 3]), make_item("b", "chat", [4, 5, 6, 7, 8]),
                     make_item("held", "heldout", list(range(10, 40)))), K,
                    {"reference": "fake"})


class FakeBackend(Backend):
    """Answers with the fake model's logits, plus ``bias`` added to token ``bias_token`` at
    absolute positions ``bias_positions`` (to make known errors and divergences)."""

    def __init__(self, manifest: Manifest, variant: str, logits_mode: str = "all",
                 bias: float = 0.0, bias_positions: tuple[int, ...] = (), bias_token: int = 0):
        self.manifest, self.variant, self.logits_mode = manifest, variant, logits_mode
        self.bias, self.bias_positions, self.bias_token = bias, bias_positions, bias_token
        self.calls: list[int] = []

    def _new_cache_impl(self, batch_size: int, capacity: int) -> KVCache:
        return KVCache(batch_size, capacity)

    def _forward_impl(self, input_ids: np.ndarray, position_ids: np.ndarray,
                      attention_mask: np.ndarray, cache: KVCache, tail: int) -> np.ndarray:
        self.calls.append(input_ids.shape[1])
        out = true_logits(input_ids[0], cache.length)
        for p in self.bias_positions:
            if cache.length <= p < cache.length + len(out):
                out[p - cache.length, self.bias_token] += self.bias
        return np.ascontiguousarray(out[None, len(out) - tail:], dtype=np.float32)

    def _truncate_impl(self, cache: KVCache, length: int) -> None:
        pass  # the fake model's logits depend on positions only; nothing cached to forget


def write_bundle(root: Path, refs: ReferenceSet = REFS, **variant_extra: Any) -> Path:
    """A bundle folder with a manifest and references only (the fake backend needs no graph)."""
    root.mkdir(parents=True, exist_ok=True)
    save_references(root / FILE, refs)
    variants = {name: {"file": f"model.{name}.onnx", "precision": name, "logits": "all",
                       "inputs": [], "outputs": [], **variant_extra}
                for name in ("fp32", "int4")}
    data = {"format_version": FORMAT_VERSION, "model": {"num_layers": 1, "vocab_size": V},
            "dims": {"batch": {"min": 1, "opt": 1, "max": 1},
                     "seq": {"min": 1, "opt": 8, "max": 64}, "past": {"min": 0, "opt": 8, "max": 63},
                     "total": {"min": 1, "opt": 8, "max": 64}},
            "tokenizer": {}, "variants": variants, "files": {},
            "engines": [{"path": "engines/gpu-fp32.plan", "variant": "fp32"}],
            "references": refs.manifest_entry()}
    m = Manifest(data)
    for rel in [FILE, *m.files_of_variant("fp32"), *m.files_of_variant("int4")]:
        if not (root / rel).exists():
            (root / rel).write_bytes(b"graph")  # checked by sha256, never opened by the fake
        m.record_file(root, rel)
    m.save(root)
    return root


def _factory(**kw: Any) -> Any:
    made: list[FakeBackend] = []

    def make(bundle: Path, manifest: Manifest, variant: str, graph: str) -> FakeBackend:
        b = FakeBackend(manifest, variant, **(kw.get(variant, {})))
        made.append(b)
        return b
    make.made = made  # type: ignore[attr-defined]
    return make


def test_feed_schedule() -> None:
    def every(n: int) -> int:
        return n

    def last(_: int) -> int:
        return 1

    assert feed_schedule(10, 4, every, 64) == [4, 1, 1, 1, 1, 1, 1]
    assert feed_schedule(29, 30, every, 64) == [29]           # held-out text: one prefill
    assert feed_schedule(6, 4, last, 64) == [1] * 6           # --logits last: token by token
    assert feed_schedule(6, 4, every, 3) == [1] * 6           # prompt longer than the profile
    assert feed_schedule(6, 4, lambda n: min(n, 2), 64) == [1] * 6  # a bounded tail window


def test_exact_backend_passes_with_zero_error(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b")
    result = run_parity(bundle, ParityOptions(variant="fp32", graph="standard"),
                        factory=_factory())
    (row,) = result.rows
    assert row.passed and row.max_abs < 1e-5 and row.top1 == 1.0 and row.kl < 1e-9
    assert row.greedy == {"a": NEW, "b": NEW} and row.new_tokens == {"a": NEW, "b": NEW}
    assert row.ppl == pytest.approx(row.ppl_ref, rel=1e-5)
    assert row.positions == sum(it.positions for it in REFS.items)


@pytest.mark.parametrize("mode", ["all", "last"])
def test_known_divergence_and_error(tmp_path: Path, mode: str) -> None:
    """Boost a non-top token at one continuation position of item 'a': greedy diverges there,
    the error is the boost, and the held-out text (other positions) is untouched."""
    bundle = write_bundle(tmp_path / "b")
    item = REFS.items[0]
    row_at = item.prompt_tokens - 1 + 5                       # predicts continuation token 5
    token = int(item.topk_ids[row_at, 3])                     # the original's 4th choice
    boost = float(item.topk_values[row_at, 0] - item.topk_values[row_at, 3]) + 1.0
    make = _factory(fp32={"logits_mode": mode, "bias": boost, "bias_positions": (row_at,),
                          "bias_token": token})
    result = run_parity(bundle, ParityOptions(variant="fp32", graph="standard"), factory=make)
    (row,) = result.rows
    assert row.greedy["a"] == 5 and row.greedy["b"] == NEW
    assert row.max_abs == pytest.approx(boost, rel=1e-5)
    assert row.top1 == pytest.approx(1 - 1 / row.positions)
    assert not row.passed and any(f.startswith("greedy 0.4167 < 1") for f in row.failures)
    calls = make.made[0].calls
    if mode == "last":
        assert set(calls) == {1}                              # fed one token per call
    else:
        assert calls.count(item.prompt_tokens) >= 1 and max(calls) == REFS.items[2].positions


def test_near_tie_divergence_is_forgiven(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b")
    item = REFS.items[0]
    row_at = item.prompt_tokens - 1 + 2
    gap = float(item.topk_values[row_at, 0] - item.topk_values[row_at, 1])
    make = _factory(fp32={"bias": gap + 1e-3, "bias_positions": (row_at,),
                          "bias_token": int(item.topk_ids[row_at, 1])})
    over = {None: {"tie": gap * 1.01, "max_abs": None, "mean_abs": None, "top1": None,
                   "kl": None, "ppl": None}}
    (row,) = run_parity(bundle, ParityOptions(variant="fp32", graph="standard", overrides=over),
                        factory=make).rows
    assert row.greedy["a"] == 2 and row.greedy_gated == 1.0 and row.passed
    over[None]["tie"] = gap * 0.99
    (row,) = run_parity(bundle, ParityOptions(variant="fp32", graph="standard", overrides=over),
                        factory=make).rows
    assert not row.passed and row.greedy_gated == pytest.approx(2 / NEW)


def test_trt_and_ort_rows_are_the_same_code(tmp_path: Path) -> None:
    """Same fake answers behind backend=ort and backend=trt: identical metrics, one code path."""
    bundle = write_bundle(tmp_path / "b")
    noisy = {"fp32": {"bias": 0.3, "bias_positions": (4, 20), "bias_token": 7}}
    ort = run_parity(bundle, ParityOptions(variant="fp32", graph="standard"),
                     factory=_factory(**noisy))
    trt = run_parity(bundle, ParityOptions(variant="fp32", backend="trt"),
                     factory=_factory(**noisy))
    a, b = ort.rows[0].to_dict(), trt.rows[0].to_dict()
    assert (a.pop("backend"), a.pop("graph")) == ("ort:cpu", "standard")
    assert (b.pop("backend"), b.pop("graph")) == ("trt", "engine")
    assert a == b and a["max_abs"] == pytest.approx(0.3, rel=1e-5)


def test_plan_rows(tmp_path: Path) -> None:
    m = Manifest.load(write_bundle(tmp_path / "b", ort_graph={"file": "x.ort.onnx"}))
    assert plan_rows(m, ParityOptions()) == [("fp32", "standard"), ("fp32", "ort"),
                                             ("int4", "standard"), ("int4", "ort")]
    assert plan_rows(m, ParityOptions(graph="ort", variant="int4")) == [("int4", "ort")]
    assert plan_rows(m, ParityOptions(provider="cuda")) == [("fp32", "standard"),
                                                            ("int4", "standard")]
    assert plan_rows(m, ParityOptions(backend="trt")) == [("fp32", "engine")]  # int4: no engine
    with pytest.raises(BundleError, match="no 'int8' variant"):
        plan_rows(m, ParityOptions(variant="int8"))


def test_failing_row_is_flagged_in_the_table(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b")
    make = _factory(int4={"bias": 50.0, "bias_positions": tuple(range(0, 60, 3)),
                          "bias_token": 9})
    result = run_parity(bundle, ParityOptions(graph="standard"), factory=make)
    assert [r.passed for r in result.rows] == [True, False] and not result.passed
    table = format_table(result)
    assert "FAIL int4 (standard, ort:cpu): " in table and "FAIL fp32" not in table
    assert json.loads(json.dumps(result.to_dict()))["rows"][1]["passed"] is False


def test_tolerance_overrides() -> None:
    over = parse_overrides(["kl=0.5", "int8.top1=0.95", "int8wo.greedy=off", "fp32.tie=0"])
    assert tolerance_for("int8", over) == dataclasses.replace(DEFAULTS["int8"], kl=0.5,
                                                              top1=0.95, greedy=None)
    assert tolerance_for("int8wo", over).top1 == 0.95          # weight-only int8: int8 limits
    assert tolerance_for("fp32", over).tie == 0.0 and tolerance_for("fp32", over).kl == 0.5
    assert tolerance_for("bf16") == DEFAULTS["int4"]           # unknown: the loosest
    for bad, msg in [("kl", "use KEY=VALUE"), ("speed=1", "use KEY=VALUE"),
                     ("fp8.kl=1", "unknown precision 'fp8'"), ("top1=1.5", "out of range"),
                     ("kl=lots", "is not a number")]:
        with pytest.raises(InputError, match=msg):
            parse_overrides([bad])


def test_references_round_trip_and_checks(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b")
    m = Manifest.load(bundle)
    back = load_references(bundle, m)
    assert [it.name for it in back.items] == ["a", "b", "held"] and back.top_k == K
    for x, y in zip(back.items, REFS.items, strict=True):
        np.testing.assert_array_equal(x.ids, y.ids)
        np.testing.assert_array_equal(x.topk_values, y.topk_values)
    assert m.data["references"]["heldout_ppl"] > 1
    with open(bundle / FILE, "r+b") as f:  # one byte changed: the sha256 check refuses it
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(BundleError, match=r"references\.npz does not match its sha256"):
        load_references(bundle, m)
    del m.data["references"]
    with pytest.raises(BundleError, match=r"has no saved PyTorch references .*: re-export it "
                                          r"with `llama-export onnx \[MODEL\] -o"):
        load_references(bundle, m)


def test_pickled_references_are_refused(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b")
    np.savez(bundle / FILE, meta=np.array([{"evil": 1}], dtype=object))
    m = Manifest.load(bundle)
    m.record_file(bundle, FILE)  # even with a matching sha256: object arrays are never loaded
    with pytest.raises(BundleError, match="is not a valid references file"):
        load_references(bundle, m)


def test_nan_logits_fail_even_with_every_limit_off(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b")
    make = _factory(fp32={"bias": float("nan"), "bias_positions": (3,), "bias_token": 1})
    off = parse_overrides([f"{k}=off" for k in ("max_abs", "mean_abs", "top1", "kl", "ppl",
                                                "greedy")])
    (row,) = run_parity(bundle, ParityOptions(variant="fp32", graph="standard", overrides=off),
                        factory=make).rows
    assert row.failures == ["non-finite logits (NaN or inf)"]
