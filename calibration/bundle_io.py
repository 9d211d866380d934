"""Read the fp32 graph of a bundle; write a new variant into it without breaking it.

New files are written into a temp folder inside the bundle, renamed into place when complete,
and the manifest (with their sha256) is saved last: a run that fails before that point leaves
the bundle exactly as it was (an interrupted write leaves at most a stray hidden temp folder).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import onnx

from llama_export.runtime.errors import BundleError
from llama_export.runtime.manifest import Manifest
from llama_export.runtime.tempnames import temp_dir

from .graph import merge_lm_head_slices, save_model
from .nbits import fuse_matmul_nbits
from .unpadded import write_unpadded_graph

SOURCE_VARIANT = "fp32"


def fp32_source(bundle: Path) -> tuple[Manifest, Path]:
    """The bundle's manifest and the path of its fp32 graph (files checked against sha256)."""
    manifest = Manifest.load(bundle)
    if SOURCE_VARIANT not in manifest.variants:
        have = ", ".join(sorted(manifest.variants)) or "none"
        raise BundleError(f"bundle {bundle} has no fp32 variant (has: {have}): quantization "
                          "starts from fp32; re-export with `llama-export onnx --dtype fp32`")
    files = manifest.files_of_variant(SOURCE_VARIANT)
    manifest.verify_files(bundle, files)
    for rel in files:
        links = (bundle / rel).stat().st_nlink
        if links > 1 and rel.endswith(".data"):
            # onnx's external-data reader refuses such a file (its hard-link attack guard),
            # deep inside the weight loop: say so before any work
            raise BundleError(f"{bundle / rel} has {links} hard links and onnx refuses to read "
                              "weights from a hard-linked file: copy the bundle with `cp -r` "
                              "(not `cp -al` or `ln`) and quantize the copy")
    return manifest, bundle / manifest.variant(SOURCE_VARIANT)["file"]


def load_fp32(bundle: Path) -> tuple[Manifest, onnx.ModelProto]:
    """The bundle's manifest and fp32 graph (checked against its sha256)."""
    manifest, path = fp32_source(bundle)
    return manifest, onnx.load(str(path), load_external_data=True)


def load_ort_graph(bundle: Path, manifest: Manifest, external: bool = True,
                   merge_head: bool = True) -> onnx.ModelProto | None:
    """The fp32 variant's ONNX-Runtime graph (files checked by :func:`load_fp32`), or None.
    ``external=False``: the graph without its external data (read from ``bundle``).
    ``merge_head``: a column-sliced lm_head (the exporter's, above 256 MB) made whole again
    (graph.py: merge_lm_head_slices), as the quantizers expect it."""
    if "ort" not in manifest.graphs(SOURCE_VARIANT):
        return None
    path = bundle / manifest.graph(SOURCE_VARIANT, "ort")["file"]
    model = onnx.load(str(path), load_external_data=external)
    if merge_head:
        merge_lm_head_slices(model, None if external else bundle)
    return model


def ort_graph_entry(manifest: Manifest, file: str) -> dict[str, Any]:
    """A quantized variant's ``ort_graph`` entry: the fp32 one's properties, its own file."""
    src = manifest.variant(SOURCE_VARIANT)["ort_graph"]
    own = ("file", "data_file", "parity", "unpadded_file", "unpadded_parity")
    return {**{k: v for k, v in src.items() if k not in own},
            "file": file, "source_file": src["file"]}


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
                  entry: dict[str, Any], extra: dict[str, str] | None = None,
                  ort_model: onnx.ModelProto | None = None) -> None:
    """Save ``model`` as ``entry["file"]`` (+ text files ``extra``, + ``ort_model`` as
    ``entry["ort_graph"]["file"]``) and record the variant."""
    tmp = temp_dir(bundle, name)
    try:
        data_file = save_model(model, tmp / entry["file"])
        entry["data_file"] = data_file
        names = [n for n in (data_file, *(extra or {})) if n]
        if ort_model is not None:
            ort_entry = entry["ort_graph"]
            # ONNX Runtime would fuse DQ+MatMul itself, at the cost of a second copy of the
            # weights while the session loads (calibration/nbits.py): store it fused.
            ort_model, ort_entry["matmul_nbits"] = fuse_matmul_nbits(ort_model)
            ort_entry["data_file"] = save_model(ort_model, tmp / ort_entry["file"])
            unpadded = write_unpadded_graph(tmp / ort_entry["file"])  # calibration/unpadded.py
            if unpadded:
                ort_entry["unpadded_file"] = unpadded
            names += [n for n in (ort_entry["data_file"], unpadded, ort_entry["file"]) if n]
        for rel, text in (extra or {}).items():
            (tmp / rel).write_text(text, encoding="utf-8")
        names.append(entry["file"])
        old = manifest.variants.get(name)
        for rel in names:  # the standard graph last: it is what a reader opens first
            os.replace(tmp / rel, bundle / rel)
        for stale in _stale_files(old, entry):
            (bundle / stale).unlink(missing_ok=True)
            manifest.data["files"].pop(stale, None)
        for rel in names:
            manifest.record_file(bundle, rel)
        manifest.data["variants"][name] = entry
        manifest.save(bundle)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _stale_files(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """Files of the variant's previous version that the new version does not reuse."""
    if not old:
        return []

    def files(v: dict[str, Any]) -> set[str]:
        g = v.get("ort_graph") or {}
        return {f for f in (v.get("file"), v.get("data_file"), g.get("file"), g.get("data_file"),
                            g.get("unpadded_file")) if f}

    return sorted(files(old) - files(new))
