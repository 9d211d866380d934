"""Speed measurement behind ``llama-export bench`` (figures, never assertions).

Tokens/s exclude a warm-up run (llama2.c). Decode time is wall time per step including the
loop's own work (sampling, detokenizing); "outside" is the share of that time not spent inside
the engine call. The optional PyTorch baseline runs the transformers original on the same
weights in the same process, interleaved with ours (see :func:`measure`). Peak RSS is the
process's high-water mark after each engine's first run: ours is measured before torch loads; the
torch row includes our session's memory.
"""

from __future__ import annotations

import importlib
import importlib.util
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from llama_export.runtime.bundle import Model
from llama_export.runtime.errors import InputError, MissingDependencyError
from llama_export.runtime.generate import GenerationStats
from llama_export.runtime.speculative import SpeculativeOptions

Progress = Callable[[str], None]

_FILLER = ("The history of the Roman Empire spans many centuries, from the founding of the city "
           "to the fall of Constantinople, and its law, roads and language shaped Europe. ")


@dataclass(frozen=True)
class BenchOptions:
    prompt_len: int = 128
    gen_len: int = 128
    batch: int = 1
    runs: int = 3

    def __post_init__(self) -> None:
        for name in ("prompt_len", "gen_len", "batch", "runs"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1: pass a positive value")
        if self.gen_len < 2:
            raise InputError("--gen-len must be >= 2 (one prefill token + decode steps)")


@dataclass
class BenchResult:
    name: str
    prefill_tok_s: float
    decode_tok_s: float
    ms_per_token: float
    outside_share: float | None  # None when the engine call is not separately timed
    peak_rss_mb: float
    runs: list[dict[str, float]] = field(default_factory=list)
    acceptance_rate: float | None = None  # speculative decoding: drafts the target kept
    tokens_per_forward: float | None = None  # decode tokens per target forward

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def stderr_progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux (bytes on macOS; we report Linux semantics).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_prompt(model: Model, length: int) -> list[int]:
    """Exactly ``length`` token ids of ordinary English text."""
    ctx = model.manifest.max_context
    if length >= ctx:
        raise InputError(f"--prompt-len {length} does not fit the bundle's context {ctx}: "
                         "use a smaller --prompt-len")
    ids: list[int] = []
    while len(ids) < length:
        ids += model.tokenizer.encode(_FILLER, add_special_tokens=False)
    return ids[:length]


def ours_label(model: Model) -> str:
    """``ours:ort`` / ``ours:standard`` (which graph ONNX Runtime runs), ``ours`` otherwise."""
    graph = getattr(model.backend, "graph", None)
    return f"ours:{graph}" if graph else "ours"


Runner = Callable[[], dict[str, float]]  # one run → {"prefill_tok_s", "decode_tok_s", ...}


def generation_figures(stats: GenerationStats, batch: int = 1) -> dict[str, float]:
    """One run's figures from its stats (speculation adds acceptance and tokens/forward)."""
    out = {"prefill_tok_s": stats.prompt_tokens / stats.prefill_seconds,
           "decode_tok_s": batch * stats.decode_tokens / stats.decode_seconds,
           "outside_share": 1.0 - stats.decode_engine_seconds / stats.decode_seconds}
    if stats.acceptance_rate is not None:
        out["acceptance_rate"] = stats.acceptance_rate
    if stats.tokens_per_forward is not None and stats.drafted_tokens:
        out["tokens_per_forward"] = stats.tokens_per_forward
    return out


def ours_runner(model: Model, opts: BenchOptions,
                speculative: SpeculativeOptions | None = None) -> Runner:
    """Greedy generation of exactly ``gen_len`` tokens (EOS ignored) per call."""
    prompt = [synthetic_prompt(model, opts.prompt_len)] * opts.batch
    if opts.prompt_len + opts.gen_len > model.manifest.max_context:
        raise InputError(f"--prompt-len + --gen-len exceeds the bundle's context "
                         f"{model.manifest.max_context}: lower one of them")

    def run() -> dict[str, float]:
        gen = model.start(prompt, max_new_tokens=opts.gen_len, eos_token_ids=(),
                          speculative=speculative)
        for _ in gen:
            pass
        return generation_figures(gen.stats, opts.batch)

    return run


def reference_source(model: Model) -> str | None:
    """The export source recorded in the manifest (None = the built-in SmolLM2)."""
    src = str(model.manifest.data.get("provenance", {}).get("source", ""))
    if src.startswith("builtin:"):
        return None
    if not src:
        raise InputError("the manifest records no export source: pass --source for the baseline")
    return src


def torch_runner(source: str | None, prompt: Sequence[int], opts: BenchOptions,
                 threads: int | None, progress: Progress = stderr_progress) -> Runner:
    """The PyTorch original (transformers, eager, fp32), same prompt, greedy, manual KV loop.

    The only place the runtime package touches torch, and only when ``--baseline torch`` is
    asked for: modules are looked up by name at call time (like ``cli.py``), so importing the
    runtime never imports torch or the exporter. The model loads on the first call, so the
    runs before it (ours) see a torch-free process (peak RSS).
    """
    if any(importlib.util.find_spec(m) is None for m in ("torch", "transformers")):
        raise MissingDependencyError("--baseline torch", "export")  # fail before measuring
    loaded: list[Any] = []

    def run() -> dict[str, float]:
        if not loaded:  # even `import torch` costs ~300 MB RSS: only after ours has run
            progress("loading the PyTorch original (transformers)")
            loaded.append(importlib.import_module("torch"))
            if threads:
                loaded[0].set_num_threads(threads)
            reference = importlib.import_module("llama_export.exporter.reference")
            loaded.append(reference.load_reference(source))
        torch, ref = loaded
        ids = torch.tensor([list(prompt)] * opts.batch, dtype=torch.long)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = ref(input_ids=ids, use_cache=True)
            t1 = time.perf_counter()
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(opts.gen_len - 1):
                out = ref(input_ids=tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t2 = time.perf_counter()
        return {"prefill_tok_s": ids.numel() / (t1 - t0),
                "decode_tok_s": opts.batch * (opts.gen_len - 1) / (t2 - t1)}

    return run


def measure(runners: dict[str, Runner], runs: int,
            progress: Progress = stderr_progress) -> list[BenchResult]:
    """Interleaved rounds (round r runs every engine once), round 0 a warm-up; medians.

    Interleaving is what makes same-run ratios meaningful on a shared, noisy machine.
    """
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    rss: dict[str, float] = {}
    for r in range(runs + 1):
        for name, run in runners.items():
            res = run()
            rss.setdefault(name, peak_rss_mb())  # after its first run: before later engines load
            outside = f", outside engine {res['outside_share']:.1%}" if "outside_share" in res else ""
            if "acceptance_rate" in res:
                outside += (f", acceptance {res['acceptance_rate']:.0%}, "
                            f"{res.get('tokens_per_forward', 1.0):.2f} tokens/forward")
            progress(f"{name} {'warm-up' if r == 0 else f'run {r}/{runs}'}: prefill "
                     f"{res['prefill_tok_s']:.1f} tok/s, decode {res['decode_tok_s']:.1f} tok/s"
                     f"{outside}")
            if r:
                samples[name].append(res)
    out = []
    for name, rows in samples.items():
        med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
        out.append(BenchResult(name, med["prefill_tok_s"], med["decode_tok_s"],
                               1000.0 / med["decode_tok_s"], med.get("outside_share"), rss[name],
                               rows, med.get("acceptance_rate"), med.get("tokens_per_forward")))
    return out


def format_table(results: Sequence[BenchResult],
                 ratios: Sequence[tuple[str, str]] | None = None) -> str:
    """Plain-text table, then ``a / b`` speed ratios for each pair of names in ``ratios``
    (default: the first row against each other row)."""
    base = results[0]
    lines = [f"{'':22s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'ms/token':>9s} "
             f"{'outside':>8s} {'accept':>7s} {'tok/fwd':>8s} {'peak RSS MB':>12s}"]
    for r in results:
        outside = f"{r.outside_share:.1%}" if r.outside_share is not None else "-"
        accept = f"{r.acceptance_rate:.0%}" if r.acceptance_rate is not None else "-"
        per_fwd = f"{r.tokens_per_forward:.2f}" if r.tokens_per_forward is not None else "-"
        lines.append(f"{r.name:22s} {r.prefill_tok_s:14.1f} {r.decode_tok_s:13.1f} "
                     f"{r.ms_per_token:9.2f} {outside:>8s} {accept:>7s} {per_fwd:>8s} "
                     f"{r.peak_rss_mb:12.0f}")
    by_name = {r.name: r for r in results}
    for a, b in ratios if ratios is not None else [(base.name, r.name) for r in results[1:]]:
        x, y = by_name[a], by_name[b]
        lines.append(f"{a} / {b}: prefill {x.prefill_tok_s / y.prefill_tok_s:.2f}x, "
                     f"decode {x.decode_tok_s / y.decode_tok_s:.2f}x")
    return "\n".join(lines)
