"""``llama-export generate`` and ``llama-export bench`` (parse → one library call → print)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from typing import Any

import click

from llama_export.runtime.errors import InputError

_PROVIDERS = click.Choice(["cpu", "cuda", "tensorrt"])
_BACKENDS = click.Choice(["ort", "trt"])
_BACKEND_HELP = "ort: ONNX Runtime (--provider picks its device); trt: built TensorRT engines."


def _load(bundle: str, variant: str | None, backend: str, provider: str, threads: int | None,
          spin: bool, graph: str = "auto") -> Any:
    from llama_export.runtime.bundle import load_bundle

    return load_bundle(bundle, variant=variant, backend=backend, provider=provider,
                       threads=threads, spin=spin, graph=graph)


_GRAPH_HELP = ("ONNX Runtime graph: auto = the ONNX-Runtime-optimized graph on CPU when the "
               "variant has one, else the standard graph.")


_SPEC_HELP = ("Speculative decoding: lookup (drafts copied from the prompt / text so far) or "
              "draft:BUNDLE (a smaller bundle with the same tokenizer). Greedy text is unchanged.")
_DRAFT_TOKENS_HELP = ("Most drafts verified per forward (below it, lookup picks each draft's "
                      "length from the acceptance and forward costs it measures).")


def _speculative(spec: str | None, draft_tokens: int) -> Any:
    if spec is None:
        return None
    from llama_export.runtime.speculative import SpeculativeOptions

    return SpeculativeOptions.parse(spec, draft_tokens)


_SPIN_HELP = ("ONNX Runtime threads busy-wait between ops: faster on an idle machine; "
              "--no-spin is faster when other processes share the cores.")


def backend_options(f: Any) -> Any:
    """--variant --backend --provider --threads --spin --graph: how a command loads a bundle
    (generate, serve)."""
    options = [
        click.option("--variant", help="Bundle variant (default: fp32, else the first)."),
        click.option("--backend", type=_BACKENDS, default="ort", show_default=True,
                     help=_BACKEND_HELP),
        click.option("--provider", type=_PROVIDERS, default="cpu", show_default=True),
        click.option("--threads", type=int,
                     help="ONNX Runtime intra-op threads (default: all cores)."),
        click.option("--spin/--no-spin", default=True, show_default=True, help=_SPIN_HELP),
        click.option("--graph", type=click.Choice(["auto", "standard", "ort"]), default="auto",
                     show_default=True, help=_GRAPH_HELP),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--prompt", help="Plain text prompt.")
@click.option("--chat", "chat_text", help="A user message, rendered with the chat template.")
@click.option("--system", help="Optional system message (with --chat).")
@click.option("--max-new-tokens", default=128, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=int, help="0 = off.")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="1.0 = off.")
@click.option("--min-p", default=0.0, show_default=True, type=float, help="0 = off.")
@click.option("--repetition-penalty", default=1.0, show_default=True, type=float)
@click.option("--seed", type=int, help="Same seed, same text.")
@click.option("--stop", multiple=True, help="Stop string (repeatable; not printed).")
@backend_options
@click.option("--speculative", "spec", metavar="lookup|draft:BUNDLE", help=_SPEC_HELP)
@click.option("--draft-tokens", default=8, show_default=True, type=int, help=_DRAFT_TOKENS_HELP)
def generate(bundle: str, prompt: str | None, chat_text: str | None, system: str | None,
             variant: str | None, backend: str, provider: str, threads: int | None, spin: bool,
             graph: str, spec: str | None, draft_tokens: int, **sampling: Any) -> None:
    """Generate text from BUNDLE, streamed to stdout."""
    if (prompt is None) == (chat_text is None):
        raise InputError("pass exactly one of --prompt TEXT or --chat TEXT")
    if system and chat_text is None:
        raise InputError("--system needs --chat: pass the user message with --chat")
    sampling["stop"] = tuple(sampling["stop"])
    sampling["speculative"] = _speculative(spec, draft_tokens)
    with _load(bundle, variant, backend, provider, threads, spin, graph) as model:
        if chat_text is not None:
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": chat_text})
            pieces = model.stream_chat(messages, **sampling)
        else:
            pieces = model.stream(prompt, **sampling)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


@click.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--prompt-len", default=128, show_default=True, type=int)
@click.option("--gen-len", default=128, show_default=True, type=int)
@click.option("--batch", default=1, show_default=True, type=int)
@click.option("--runs", default=3, show_default=True, type=int, help="Measured runs (median).")
@click.option("--threads", type=int, help="Intra-op threads (ours and the torch baseline).")
@click.option("--variant", help="Bundle variant (default: fp32, else the first).")
@click.option("--backend", type=_BACKENDS, default="ort", show_default=True, help=_BACKEND_HELP)
@click.option("--provider", type=_PROVIDERS, default="cpu", show_default=True)
@click.option("--baseline", type=click.Choice(["none", "torch"]), default="none",
              show_default=True, help="Also run the PyTorch original in the same run.")
@click.option("--source", help="Model source for the baseline (default: the manifest's).")
@click.option("--spin/--no-spin", default=True, show_default=True, help=_SPIN_HELP)
@click.option("--graph", type=click.Choice(["auto", "standard", "ort", "both"]), default="auto",
              show_default=True, help=_GRAPH_HELP + " both: measure the two, interleaved.")
@click.option("--speculative", "spec", metavar="lookup|draft:BUNDLE",
              help=_SPEC_HELP + " Measured beside plain decoding, interleaved.")
@click.option("--draft-tokens", default=8, show_default=True, type=int, help=_DRAFT_TOKENS_HELP)
@click.option("--tasks", type=click.Choice(["synthetic", "grounded", "chat", "all"]),
              default="synthetic", show_default=True,
              help="synthetic: --prompt-len tokens of filler text, EOS ignored; grounded / chat / "
                   "all: the built-in task prompts (up to --gen-len tokens each, EOS honoured).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def bench(bundle: str, prompt_len: int, gen_len: int, batch: int, runs: int, threads: int | None,
          variant: str | None, backend: str, provider: str, baseline: str, source: str | None,
          spin: bool, graph: str, spec: str | None, draft_tokens: int, tasks: str,
          as_json: bool) -> None:
    """Benchmark prefill/decode speed of BUNDLE (medians; progress on stderr)."""
    from llama_export.runtime import bench as b

    opts = b.BenchOptions(prompt_len=prompt_len, gen_len=gen_len, batch=batch, runs=runs)
    speculative = _speculative(spec, draft_tokens)
    with contextlib.ExitStack() as stack:
        model = stack.enter_context(_load(bundle, variant, backend, provider, threads, spin,
                                          "ort" if graph == "both" else graph))
        if tasks != "synthetic":
            _bench_tasks(model, opts, tasks, speculative, as_json)
            return
        runners = {b.ours_label(model): b.ours_runner(model, opts)}
        if speculative is not None:
            runners[f"{b.ours_label(model)}+{spec}"] = b.ours_runner(model, opts, speculative)
        if graph == "both":
            standard = stack.enter_context(_load(bundle, variant, backend, provider, threads,
                                                 spin, "standard"))
            runners[b.ours_label(standard)] = b.ours_runner(standard, opts)
        if baseline == "torch":
            src = source if source is not None else b.reference_source(model)
            prompt = b.synthetic_prompt(model, prompt_len)
            runners["torch"] = b.torch_runner(src, prompt, opts, threads)
        results = b.measure(runners, opts.runs)
    if as_json:
        options = {**dataclasses.asdict(opts), "threads": threads}
        click.echo(json.dumps({"bundle": bundle, "options": options,
                               "results": [r.as_dict() for r in results]}, indent=2))
    else:
        click.echo(b.format_table(results))
        _echo_verify_cost(model, speculative)


def _echo_verify_cost(model: Any, speculative: Any) -> None:
    """The verification costs prompt lookup learned while drafting (what its plans rest on)."""
    points = model.verify_cost.measured_steps() if speculative is not None else {}
    if len(points) > 1:
        click.echo("verification cost here, in plain steps (T new tokens, learned while "
                   "drafting): " + ", ".join(f"T={t} {v:.2f}" for t, v in points.items()))


def _bench_tasks(model: Any, opts: Any, tasks: str, speculative: Any, as_json: bool) -> None:
    """Plain (and speculative) greedy decoding over the built-in task prompts, interleaved."""
    from llama_export.runtime import bench as b
    from llama_export.runtime import spec_bench as sb

    if opts.batch != 1:
        raise InputError("--tasks runs one prompt at a time: drop --batch")
    categories = list(sb.CATEGORIES) if tasks == "all" else [tasks]
    runners, pairs = {}, []
    for cat in categories:
        chosen = sb.builtin_tasks(model, [cat], opts.gen_len)
        runners[f"{cat}:plain"] = sb.tasks_runner(model, chosen, opts.gen_len)
        if speculative is not None:
            label = f"{cat}:{sb.speculation_label(speculative)}"
            runners[label] = sb.tasks_runner(model, chosen, opts.gen_len, speculative)
            pairs.append((label, f"{cat}:plain"))
    results = b.measure(runners, opts.runs)
    if as_json:
        click.echo(json.dumps({"options": dataclasses.asdict(opts), "tasks": tasks,
                               "results": [r.as_dict() for r in results]}, indent=2))
        return
    click.echo(b.format_table(results, pairs))
    _echo_verify_cost(model, speculative)
