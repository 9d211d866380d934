"""Serving (DESIGN.md §6b): an engine usable without HTTP, and an OpenAI-compatible ASGI app.

    Ray Serve / any host process   wraps the app (``create_app``) or owns the engine's start/stop
            │
    app.py (extra [serve])         OpenAI routes, SSE, auth, limits, /metrics: thin
            │ submit() / RequestStream
    engine.py (torch-free core)    one backend, N KV slots (slots.py), continuous batching

``engine``, ``slots`` and ``metrics`` need only the runtime's own dependencies; ``app``,
``protocol``, ``server`` and ``loadgen`` need ``pip install 'llama-export[serve]'``.
"""

from llama_export.runtime.serve.engine import (
    Chunk,
    Engine,
    EngineOptions,
    EngineStoppedError,
    QueueFullError,
    RequestOptions,
)

__all__ = ["Chunk", "Engine", "EngineOptions", "EngineStoppedError", "QueueFullError",
           "RequestOptions"]
