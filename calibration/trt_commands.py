"""``llama-export trt``: parse options → :func:`run_trt` → the engine path (hatch's pattern).

Nothing heavy at import time: the command must show in ``--help`` and run its CPU steps (plan,
trtexec lines, dry run) on machines without TensorRT.
"""

from __future__ import annotations

import click


@click.command(help="Build a strongly typed TensorRT engine from a bundle's ONNX variant "
                    "(made first when missing) for this GPU.")
@click.argument("bundle", type=click.Path(path_type=str))
@click.option("--fp16", "precision", flag_value="fp16",
              help="fp16 variant (export it with `llama-export onnx --dtype fp16`). Without a "
                   "precision flag: the bundle's own graph (fp32, else fp16).")
@click.option("--int8", "precision", flag_value="int8",
              help="INT8 Q/DQ variant (calibrated first when missing).")
@click.option("--int4", "precision", flag_value="int4",
              help="Weight-only INT4 variant (quantized first when missing).")
@click.option("--fp32", "precision", flag_value="fp32", help="The exported fp32 graph.")
@click.option("--max-batch", type=int, default=None, help="Largest batch (default: the bundle's).")
@click.option("--max-prompt", type=int, default=None,
              help="Longest prompt for the prefill profile (default: bundle max seq).")
@click.option("--max-context", type=int, default=None,
              help="Longest prompt + generation (default: the bundle's max context).")
@click.option("--timing-cache", type=click.Path(path_type=str), default=None,
              help="TensorRT timing cache file: read if present, updated after the build.")
@click.option("--opt-level", type=int, default=3, show_default=True,
              help="Builder optimization level 0..5.")
@click.option("--hardware-compatible", is_flag=True,
              help="Engine runs on any Ampere-or-newer GPU (somewhat slower).")
@click.option("--version-compatible", is_flag=True,
              help="Engine runs on later TensorRT releases of the same major version.")
@click.option("--dla-core", type=int, default=None, help="Build for this DLA core (Orin, 10.x).")
@click.option("--device", type=int, default=0, show_default=True, help="CUDA device index.")
@click.option("--print-trtexec", is_flag=True,
              help="Print equivalent trtexec command lines (TensorRT 10 and 11).")
@click.option("--register", type=click.Path(path_type=str), default=None,
              help="Record an engine built by the printed trtexec command (inside the bundle) "
                   "instead of building; pass the same precision and --max-* flags.")
@click.option("--dry-run", is_flag=True,
              help="Check variant, shapes, profiles and memory without TensorRT; print the plan.")
def trt(bundle: str, precision: str | None, max_batch: int | None, max_prompt: int | None,
        max_context: int | None, timing_cache: str | None, opt_level: int,
        hardware_compatible: bool, version_compatible: bool, dla_core: int | None, device: int,
        print_trtexec: bool, register: str | None, dry_run: bool) -> None:
    from pathlib import Path

    from llama_export.calibration.trt.compat import BuildOptions
    from llama_export.calibration.trt.pipeline import TrtRequest, run_trt
    from llama_export.runtime.manifest import Manifest

    if precision is None:
        precision = Manifest.load(bundle).default_variant()
    opts = BuildOptions(precision=precision, opt_level=opt_level, timing_cache=timing_cache,
                        hardware_compatible=hardware_compatible,
                        version_compatible=version_compatible, dla_core=dla_core)
    run_trt(TrtRequest(Path(bundle), opts, max_batch, max_prompt, max_context, dry_run,
                       print_trtexec, device, register))
