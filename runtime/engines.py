"""TensorRT engine entries in the manifest, and whether an engine can run here (pure, no GPU).

The builder (``llama-export trt``, in calibration) writes entries with :func:`engine_entry`; the
runtime's ``TrtBackend`` picks one with :func:`select_engine`. Both sides share this module so
the schema and the compatibility rule live in one place (the runtime must not import
calibration; calibration may import the runtime).

An entry (one per ``BUNDLE/engines/*.plan``)::

    {"path": "engines/rtx-4090-int8.plan", "precision": "int8", "variant": "int8",
     "source_file": "model.int8.onnx", "source_sha256": "...",
     "tensorrt_version": "10.3.0", "gpu": {"name": "NVIDIA GeForce RTX 4090",
     "compute_capability": "8.9"}, "hardware_compatibility": "none" | "ampere_plus",
     "version_compatible": false, "dla_core": null,
     "limits": {"max_batch": 8, "max_prompt": 256, "max_context": 256},
     "profiles": [{"name": "prefill", "shapes": {input: {"min": [..], "opt": [..], "max": [..]}}},
                  {"name": "decode", ...}],
     "build_options": {...}, "sha256": "...", "build_seconds": 12.3, "built_at": "...Z"}

Compatibility rule (TensorRT's own): a plain engine runs only on the same GPU model (compute
capability) with the exact TensorRT version that built it. ``hardware_compatibility:
ampere_plus`` relaxes the GPU to any compute capability >= 8.0; ``version_compatible`` relaxes
the TensorRT version to any later release of the same major version.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llama_export.runtime.errors import BundleError, HardwareError, InputError
from llama_export.runtime.manifest import Manifest

ENGINES_DIR = "engines"
PREFILL, DECODE = "prefill", "decode"  # profile 0 and 1, in that order
HARDWARE_LEVELS = ("none", "ampere_plus")


@dataclass(frozen=True)
class GpuInfo:
    """What the compatibility check needs to know about a GPU."""

    name: str
    compute_capability: tuple[int, int]
    total_memory: int | None = None  # bytes

    @property
    def sm(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


def parse_version(text: str) -> tuple[int, ...]:
    """``"10.3.0.26"`` → ``(10, 3, 0, 26)``; trailing tags (``"11.4.1.post1"``) are dropped."""
    parts: list[int] = []
    for piece in str(text).split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    if not parts:
        raise ValueError(f"not a version: {text!r}")
    return tuple(parts)


def parse_compute_capability(text: str) -> tuple[int, int]:
    major, _, minor = str(text).partition(".")
    return int(major), int(minor or 0)


def gpu_slug(gpu: GpuInfo | None, hardware_compatibility: str = "none",
             dla_core: int | None = None) -> str:
    """File-name slug: ``NVIDIA GeForce RTX 4090`` → ``rtx-4090``; ``Orin (nvgpu)`` → ``orin``."""
    if hardware_compatibility == "ampere_plus":
        base = "ampere-plus"
    elif gpu is None:
        base = "target"  # planning on a machine without the GPU (trtexec lines, --dry-run)
    else:
        name = re.sub(r"\(.*?\)", " ", gpu.name.lower())
        name = re.sub(r"\b(nvidia|geforce|tesla|corporation)\b", " ", name)
        base = re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"
    return f"{base}-dla{dla_core}" if dla_core is not None else base


def engine_path(slug: str, precision: str) -> str:
    return f"{ENGINES_DIR}/{slug}-{precision}.plan"


@dataclass(frozen=True)
class EngineBuild:
    """What one build produced, as recorded in the manifest (see the module docstring)."""

    path: str
    precision: str
    variant: str
    source_file: str
    source_sha256: str
    tensorrt_version: str
    gpu: GpuInfo | None
    hardware_compatibility: str
    version_compatible: bool
    dla_core: int | None
    limits: Mapping[str, int]
    profiles: Sequence[Mapping[str, Any]]
    build_options: Mapping[str, Any]
    sha256: str
    build_seconds: float
    built_at: str


def engine_entry(b: EngineBuild) -> dict[str, Any]:
    gpu = None if b.gpu is None else {"name": b.gpu.name, "compute_capability": b.gpu.sm}
    return {"path": b.path, "precision": b.precision, "variant": b.variant,
            "source_file": b.source_file, "source_sha256": b.source_sha256,
            "tensorrt_version": b.tensorrt_version, "gpu": gpu,
            "hardware_compatibility": b.hardware_compatibility,
            "version_compatible": b.version_compatible, "dla_core": b.dla_core,
            "limits": dict(b.limits), "profiles": [dict(p) for p in b.profiles],
            "build_options": dict(b.build_options), "sha256": b.sha256,
            "build_seconds": round(b.build_seconds, 3), "built_at": b.built_at}


def upsert_engine(data: dict[str, Any], entry: dict[str, Any]) -> None:
    """Add ``entry`` to the manifest dict, replacing an entry for the same path."""
    engines = [e for e in data.get("engines", []) if e.get("path") != entry["path"]]
    data["engines"] = [*engines, entry]


def incompatibility(entry: Mapping[str, Any], gpu: GpuInfo, trt_version: str) -> str | None:
    """Why ``entry`` cannot run on ``gpu`` with TensorRT ``trt_version``; None when it can."""
    built = parse_version(entry["tensorrt_version"])
    here = parse_version(trt_version)
    if entry.get("version_compatible"):
        if built[0] != here[0] or here[:3] < built[:3]:
            return (f"it was built version-compatible with TensorRT {entry['tensorrt_version']}, "
                    f"which runs on TensorRT {built[0]}.x >= {entry['tensorrt_version']} only, "
                    f"not {trt_version}")
    elif built[:3] != here[:3]:
        return f"it was built with TensorRT {entry['tensorrt_version']}, this is TensorRT {trt_version}"
    egpu = entry.get("gpu") or {}
    built_cc = parse_compute_capability(egpu.get("compute_capability", "0.0"))
    if entry.get("hardware_compatibility", "none") == "ampere_plus":
        if gpu.compute_capability < (8, 0):
            return (f"it was built for Ampere or newer GPUs (SM >= 8.0), this {gpu.name} is "
                    f"SM {gpu.sm}")
    elif built_cc != gpu.compute_capability:
        return (f"it was built for {egpu.get('name', '?')} (SM {egpu.get('compute_capability')}), "
                f"this GPU is {gpu.name} (SM {gpu.sm})")
    return None


def select_engine(engines: Sequence[Mapping[str, Any]], variant: str, gpu: GpuInfo,
                  trt_version: str, bundle: str = "BUNDLE") -> dict[str, Any]:
    """The first engine of ``variant`` that runs here, or a one-line error naming why not."""
    mine = [e for e in engines if e.get("variant") == variant]
    if not mine:
        have = ", ".join(sorted({str(e.get("variant")) for e in engines})) or "none"
        raise BundleError(
            f"bundle has no TensorRT engine for variant '{variant}' (engines for: {have}): "
            f"build one on this machine with `llama-export trt {bundle} --{variant}`")
    reasons = []
    for e in mine:
        why = incompatibility(e, gpu, trt_version)
        if why is None:
            return dict(e)
        reasons.append(f"{e['path']}: {why}")
    raise HardwareError(
        f"no '{variant}' engine in the bundle runs here ({'; '.join(reasons)}): rebuild it on "
        f"this machine with `llama-export trt {bundle} --{variant}` (engines are tied to the GPU "
        "and TensorRT version that built them)")


@dataclass(frozen=True)
class Limits:
    max_batch: int
    max_prompt: int
    max_context: int

    def to_dict(self) -> dict[str, int]:
        return {"max_batch": self.max_batch, "max_prompt": self.max_prompt,
                "max_context": self.max_context}


def select_profile(limits: Limits, batch: int, seq: int, past: int) -> int:
    """Index of the profile that covers a step (0 = prefill, 1 = decode), or a one-line error."""
    if batch > limits.max_batch:
        raise InputError(f"batch {batch} exceeds the engine's max batch {limits.max_batch}: "
                         "pass fewer prompts or rebuild with `llama-export trt --max-batch`")
    if past + seq > limits.max_context:
        raise InputError(f"{past + seq} positions exceed the engine's max context "
                         f"{limits.max_context}: shorten the generation or rebuild with "
                         "`llama-export trt --max-context`")
    if past == 0:
        if seq > limits.max_prompt:
            raise InputError(f"prompt of {seq} tokens exceeds the engine's max prompt "
                             f"{limits.max_prompt}: shorten it or rebuild with "
                             "`llama-export trt --max-prompt`")
        return 0
    if seq != 1:
        raise InputError(f"{seq} tokens after {past} cached positions: the TensorRT engine "
                         "covers prefill (empty cache) and one-token decode steps only; run the "
                         "prompt in one call or use --backend ort")
    return 1


def engine_view(manifest: Manifest, limits: Limits) -> Manifest:
    """The manifest with its dims narrowed to what an engine was built for.

    TrtBackend exposes this view, so the generation loop's own capacity checks (prompt length,
    cache capacity, batch size) already speak in the engine's limits.
    """
    data = copy.deepcopy(manifest.data)
    dims = data["dims"]
    for name, hi in (("batch", limits.max_batch), ("seq", limits.max_prompt),
                     ("past", limits.max_context - 1), ("total", limits.max_context)):
        d = dims[name]
        d["max"] = min(int(d["max"]), hi)
        d["opt"] = min(int(d["opt"]), d["max"])
    return Manifest(data)
