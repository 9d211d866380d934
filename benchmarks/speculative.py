"""Development script: speculative decoding vs plain greedy vs onnxruntime-genai, one run.

    python benchmarks/speculative.py [--bundle build/smollm2] [--variant int8] [--genai int8] \
        [--draft BUNDLE@VARIANT] [--gen-len 384] [--runs 3] [--threads 2] [--json]

The built-in task prompts (``runtime/data/bench_tasks.json``: grounded code/document tasks and
open-ended chat), chat-rendered with the bundle's template, greedy, batch 1, each answer up to
``--gen-len`` tokens or EOS. Engines, measured *interleaved* (round r runs every engine once;
round 0 is a warm-up), medians over the measured rounds:

* ``plain``  our runtime, plain greedy decoding;
* ``lookup`` our runtime, prompt-lookup speculation (``--speculative lookup``);
* ``draft``  our runtime, draft-model speculation (``--draft``, skipped when not given);
* ``genai`` / ``genai-ngram``: onnxruntime-genai at the same precision (its own model builder on
  the same weights, see compare_peers.py), plain greedy and with its n-gram speculation (0.18 has
  one: ``speculative.ngram_size``; the issue predates it), adaptive k on.

Decode tok/s = tokens after the first / time after the prompt's forward, summed over a
category's prompts. Peak RSS is the process high-water mark after each engine's first run
(cumulative: engines share one process).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compare_peers import ensure_genai_model, ensure_hf_folder, log

from llama_export.runtime import load_bundle
from llama_export.runtime.bench import peak_rss_mb
from llama_export.runtime.spec_bench import CATEGORIES, Task, builtin_tasks, tasks_runner
from llama_export.runtime.speculative import SpeculativeOptions

Figures = dict[str, float]


def genai_runner(model_dir: Path, tasks: list[Task], gen_len: int,
                 ngram: int) -> Callable[[], Figures]:
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))

    def run() -> Figures:
        tokens = 0
        seconds = 0.0
        for task in tasks:
            params = og.GeneratorParams(model)
            params.set_search_options(do_sample=False, max_length=len(task.ids) + gen_len)
            if ngram:
                params.set_speculative_options(ngram_size=ngram, max_draft_tokens=8,
                                               min_adaptive_k=1)
            gen = og.Generator(model, params)
            gen.append_tokens(task.ids)  # the prompt's forward and the first token
            t0 = time.perf_counter()
            start = len(gen.get_sequence(0))
            while not gen.is_done():
                gen.generate_next_token()
            seconds += time.perf_counter() - t0
            tokens += len(gen.get_sequence(0)) - start
        return {"decode_tok_s": tokens / seconds}

    return run


def interleave(runners: dict[str, Callable[[], Figures]], runs: int) -> dict[str, Any]:
    samples: dict[str, list[Figures]] = {n: [] for n in runners}
    rss: dict[str, float] = {}
    for r in range(runs + 1):
        for name, run in runners.items():
            res = run()
            rss.setdefault(name, peak_rss_mb())
            extra = "".join(f" {k} {v:.2f}" for k, v in res.items() if k != "decode_tok_s")
            log(f"{'warm-up' if r == 0 else f'round {r}/{runs}'} {name:22s} decode "
                f"{res['decode_tok_s']:7.1f} tok/s{extra}")
            if r:
                samples[name].append(res)
    return {n: {**{k: statistics.median(s[k] for s in rows) for k in rows[0]},
                "peak_rss_mb": rss[n], "runs": rows} for n, rows in samples.items()}


def table(results: dict[str, Any]) -> str:
    lines = [f"{'engine':26s} {'decode tok/s':>13s} {'accept':>7s} {'tok/fwd':>8s} "
             f"{'peak RSS MB':>12s}"]
    for name, r in results.items():
        acc = f"{r['acceptance_rate']:.0%}" if "acceptance_rate" in r else "-"
        per = f"{r['tokens_per_forward']:.2f}" if "tokens_per_forward" in r else "-"
        lines.append(f"{name:26s} {r['decode_tok_s']:13.1f} {acc:>7s} {per:>8s} "
                     f"{r['peak_rss_mb']:12.0f}")
    for cat in CATEGORIES:
        base = results.get(f"{cat}:plain")
        for name, r in results.items():
            if base and name.startswith(f"{cat}:") and name != f"{cat}:plain":
                lines.append(f"{name} / {cat}:plain: {r['decode_tok_s'] / base['decode_tok_s']:.2f}x")
        for peer in ("genai", "genai-ngram"):
            spec, other = results.get(f"{cat}:lookup"), results.get(f"{cat}:{peer}")
            if spec and other:
                lines.append(f"{cat}:lookup / {cat}:{peer}: "
                             f"{spec['decode_tok_s'] / other['decode_tok_s']:.2f}x")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("build/smollm2"))
    ap.add_argument("--source", default=None, help="HF folder or .gguf (default: built-in)")
    ap.add_argument("--variant", default="int8")
    ap.add_argument("--genai", default="int8", help="genai precision, '' = none")
    ap.add_argument("--draft", default=None, help="draft bundle for draft-model speculation")
    ap.add_argument("--categories", default=",".join(CATEGORIES))
    ap.add_argument("--work", type=Path, default=Path("build/peers"))
    ap.add_argument("--gen-len", type=int, default=384)
    ap.add_argument("--draft-tokens", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    model = load_bundle(a.bundle, variant=a.variant, threads=a.threads, verify=False)
    lookup = SpeculativeOptions(max_draft_tokens=a.draft_tokens)
    draft = SpeculativeOptions.parse(f"draft:{a.draft}", a.draft_tokens) if a.draft else None
    genai_dir = None
    if a.genai:
        hf = ensure_hf_folder(a.work / "hf", a.source, a.bundle)
        genai_dir = ensure_genai_model(hf, a.work / f"genai-{a.genai}", a.genai, a.threads)
    runners: dict[str, Callable[[], Figures]] = {}
    for cat in a.categories.split(","):
        tasks = builtin_tasks(model, [cat], a.gen_len)
        runners[f"{cat}:plain"] = tasks_runner(model, tasks, a.gen_len)
        runners[f"{cat}:lookup"] = tasks_runner(model, tasks, a.gen_len, lookup)
        if draft is not None:
            runners[f"{cat}:draft"] = tasks_runner(model, tasks, a.gen_len, draft)
        if genai_dir is not None:
            runners[f"{cat}:genai"] = genai_runner(genai_dir, tasks, a.gen_len, 0)
            runners[f"{cat}:genai-ngram"] = genai_runner(genai_dir, tasks, a.gen_len, 3)
    log(f"{a.variant}, {a.threads} threads, {a.runs} measured rounds + 1 warm-up, interleaved")
    results = interleave(runners, a.runs)
    learned = model.verify_cost.measured_steps()
    if a.json:
        print(json.dumps({**results, "verify_cost_steps": learned}, indent=2))
    else:
        print(table(results))
        print("verification cost learned (plain steps): "
              + ", ".join(f"T={t} {v:.2f}" for t, v in learned.items()))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
