"""Development script: what one speculative verification costs against one decode step.

    python benchmarks/verify_cost.py [--bundle build/smollm2] [--variants fp32,int8,int4] \
        [--tokens 1,2,3,5,9] [--past 256] [--runs 30] [--threads 2]

Speculative decoding pays off when a forward of ``T`` new tokens over the KV cache (the last
token plus ``T - 1`` drafts) costs little more than a forward of one. For each variant this
times ``forward_tail(T)`` over a ``--past``-token cache (rolled back after each call, so every
call sees the same cache), interleaving the ``T`` values run by run, and prints the median
milliseconds and the ratio to ``T = 1``. With ``c(T)`` that ratio and ``a`` drafts accepted per
verification on average, speculation's best speed-up is ``(a + 1) / c(T)``: e.g. 2x needs
``a + 1 >= 2 c(T)``. Peak RSS of the process is printed at the end (all variants loaded one
after another).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from llama_export.runtime import load_bundle
from llama_export.runtime.bench import peak_rss_mb


def measure(bundle: Path, variant: str, tokens: list[int], past: int, runs: int,
            threads: int) -> dict[int, float]:
    times: dict[int, list[float]] = {t: [] for t in tokens}
    with load_bundle(bundle, variant=variant, threads=threads, verify=False) as model:
        be = model.backend
        cache = be.new_cache(1, past + max(tokens) + 1)
        rng = np.random.default_rng(0)
        prompt = rng.integers(100, 20000, size=(1, past))
        be.forward(prompt, np.arange(past)[None, :], None, cache)
        for r in range(runs + 2):  # two warm-up rounds
            for t in tokens:
                ids = rng.integers(100, 20000, size=(1, t))
                pos = np.arange(past, past + t)[None, :]
                t0 = time.perf_counter()
                be.forward_tail(ids, pos, None, cache, t)
                dt = time.perf_counter() - t0
                be.truncate(cache, past)
                if r >= 2:
                    times[t].append(dt)
            print(f"[verify-cost] {variant}: round {r + 1}/{runs + 2}", file=sys.stderr,
                  end="\r", flush=True)
    print(file=sys.stderr)
    return {t: statistics.median(v) * 1000 for t, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("build/smollm2"))
    ap.add_argument("--variants", default="fp32,int8,int4")
    ap.add_argument("--tokens", default="1,2,3,5,9")
    ap.add_argument("--past", type=int, default=256)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    tokens = sorted({int(t) for t in a.tokens.split(",")} | {1})
    print(f"{'variant':8s} " + " ".join(f"{'T=' + str(t):>14s}" for t in tokens))
    for v in a.variants.split(","):
        ms = measure(a.bundle, v, tokens, a.past, a.runs, a.threads)
        print(f"{v:8s} " + " ".join(f"{ms[t]:7.2f} ms {ms[t] / ms[1]:4.2f}x" for t in tokens),
              flush=True)
    print(f"peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
