"""Read the fp32 graph of a bundle; write a new variant into it without breaking it.

New files are written into a temp folder inside the bundle, renamed into place when complete,
and the manifest (with their sha256) is saved last: a run that fails before that point leaves
the bundle exactly as it was (an interrupted write leaves at most a stray hidden temp folder).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx

from llama_export.runtime.errors import BundleError
from llama_export.runtime.manifest import Manifest

from .graph import save_model

SOURCE_VARIANT = "fp32"


def load_fp32(bundle: Path) -> tuple[Manifest, onnx.ModelProto]:
    """The bundle's manifest and fp32 graph (checked against its sha256)."""
    manifest = Manifest.load(bundle)
    if SOURCE_VARIANT not in manifest.variants:
        have = ", ".join(sorted(manifest.variants)) or "none"
        raise BundleError(f"bundle {bundle} has no fp32 variant (has: {have}): quantization "
                          "starts from fp32; re-export with `llama-export onnx --dtype fp32`")
    manifest.verify_files(bundle, manifest.files_of_variant(SOURCE_VARIANT))
    path = bundle / manifest.variant(SOURCE_VARIANT)["file"]
    return manifest, onnx.load(str(path), load_external_data=True)


def base_entry(manifest: Manifest, file: str, data_file: str | None, precision: str,
               scheme: str, opset: int) -> dict[str, Any]:
    """A variant entry with the fp32 variant's IO (quantization changes no graph IO)."""
    src = manifest.variant(SOURCE_VARIANT)
    return {"file": file, "data_file": data_file, "precision": precision, "scheme": scheme,
            "logits": src.get("logits", "all"), "opset": opset, "inputs": src["inputs"],
            "outputs": src["outputs"], "source_variant": SOURCE_VARIANT}


def model_opset(model: onnx.ModelProto) -> int:
    return int(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))


def write_variant(bundle: Path, manifest: Manifest, name: str, model: onnx.ModelProto,
                  entry: dict[str, Any], extra: dict[str, str] | None = None) -> None:
    """Save ``model`` as ``entry["file"]`` (+ text files ``extra``) and record the variant."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=bundle))
    try:
        data_file = save_model(model, tmp / entry["file"])
        entry["data_file"] = data_file
        for rel, text in (extra or {}).items():
            (tmp / rel).write_text(text, encoding="utf-8")
        names = [n for n in (data_file, *(extra or {}), entry["file"]) if n]
        old = manifest.variants.get(name)
        for rel in names:  # the graph last: it is what a reader opens first
            os.replace(tmp / rel, bundle / rel)
        if old and old.get("data_file") and old["data_file"] != data_file:
            (bundle / old["data_file"]).unlink(missing_ok=True)
            manifest.data["files"].pop(old["data_file"], None)
        for rel in names:
            manifest.record_file(bundle, rel)
        manifest.data["variants"][name] = entry
        manifest.save(bundle)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
