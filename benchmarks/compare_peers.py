"""Development script: our runtime vs onnxruntime-genai vs the PyTorch original, one run.

    python benchmarks/compare_peers.py [--bundle build/smollm2] [--genai fp32,int4] \
        [--prompt-len 128 --gen-len 128 --runs 3 --threads 2] [--json]
    python benchmarks/compare_peers.py --rss --variants fp32,int8,int4 --genai fp32,int8,int4

``--rss``: peak RSS of each engine in a fresh process of its own (a process's high-water mark
cannot be split between engines sharing it), rounds interleaved, medians, tok/s beside it.

Same model weights, same prompt token ids, greedy, batch 1. Engines are measured *interleaved*
(round r runs every engine once) and reported as medians over the measured rounds after one
warm-up round: this machine is shared and noisy (±25% between runs), so only same-run ratios
mean anything. onnxruntime-genai models come from its own model builder run on a Hugging Face
folder written from our source (DESIGN.md §9: a fresh LlamaForCausalLM holding the weights).

Counting: prefill tok/s = prompt tokens / time of the prompt forward; decode tok/s =
(gen_len - 1) / time of the (gen_len - 1) single-token steps that follow (sampling included).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Timing = tuple[float, float]  # (prefill tok/s, decode tok/s)


def log(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


# ---- model preparation ---------------------------------------------------------------------
def ensure_bundle(path: Path, source: str | None) -> Path:
    if (path / "manifest.json").is_file():
        return path
    from llama_export.exporter.export import ExportOptions, export_bundle

    log(f"exporting {source or 'built-in SmolLM2'} to {path}")
    return export_bundle(source, path, ExportOptions(force=True))


def ensure_hf_folder(out: Path, source: str | None, bundle: Path) -> Path:
    """A plain HF folder (safetensors + tokenizer) holding exactly the bundle's weights."""
    if (out / "config.json").is_file():
        return out
    import transformers

    from llama_export.exporter.reference import load_reference

    log(f"writing a Hugging Face folder for onnxruntime-genai's builder to {out}")
    ref = load_reference(source)
    cfg = ref.config.to_dict()
    cfg.pop("quantization_config", None)  # set by GGUF loading; the builder refuses it
    fresh = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    fresh.load_state_dict(ref.state_dict())
    fresh.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bundle / name, out / name)
    return out


def ensure_genai_model(hf: Path, out: Path, precision: str, threads: int) -> Path:
    if not (out / "genai_config.json").is_file():
        log(f"building onnxruntime-genai {precision} model in {out} (its model builder)")
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf),
                        "-o", str(out), "-p", precision, "-e", "cpu"], check=True)
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


# ---- runners: each returns one (prefill, decode) timing per call ----------------------------
def ours_runner(bundle: Path, variant: str, prompt: list[int], gen_len: int, threads: int,
                spin: bool = True) -> Callable[[], Timing]:
    from llama_export.runtime import load_bundle

    model = load_bundle(bundle, variant=variant, threads=threads, verify=False, spin=spin)

    def run() -> Timing:
        gen = model.start([prompt], max_new_tokens=gen_len, eos_token_ids=())
        for _ in gen:
            pass
        s = gen.stats
        return s.prompt_tokens / s.prefill_seconds, s.decode_steps / s.decode_seconds

    return run


def genai_runner(model_dir: Path, prompt: list[int], gen_len: int) -> Callable[[], Timing]:
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))

    def run() -> Timing:
        params = og.GeneratorParams(model)
        total = len(prompt) + gen_len
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt)
        t1 = time.perf_counter()
        for _ in range(gen_len - 1):
            gen.generate_next_token()
        t2 = time.perf_counter()
        return len(prompt) / (t1 - t0), (gen_len - 1) / (t2 - t1)

    return run


def torch_runner(source: str | None, prompt: list[int], gen_len: int,
                 threads: int) -> Callable[[], Timing]:
    import torch

    from llama_export.exporter.hf_compat import forward_cached, new_cache
    from llama_export.exporter.reference import load_reference

    torch.set_num_threads(threads)
    ref = load_reference(source)
    ids = torch.tensor([prompt])

    def run() -> Timing:
        with torch.inference_mode():
            cache = new_cache(ref)
            t0 = time.perf_counter()
            tok = forward_cached(ref, ids, cache)[:, -1].argmax(-1, keepdim=True)
            t1 = time.perf_counter()
            for _ in range(gen_len - 1):
                tok = forward_cached(ref, tok, cache)[:, -1].argmax(-1, keepdim=True)
            t2 = time.perf_counter()
        return len(prompt) / (t1 - t0), (gen_len - 1) / (t2 - t1)

    return run


# ---- peak RSS: one fresh process per engine and round ---------------------------------------
def child_run(engine: str, a: argparse.Namespace) -> None:
    """``--child ours:int8`` / ``genai:int4``: load, generate once, print JSON (peak RSS, tok/s).

    Peak RSS is a process's high-water mark, so each engine is measured in its own process:
    what a user running that one model would see (weights, session, KV cache, tokenizer).
    """
    import resource

    from llama_export.runtime import load_bundle
    from llama_export.runtime.bench import synthetic_prompt

    kind, precision = engine.split(":")
    with load_bundle(a.bundle, verify=False) as m:
        prompt = synthetic_prompt(m, a.prompt_len)
    if kind == "ours":
        run = ours_runner(a.bundle, precision, prompt, a.gen_len, a.threads)
    else:
        run = genai_runner(a.work / f"genai-{precision}", prompt, a.gen_len)
    pre, dec = run()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": rss, "prefill_tok_s": pre, "decode_tok_s": dec}))


def rss_table(engines: list[str], a: argparse.Namespace) -> str:
    """Interleaved rounds of one child process per engine; medians."""
    rows: dict[str, list[dict[str, float]]] = {e: [] for e in engines}
    base = [sys.executable, __file__, "--bundle", str(a.bundle), "--work", str(a.work),
            "--prompt-len", str(a.prompt_len), "--gen-len", str(a.gen_len),
            "--threads", str(a.threads)]
    for r in range(a.runs):
        for e in engines:
            out = subprocess.run([*base, "--child", e], check=True, capture_output=True,
                                 text=True).stdout
            rows[e].append(json.loads(out.strip().splitlines()[-1]))
            log(f"round {r + 1}/{a.runs} {e:12s} peak RSS {rows[e][-1]['peak_rss_mb']:7.0f} MB"
                f"  decode {rows[e][-1]['decode_tok_s']:6.1f} tok/s")
    lines = [f"{'engine':14s} {'peak RSS MB':>12s} {'decode tok/s':>13s}"]
    for e, rs in rows.items():
        lines.append(f"{e:14s} {statistics.median(x['peak_rss_mb'] for x in rs):12.0f} "
                     f"{statistics.median(x['decode_tok_s'] for x in rs):13.1f}")
    return "\n".join(lines)


# ---- measurement ---------------------------------------------------------------------------
def interleave(runners: dict[str, Callable[[], Timing]], runs: int) -> dict[str, list[Timing]]:
    results: dict[str, list[Timing]] = {name: [] for name in runners}
    for r in range(runs + 1):
        for name, run in runners.items():
            pre, dec = run()
            label = "warm-up" if r == 0 else f"round {r}/{runs}"
            log(f"{label} {name:12s} prefill {pre:8.1f} tok/s  decode {dec:6.1f} tok/s")
            if r:
                results[name].append((pre, dec))
    return results


def table(results: dict[str, list[Timing]]) -> tuple[str, dict[str, Any]]:
    med = {n: (statistics.median(p for p, _ in t), statistics.median(d for _, d in t))
           for n, t in results.items()}
    ours_pre, ours_dec = med[next(iter(med))]
    lines = [f"{'engine':14s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'ms/token':>9s} "
             f"{'ours/x prefill':>15s} {'ours/x decode':>14s}"]
    for name, (pre, dec) in med.items():
        lines.append(f"{name:14s} {pre:14.1f} {dec:13.1f} {1000 / dec:9.2f} "
                     f"{ours_pre / pre:14.2f}x {ours_dec / dec:13.2f}x")
    data = {n: {"prefill_tok_s": p, "decode_tok_s": d, "runs": results[n]}
            for n, (p, d) in med.items()}
    return "\n".join(lines), data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("build/smollm2"))
    ap.add_argument("--source", default=None, help="HF folder or .gguf (default: built-in)")
    ap.add_argument("--work", type=Path, default=Path("build/peers"))
    ap.add_argument("--variants", default="fp32", help="our bundle variants, comma-separated")
    ap.add_argument("--genai", default="fp32", help="genai precisions (fp32,int4), '' = none")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--with-no-spin", action="store_true",
                    help="also run ours without spinning ORT threads (better on a busy machine)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rss", action="store_true",
                    help="peak RSS per engine instead: one process per engine and round")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child_run(a.child, a)
        return

    from llama_export.runtime import load_bundle
    from llama_export.runtime.bench import synthetic_prompt

    bundle = ensure_bundle(a.bundle, a.source)
    with load_bundle(bundle, verify=False) as m:
        prompt = synthetic_prompt(m, a.prompt_len)
    runners: dict[str, Callable[[], Timing]] = {}
    for v in filter(None, [] if a.rss else a.variants.split(",")):
        runners[f"ours-{v}"] = ours_runner(bundle, v, prompt, a.gen_len, a.threads)
        if a.with_no_spin:
            runners[f"ours-{v}-nospin"] = ours_runner(bundle, v, prompt, a.gen_len, a.threads,
                                                      spin=False)
    precisions = [p for p in a.genai.split(",") if p]
    if precisions:
        hf = ensure_hf_folder(a.work / "hf", a.source, bundle)
        for p in precisions:
            model_dir = ensure_genai_model(hf, a.work / f"genai-{p}", p, a.threads)
            if not a.rss:
                runners[f"genai-{p}"] = genai_runner(model_dir, prompt, a.gen_len)
    if a.rss:  # pairs ours-v / genai-v side by side
        variants = [v for v in a.variants.split(",") if v]
        engines: list[str] = []
        for v in dict.fromkeys([*variants, *precisions]):
            engines += [f"ours:{v}"] * (v in variants) + [f"genai:{v}"] * (v in precisions)
        print(rss_table(engines, a))
        return
    if not a.no_torch:
        runners["torch-eager"] = torch_runner(a.source, prompt, a.gen_len, a.threads)
    log(f"prompt {len(prompt)} tokens, {a.gen_len} new, {a.threads} threads, "
        f"{a.runs} measured rounds + 1 warm-up, interleaved")
    text, data = table(interleave(runners, a.runs))
    print(json.dumps(data, indent=2) if a.json else text)


if __name__ == "__main__":
    main()
