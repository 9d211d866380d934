"""``llama-export parity``: which rows to run, and the backend each runs on.

A row is one (variant, graph or engine, backend). ONNX Runtime rows run every selected graph of
a variant (the ONNX-Runtime graph only on the CPU provider: its contrib ops have no TensorRT
provider support and CUDA kernels only for fp16); TensorRT rows run the engine the backend picks
for this GPU. Every row goes through :func:`.compare.compare_backend`: only the backend object
differs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_export.runtime.backends.base import Backend
from llama_export.runtime.errors import BundleError, InputError
from llama_export.runtime.manifest import Manifest

from .compare import Progress, Row, RowLabel, compare_backend
from .references import ReferenceSet, load_references
from .tolerances import tolerance_for

BACKENDS = ("ort", "trt")
GRAPH_CHOICES = ("all", "standard", "ort")


@dataclass(frozen=True)
class ParityOptions:
    variant: str = "all"        # all | a variant name
    graph: str = "all"          # all | standard | ort (ONNX Runtime rows)
    backend: str = "ort"        # ort | trt
    provider: str = "cpu"       # ONNX Runtime: cpu | cuda | tensorrt
    threads: int | None = None  # ONNX Runtime intra-op threads
    overrides: Mapping[str | None, Mapping[str, float | None]] = field(default_factory=dict)


@dataclass
class ParityResult:
    bundle: str
    references: ReferenceSet
    rows: list[Row]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        refs = self.references
        return {"bundle": self.bundle, "passed": self.passed,
                "references": {"top_k": refs.top_k, "items": [
                    {"name": it.name, "kind": it.kind, "prompt_tokens": it.prompt_tokens,
                     "new_tokens": it.new_tokens} for it in refs.items], **refs.provenance},
                "rows": [r.to_dict() for r in self.rows]}


# (bundle, manifest, variant, graph) -> an open backend. Tests pass fakes.
BackendFactory = Callable[[Path, Manifest, str, str], Backend]


def backend_factory(opts: ParityOptions) -> BackendFactory:
    if opts.backend == "ort":
        from llama_export.runtime.backends.ort import OrtBackend, OrtOptions

        def ort(bundle: Path, manifest: Manifest, variant: str, graph: str) -> Backend:
            return OrtBackend(bundle, manifest, variant, OrtOptions(
                provider=opts.provider, threads=opts.threads, graph=graph))
        return ort
    if opts.backend == "trt":
        def trt(bundle: Path, manifest: Manifest, variant: str, graph: str) -> Backend:
            from llama_export.runtime.backends.trt import TrtBackend
            return TrtBackend(bundle, manifest, variant)
        return trt
    raise InputError(f"--backend {opts.backend} is unknown: use one of {', '.join(BACKENDS)}")


def plan_rows(manifest: Manifest, opts: ParityOptions) -> list[tuple[str, str]]:
    """``(variant, graph)`` pairs to run, in manifest order; ``graph`` is ``engine`` for
    TensorRT rows."""
    if opts.graph not in GRAPH_CHOICES:
        raise InputError(f"--graph {opts.graph} is unknown: use one of {', '.join(GRAPH_CHOICES)}")
    names = list(manifest.variants) if opts.variant == "all" else [opts.variant]
    for name in names:
        manifest.variant(name)  # a clear error for a missing variant
    if opts.backend == "trt":
        built = {str(e.get("variant")) for e in manifest.engines}
        rows = [(n, "engine") for n in names if n in built or opts.variant != "all"]
        if not rows:
            raise BundleError("the bundle has no TensorRT engines: build them on this machine "
                              "with `llama-export trt BUNDLE --fp16|--int8|--int4`")
        return rows
    rows = []
    for name in names:
        have = manifest.graphs(name)
        if opts.provider != "cpu":
            have = ["standard"]  # see the module docstring
        wanted = have if opts.graph == "all" else [opts.graph]
        if opts.variant != "all" and opts.graph != "all" and opts.graph not in have:
            manifest.graph(name, opts.graph)  # raises the one-line error naming the fix
        rows += [(name, g) for g in wanted if g in have]
    if not rows:
        raise InputError(f"no variant has a {opts.graph} graph for --provider {opts.provider}: "
                         "use --graph all")
    return rows


def run_parity(bundle: str | os.PathLike[str], opts: ParityOptions | None = None,
               progress: Progress = lambda _: None,
               factory: BackendFactory | None = None) -> ParityResult:
    """Every selected row against the bundle's saved references."""
    opts = opts or ParityOptions()
    path = Path(bundle)
    manifest = Manifest.load(path)
    refs = load_references(path, manifest)  # sha256-checked
    rows = plan_rows(manifest, opts)
    make = factory or backend_factory(opts)
    out: list[Row] = []
    checked: set[str] = set()
    for variant, graph in rows:
        files = [] if graph == "engine" else manifest.files_of_variant(variant, graph)
        # Graphs of a variant share their weights file: hash it once. Engines: TrtBackend
        # checks the plan's sha256 itself.
        manifest.verify_files(path, only=[f for f in files if f not in checked])
        checked.update(files)
        precision = str(manifest.variant(variant).get("precision", variant))
        tol = tolerance_for(precision, opts.overrides)
        with make(path, manifest, variant, graph) as backend:
            label = RowLabel(variant, precision, _graph_label(backend, graph),
                             opts.backend if opts.backend == "trt" else f"ort:{opts.provider}")
            row = compare_backend(backend, refs, label, tol, progress)
        progress(f"{variant} ({label.graph}): {'pass' if row.passed else 'FAIL'}")
        out.append(row)
    return ParityResult(str(bundle), refs, out)


def _graph_label(backend: Backend, graph: str) -> str:
    entry = getattr(backend, "engine_entry", None)
    if graph == "engine" and isinstance(entry, dict):
        return Path(str(entry.get("path", "engine"))).name
    return graph


def format_table(result: ParityResult) -> str:
    """The parity table (plain text): one line per row, failures spelled out below."""
    head = (f"{'variant':8s} {'graph':20s} {'backend':9s} {'max|dl|':>9s} {'mean|dl|':>9s} "
            f"{'top-1':>7s} {'KL(top-k)':>10s} {'greedy':>13s} {'ppl (orig)':>17s}  result")
    lines = [head]
    for r in result.rows:
        ppl = "-" if r.ppl is None else f"{r.ppl:.3f} ({r.ppl_ref:.3f})"
        lines.append(f"{r.label.variant:8s} {r.label.graph:20s} {r.label.backend:9s} "
                     f"{r.max_abs:9.2e} {r.mean_abs:9.2e} {r.top1:7.1%} {r.kl:10.2e} "
                     f"{r.greedy_worst:>13s} {ppl:>17s}  {'pass' if r.passed else 'FAIL'}")
    for r in result.rows:
        if r.failures:
            lines.append(f"FAIL {r.label.variant} ({r.label.graph}, {r.label.backend}): "
                         + "; ".join(r.failures))
    n = sum(it.positions for it in result.references.items)
    lines.append(f"{len(result.references.items)} reference items, {n} positions, top-"
                 f"{result.references.top_k} logits of the PyTorch original; greedy = tokens "
                 "reproduced before the first divergence (worst prompt); KL on the top-k "
                 "renormalized")
    return "\n".join(lines)
