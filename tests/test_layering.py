"""Layer rules (shared/DESIGN.md §2): dependencies point down only.

Static check: every import statement in each package (including ones inside functions) is
allowed for its layer. Dynamic check: importing the runtime and calibration packages, and
`llama-export --help`, never load torch or transformers.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "runtime": {"torch", "transformers", "llama_export.exporter", "llama_export.calibration",
                "onnx", "gguf", "safetensors"},
    "calibration": {"torch", "transformers", "llama_export.exporter", "gguf", "safetensors"},
    "exporter": {"tensorrt", "llama_export.calibration"},
}


def _imports(path: Path) -> set[str]:
    mods: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
    return mods


# The repo folders are not the package names: `import runtime` only works from the repo root.
FOLDER_NAMES = {"runtime", "exporter", "calibration"}
# The HTTP stack (extra [serve]) belongs to runtime/serve's HTTP modules only; the engine
# (engine.py, slots.py, metrics.py) stays importable without it.
HTTP_STACK = {"fastapi", "starlette", "uvicorn", "pydantic", "prometheus_client", "httpx",
              "openai"}
HTTP_MODULES = {"app.py", "protocol.py", "prometheus.py", "server.py", "loadgen.py",
                "commands.py"}


# Ray (extra [ray]) belongs to runtime/serve/ray.py alone, which also uses the HTTP stack; the
# Ray test only drives it from outside (subprocesses, HTTP) and imports ray to be skipped.
RAY_MODULES = {ROOT / "runtime" / "serve" / "ray.py", ROOT / "tests" / "test_serve_ray.py"}


def _banned(package: str, path: Path) -> set[str]:
    banned = FORBIDDEN.get(package, set()) | FOLDER_NAMES
    in_serve = path.parent == ROOT / "runtime" / "serve" and (path.name in HTTP_MODULES
                                                                or path.name == "ray.py")
    if package in FORBIDDEN and not in_serve:
        banned |= HTTP_STACK
    if path not in RAY_MODULES:
        banned |= {"ray"}
    return banned


@pytest.mark.parametrize("package", [*sorted(FORBIDDEN), "tests", "examples", "benchmarks"])
def test_static_imports_respect_layers(package: str) -> None:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for mod in _imports(path):
            for banned in _banned(package, path):
                if mod == banned or mod.startswith(banned + "."):
                    bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, "\n".join(bad)


def _modules(package: str) -> list[str]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT / package).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out.append(".".join(["llama_export", package, *parts]))
    return out


@pytest.mark.parametrize("package", ["runtime", "calibration"])
def test_runtime_and_calibration_never_load_torch(package: str) -> None:
    code = (
        "import importlib, sys\n"
        f"for m in {_modules(package)!r}:\n"
        "    importlib.import_module(m)\n"
        "bad = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_help_is_lazy() -> None:
    code = (
        "import sys\n"
        "from llama_export.runtime.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'onnx', 'onnxruntime', 'fastapi', 'uvicorn', 'ray') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd="/", capture_output=True,
                         text=True)
    for cmd in ("onnx", "generate", "bench", "serve", "bench-serve", "calibrate", "quantize",
                "trt", "verify", "parity"):
        assert f"  {cmd} " in out.stdout
