"""TensorRT 10.x vs 11.x: the one place that knows how the two generations differ (pure).

* 10.x (JetPack 6): networks are weakly typed unless created with the ``STRONGLY_TYPED`` flag;
  ``--stronglyTyped`` for trtexec. Precision flags (FP16/INT8) and calibrators still exist but
  we never use them: precision comes from the ONNX variant (fp16 graph, Q/DQ INT8/INT4).
* 11.x: every network is strongly typed (the flag is accepted and ignored, ``--stronglyTyped`` is
  a no-op); the precision flags and the calibrator are gone.
* 9.x and older: no strongly typed networks worth the name: refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from llama_export.runtime.engines import parse_version
from llama_export.runtime.errors import InputError, MissingDependencyError

PRECISIONS = ("fp32", "fp16", "int8", "int4")
OPT_LEVELS = range(6)  # TensorRT's builder_optimization_level: 0 (fast build) .. 5 (slowest)


@dataclass(frozen=True)
class Generation:
    """What the build code must do differently for a TensorRT major version."""

    major: int
    strongly_typed_flag: bool  # pass NetworkDefinitionCreationFlag.STRONGLY_TYPED
    trtexec_strongly_typed: bool  # pass --stronglyTyped
    dla: bool  # DLA cores exist on this generation's platforms (Orin, JetPack 6)


def generation(version: str) -> Generation:
    major = parse_version(version)[0]
    if major < 10:
        raise MissingDependencyError(
            f"TensorRT {version} is too old (strongly typed builds need 10.x or 11.x)", "gpu")
    if major == 10:
        return Generation(10, strongly_typed_flag=True, trtexec_strongly_typed=True, dla=True)
    # 11.x and later: strong typing is unconditional; Thor (JetPack 7) has no DLA.
    return Generation(major, strongly_typed_flag=False, trtexec_strongly_typed=False, dla=False)


@dataclass(frozen=True)
class BuildOptions:
    """``llama-export trt`` build settings (what the manifest's ``build_options`` records)."""

    precision: str = "fp16"
    opt_level: int = 3
    timing_cache: str | None = None
    hardware_compatible: bool = False
    version_compatible: bool = False
    dla_core: int | None = None
    workspace_mib: int | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"precision {self.precision!r} is unknown: use one of "
                             f"{', '.join(PRECISIONS)}")
        if self.opt_level not in OPT_LEVELS:
            raise InputError(f"--opt-level {self.opt_level} is outside 0..5: use 3 (TensorRT's "
                             "default), lower for faster builds, 5 for the most tuning")
        if self.dla_core is not None and self.dla_core < 0:
            raise InputError(f"--dla-core {self.dla_core} is invalid: use 0 or 1 (Orin)")
        if self.dla_core is not None and self.precision in ("fp32", "int4"):
            raise InputError(f"--dla-core needs an fp16 or int8 engine (DLA has no "
                             f"{self.precision} kernels): use --fp16 or --int8")
        if self.dla_core is not None and self.hardware_compatible:
            raise InputError("--dla-core and --hardware-compatible exclude each other (DLA "
                             "engines are device-specific): drop one")

    @property
    def hardware_compatibility(self) -> str:
        return "ampere_plus" if self.hardware_compatible else "none"

    def to_dict(self) -> dict[str, object]:
        return {"precision": self.precision, "opt_level": self.opt_level,
                "timing_cache": self.timing_cache,
                "hardware_compatibility": self.hardware_compatibility,
                "version_compatible": self.version_compatible, "dla_core": self.dla_core,
                "workspace_mib": self.workspace_mib, "strongly_typed": True}


def check_options_for(gen: Generation, opts: BuildOptions) -> None:
    """Options the installed TensorRT cannot honour, as one-line errors."""
    if opts.dla_core is not None and not gen.dla:
        raise InputError(f"--dla-core needs TensorRT 10.x on a DLA device (Jetson Orin, "
                         f"JetPack 6); TensorRT {gen.major}.x targets have no DLA: drop --dla-core")
