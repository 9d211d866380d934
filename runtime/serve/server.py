"""Run the app under uvicorn: loopback by default, graceful SIGTERM (drain, then exit 0)."""

from __future__ import annotations

import ipaddress
import signal
import sys
from pathlib import Path
from types import FrameType

from llama_export.runtime.errors import InputError, MissingDependencyError
from llama_export.runtime.manifest import Manifest
from llama_export.runtime.serve.app import ServeSettings, create_app


def read_api_keys(keys: tuple[str, ...], key_file: str | None) -> tuple[str, ...]:
    """``--api-key`` values plus the non-empty lines of ``--api-key-file``."""
    out = [k for k in keys if k]
    if len(out) != len(keys):
        raise InputError("--api-key is empty: pass a non-empty key")
    if key_file is not None:
        try:
            lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise InputError(f"cannot read --api-key-file {key_file} ({e.strerror}): "
                             "pass a readable file with one key per line") from None
        file_keys = [ln.strip() for ln in lines if ln.strip()]
        if not file_keys:
            raise InputError(f"--api-key-file {key_file} holds no key: write one key per line")
        out += file_keys
    return tuple(out)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_open(settings: ServeSettings, host: str) -> None:
    if not is_loopback(host) and not settings.api_keys:
        print(f"[serve] warning: listening on {host} without --api-key: anyone who can reach "
              "this address can use the model", file=sys.stderr)


def run_server(settings: ServeSettings, host: str, port: int, drain_timeout: float,
               log_level: str = "info") -> None:
    """Serve until SIGTERM/SIGINT. SIGTERM: stop accepting connections, let running requests
    finish for up to ``drain_timeout`` seconds (then cancel them), stop the engine, return."""
    try:
        import uvicorn
    except ImportError:
        raise MissingDependencyError("`llama-export serve`", "serve") from None
    Manifest.load(settings.bundle)  # a wrong path fails here, in one line, before binding
    warn_if_open(settings, host)
    app = create_app(settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=max(1, round(drain_timeout)),
                            lifespan="on")
    server = uvicorn.Server(config)
    state = app.state.serve
    state.on_ready = lambda note: print(f"[serve] {note} on http://{host}:{port}",
                                        file=sys.stderr, flush=True)
    state.on_failure = lambda: setattr(server, "should_exit", True)

    # uvicorn drains on SIGTERM and then raises the signal again to the previous handler:
    # a handler that does nothing turns that into a normal return (exit 0).
    def ignore(signum: int, frame: FrameType | None) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, ignore)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if state.load_error is not None:
        raise state.load_error
