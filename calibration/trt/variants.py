"""Make the ONNX variant a precision needs when the bundle lacks it (the one-command path).

    --fp32   the exported graph; never made here
    --fp16   `llama-export quantize BUNDLE --fp16` (converted from the fp32 ONNX graphs, no torch;
             norms, softmax and RoPE angles kept fp32 as the exporter does)
    --int8   `llama-export calibrate BUNDLE` (SmoothQuant W8A8 Q/DQ, built-in calibration text)
    --int4   `llama-export quantize BUNDLE --int4` (weight-only blocked INT4, no data needed)

The makers are a seam (``makers=``) so tests can stub them; by default they run the calibration
commands' own click entry points, exactly what a user typing them would get.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from llama_export.runtime.errors import BundleError, CalibrationError
from llama_export.runtime.manifest import Manifest

VariantMaker = Callable[[Path], None]

HOW = {"fp16": "`llama-export quantize --fp16` (converted from the fp32 graphs, no torch)",
       "int8": "`llama-export calibrate` with the built-in calibration text",
       "int4": "`llama-export quantize --int4` (weight-only, no calibration data)"}


def _run_click(module: str, name: str, args: list[str]) -> None:
    import importlib

    cmd = getattr(importlib.import_module(module), name)
    cmd.main(args=args, prog_name=f"llama-export {name}", standalone_mode=False)


def calibrate_int8(bundle: Path) -> None:
    _run_click("llama_export.calibration.commands", "calibrate", [str(bundle)])


def quantize_int4(bundle: Path) -> None:
    _run_click("llama_export.calibration.commands", "quantize", [str(bundle), "--int4"])


def convert_fp16(bundle: Path) -> None:
    _run_click("llama_export.calibration.commands", "quantize", [str(bundle), "--fp16"])


DEFAULT_MAKERS: dict[str, VariantMaker] = {"fp16": convert_fp16, "int8": calibrate_int8,
                                           "int4": quantize_int4}


def missing_variant_error(bundle: Path, manifest: Manifest, precision: str) -> BundleError:
    have = ", ".join(sorted(manifest.variants)) or "none"
    return BundleError(f"bundle has no {precision} variant (has: {have}): "
                       f"re-export the bundle with `llama-export onnx`")


def ensure_variant(bundle: Path, manifest: Manifest, precision: str,
                   makers: Mapping[str, VariantMaker] | None = None,
                   say: Callable[[str], None] = print) -> Manifest:
    """The manifest, after creating the ``precision`` variant first if it can be made here."""
    if precision in manifest.variants:
        return manifest
    makers = DEFAULT_MAKERS if makers is None else makers
    if precision not in makers:
        raise missing_variant_error(bundle, manifest, precision)
    say(f"bundle has no {precision} variant: creating it first with {HOW.get(precision, '?')}")
    makers[precision](bundle)
    fresh = Manifest.load(bundle)
    if precision not in fresh.variants:
        raise CalibrationError(f"creating the {precision} variant did not record it in the "
                               f"manifest: run {HOW.get(precision, 'it')} by hand and check its "
                               "output")
    return fresh
