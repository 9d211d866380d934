"""The built wheel contains every module and imports from outside the repository.

Subpackages missing from pyproject's explicit package list would vanish from the wheel
silently; this builds the wheel, installs it into a scratch directory and imports every module
from there (cwd outside the repo, the scratch directory first on sys.path).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("exporter", "runtime", "calibration")


def _expected_modules() -> list[str]:
    mods = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT / pkg).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods.append(".".join(["llama_export", pkg, *parts]))
    return mods


def test_wheel_installs_and_imports_every_module(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dist), str(ROOT)], check=True, cwd=tmp_path)
    wheel = next(dist.glob("llama_export-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [m for m in _expected_modules()
               if m.replace(".", "/") + ".py" not in names
               and m.replace(".", "/") + "/__init__.py" not in names]
    assert not missing, f"modules missing from the wheel (add to pyproject packages): {missing}"
    assert not any(n.startswith(("tests/", "runtime/", "exporter/")) for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, cwd=tmp_path)
    code = (
        "import importlib, sys\n"
        f"sys.path.insert(0, {str(target)!r})\n"
        f"for m in {_expected_modules()!r}:\n"
        "    mod = importlib.import_module(m)\n"
        f"    assert mod.__file__.startswith({str(target)!r}), (m, mod.__file__)\n"
        "from importlib.metadata import version\n"
        "print(version('llama-export'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.stdout.strip()
