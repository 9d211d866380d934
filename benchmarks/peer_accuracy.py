"""Development script: a peer's ONNX graph scored by our held-out evaluator.

    python benchmarks/peer_accuracy.py BUNDLE PEER_MODEL.onnx [PEER_MODEL.onnx ...]

The same held-out segments (4 built-in genres), the same fp32 reference (BUNDLE's fp32 graph
under ONNX Runtime) and the same figures (perplexity change, top-1 agreement, mean KL) that
gate our quantized variants, computed for another engine's graph of the same weights, e.g.
onnxruntime-genai's ``model.onnx`` from compare_peers.py. The peer's graph must take Optimum's
IO names (``input_ids``, ``attention_mask``, ``past_key_values.N.key/value``; what genai
writes); inputs it lacks (genai's graph has no ``position_ids``) are left out of its feed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llama_export.calibration import accuracy
from llama_export.calibration.bundle_io import fp32_source
from llama_export.calibration.pipeline import EvalOptions, Evaluator, eval_segments
from llama_export.runtime.tokenizer import Tokenizer


class _FeedFilter:
    """An ONNX Runtime session that ignores feed entries its graph has no input for."""

    def __init__(self, sess: Any) -> None:
        self.sess = sess
        self.names = {i.name for i in sess.get_inputs()}

    def get_outputs(self) -> Any:
        return self.sess.get_outputs()

    def run(self, outputs: Any, feed: dict[str, Any]) -> Any:
        return self.sess.run(outputs, {k: v for k, v in feed.items() if k in self.names})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("peer", type=Path, nargs="+")
    a = ap.parse_args()
    manifest, fp32_file = fp32_source(a.bundle)
    held, _ = eval_segments(Tokenizer.from_bundle(a.bundle, manifest.tokenizer), EvalOptions(),
                            None)
    print(f"[peer-accuracy] fp32 reference logits from {fp32_file}", file=sys.stderr, flush=True)
    ev = Evaluator(manifest, held).start(fp32_file)
    real = accuracy.ort_session

    @contextmanager
    def filtered(model: Any, threads: int = 0) -> Iterator[object]:
        with real(model, threads) as sess:
            yield _FeedFilter(sess)

    accuracy.ort_session = filtered  # type: ignore[assignment]
    for peer in a.peer:
        print(f"{peer}: {ev.score(peer).line()}", flush=True)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
