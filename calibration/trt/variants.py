"""Make the ONNX variant a precision needs when the bundle lacks it (the one-command path).

    --fp32   the exported graph; never made here
    --fp16   not made here: the exporter writes fp16 graphs (norms and softmax kept in fp32) and
             calibration must not import the exporter; a cast-inserting fp32->fp16 rewrite would
             be a second, less tested fp16 path. The error names the export command instead.
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

HOW = {"int8": "`llama-export calibrate` with the built-in calibration text",
       "int4": "`llama-export quantize --int4` (weight-only, no calibration data)"}


def _run_click(module: str, name: str, args: list[str]) -> None:
    import importlib

    cmd = getattr(importlib.import_module(module), name)
    cmd.main(args=args, prog_name=f"llama-export {name}", standalone_mode=False)


def calibrate_int8(bundle: Path) -> None:
    _run_click("llama_export.calibration.commands", "calibrate", [str(bundle)])


def quantize_int4(bundle: Path) -> None:
    _run_click("llama_export.calibration.commands", "quantize", [str(bundle), "--int4"])


DEFAULT_MAKERS: dict[str, VariantMaker] = {"int8": calibrate_int8, "int4": quantize_int4}


def missing_variant_error(bundle: Path, manifest: Manifest, precision: str) -> BundleError:
    have = ", ".join(sorted(manifest.variants)) or "none"
    if precision == "fp16":
        source = manifest.data.get("provenance", {}).get("source") or "MODEL"
        return BundleError(
            f"bundle has no fp16 variant (has: {have}): export one with `llama-export onnx "
            f"{source} --dtype fp16 -o {bundle}-fp16` and build from that bundle, or use "
            "--fp32 / --int8 / --int4 here")
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
