"""``llama-export trt``: every step that needs no GPU first, then the build.

    manifest ─► variant (made if missing) ─► sha256 + graph check (ops, IO) ─► limits/profiles
        ─► memory estimate ─► plan printed [─► trtexec lines]        (all CPU; --dry-run stops)
        ─► tensorrt? GPU? (else: trtexec lines + one-line error)
        ─► build ─► engines/<gpu>-<precision>.plan (temp + rename) ─► manifest entry (last)
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx

from llama_export.runtime.engines import (
    EngineBuild,
    GpuInfo,
    Limits,
    engine_entry,
    engine_path,
    gpu_slug,
    upsert_engine,
)
from llama_export.runtime.errors import HardwareError, InputError
from llama_export.runtime.manifest import Manifest, sha256_file

from . import gpu as gpu_mod
from .build import BuildResult, build_engine, import_tensorrt_or_none
from .compat import BuildOptions, check_options_for, generation
from .graph_check import check_graph_for_tensorrt, dq_weight_types, qdq_summary
from .memory import MemoryEstimate, estimate_memory, mib, weight_bytes
from .profiles import Profile, limits_from_manifest, profiles_from_manifest
from .trtexec import trtexec_commands
from .variants import DEFAULT_MAKERS, VariantMaker, ensure_variant, missing_variant_error

NO_TENSORRT = ("TensorRT is not installed here: pip install 'llama-export[gpu]' on a machine with "
               "an NVIDIA GPU and run this command there, or build on the target with the trtexec "
               "command printed above")
NO_GPU = ("no NVIDIA GPU found here (a TensorRT engine is built on the GPU it runs on): run "
          "this command on the target machine, or build there with the trtexec command printed "
          "above")


@dataclass(frozen=True)
class TrtRequest:
    bundle: Path
    build: BuildOptions = field(default_factory=BuildOptions)
    max_batch: int | None = None
    max_prompt: int | None = None
    max_context: int | None = None
    dry_run: bool = False
    print_trtexec: bool = False
    device: int = 0
    register: str | None = None  # record an engine trtexec built instead of building one


def _stderr(msg: str) -> None:
    print(f"[llama-export trt] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Hooks:
    """Seams: what creates variants, finds TensorRT and the GPU, and where text goes."""

    makers: Mapping[str, VariantMaker] | None = None
    load_tensorrt: Callable[[], Any | None] = import_tensorrt_or_none
    detect_gpu: Callable[[int], GpuInfo | None] = gpu_mod.detect_gpu
    out: Callable[[str], None] = print
    progress: Callable[[str], None] = _stderr


@dataclass(frozen=True)
class Plan:
    variant: str
    onnx_file: str
    exists: bool  # False: --dry-run on a bundle that still lacks the variant
    graph_note: str
    limits: Limits
    profiles: list[Profile]
    engine_file: str
    gpu: GpuInfo | None
    memory: MemoryEstimate


def make_plan(bundle: Path, manifest: Manifest, req: TrtRequest, gpu: GpuInfo | None) -> Plan:
    precision = req.build.precision
    exists = precision in manifest.variants
    # A missing variant (dry run) is planned from the graph it will be made from: same IO.
    variant = precision if exists else manifest.default_variant()
    onnx_file = str(manifest.variant(variant)["file"]) if exists else f"model.{precision}.onnx"
    model = onnx.load(str(bundle / manifest.variant(variant)["file"]), load_external_data=False)
    counts = check_graph_for_tensorrt(model, onnx_file if exists else f"{variant} graph",
                                      [s.name for s in manifest.inputs(variant)])
    note = f"{len(counts)} op types, all in TensorRT 10's ONNX parser; {qdq_summary(model, counts)}"
    if exists and precision == "int4" and "INT4" not in dq_weight_types(model):
        note += ("; WARNING: no INT4 weights, TensorRT will build what the graph holds "
                 "(INT8 weight-only), not INT4")
    if not exists:
        note = (f"not made yet: will be created from the {variant} graph, whose {note}; "
                f"weights below are the {variant} size, an upper bound")
    limits = limits_from_manifest(manifest, req.max_batch, req.max_prompt, req.max_context)
    profiles = profiles_from_manifest(manifest, variant, limits)
    memory = estimate_memory(manifest, variant, limits, weight_bytes(model))
    slug = gpu_slug(gpu, req.build.hardware_compatibility, req.build.dla_core)
    return Plan(precision, onnx_file, exists, note, limits, profiles, engine_path(slug, precision),
                gpu, memory)


def _shape_range(lo: tuple[int, ...], opt: tuple[int, ...], hi: tuple[int, ...]) -> str:
    return " .. ".join("x".join(map(str, s)) for s in (lo, opt, hi))


def plan_text(bundle: Path, plan: Plan, opts: BuildOptions) -> str:
    gpu = "none found" if plan.gpu is None else f"{plan.gpu.name} (SM {plan.gpu.sm})"
    lim = plan.limits
    lines = [f"TensorRT plan for {bundle}",
             f"  variant   {plan.variant}: {plan.onnx_file} ({plan.graph_note})",
             f"  GPU       {gpu}",
             f"  limits    batch <= {lim.max_batch}, prompt <= {lim.max_prompt}, "
             f"context <= {lim.max_context}"]
    for i, prof in enumerate(plan.profiles):
        shown = [n for n in prof.shapes if not n.startswith("past_key_values.")]
        kv = [n for n in prof.shapes if n.startswith("past_key_values.")]
        parts = [f"{n} {_shape_range(*prof.shapes[n])}" for n in shown]
        if kv:
            parts.append(f"{len(kv)} past_key_values.* {_shape_range(*prof.shapes[kv[0]])}")
        lines.append(f"  profile {i} ({prof.name}): " + "; ".join(parts))
    flags = [f"opt level {opts.opt_level}"]
    flags += ["hardware-compatible (Ampere+)"] if opts.hardware_compatible else []
    flags += ["version-compatible"] if opts.version_compatible else []
    flags += [f"DLA core {opts.dla_core}"] if opts.dla_core is not None else []
    flags += [f"timing cache {opts.timing_cache}"] if opts.timing_cache else []
    lines.append(f"  engine    {plan.engine_file} (strongly typed; {', '.join(flags)})")
    lines.append("  device memory at max batch and context:")
    lines += plan.memory.lines()
    if plan.gpu is not None and plan.gpu.total_memory:
        lines.append(f"  GPU memory {mib(plan.gpu.total_memory)}")
    return "\n".join(lines)


def run_trt(req: TrtRequest, hooks: Hooks | None = None) -> Path | None:
    """Plan (and unless ``dry_run``, build) an engine; returns the engine path when built."""
    hooks = hooks or Hooks()
    bundle, opts = Path(req.bundle), req.build
    manifest = Manifest.load(bundle)
    makeable = DEFAULT_MAKERS if hooks.makers is None else hooks.makers
    if req.dry_run:
        if opts.precision not in manifest.variants and opts.precision not in makeable:
            raise missing_variant_error(bundle, manifest, opts.precision)
    else:
        manifest = ensure_variant(bundle, manifest, opts.precision, hooks.makers, hooks.progress)
    if opts.precision in manifest.variants:
        manifest.verify_files(bundle, only=manifest.files_of_variant(opts.precision))
    gpu = hooks.detect_gpu(req.device)
    plan = make_plan(bundle, manifest, req, gpu)
    hooks.out(plan_text(bundle, plan, opts))
    trtexec = trtexec_commands(plan.onnx_file, plan.engine_file, plan.profiles, opts)
    if req.print_trtexec:
        hooks.out(trtexec)
    if req.dry_run:
        return None
    trt = hooks.load_tensorrt()
    if trt is None or gpu is None:
        if not req.print_trtexec:
            hooks.out(trtexec)
        raise HardwareError(NO_TENSORRT if trt is None else NO_GPU)
    return _build_or_register(req, hooks, plan, trt, gpu)


def _build_or_register(req: TrtRequest, hooks: Hooks, plan: Plan, trt: Any, gpu: GpuInfo) -> Path:
    bundle, opts = Path(req.bundle), req.build
    gen = generation(str(trt.__version__))
    check_options_for(gen, opts)
    info = EngineInfo(str(trt.__version__), gpu, opts, 0.0)
    if req.register:
        rel = register_path(bundle, req.register)
        record_engine(bundle, plan, rel, info)
        hooks.progress(f"recorded {rel} in the manifest (TensorRT {trt.__version__}, {gpu.name})")
        return bundle / rel
    if gpu.total_memory and plan.memory.total > gpu.total_memory:
        hooks.progress(f"warning: the estimate ({mib(plan.memory.total)}) exceeds GPU memory "
                       f"({mib(gpu.total_memory)}); lower --max-batch / --max-context if it fails")
    if req.device:  # the builder compiles for the current CUDA device
        from llama_export.runtime.backends.trt import cuda_call, import_cudart

        cudart = import_cudart()
        cuda_call(cudart, cudart.cudaSetDevice(req.device))
    t0 = time.perf_counter()
    result = build_engine(trt, bundle / plan.onnx_file, plan.profiles, opts, gen, hooks.progress)
    seconds = time.perf_counter() - t0
    path = write_engine(bundle, plan, result, dataclasses.replace(info, seconds=seconds))
    hooks.progress(f"engine written to {path} in {seconds:.1f} s")
    return path


@dataclass(frozen=True)
class EngineInfo:
    tensorrt_version: str
    gpu: GpuInfo
    opts: BuildOptions
    seconds: float


def write_engine(bundle: Path, plan: Plan, result: BuildResult, info: EngineInfo) -> Path:
    """Plan file (temp + rename), timing cache, then the manifest entry, last."""
    target = bundle / plan.engine_file
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, result.plan)
    if result.timing_cache is not None and info.opts.timing_cache:
        atomic_write_bytes(Path(info.opts.timing_cache), result.timing_cache)
    record_engine(bundle, plan, plan.engine_file, info)
    return target


def record_engine(bundle: Path, plan: Plan, rel: str, info: EngineInfo) -> None:
    """Add (or replace) the manifest entry of the engine at ``bundle/rel``."""
    manifest = Manifest.load(bundle)  # re-read: another command may have added to it meanwhile
    opts = info.opts
    build = EngineBuild(
        path=rel, precision=plan.variant, variant=plan.variant,
        source_file=plan.onnx_file, source_sha256=manifest.data["files"].get(plan.onnx_file, ""),
        tensorrt_version=info.tensorrt_version, gpu=info.gpu,
        hardware_compatibility=opts.hardware_compatibility,
        version_compatible=opts.version_compatible, dla_core=opts.dla_core,
        limits=plan.limits.to_dict(), profiles=[p.to_dict() for p in plan.profiles],
        build_options=opts.to_dict(), sha256=sha256_file(bundle / rel),
        build_seconds=info.seconds,
        built_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    upsert_engine(manifest.data, engine_entry(build))
    manifest.data["files"][rel] = build.sha256
    manifest.save(bundle)


def register_path(bundle: Path, plan_file: str) -> str:
    """``--register``: the engine's path relative to the bundle (it must live inside it)."""
    path = Path(plan_file)
    path = path if path.is_absolute() else Path.cwd() / path
    if not path.is_file():
        raise InputError(f"--register {plan_file}: no such file: pass the .plan trtexec wrote")
    try:
        return path.resolve().relative_to(bundle.resolve()).as_posix()
    except ValueError:
        raise InputError(f"--register {plan_file} is outside {bundle}: move it into "
                         f"{bundle}/engines/ first (the bundle is copied as a whole)") from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
