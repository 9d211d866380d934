"""Every command run without its extra says in one line which extra to install (issue #10).

Each command runs in a subprocess whose imports of the other extras' modules fail, as in an
environment made with ``pip install 'llama-export[ort]'`` (the Jetson path) or with no extra.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# A meta-path finder that makes the named top-level modules (and importlib.util.find_spec on
# them) look absent, then the CLI. argv: blocked,names CLI-ARGS...
_BLOCKED_CLI = """
import importlib.util, sys
blocked = set(sys.argv.pop(1).split(","))
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Block())
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] in blocked else _find_spec(name, *a)
from llama_export.runtime.cli import main
main(sys.argv[1:])
"""
# What `pip install 'llama-export[ort]'` lacks, and what a bare install lacks on top of that.
NOT_IN_ORT = ("torch", "transformers", "onnx", "gguf", "safetensors", "accelerate", "onnxscript",
              "tensorrt", "polygraphy", "cuda")
NOT_IN_BARE = (*NOT_IN_ORT, "onnxruntime")


def _run(blocked: tuple[str, ...], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _BLOCKED_CLI, ",".join(blocked), *args],
                          capture_output=True, text=True, cwd="/", timeout=300, check=False)


@pytest.mark.parametrize(("args", "extra", "module"), [
    (("onnx", "-o", "{tmp}/out"), "export", "torch"),
    (("onnx", "{tmp}/model.gguf", "-o", "{tmp}/out"), "export", "torch"),
    (("verify", "{bundle}"), "export", "torch"),
    (("calibrate", "{bundle}"), "calibrate", "onnx"),
    (("quantize", "{bundle}", "--int4"), "calibrate", "onnx"),
    (("trt", "{bundle}", "--int8", "--dry-run"), "gpu", "onnx"),
    (("trt", "{bundle}", "--fp16", "--dry-run"), "gpu", "onnx"),
])
def test_ort_only_environment(tiny_bundle: Path, tmp_path: Path, args: tuple[str, ...],
                              extra: str, module: str) -> None:
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    argv = [a.format(tmp=tmp_path, bundle=tiny_bundle) for a in args]
    r = _run(NOT_IN_ORT, *argv)
    assert r.returncode == 2, r.stderr
    assert r.stderr == (f"error: `llama-export {args[0]}` (module '{module}' not found) needs the "
                        f"'{extra}' extra: pip install 'llama-export[{extra}]'\n")
    assert not (tmp_path / "out").exists()


def test_ort_only_environment_generates(tiny_bundle: Path) -> None:
    r = _run(NOT_IN_ORT, "generate", str(tiny_bundle), "--prompt", "ab", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_bare_environment(tiny_bundle: Path, command: str) -> None:
    args = ["--prompt", "ab"] if command == "generate" else ["--prompt-len", "4", "--gen-len", "3"]
    r = _run(NOT_IN_BARE, command, str(tiny_bundle), *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr  # one line, no traceback
    assert r.stderr.endswith(" needs the 'ort' extra: pip install 'llama-export[ort]'\n")
