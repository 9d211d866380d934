"""Run calibration segments through the fp32 graph and collect activation statistics.

The tensors we need are added as extra graph outputs of the in-memory model and fetched from
ONNX Runtime on every step: prefill of each segment, then ``decode_steps`` single-token steps
with the real past K/V. For the projection inputs we keep per-channel maxima (SmoothQuant
statistics) and a row sample (percentile / entropy ranges and the error proxy); for the other
tensors (legacy TensorRT cache) only the absolute maximum.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from llama_export.runtime.manifest import Manifest
from llama_export.runtime.tempnames import temp_file

from .data import Feed, empty_past, past_from_outputs, prefill_feed
from .graph import ort_session


@dataclass
class TensorStats:
    """Running statistics of one tensor. The row sample is kept bounded while collecting:
    every row gets a random key and the ``max_rows`` smallest keys stay (bottom-k sampling, a
    uniform sample without replacement of all rows seen), so memory is ``max_rows x K`` per
    tensor whatever the calibration set's size. Keeping every row until the end, as before,
    took (rows x sum of K) floats: 16k rows of Qwen2.5-0.5B's 24 layers ran out of 24 GB."""

    amax: float = 0.0
    channel_amax: np.ndarray | None = None
    rows: np.ndarray | None = None  # (R, K) sampled rows, in the order they were seen
    max_rows: int = 2048
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    _keys: np.ndarray | None = None

    def update(self, x: np.ndarray, keep_rows: bool) -> None:
        a = np.abs(x)
        self.amax = max(self.amax, float(a.max(initial=0.0)))
        if not keep_rows:
            return
        flat = x.reshape(-1, x.shape[-1])
        cmax = a.reshape(flat.shape).max(axis=0)
        self.channel_amax = cmax if self.channel_amax is None else np.maximum(
            self.channel_amax, cmax)
        keys = self.rng.random(len(flat))
        fresh = False  # does ``flat`` own its memory (never keep a view of ORT's output)?
        if self.rows is not None and self._keys is not None:
            if len(self.rows) + len(flat) > self.max_rows:
                # only rows that can still make the sample are copied
                cut = np.partition(np.concatenate([self._keys, keys]),
                                   self.max_rows - 1)[self.max_rows - 1]
                new = keys <= cut
                if not new.any():
                    return  # the sample is unchanged (the common case late in a long run)
                flat, keys = flat[new], keys[new]
            flat = np.concatenate([self.rows, flat.astype(np.float32, copy=False)])
            keys = np.concatenate([self._keys, keys])
            fresh = True
        if len(flat) > self.max_rows:
            keep = np.sort(np.argpartition(keys, self.max_rows - 1)[: self.max_rows])
            flat, keys = flat[keep], keys[keep]
            fresh = True
        self.rows = flat.astype(np.float32, copy=not fresh)
        self._keys = keys

    def finish(self) -> None:
        """Drop the sampling state (the rows stay in the order they were seen)."""
        self._keys = None


def run_segment(seg: np.ndarray, manifest: Manifest, decode_steps: int,
                step: Callable[[Feed], Feed]) -> None:
    """Prefill ``seg[:-d]``, then ``d`` single-token decode steps; ``step(feed)`` returns the
    next past K/V (the real ``present`` outputs, so decode-phase tensors are calibrated)."""
    d = min(decode_steps, len(seg) // 2)
    past = step(prefill_feed(seg[: len(seg) - d], empty_past(manifest)))
    for t in range(len(seg) - d, len(seg)):
        past = step(prefill_feed(seg[t:t + 1], past))


def collect_stats(model: onnx.ModelProto | Path, manifest: Manifest, segments: np.ndarray, *,
                  row_tensors: Iterable[str], amax_tensors: Iterable[str] = (),
                  decode_steps: int = 8, max_rows: int = 2048) -> dict[str, TensorStats]:
    """Statistics of ``row_tensors`` (per-channel + rows) and ``amax_tensors`` (amax only).

    ``model``: an in-memory graph, or a model file with external data (a bundle's fp32 graph):
    then only its graph is loaded, the extra outputs added, and a temp copy of that graph
    beside the file runs on the file's own weights (no proto of the weights in memory, no
    temp copy of them: Qwen2.5-1.5B's are 7 GB)."""
    row_tensors, amax_tensors = list(row_tensors), list(amax_tensors)
    if isinstance(model, Path):
        graph = onnx.load(str(model), load_external_data=False)
        tmp = temp_file(model.parent, "calibrate")
        try:
            _with_outputs(graph, [*row_tensors, *amax_tensors])
            tmp.write_bytes(graph.SerializeToString())
            return _collect(tmp, manifest, segments, row_tensors=row_tensors,
                            amax_tensors=amax_tensors, decode_steps=decode_steps,
                            max_rows=max_rows)
        finally:
            tmp.unlink(missing_ok=True)
    have = len(model.graph.output)
    _with_outputs(model, [*row_tensors, *amax_tensors])
    try:
        return _collect(model, manifest, segments, row_tensors=row_tensors,
                        amax_tensors=amax_tensors, decode_steps=decode_steps, max_rows=max_rows)
    finally:
        del model.graph.output[have:]


def _with_outputs(model: onnx.ModelProto, tensors: list[str]) -> None:
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in dict.fromkeys(tensors) if t not in have)


def _collect(model: onnx.ModelProto | Path, manifest: Manifest, segments: np.ndarray, *,
             row_tensors: Iterable[str], amax_tensors: Iterable[str], decode_steps: int,
             max_rows: int) -> dict[str, TensorStats]:
    rows_set = list(dict.fromkeys(row_tensors))
    wanted = list(dict.fromkeys([*rows_set, *amax_tensors]))
    rng = np.random.default_rng(0)
    stats = {t: TensorStats(max_rows=max_rows, rng=rng) for t in wanted}
    keep = set(rows_set)
    with ort_session(model) as sess:
        names = [o.name for o in sess.get_outputs()]  # type: ignore[attr-defined]
        n_steps = 0

        def run(feed: Feed) -> Feed:
            nonlocal n_steps
            outs = sess.run(names, feed)  # type: ignore[attr-defined]
            for n, o in zip(names, outs, strict=True):
                if n in stats:
                    stats[n].update(o, n in keep)
            n_steps += 1
            return past_from_outputs(names, outs)

        for i, seg in enumerate(segments):
            run_segment(seg, manifest, decode_steps, run)
            print(f"[calibrate] segment {i + 1}/{len(segments)} ({n_steps} steps)",
                  file=sys.stderr, flush=True)
    for s in stats.values():
        s.finish()
    return stats
