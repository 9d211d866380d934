"""``llama-export``: a lazy click group (hatch's ``cli/lazy.py`` pattern).

Command modules are imported only when their command runs, so ``llama-export --help`` never
imports torch, and a command whose extra is missing still shows in ``--help`` and says which
extra to install (Polygraphy's ``MissingTool``). This module sits above the layers: it names
command modules by string only, so the runtime package never imports exporter/calibration code.
"""

from __future__ import annotations

import errno
import functools
import importlib
import sys
from dataclasses import dataclass
from typing import Any

import click

from .errors import LlamaExportError, MissingDependencyError


@dataclass(frozen=True)
class _Entry:
    module: str
    attr: str
    extra: str
    help: str


COMMANDS: dict[str, _Entry] = {
    "onnx": _Entry("llama_export.exporter.commands", "onnx", "export",
                   "Export a LLaMA model (HF folder, .gguf, or built-in SmolLM2) to an ONNX bundle."),
    "verify": _Entry("llama_export.exporter.commands", "verify", "export",
                     "Check a bundle variant against the PyTorch original (parity report)."),
    "generate": _Entry("llama_export.runtime.commands", "generate", "ort",
                       "Generate text from a bundle, streamed to stdout."),
    "bench": _Entry("llama_export.runtime.commands", "bench", "ort",
                    "Benchmark prefill/decode speed of a bundle."),
    "serve": _Entry("llama_export.runtime.serve.commands", "serve", "serve",
                    "Serve a bundle over an OpenAI-compatible HTTP API (continuous batching)."),
    "bench-serve": _Entry("llama_export.runtime.serve.commands", "bench_serve", "serve",
                          "Load-test an OpenAI-compatible server (aggregate tok/s, TTFT)."),
    "calibrate": _Entry("llama_export.calibration.commands", "calibrate", "calibrate",
                        "Calibrate activations and write the INT8 (SmoothQuant W8A8 Q/DQ) variant."),
    "quantize": _Entry("llama_export.calibration.commands", "quantize", "calibrate",
                       "Write a weight-only INT4/INT8 variant (no calibration data needed)."),
    "parity": _Entry("llama_export.runtime.parity.commands", "parity", "ort",
                     "Compare variants/engines with the PyTorch original's saved answers "
                     "(torch-free)."),
    "trt": _Entry("llama_export.calibration.trt_commands", "trt", "gpu",
                  "Build a strongly typed TensorRT engine (FP32/FP16/INT8/INT4) for this GPU."),
}

# Third-party top-level modules that belong to an extra: an ImportError naming one of them means
# "extra not installed", anything else is a bug and keeps its traceback.
_OPTIONAL = {"torch", "transformers", "onnx", "onnxruntime", "gguf", "safetensors", "accelerate",
             "tensorrt", "polygraphy", "cuda", "onnxscript", "psutil"}


def _missing_command(name: str, entry: _Entry, missing: str) -> click.Command:
    @click.command(name=name, help=entry.help + f" [needs: pip install 'llama-export[{entry.extra}]']",
                   context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def _cmd() -> None:
        raise MissingDependencyError(f"`llama-export {name}` (module '{missing}' not found)",
                                     entry.extra)
    return _cmd


def _guarded(cmd: click.Command, entry: _Entry) -> click.Command:
    """``cmd`` whose body turns a missing optional module into the one-line extra to install.

    Command modules import their heavy dependencies inside the body (``--help`` stays fast), so
    a missing extra shows up only when the command runs.
    """
    callback = cmd.callback
    if callback is None or getattr(callback, "_guarded", False):
        return cmd

    @functools.wraps(callback)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except ModuleNotFoundError as e:
            root = (e.name or "").split(".")[0]
            if root not in _OPTIONAL:
                raise
            raise MissingDependencyError(f"`llama-export {cmd.name}` (module '{root}' not "
                                         "found)", entry.extra) from None

    run._guarded = True  # type: ignore[attr-defined]
    cmd.callback = run
    return cmd


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        try:
            module = importlib.import_module(entry.module)
        except ModuleNotFoundError as e:
            root = (e.name or "").split(".")[0]
            if root in _OPTIONAL:
                return _missing_command(cmd_name, entry, root)
            raise
        cmd: click.Command = getattr(module, entry.attr)
        return _guarded(cmd, entry)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help from the table: listing commands must not import them.
        rows = [(name, e.help) for name, e in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("llama-export")
    except PackageNotFoundError:
        return "unknown"


@click.group(cls=LazyGroup)
@click.version_option(_version(), prog_name="llama-export")
def cli() -> None:
    """Export LLaMA-family decoders to ONNX and TensorRT, quantize them, and run them."""


def main(argv: list[str] | None = None) -> Any:
    try:
        return cli.main(args=argv, prog_name="llama-export", standalone_mode=False)
    except LlamaExportError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except OSError as e:
        message = _os_error_message(e)
        if message is None:
            raise
        click.echo(f"error: {message}", err=True)
        sys.exit(2)


# Environment failures a user fixes outside the program: one line naming the path and the fix,
# never a traceback from the library that happened to be writing. Commands write to a temporary
# path and rename when complete, so such a failure leaves no half-written output behind.
_OS_FIXES = {
    errno.ENOSPC: "no space left on device{at}: free disk space, or write to another disk "
                  "(-o PATH; TMPDIR for temporary files)",
    errno.EDQUOT: "disk quota exceeded{at}: free space within the quota, or write to another disk",
    errno.EROFS: "read-only file system{at}: write to a writable location (-o PATH)",
    errno.EACCES: "permission denied{at}: choose a location you may write to, or fix its "
                  "permissions",
}


def _os_error_message(e: OSError) -> str | None:
    template = _OS_FIXES.get(e.errno) if e.errno is not None else None
    if template is None:
        return None
    at = f" ({e.filename})" if e.filename else ""
    return template.format(at=at)


if __name__ == "__main__":
    main()
