"""Ray Serve replicas of the OpenAI app (extra ``[ray]``; the only module that imports ray).

Each replica loads the bundle, starts one :class:`~.engine.Engine` (one backend, one KV cache)
and only then builds the same ASGI app as ``llama-export serve`` over it (``create_app(engine,
settings)`` from Ray's ``__serve_build_asgi_app__`` hook), so Ray routes to a replica once it
is loaded. Ray does the rest: routing, ``max_ongoing_requests`` = the engine's slots (Ray queues
the rest, up to ``max_queued_requests`` = ``--max-queue``, then 503), autoscaling on ongoing
requests, restarts. Responses carry ``x-llama-export-replica``; each replica's engine metrics
go to Ray's metrics export (``ray_llama_export_*`` with ``deployment``/``replica`` tags).

    serve run llama_export.runtime.serve.ray:app bundle=PATH [variant=int8] [replicas=2] ...
    llama-export serve BUNDLE --ray --replicas 2 [--autoscale 1:4] [--replica-cpus 1]
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import psutil
import ray
from fastapi import FastAPI
from ray import serve
from ray.serve import metrics as serve_metrics
from ray.serve.deployment import Application

from llama_export.runtime.errors import InputError
from llama_export.runtime.manifest import Manifest
from llama_export.runtime.serve.app import ASGIApp, Scope, ServeSettings, create_app
from llama_export.runtime.serve.engine import Engine, EngineOptions
from llama_export.runtime.serve.metrics import LATENCY_BUCKETS, STEP_BUCKETS, EngineMetrics
from llama_export.runtime.serve.server import is_loopback, warn_if_open

REPLICA_HEADER = "x-llama-export-replica"
APP_NAME = "llama-export"
# Ray keeps its own traffic on this address when the HTTP host is loopback: given 127.0.0.1 it
# silently picks the machine's routable address instead (measured, ray 2.60).
LOOPBACK_NODE_IP = "127.0.0.2"


@dataclass(frozen=True)
class RayOptions:
    """``replicas``: fixed count (or the initial one with ``autoscale``); ``autoscale``: (min,
    max) replicas, scaled on ongoing requests; ``replica_cpus``: Ray CPUs per replica (None: the
    local machine's cores shared by the most replicas, capped at 1, or 1 on a cluster), which
    also sets the engine's threads unless ``--threads``; ``replica_gpus``: GPUs per replica."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    replica_cpus: float | None = None
    replica_gpus: float = 0.0
    drain_timeout: float = 30.0  # seconds Ray lets a stopping replica finish its requests

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise InputError(f"--replicas must be >= 1, got {self.replicas}")
        if self.autoscale is not None:
            lo, hi = self.autoscale
            if not 0 <= lo <= hi or hi < 1:
                raise InputError(f"--autoscale {lo}:{hi} is not a range: use MIN:MAX with "
                                 "0 <= MIN <= MAX and MAX >= 1")
        if self.replica_cpus is not None and self.replica_cpus <= 0:
            raise InputError(f"--replica-cpus must be > 0, got {self.replica_cpus}")
        if self.replica_gpus < 0:
            raise InputError(f"--replica-gpus must be >= 0, got {self.replica_gpus}")

    @property
    def max_replicas(self) -> int:
        return self.autoscale[1] if self.autoscale else self.replicas


def parse_autoscale(text: str | None) -> tuple[int, int] | None:
    """``"1:4"`` → (1, 4)."""
    if text is None:
        return None
    lo, sep, hi = text.partition(":")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise InputError(f"--autoscale {text!r} is not MIN:MAX: use e.g. 1:4")
    return int(lo), int(hi)


def deployment_options(settings: ServeSettings, opts: RayOptions, local_cpus: int | None
                       ) -> dict[str, Any]:
    """``serve.deployment(...).options(**this)``. ``local_cpus``: cores of the machine Ray runs
    on when it is started here (None: an existing cluster, Ray's default of 1 CPU per replica)."""
    cpus = opts.replica_cpus
    if cpus is None:
        cpus = 1.0 if local_cpus is None else min(1.0, round(local_cpus / opts.max_replicas, 2))
    slots = settings.engine.slots
    out: dict[str, Any] = {
        "max_ongoing_requests": slots,
        "max_queued_requests": settings.engine.max_queue,
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": opts.replica_gpus},
        "health_check_period_s": 5,
        "graceful_shutdown_timeout_s": opts.drain_timeout,
    }
    if opts.autoscale is None:
        out["num_replicas"] = opts.replicas
    else:
        lo, hi = opts.autoscale
        # Scale up before Ray starts queueing (it queues at max_ongoing_requests = slots).
        out["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                     "initial_replicas": min(max(opts.replicas, lo), hi),
                                     "target_ongoing_requests": max(1, round(slots * 0.75))}
    return out


def replica_settings(settings: ServeSettings, replica_cpus: float) -> ServeSettings:
    """Threads per replica from its CPU share, unless ``--threads`` was given."""
    if settings.threads is not None:
        return settings
    return replace(settings, threads=max(1, math.floor(replica_cpus)))


# ---- the replica ----------------------------------------------------------------------------
class RayEngineMetrics(EngineMetrics):
    """The engine's metrics, also observed into Ray's metrics (one series per replica: Ray Serve
    adds ``deployment``, ``replica`` and ``application`` tags)."""

    def __init__(self, slots: int) -> None:
        super().__init__(slots)
        m = serve_metrics
        self.ray_requests = m.Counter("llama_export_requests", "Finished requests by finish "
                                      "reason.", tag_keys=("finish_reason",))
        self.ray_prompt = m.Counter("llama_export_prompt_tokens", "Prompt tokens prefilled.")
        self.ray_generated = m.Counter("llama_export_generation_tokens", "Tokens generated.")
        self.ray_ttft = m.Histogram("llama_export_time_to_first_token_seconds",
                                    "Submit to first token.", boundaries=list(LATENCY_BUCKETS))
        self.ray_latency = m.Histogram("llama_export_request_seconds", "Submit to finish.",
                                       boundaries=list(LATENCY_BUCKETS))
        self.ray_step = m.Histogram("llama_export_step_seconds", "Engine steps (with a prompt "
                                    "chunk or not).", boundaries=list(STEP_BUCKETS),
                                    tag_keys=("prefill",))
        self.ray_running = m.Gauge("llama_export_requests_running", "Requests holding a slot.")
        self.ray_waiting = m.Gauge("llama_export_requests_waiting", "Requests waiting for a "
                                   "slot in the engine (Ray queues before it).")
        self.ray_slots = m.Gauge("llama_export_slots", "KV slots.")
        self.ray_slots.set(slots)

    def finished(self, reason: str, seconds: float) -> None:
        super().finished(reason, seconds)
        self.ray_requests.inc(1, tags={"finish_reason": reason})
        self.ray_latency.observe(seconds)

    def first_token(self, seconds: float, prompt_tokens: int) -> None:
        super().first_token(seconds, prompt_tokens)
        self.ray_ttft.observe(seconds)
        self.ray_prompt.inc(prompt_tokens)

    def step(self, seconds: float, decoders: int, prefill: bool) -> None:
        super().step(seconds, decoders, prefill)
        self.ray_step.observe(seconds, tags={"prefill": str(prefill).lower()})

    def tokens(self, n: int) -> None:
        super().tokens(n)
        self.ray_generated.inc(n)

    def occupancy(self, running: int, waiting: int) -> None:
        self.ray_running.set(running)
        self.ray_waiting.set(waiting)


class _ReplicaHeader:
    """Adds ``x-llama-export-replica: <Ray replica id>`` to every response."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        async def tagged(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged if scope["type"] == "http" else send)


@serve.deployment(name="LlamaExport")
@serve.ingress()
class LlamaExportReplica:
    """One replica: one loaded bundle, one running engine, the ``llama-export serve`` app."""

    def __init__(self, settings: ServeSettings) -> None:
        from llama_export.runtime.bundle import load_bundle

        self.settings = settings
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        s = settings
        model = load_bundle(s.bundle, variant=s.variant, backend=s.backend, provider=s.provider,
                            threads=s.threads, spin=s.spin, graph=s.graph)
        self.metrics = RayEngineMetrics(s.engine.slots)
        self.engine = Engine(model, s.engine, metrics=self.metrics).start()
        self._stop = threading.Event()
        threading.Thread(target=self._gauges, name="llama-export-gauges", daemon=True).start()
        print(f"[serve] replica {self.replica_id}: {self.engine.describe()}", file=sys.stderr,
              flush=True)

    def _gauges(self) -> None:
        """Running/waiting change inside the engine loop: sample them for Ray once a second."""
        while not self._stop.wait(1.0):
            snap = self.engine.snapshot()
            self.metrics.occupancy(snap.running, snap.waiting)

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self.engine, self.settings)
        app.add_middleware(_ReplicaHeader, replica=self.replica_id)
        return app

    def check_health(self) -> None:
        """Ray restarts a replica whose engine loop died."""
        if not self.engine.running:
            raise RuntimeError("the engine loop is not running")

    def __del__(self) -> None:
        # Ray waits for ongoing requests (graceful_shutdown_timeout_s) before calling this.
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
            self.engine.stop(drain=False)
            self.engine.model.close()


def build(settings: ServeSettings, opts: RayOptions, local_cpus: int | None = None
          ) -> Application:
    """The Ray Serve application: ``opts`` replicas of ``settings``' bundle."""
    options = deployment_options(settings, opts, local_cpus)
    per_replica = replica_settings(settings, options["ray_actor_options"]["num_cpus"])
    return LlamaExportReplica.options(**options).bind(per_replica)  # type: ignore[attr-defined,no-any-return]


# ---- `serve run llama_export.runtime.serve.ray:app key=value ...` ---------------------------
_ENGINE_ARGS = tuple(f.name for f in fields(EngineOptions))
_TEXT_ENGINE_ARGS = ("layout", "speculative")
_SETTINGS_ARGS = ("variant", "backend", "provider", "graph", "model_name")


def app(args: Mapping[str, Any]) -> Application:
    """Application builder for ``serve run`` and Serve config files (``args:``): ``bundle``
    (required), ``variant``, ``backend``, ``provider``, ``graph``, ``model_name``, ``threads``,
    ``slots``, ``max_queue``, ``prefill_chunk``, ``context``, ``layout``, ``speculative``,
    ``draft_tokens``, ``api_keys`` (a list
    or comma-separated), ``replicas``, ``autoscale`` ("MIN:MAX"), ``replica_cpus`` (default 1,
    also the threads), ``replica_gpus``. A config file's deployment options override these."""
    known = {"bundle", "threads", "api_keys", "replicas", "autoscale", "replica_cpus",
             "replica_gpus", *_SETTINGS_ARGS, *_ENGINE_ARGS}
    unknown = sorted(set(args) - known)
    if unknown:
        raise InputError(f"unknown application args {', '.join(unknown)}: use "
                         f"{', '.join(sorted(known))}")
    if "bundle" not in args:
        raise InputError("the bundle arg is missing: serve run ... bundle=PATH")
    bundle = str(args["bundle"])
    Manifest.load(bundle)  # a wrong path fails here in one line, not in every replica
    engine_args: dict[str, Any] = {k: str(args[k]) if k in _TEXT_ENGINE_ARGS
                                   else _int_or_none(args[k]) for k in _ENGINE_ARGS if k in args}
    engine = EngineOptions(**engine_args)
    keys = args.get("api_keys") or ()
    if isinstance(keys, str):  # `serve run ... api_keys=a,b`
        keys = keys.split(",")
    text_args: dict[str, Any] = {k: str(args[k]) for k in _SETTINGS_ARGS if k in args}
    settings = ServeSettings(bundle=bundle, engine=engine, api_keys=tuple(map(str, keys)),
                             threads=_int_or_none(args.get("threads")),
                             **text_args)
    opts = RayOptions(replicas=int(args.get("replicas", 1)),
                      autoscale=parse_autoscale(args.get("autoscale")),
                      replica_cpus=float(args["replica_cpus"]) if "replica_cpus" in args else None,
                      replica_gpus=float(args.get("replica_gpus", 0)))
    return build(settings, opts)


def _int_or_none(value: Any) -> int | None:
    if value is None or str(value).lower() in ("", "none"):
        return None
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{value!r} is not an integer") from None


# ---- `llama-export serve BUNDLE --ray` -------------------------------------------------------
def run_ray(settings: ServeSettings, opts: RayOptions, host: str, port: int,
            address: str | None = None, metrics_port: int | None = None) -> None:
    """Start (or join, ``address``) Ray, deploy, serve on ``host:port`` until SIGINT/SIGTERM,
    then shut the application and the Ray instance started here down. ``metrics_port``: of
    the local Ray's Prometheus endpoint (default: a free port Ray picks)."""
    Manifest.load(settings.bundle)
    warn_if_open(settings, host)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    init: dict[str, Any] = {"include_dashboard": False}
    local_cpus: int | None = None
    if address is None:
        local_cpus = os.cpu_count() or 1
        if is_loopback(host):
            init["_node_ip_address"] = LOOPBACK_NODE_IP
        if metrics_port is not None:
            init["_metrics_export_port"] = metrics_port
    elif metrics_port is not None:
        raise InputError("--ray-metrics-port applies to a Ray started here: the cluster's "
                         "nodes set theirs (ray start --metrics-export-port)")
    else:
        init["address"] = address
    ray.init(**init)
    # After ray.init: its core worker installs a SIGTERM handler that aborts the process, which
    # would skip the shutdown below and leave the node's agents running.
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT,
                                                                      signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build(settings, opts, local_cpus), name=APP_NAME, route_prefix="/")
        print(f"[serve] {opts.max_replicas} Ray Serve replica(s) of {settings.bundle} on "
              f"http://{host}:{port}", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        print("[serve] shutting down", file=sys.stderr, flush=True)
        started = psutil.Process().children(recursive=True) if address is None else []
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
        _reap(started)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _reap(procs: list[psutil.Process], grace: float = 5.0) -> None:
    """``ray.shutdown()`` leaves the local node's dashboard and runtime-env agents running for
    minutes (measured, ray 2.60): end what the Ray instance started here left behind."""
    alive = [p for p in procs if p.is_running()]
    _, alive = psutil.wait_procs(alive, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(alive, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
