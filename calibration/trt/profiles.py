"""TensorRT optimization profiles from the manifest's named dims (pure).

One engine serves both phases of generation with two profiles, each tuned for its own shapes
(a single ``seq in [1, P]`` profile would tune decode kernels for a prompt length decode never
sees)::

    profile   batch      seq        past          total = past + seq
    prefill   1..B       1..P       0             1..P
    decode    1..B       1          1..C-1        2..C

``B``/``P``/``C`` are the user's ``--max-batch`` / ``--max-prompt`` / ``--max-context``, bounded
by what the ONNX graph was exported for (``dims`` in the manifest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llama_export.runtime.engines import DECODE, PREFILL, Limits
from llama_export.runtime.errors import InputError
from llama_export.runtime.manifest import Manifest, TensorSpec

Shape = tuple[int, ...]
__all__ = ["DECODE", "PREFILL", "Limits", "Profile", "limits_from_manifest", "phase_dims",
           "profiles_from_manifest", "validate_profiles"]


@dataclass(frozen=True)
class Profile:
    """min/opt/max shape of every graph input (``shapes[name] = (min, opt, max)``)."""

    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name,
                "shapes": {k: {"min": list(a), "opt": list(b), "max": list(c)}
                           for k, (a, b, c) in self.shapes.items()}}


def limits_from_manifest(manifest: Manifest, max_batch: int | None = None,
                         max_prompt: int | None = None, max_context: int | None = None) -> Limits:
    """The user's limits (defaults: the graph's own maxima), checked against the manifest."""
    d = manifest.dims
    context = d["total"].max if max_context is None else max_context
    batch = d["batch"].max if max_batch is None else max_batch
    prompt = min(d["seq"].max, context - 1) if max_prompt is None else max_prompt
    _check_range("--max-batch", batch, 1, d["batch"].max, "the bundle's max batch")
    _check_range("--max-context", context, 2, d["total"].max, "the bundle's max context")
    _check_range("--max-prompt", prompt, 1, min(d["seq"].max, context - 1),
                 "the bundle's max seq and --max-context - 1")
    return Limits(batch, prompt, context)


def _check_range(flag: str, value: int, lo: int, hi: int, what: str) -> None:
    if not lo <= value <= hi:
        raise InputError(f"{flag} {value} is outside {lo}..{hi} ({what}): pick a value in range, "
                         "or re-export the bundle with larger --max-batch / --max-seq-len")


def phase_dims(manifest: Manifest, limits: Limits) -> dict[str, dict[str, tuple[int, int, int]]]:
    """Named dim → (min, opt, max) per profile; opt points come from the manifest, clipped."""
    d = manifest.dims
    b = (1, max(1, min(d["batch"].opt, limits.max_batch)), limits.max_batch)
    p_opt = max(1, min(d["seq"].opt, limits.max_prompt))
    c_opt = max(1, min(d["past"].opt, limits.max_context - 1))
    return {
        PREFILL: {"batch": b, "seq": (1, p_opt, limits.max_prompt), "past": (0, 0, 0),
                  "total": (1, p_opt, limits.max_prompt)},
        DECODE: {"batch": b, "seq": (1, 1, 1), "past": (1, c_opt, limits.max_context - 1),
                 "total": (2, c_opt + 1, limits.max_context)},
    }


def profiles_from_manifest(manifest: Manifest, variant: str, limits: Limits) -> list[Profile]:
    """The prefill and decode profiles for every input of ``variant`` (in that order)."""
    inputs = manifest.inputs(variant)
    out = []
    for name, dims in phase_dims(manifest, limits).items():
        shapes = {spec.name: _resolve(spec, dims) for spec in inputs}
        out.append(Profile(name, shapes))
    validate_profiles(out)
    return out


def _resolve(spec: TensorSpec, dims: dict[str, tuple[int, int, int]]) -> tuple[Shape, Shape, Shape]:
    picked: list[tuple[int, int, int]] = []
    for dim in spec.dims:
        if isinstance(dim, int):
            picked.append((dim, dim, dim))
        elif dim in dims:
            picked.append(dims[dim])
        else:
            raise InputError(f"input {spec.name} has dim '{dim}' the TensorRT profiles do not know "
                             "(expected batch/seq/past/total or an integer): re-export the bundle")
    lo, opt, hi = (tuple(p[i] for p in picked) for i in range(3))
    return lo, opt, hi


def validate_profiles(profiles: list[Profile]) -> None:
    """min <= opt <= max everywhere, same inputs and ranks in every profile."""
    names = set(profiles[0].shapes) if profiles else set()
    for prof in profiles:
        if set(prof.shapes) != names:
            raise InputError(f"profile {prof.name} covers different inputs: re-export the bundle")
        for name, (lo, opt, hi) in prof.shapes.items():
            if not (len(lo) == len(opt) == len(hi)) or not all(
                    a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
                raise InputError(f"profile {prof.name}: {name} min/opt/max {lo}/{opt}/{hi} is "
                                 "inconsistent: check --max-batch/--max-prompt/--max-context")
