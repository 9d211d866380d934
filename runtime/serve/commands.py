"""``llama-export serve`` and ``llama-export bench-serve`` (parse → one library call → print).

Heavy imports (uvicorn, FastAPI, httpx) happen inside the commands: ``--help`` stays fast and a
missing ``[serve]`` extra is one line naming it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from llama_export.runtime.commands import backend_options
from llama_export.runtime.errors import InputError

if TYPE_CHECKING:
    from llama_export.runtime.serve.app import ServeSettings


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--concurrency {text!r} is not a list of integers: use e.g. 1,2,4,8") from None


@click.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (loopback by default; anything else needs care).")
@click.option("--port", default=8000, show_default=True, type=int)
@backend_options
@click.option("--slots", default=8, show_default=True, type=int,
              help="Requests decoded together (KV cache rows).")
@click.option("--max-queue", default=64, show_default=True, type=int,
              help="Requests allowed to wait for a slot; beyond it: 429.")
@click.option("--prefill-chunk", default=64, show_default=True, type=int,
              help="Prompt tokens prefilled per step (bounds how long running streams stall).")
@click.option("--context", type=int, help="KV positions per slot (default: the bundle's max).")
@click.option("--layout", type=click.Choice(["auto", "rows", "aligned"]), default="auto",
              show_default=True, help="KV slot layout: rows needs a per-row-length ONNX-Runtime "
              "graph on CPU; aligned works with every backend.")
@click.option("--speculative", type=click.Choice(["lookup"]), help="Prompt-lookup speculative "
              "decoding while one request runs alone (greedy text unchanged; needs a bundle "
              "exported with --logits tail:N and the row layout).")
@click.option("--draft-tokens", default=8, show_default=True, type=int,
              help="With --speculative: most drafts verified per forward (adaptive below it).")
@click.option("--api-key", "api_keys", multiple=True, help="Require Authorization: Bearer KEY "
              "on /v1/* (repeatable).")
@click.option("--api-key-file", type=click.Path(dir_okay=False), help="Keys, one per line.")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Allow browser requests from this origin (repeatable; CORS is off otherwise).")
@click.option("--served-model-name", help="Model id in the API (default: the bundle folder name).")
@click.option("--max-body-bytes", default=1 << 20, show_default=True, type=int)
@click.option("--drain-timeout", default=30.0, show_default=True, type=float,
              help="On SIGTERM, seconds running requests may take to finish before cancelling.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.option("--ray", "use_ray", is_flag=True, help="Serve Ray Serve replicas of this app "
              "(extra [ray]): Ray routes, queues, autoscales and restarts them.")
@click.option("--replicas", default=1, show_default=True, type=int,
              help="With --ray: replicas, each one engine (initial count with --autoscale).")
@click.option("--autoscale", metavar="MIN:MAX", help="With --ray: scale between MIN and MAX "
              "replicas on ongoing requests.")
@click.option("--replica-cpus", type=float, help="With --ray: CPUs per replica (default: this "
              "machine's cores / replicas, at most 1; 1 on a cluster). Sets --threads too.")
@click.option("--replica-gpus", default=0.0, show_default=True, type=float,
              help="With --ray: GPUs per replica.")
@click.option("--ray-address", help="With --ray: join this Ray cluster (e.g. ray://head:10001 "
              "or auto) instead of starting a local one.")
@click.option("--ray-metrics-port", type=int, help="With --ray and a local Ray: the port of "
              "Ray's Prometheus endpoint (replicas' ray_llama_export_* metrics; default: a free "
              "port, listed in /tmp/ray/prom_metrics_service_discovery.json).")
def serve(bundle: str, host: str, port: int, variant: str | None, backend: str, provider: str,
          threads: int | None, spin: bool, graph: str, slots: int, max_queue: int,
          prefill_chunk: int, context: int | None, layout: str, speculative: str | None,
          draft_tokens: int, api_keys: tuple[str, ...],
          api_key_file: str | None, cors_origins: tuple[str, ...],
          served_model_name: str | None, max_body_bytes: int, drain_timeout: float,
          log_level: str, use_ray: bool, replicas: int, autoscale: str | None,
          replica_cpus: float | None, replica_gpus: float, ray_address: str | None,
          ray_metrics_port: int | None) -> None:
    """Serve BUNDLE over an OpenAI-compatible HTTP API with continuous batching."""
    from llama_export.runtime.serve.engine import EngineOptions

    try:
        from llama_export.runtime.serve.app import ServeSettings
        from llama_export.runtime.serve.server import read_api_keys, run_server
    except ImportError as e:
        from llama_export.runtime.errors import MissingDependencyError

        raise MissingDependencyError(f"`llama-export serve` (module '{e.name}' not found)",
                                     "serve") from None
    settings = ServeSettings(
        bundle=bundle, variant=variant, backend=backend, provider=provider, threads=threads,
        spin=spin, graph=graph, model_name=served_model_name,
        engine=EngineOptions(slots=slots, max_queue=max_queue, prefill_chunk=prefill_chunk,
                             context=context, layout=layout, speculative=speculative,
                             draft_tokens=draft_tokens),
        api_keys=read_api_keys(api_keys, api_key_file), cors_origins=cors_origins,
        max_body_bytes=max_body_bytes)
    ray_opts = {"replicas": replicas, "autoscale": autoscale, "replica_cpus": replica_cpus,
                "replica_gpus": replica_gpus, "drain_timeout": drain_timeout}
    if use_ray:
        _serve_ray(settings, host, port, (ray_address, ray_metrics_port), ray_opts)
        return
    defaults = {"replicas": 1, "autoscale": None, "replica_cpus": None, "replica_gpus": 0.0,
                "ray_address": None, "ray_metrics_port": None}
    asked = {**ray_opts, "ray_address": ray_address, "ray_metrics_port": ray_metrics_port}
    given = [f"--{k.replace('_', '-')}" for k, v in defaults.items() if asked[k] != v]
    if given:
        verb = "apply" if len(given) > 1 else "applies"
        raise InputError(f"{', '.join(given)} only {verb} with --ray: add --ray")
    run_server(settings, host, port, drain_timeout, log_level)


def _serve_ray(settings: ServeSettings, host: str, port: int,
               cluster: tuple[str | None, int | None], raw: dict[str, Any]) -> None:
    """``cluster``: (--ray-address, --ray-metrics-port); ``raw``: RayOptions' fields."""
    try:
        from llama_export.runtime.serve import ray as serve_ray
    except ImportError as e:
        from llama_export.runtime.errors import MissingDependencyError

        raise MissingDependencyError(f"`llama-export serve --ray` (module '{e.name}' not found)",
                                     "ray") from None
    opts = serve_ray.RayOptions(**{**raw, "autoscale": serve_ray.parse_autoscale(raw["autoscale"])})
    serve_ray.run_ray(settings, opts, host, port, *cluster)


@click.command("bench-serve")
@click.argument("url")
@click.option("--concurrency", default="1,2,4,8,16", show_default=True,
              help="Comma-separated concurrency levels.")
@click.option("--prompt-len", default=128, show_default=True, type=int)
@click.option("--gen-len", default=128, show_default=True, type=int)
@click.option("--requests", type=int, help="Requests per level (default: 2 x concurrency, >= 4).")
@click.option("--model", help="Model id (default: the server's first /v1/models entry).")
@click.option("--api-key", help="Sent as Authorization: Bearer KEY.")
@click.option("--pid", type=int, help="Local server process: report its RSS.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def bench_serve(url: str, concurrency: str, prompt_len: int, gen_len: int, requests: int | None,
                model: str | None, api_key: str | None, pid: int | None, as_json: bool) -> None:
    """Load-test any OpenAI-compatible server at URL with streaming requests."""
    from llama_export.runtime.serve import loadgen

    opts = loadgen.LoadOptions(url=url, concurrency=_ints(concurrency), prompt_len=prompt_len,
                               gen_len=gen_len, requests=requests, model=model, api_key=api_key,
                               pid=pid)
    levels = loadgen.run_load(opts)
    click.echo(loadgen.levels_json(opts, levels) if as_json else loadgen.format_levels(levels))
