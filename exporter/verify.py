"""Parity: the exported graph under ONNX Runtime (CPU) vs transformers' ``LlamaForCausalLM``.

A batch of two prompts, the second left-padded, runs a prefill and then ``steps`` decode steps
through the graph's KV cache (the ONNX-Runtime graph's unpadded form, which left padding must
not reach, runs the first prompt alone: ``unpadded=True``); the reference recomputes the whole
sequence each step without a cache, so the cache path is checked against an independent
computation. Both sides are fed the
reference's greedy tokens (teacher forcing), so one early disagreement cannot snowball.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llama_export.runtime.errors import ParityError
from llama_export.runtime.generate import left_pad, positions_from_mask
from llama_export.runtime.manifest import Manifest

from .sources import Progress

# Stated tolerances on max-abs logits error, scaled by the reference logits' magnitude
# (tiny random models have |logits| < 1; SmolLM2's reach ~30): atol + rtol * max|ref|.
# Quantized variants are judged mostly by greedy agreement (accuracy is calibration's report).
TOLERANCES = {"fp32": (1e-4, 1e-5), "fp16": (1e-2, 5e-3), "int8": (0.5, 0.15), "int4": (1.0, 0.2)}
MIN_GREEDY_AGREEMENT = {"fp32": 1.0, "fp16": 0.9, "int8": 0.8, "int4": 0.7}
PROMPTS = ("The capital of France is", "def add(a, b):\n    return")


@dataclass
class ParityReport:
    variant: str
    graph: str
    max_abs_err: float
    mean_abs_err: float
    ref_max_abs: float
    tolerance: float
    greedy_agreement: float
    positions: int
    decode_steps: int
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        graph = "" if self.graph == "standard" else f" ({self.graph} graph)"
        batch = "batch 1" if self.graph.endswith("unpadded") else "batch 2 left-padded"
        return (f"{self.variant}{graph}: max-abs logits error {self.max_abs_err:.2e} (tolerance "
                f"{self.tolerance:.2e}, |ref| max {self.ref_max_abs:.1f}), mean {self.mean_abs_err:.2e}, "
                f"greedy agreement {self.greedy_agreement:.1%} over {self.positions} positions "
                f"(prefill + {self.decode_steps} decode steps, {batch})")


def _prompt_ids(bundle: Path, manifest: Manifest, vocab: int) -> list[list[int]]:
    tok_path = bundle / "tokenizer.json"
    if tok_path.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_path))
        ids = [tok.encode(p).ids for p in PROMPTS]
        if all(ids) and max(max(i) for i in ids) < vocab:
            return [ids[0][:12], ids[1][: max(1, min(len(ids[1]), len(ids[0][:12]) - 2))]]
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, 7).tolist(), rng.integers(0, vocab, 4).tolist()]


class _OrtStepper:
    """Minimal prefill/decode driver over an ONNX Runtime session (numpy IO; verification only)."""

    def __init__(self, bundle: Path, manifest: Manifest, variant: str, graph: str,
                 unpadded: bool = False) -> None:
        import onnxruntime as ort

        v = manifest.graph(variant, graph)
        file = v["unpadded_file"] if unpadded else v["file"]
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = 1  # tiny batches: spinning thread pools only add contention
        self.sess = ort.InferenceSession(str(bundle / file), so, providers=["CPUExecutionProvider"])
        self.m = manifest
        self.dtype = np.float16 if manifest.kv_dtype(variant) == "float16" else np.float32
        self.past: list[np.ndarray] | None = None

    def step(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        B, L = ids.shape[0], self.m.num_layers
        if self.past is None:
            empty = np.zeros((B, self.m.num_kv_heads, 0, self.m.head_dim), dtype=self.dtype)
            self.past = [empty] * (2 * L)
        feed: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        for i in range(L):
            feed[f"past_key_values.{i}.key"] = self.past[2 * i]
            feed[f"past_key_values.{i}.value"] = self.past[2 * i + 1]
        out = self.sess.run(None, feed)
        self.past = out[1:]
        return np.asarray(out[0], dtype=np.float32)


def verify_bundle(bundle: str | os.PathLike[str], model: str | os.PathLike[str] | None, *,
                  manifest: Manifest | None = None, variant: str | None = None,
                  steps: int = 6, reference: Any = None, graph: str = "standard",
                  progress: Progress = lambda _: None,
                  reference_cache: dict[bytes, np.ndarray] | None = None,
                  unpadded: bool = False) -> ParityReport:
    """Compare ``variant`` of ``bundle`` (its ``graph``: standard | ort; ``unpadded``: the ort
    graph's unpadded form, on the unpadded prompt alone) with the PyTorch original; raise
    ParityError on failure.

    ``reference_cache`` (one dict shared by calls with the same ``reference``) keeps the
    reference's logits per input: both graphs of a bundle are fed the same prompts and the
    reference's own greedy tokens, so the second graph's check costs no PyTorch forward (on a
    1.5B model each full recompute is seconds)."""

    bundle = Path(bundle)
    manifest = manifest or Manifest.load(bundle)
    variant = variant or manifest.default_variant()
    name = f"{graph}-unpadded" if unpadded else graph
    progress(f"verifying {variant} ({name} graph) against transformers' original "
             "(ONNX Runtime CPU)")
    with _ort_failures(variant, graph):
        ours = _OrtStepper(bundle, manifest, variant, graph, unpadded)  # fails fast if missing
    if reference is None:
        from .reference import load_reference
        reference = load_reference(model)
    from .reference import reference_threads

    with reference_threads(reference), _ort_failures(variant, graph):
        report = _compare(ours, reference, bundle, manifest, variant, name, steps,
                          {} if reference_cache is None else reference_cache)
    progress("parity " + report.summary())
    if not report.passed:
        raise ParityError(f"parity check failed for {report.summary()}: the export does not match "
                          "the PyTorch original; re-export with --no-verify only to debug, and "
                          "report the model config")
    return report


@contextmanager
def _ort_failures(variant: str, graph: str) -> Iterator[None]:
    """ONNX Runtime's own exception types (not RuntimeError) as one ParityError line."""
    try:
        yield
    except Exception as e:
        if not type(e).__module__.startswith("onnxruntime"):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        fix = ("re-export with --no-ort-graph (the standard graph does not need it)"
               if graph == "ort" else "report the model config")
        raise ParityError(f"ONNX Runtime cannot run the {variant} variant's {graph} graph "
                          f"({first}): {fix}") from None


def _reference_logits(reference: Any, ids: np.ndarray, mask: np.ndarray,
                      cache: dict[bytes, np.ndarray]) -> np.ndarray:
    """The reference's logits over the whole (left-padded) batch, no KV cache; memoized."""
    import torch

    key = np.asarray(ids.shape, dtype=np.int64).tobytes() + ids.tobytes() + mask.tobytes()
    if key not in cache:
        with torch.no_grad():
            cache[key] = reference(
                input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(positions_from_mask(mask, mask.shape[1])),
                use_cache=False).logits.float().numpy()
    return cache[key]


def _compare(ours: _OrtStepper, reference: Any, bundle: Path, manifest: Manifest, variant: str,
             graph: str, steps: int, cache: dict[bytes, np.ndarray]) -> ParityReport:
    precision = str(manifest.variant(variant).get("precision", variant))
    pad = manifest.tokenizer.get("pad_token_id") or 0
    ids, mask = left_pad(_prompt_ids(bundle, manifest, manifest.vocab_size), pad)
    full_ids, full_mask = ids, mask
    # the unpadded graph runs row 0 (the longer prompt, never padded) of the same teacher-forced
    # batch, so the reference's batch logits serve both graphs
    rows = slice(0, 1) if graph.endswith("unpadded") else slice(None)
    assert rows.stop is None or full_mask[rows].all(), "row 0 must be the unpadded prompt"
    errs: list[np.ndarray] = []
    agree: list[np.ndarray] = []
    ref_max = 0.0
    step_ids = ids
    for _ in range(steps + 1):
        pos = positions_from_mask(full_mask, step_ids.shape[1])
        got = ours.step(step_ids[rows], full_mask[rows], pos[rows])
        full_ref = _reference_logits(reference, full_ids, full_mask, cache)
        ref = full_ref[rows, -got.shape[1]:, :]
        valid = full_mask[rows, -got.shape[1]:].astype(bool)  # skip pad query positions
        errs.append(np.abs(got - ref)[valid].max(axis=-1))
        agree.append((got.argmax(-1) == ref.argmax(-1))[valid])
        ref_max = max(ref_max, float(np.abs(ref[valid]).max()))
        nxt = full_ref[:, -1, :].argmax(-1).astype(np.int64)[:, None]
        step_ids = nxt
        full_ids = np.concatenate([full_ids, nxt], axis=1)
        full_mask = np.concatenate([full_mask, np.ones_like(nxt)], axis=1)
    err = np.concatenate(errs)
    atol, rtol = TOLERANCES.get(precision, TOLERANCES["int4"])
    tol = atol + rtol * ref_max
    agreement = float(np.concatenate(agree).mean())
    passed = bool(np.isfinite(err).all() and err.max() <= tol
                  and agreement >= MIN_GREEDY_AGREEMENT.get(precision, 0.9))
    return ParityReport(variant, graph, float(err.max()), float(err.mean()), ref_max, tol, agreement,
                        int(err.size), steps, passed)
