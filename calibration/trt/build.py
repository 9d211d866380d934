"""The real TensorRT build (thin: every decision was made by the pure modules).

    ONNX variant ──OnnxParser──► network (strongly typed: precision from the graph)
        + profiles (prefill, decode) + options ──build_serialized_network──► plan bytes
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_export.runtime.errors import BundleError, HardwareError

from .compat import BuildOptions, Generation
from .profiles import Profile


@dataclass(frozen=True)
class BuildResult:
    plan: bytes
    timing_cache: bytes | None


def import_tensorrt_or_none() -> Any | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt


def missing_profile_inputs(network_inputs: list[str], profiles: list[Profile]) -> list[str]:
    """Network inputs the profiles do not cover (the manifest and the graph disagree)."""
    covered = set(profiles[0].shapes) if profiles else set()
    return [n for n in network_inputs if n not in covered]


def parse_network(trt: Any, builder: Any, logger: Any, onnx_path: Path,
                  gen: Generation) -> tuple[Any, Any]:
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if gen.strongly_typed_flag else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external data (model.onnx.data) next to the file.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BundleError(f"TensorRT's ONNX parser rejected {onnx_path.name} ({errors}): report "
                          "it with the TensorRT version; meanwhile use --backend ort")
    return network, parser  # the parser must outlive the network's weights


def configure(trt: Any, builder: Any, profiles: list[Profile], opts: BuildOptions,
              timing: bytes | None) -> Any:
    config = builder.create_builder_config()
    config.builder_optimization_level = opts.opt_level
    if opts.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mib << 20)
    for prof in profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.shapes.items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    cache = config.create_timing_cache(timing or b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    if opts.hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if opts.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if opts.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = opts.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers DLA cannot run go to the GPU
    return config


def build_engine(trt: Any, onnx_path: Path, profiles: list[Profile], opts: BuildOptions,
                 gen: Generation, progress: Callable[[str], None]) -> BuildResult:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    progress(f"parsing {onnx_path.name} (TensorRT {trt.__version__}, strongly typed)")
    network, _parser = parse_network(trt, builder, logger, onnx_path, gen)
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if missing := missing_profile_inputs(names, profiles):
        raise BundleError(f"graph inputs {', '.join(missing)} are not in the manifest: the bundle "
                          "is inconsistent, re-export it")
    timing = None
    if opts.timing_cache and Path(opts.timing_cache).is_file():
        timing = Path(opts.timing_cache).read_bytes()
    config = configure(trt, builder, profiles, opts, timing)
    progress(f"building (optimization level {opts.opt_level}; minutes for large models)")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise HardwareError("TensorRT could not build the engine (see its log above): free GPU "
                            "memory, lower --max-batch/--max-context, or try --opt-level 2")
    cache = bytes(config.get_timing_cache().serialize()) if opts.timing_cache else None
    return BuildResult(bytes(plan), cache)
