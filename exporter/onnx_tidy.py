"""Post-export tidy-up of the traced graph.

The TorchScript exporter names pre-transposed Linear weights ``onnx::MatMul_123``; we rename them
after the node that consumes them (``model.layers.0.self_attn.q_proj.weight_t``) so calibration,
reports and humans can find them. Past 2 GB the protobuf limit forces external data: everything
goes into one ``<file>.data`` beside the model, referenced by a relative path so the bundle loads
from any working directory.
"""

from __future__ import annotations

from pathlib import Path

import onnx

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


def tidy_onnx(src: Path, dst: Path, external_threshold: int) -> str | None:
    """Rewrite ``src`` (+ its external data) as ``dst``; returns the data file name or None."""
    model = onnx.load(str(src), load_external_data=True)
    rename_matmul_weights(model)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    model.producer_name = "llama-export"
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size < external_threshold:
        onnx.save_model(model, str(dst))
        return None
    data_name = dst.name + ".data"
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    return data_name
