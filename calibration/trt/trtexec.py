"""``trtexec`` command lines equivalent to ``llama-export trt`` (pure).

A Jetson user copies the bundle and builds on the device without Python: run the printed command
inside the bundle folder. Two generations (see :mod:`.compat`): 10.x needs ``--stronglyTyped``;
11.x is always strongly typed and has no DLA. Profiles use trtexec's ``--profile=N`` prefix
before each ``--minShapes/--optShapes/--maxShapes`` set, in the order TrtBackend expects
(0 = prefill, 1 = decode).
"""

from __future__ import annotations

from .compat import BuildOptions, Generation
from .profiles import Profile, Shape


def shape_spec(shapes: dict[str, Shape]) -> str:
    """``name:1x2x0x16,...`` (trtexec's shape syntax; a 0 dim is an empty past)."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shape)}" for name, shape in shapes.items())


def trtexec_args(onnx_file: str, engine_file: str, profiles: list[Profile], opts: BuildOptions,
                 gen: Generation) -> list[str]:
    args = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={engine_file}"]
    if gen.trtexec_strongly_typed:
        args.append("--stronglyTyped")
    for i, prof in enumerate(profiles):
        args.append(f"--profile={i}")
        for k, flag in enumerate(("--minShapes", "--optShapes", "--maxShapes")):
            args.append(f"{flag}={shape_spec({n: s[k] for n, s in prof.shapes.items()})}")
    args.append(f"--builderOptimizationLevel={opts.opt_level}")
    if opts.timing_cache:
        args.append(f"--timingCacheFile={opts.timing_cache}")
    if opts.hardware_compatible:
        args.append("--hardwareCompatibilityLevel=ampere+")
    if opts.version_compatible:
        args.append("--versionCompatible")
    if opts.workspace_mib:
        args.append(f"--memPoolSize=workspace:{opts.workspace_mib}M")
    if opts.dla_core is not None and gen.dla:
        args += [f"--useDLACore={opts.dla_core}", "--allowGPUFallback"]
    args.append("--skipInference")
    return args


def format_command(args: list[str]) -> str:
    """One argument per line, shell continuation: copy-pasteable and diff-friendly."""
    return " \\\n    ".join(args)


def trtexec_commands(onnx_file: str, engine_file: str, profiles: list[Profile],
                     opts: BuildOptions) -> str:
    """The text ``--print-trtexec`` prints: a command for TensorRT 10.x and one for 11.x."""
    ten = Generation(10, strongly_typed_flag=True, trtexec_strongly_typed=True, dla=True)
    eleven = Generation(11, strongly_typed_flag=False, trtexec_strongly_typed=False, dla=False)
    parts = ["# TensorRT 10.x (JetPack 6, Python 3.10): run inside the bundle folder",
             format_command(trtexec_args(onnx_file, engine_file, profiles, opts, ten)),
             "# TensorRT 11.x (JetPack 7): strong typing is always on, no --stronglyTyped"
             + ("; no DLA (--dla-core dropped)" if opts.dla_core is not None else ""),
             format_command(trtexec_args(onnx_file, engine_file, profiles, opts, eleven))]
    return "\n".join(parts)
