"""Post-export tidy-up of the traced graph.

The TorchScript exporter names pre-transposed Linear weights ``onnx::MatMul_123``; we rename them
after the node that consumes them (``model.layers.0.self_attn.q_proj.weight_t``) so calibration,
reports and humans can find them. Every weight goes into one ``<file>.data`` beside the model
(page-aligned, referenced by a relative path so the bundle loads from any working directory).

Several graphs of one variant (the standard graph and the ONNX-Runtime graph) share one data
file: a weight both hold (everything but the packed QKV) is stored once. SmolLM2 fp32: two
graphs in 0.72 GB instead of 1.30 GB.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import onnx
from onnx import numpy_helper

# onnxruntime 1.31 accepts IR <= 13 while onnx 1.23 writes 14 by default (shared/DESIGN.md §9).
MAX_IR_VERSION = 10


def _readable(node_name: str) -> str:
    # "/model/layers.0/self_attn/q_proj/MatMul" -> "model.layers.0.self_attn.q_proj.weight_t"
    parts = [p for p in node_name.split("/") if p]
    if parts and parts[-1].startswith("MatMul"):
        parts = parts[:-1]
    name = ".".join(parts)
    if name.startswith("layers."):  # the TorchScript scope drops the inner `model.` prefix
        name = "model." + name
    return name + ".weight_t"


def rename_matmul_weights(model: onnx.ModelProto) -> int:
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    renames: dict[str, str] = {}
    taken = set(inits)
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        old = node.input[1]
        if old not in inits or not old.startswith("onnx::") or old in renames:
            continue
        new = _readable(node.name)
        if new in taken:
            continue
        renames[old] = new
        taken.add(new)
    for old, new in renames.items():
        inits[old].name = new
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    return len(renames)


def tidy_onnx_graphs(pairs: Sequence[tuple[Path, Path]]) -> str:
    """Tidy each ``(src, dst)``; all weights go into one shared ``<first dst>.data`` (its name
    returned), whatever the size: weights inside the protobuf would cost twice their size in
    RAM when ONNX Runtime loads the graph."""
    models = []
    for src, _ in pairs:
        model = onnx.load(str(src), load_external_data=True)
        rename_matmul_weights(model)
        model.ir_version = min(model.ir_version, MAX_IR_VERSION)
        model.producer_name = "llama-export"
        models.append(model)
    data_name = pairs[0][1].name + ".data"
    _externalize_shared(models, pairs[0][1].parent / data_name, data_name)
    for model, (_, dst) in zip(models, pairs, strict=True):
        onnx.save_model(model, str(dst))
    return data_name


ALIGN = 4096  # page-aligned offsets: ONNX Runtime can map them without copying


def _externalize_shared(models: Sequence[onnx.ModelProto], path: Path, location: str,
                        size_threshold: int = 1024) -> None:
    """Move every initializer of ``size_threshold`` bytes or more into ``path``, each distinct
    byte string once (the same weight in two graphs gets one offset)."""
    written: dict[bytes, tuple[int, int]] = {}
    with open(path, "wb") as f:
        for model in models:
            for t in model.graph.initializer:
                raw = t.raw_data or numpy_helper.from_array(numpy_helper.to_array(t)).raw_data
                if len(raw) < size_threshold:
                    continue
                key = hashlib.sha256(raw).digest()
                if key not in written:
                    f.write(b"\0" * (-f.tell() % ALIGN))
                    written[key] = (f.tell(), len(raw))
                    f.write(raw)
                offset, length = written[key]
                dims, dtype, name = list(t.dims), t.data_type, t.name
                t.Clear()
                t.name, t.data_type = name, dtype
                t.dims.extend(dims)
                t.data_location = onnx.TensorProto.EXTERNAL
                for k, v in (("location", location), ("offset", str(offset)),
                             ("length", str(length))):
                    entry = t.external_data.add()
                    entry.key, entry.value = k, v
