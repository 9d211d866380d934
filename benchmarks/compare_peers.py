"""Development script: our runtime vs onnxruntime-genai vs the PyTorch original, one run.

    python benchmarks/compare_peers.py [--model smollm2|qwen2.5-coder-0.5b|qwen2.5-coder-1.5b]
        [--variants fp32,int8,int4] [--genai fp32,int8,int4] [--no-torch] \
        [--prompt-len 128 --gen-len 128 --runs 3 --threads 2] [--json]

Same model weights, same prompt token ids, greedy, batch 1. Engines are measured *interleaved*
(round r runs every engine once) and reported as medians over the measured rounds after one
warm-up round: this machine is shared and noisy (±25% between runs), so only same-run ratios
mean anything. Each engine runs in its own worker process, so the peak RSS printed beside its
tok/s is its own (load included), each holding its tokenizer as an application does (ours
loads it with the bundle, genai's ``og.Tokenizer`` is created beside the model).
onnxruntime-genai models come from its own model builder run on a Hugging Face folder written
from our source (a fresh model holding the source's weights).
``--model`` picks the built-in SmolLM2 or a Qwen2.5-Coder GGUF from benchmarks/models.py; the
bundle (exported, verified, when missing) and the peers' folders live beside that model's cache.

Counting: prefill tok/s = prompt tokens / time of the prompt forward; decode tok/s =
(gen_len - 1) / time of the (gen_len - 1) single-token steps that follow (sampling included).
"""

from __future__ import annotations

import argparse
import json
import os
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
    # tail:16, as `make demo` and serving export: the prefill computes the logits of the last
    # 16 prompt positions (up to 15 speculative drafts verify in one forward); genai's graph
    # computes them for every prompt position (78 MB for 128 tokens at Qwen's 151,936 vocab).
    return export_bundle(source, path, ExportOptions(force=True, max_seq_len=2048,
                                                     logits="tail:16"))


def ensure_hf_folder(out: Path, source: str | None, bundle: Path) -> Path:
    """A plain HF folder (safetensors + tokenizer) holding exactly the bundle's weights."""
    if (out / "config.json").is_file():
        return out
    from llama_export.exporter.reference import reference_from_state_dict
    from llama_export.exporter.sources import load_source

    log(f"writing a Hugging Face folder for onnxruntime-genai's builder to {out}")
    src = load_source(source)
    ref = reference_from_state_dict(src.config, src.state_dict)  # shares the weights: one copy
    ref.config.architectures = [type(ref).__name__]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ref.save_pretrained(str(tmp))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bundle / name, tmp / name)
    os.replace(tmp, out)
    return out


def genai_folder(spec: str) -> str:
    """``int4`` -> ``genai-int4``; ``int4@128`` (its builder's ``int4_block_size``, default 32)
    -> ``genai-int4-b128``. Its int8 weights stay in blocks of 32 whatever that option says
    (onnxruntime-genai 0.18: ``int8@128`` built a graph of 141 MatMulNBits with block 32)."""
    precision, _, block = spec.partition("@")
    return f"genai-{precision}" + (f"-b{block}" if block else "")


def ensure_genai_model(hf: Path, out: Path, spec: str, threads: int) -> Path:
    precision, _, block = spec.partition("@")
    if not (out / "genai_config.json").is_file():
        log(f"building onnxruntime-genai {spec} model in {out} (its model builder)")
        extra = ["--extra_options", f"int4_block_size={block}"] if block else []
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf),
                        "-o", str(out), "-p", precision, "-e", "cpu", *extra], check=True)
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


# ---- runners: each returns one (prefill, decode) timing per call ----------------------------
def ours_runner(bundle: str, variant: str, prompt: list[int], gen_len: int, threads: int,
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


def genai_runner(model_dir: str, prompt: list[int], gen_len: int) -> Callable[[], Timing]:
    import onnxruntime_genai as og

    model = og.Model(model_dir)
    # Ours loads its tokenizer with the bundle; genai's is a separate object an application
    # always creates too: loaded here so both peak RSS figures hold a tokenizer (~20-30 MB).
    tokenizer = og.Tokenizer(model)

    def run() -> Timing:
        assert tokenizer is not None
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


RUNNERS: dict[str, Callable[..., Callable[[], Timing]]] = {
    "ours": ours_runner, "genai": genai_runner, "torch": torch_runner}


def peak_rss_mb() -> float:
    """This process's resident high-water mark (VmHWM), load included."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(spec: dict[str, Any]) -> None:
    """One engine per process: load, then one timed run per ``run`` line on stdin."""
    run = RUNNERS[spec["kind"]](*spec["args"])
    print(json.dumps({"ready": True, "rss_mb": peak_rss_mb()}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        pre, dec = run()
        print(json.dumps({"prefill": pre, "decode": dec, "rss_mb": peak_rss_mb()}), flush=True)


class Engine:
    """The parent's handle on a worker process."""

    def __init__(self, name: str, kind: str, *args: Any) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps({"kind": kind, "args": args})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.rss_mb = self._read()["rss_mb"]  # loads one engine at a time: no overlapping peaks
        log(f"{name:14s} loaded, peak RSS {self.rss_mb:7.0f} MB")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.name}: worker exited with {self.proc.wait()}")
        return dict(json.loads(line))

    def run(self) -> Timing:
        assert self.proc.stdin is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        r = self._read()
        self.rss_mb = max(self.rss_mb, r["rss_mb"])
        return r["prefill"], r["decode"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ---- measurement ---------------------------------------------------------------------------
def interleave(engines: list[Engine], runs: int) -> dict[str, list[Timing]]:
    results: dict[str, list[Timing]] = {e.name: [] for e in engines}
    for r in range(runs + 1):
        for e in engines:
            pre, dec = e.run()
            label = "warm-up" if r == 0 else f"round {r}/{runs}"
            log(f"{label} {e.name:14s} prefill {pre:8.1f} tok/s  decode {dec:6.1f} tok/s")
            if r:
                results[e.name].append((pre, dec))
    return results


def table(results: dict[str, list[Timing]], rss: dict[str, float]) -> tuple[str, dict[str, Any]]:
    med = {n: (statistics.median(p for p, _ in t), statistics.median(d for _, d in t))
           for n, t in results.items()}
    ours_pre, ours_dec = med[next(iter(med))]
    lines = [f"{'engine':14s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'ms/token':>9s} "
             f"{'peak RSS MB':>12s} {'ours/x prefill':>15s} {'ours/x decode':>14s}"]
    for name, (pre, dec) in med.items():
        lines.append(f"{name:14s} {pre:14.1f} {dec:13.1f} {1000 / dec:9.2f} {rss[name]:12.0f} "
                     f"{ours_pre / pre:14.2f}x {ours_dec / dec:13.2f}x")
    data = {n: {"prefill_tok_s": p, "decode_tok_s": d, "peak_rss_mb": rss[n], "runs": results[n]}
            for n, (p, d) in med.items()}
    return "\n".join(lines), data


def pairwise(results: dict[str, list[Timing]], rss: dict[str, float]) -> list[str]:
    """``ours-P`` against ``genai-P`` (the same precision, the same rounds): the median of the
    per-round decode ratios and each round's, prefill, and peak RSS; one line per pair."""
    lines = []
    for name, ours in results.items():
        peer = "genai-" + name.removeprefix("ours-")
        if not name.startswith("ours-") or peer not in results:
            continue
        theirs = results[peer]
        dec = [o[1] / t[1] for o, t in zip(ours, theirs, strict=True)]
        pre = [o[0] / t[0] for o, t in zip(ours, theirs, strict=True)]
        lines.append(f"{name} / {peer}: decode {statistics.median(dec):.3f}x (rounds "
                     f"{', '.join(f'{r:.2f}' for r in dec)}), prefill "
                     f"{statistics.median(pre):.2f}x, peak RSS {rss[name]:.0f} / {rss[peer]:.0f} MB")
    return lines


def model_paths(model: str, bundle: Path | None, work: Path | None) -> tuple[str | None, Path, Path]:
    """``(source, bundle, work)`` for ``--model``: the built-in SmolLM2 or a models.py GGUF."""
    if model == "smollm2":
        return None, bundle or Path("build/smollm2"), work or Path("build/peers")
    sys.path.insert(0, str(Path(__file__).parent))  # models.py is a sibling script, not a package
    import models

    gguf = models.ensure_model(model)
    root = models.cache_dir()
    return str(gguf), bundle or root / "bundles" / model, work or root / "peers" / model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2",
                    help="smollm2 (built-in), qwen2.5-coder-0.5b or qwen2.5-coder-1.5b")
    ap.add_argument("--bundle", type=Path, default=None, help="our bundle (default per --model)")
    ap.add_argument("--work", type=Path, default=None, help="HF folder + genai models go here")
    ap.add_argument("--variants", default="fp32", help="our bundle variants, comma-separated")
    ap.add_argument("--genai", default="fp32",
                    help="genai precisions (fp32,int8,int4; int4@128: blocks of 128), '' = none")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--with-no-spin", action="store_true",
                    help="also run ours without spinning ORT threads (better on a busy machine)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(json.loads(a.worker))
        return

    from llama_export.runtime import load_bundle
    from llama_export.runtime.bench import synthetic_prompt

    source, bundle_path, work = model_paths(a.model, a.bundle, a.work)
    bundle = ensure_bundle(bundle_path, source)
    with load_bundle(bundle, verify=False) as m:
        prompt = synthetic_prompt(m, a.prompt_len)
    precisions = [p for p in a.genai.split(",") if p]
    hf = ensure_hf_folder(work / "hf", source, bundle) if precisions else None
    specs: list[tuple[str, str, tuple[Any, ...]]] = []
    for v in filter(None, a.variants.split(",")):
        specs.append((f"ours-{v}", "ours", (str(bundle), v, prompt, a.gen_len, a.threads)))
        if a.with_no_spin:
            specs.append((f"ours-{v}-nospin", "ours",
                          (str(bundle), v, prompt, a.gen_len, a.threads, False)))
    for p in precisions:
        assert hf is not None
        model_dir = ensure_genai_model(hf, work / genai_folder(p), p, a.threads)
        specs.append((f"genai-{p}", "genai", (str(model_dir), prompt, a.gen_len)))
    if not a.no_torch:  # the safetensors folder when there is one: no GGUF dequantization peak
        specs.append(("torch-eager", "torch", (str(hf) if hf else source, prompt, a.gen_len,
                                               a.threads)))
    engines: list[Engine] = []
    try:
        for name, kind, args in specs:
            engines.append(Engine(name, kind, *args))
        log(f"prompt {len(prompt)} tokens, {a.gen_len} new, {a.threads} threads, "
            f"{a.runs} measured rounds + 1 warm-up, interleaved, one process per engine")
        results = interleave(engines, a.runs)
        rss = {e.name: e.rss_mb for e in engines}
        text, data = table(results, rss)
        text = "\n".join([text, *pairwise(results, rss)])
    finally:
        for e in engines:
            e.close()
    print(json.dumps(data, indent=2) if a.json else text)


if __name__ == "__main__":
    main()
