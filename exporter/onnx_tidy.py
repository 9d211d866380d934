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
from collections.abc import Container, Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor

from llama_export.runtime.manifest import column_slices, slice_suffix

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


def drop_unused_norm_statistics(model: onnx.ModelProto) -> int:
    """Leave SkipSimplifiedLayerNormalization's optional outputs 1 and 2 (mean, inverse std,
    for training) unnamed when nothing reads them: a TorchScript symbolic cannot emit an empty
    output, and ONNX Runtime computes and writes whatever is named. onnxruntime-genai's graphs
    leave them empty too. Returns the count of outputs dropped."""
    g = model.graph
    read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    dropped = set()
    for node in g.node:
        if node.op_type == "SkipSimplifiedLayerNormalization" and node.domain == "com.microsoft":
            for i in (1, 2):
                if i < len(node.output) and node.output[i] and node.output[i] not in read:
                    dropped.add(node.output[i])
                    node.output[i] = ""
    kept = [v for v in g.value_info if v.name not in dropped]
    if len(kept) != len(g.value_info):
        del g.value_info[:]
        g.value_info.extend(kept)
    return len(dropped)


# A float lm_head above this many bytes is stored in column slices (one MatMul each + Concat)
# in the ONNX-Runtime graphs: ONNX Runtime pre-packs a MatMul's weight while the stored one is
# still resident, and the lm_head, last in the graph, is packed when every other weight already
# is, so a whole one adds its own size to the load peak. Qwen2.5-Coder-1.5B fp32 (934 MB lm_head,
# unpadded ONNX-Runtime graph, bare session): peak 7.00 GB whole, 6.32 GB in 4 slices (6.09 GB
# after load either way); onnxruntime-genai's whole model peaks at 6.83 GB. Calibration merges
# the slices back before quantizing (calibration/graph.py: merge_lm_head_slices); quantized
# graphs slice by their own rule (calibration/nbits.py). SmolLM2's 113 MB lm_head stays whole.
HEAD_SLICE_BYTES = 256 << 20
_FLOAT_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


def find_lm_head(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The MatMul with a 2-D float initializer whose result is the ``logits`` output (directly
    or through up to 3 single-consumer Reshape / Slice / Identity nodes), or None."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for node in g.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if w is None or len(w.dims) != 2 or w.data_type not in _FLOAT_NP:
            continue
        name = node.output[0]
        for _ in range(4):
            if name == "logits":
                return node
            cons = consumers.get(name, [])
            if len(cons) != 1 or cons[0].op_type not in ("Reshape", "Slice", "Identity"):
                break
            name = cons[0].output[0]
    return None


def split_lm_head(model: onnx.ModelProto, base: Path, max_bytes: int | None = None) -> int:
    """Store a float lm_head above ``max_bytes`` as column slices: one MatMul per slice (inline
    weights; the caller externalizes them) and a Concat on the last axis in place of the
    MatMul, the same values to the last bit. Returns the count of slices (0: left whole).
    ``max_bytes`` defaults to :data:`HEAD_SLICE_BYTES`."""
    max_bytes = HEAD_SLICE_BYTES if max_bytes is None else max_bytes
    node = find_lm_head(model)
    if node is None:
        return 0
    g = model.graph
    weight = next(t for t in g.initializer if t.name == node.input[1])
    nbytes = _nbytes(weight, base)
    if nbytes <= max_bytes:
        return 0
    k, n = (int(d) for d in weight.dims)
    w = np.frombuffer(_read(weight, base), dtype=_FLOAT_NP[weight.data_type]).reshape(k, n)
    slices = column_slices(n, nbytes, max_bytes)
    nodes, outs = [], []
    for a, b in slices:
        cols = slice_suffix(a, b)
        part = numpy_helper.from_array(np.ascontiguousarray(w[:, a:b]), weight.name + cols)
        g.initializer.append(part)
        outs.append(node.output[0] + cols)
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], part.name], [outs[-1]],
                                           name=node.name + cols))
    del w
    nodes.append(onnx.helper.make_node("Concat", outs, [node.output[0]], axis=-1,
                                       name=f"{node.name}.concat"))
    at = list(g.node).index(node)
    rest = list(g.node)
    rest[at:at + 1] = nodes
    del g.node[:]
    g.node.extend(rest)
    if not any(weight.name in n.input for n in g.node):
        g.initializer.remove(weight)
    return len(slices)


def tidy_onnx_graphs(pairs: Iterable[tuple[Path, Path]], data_name: str,
                     split_heads: Container[Path] = ()) -> str:
    """Tidy each ``(src, dst)``; all weights go into one shared ``data_name`` beside the first
    ``dst`` (returned), whatever the size: weights inside the protobuf would cost twice their
    size in RAM when ONNX Runtime loads the graph.

    Graphs are processed one at a time and weights streamed one tensor at a time, so memory
    holds at most one graph's structure and one weight, whatever the model size (a 1.5B fp32
    export would otherwise hold both graphs' 6 GB of weights at once). ``pairs`` may be lazy:
    the exporter traces each graph when asked for it and deletes its raw trace once tidied, so
    the disk holds one raw trace beside the shared data (a > 2 GB trace is a file per weight).
    A graph whose ``dst`` is in ``split_heads`` gets a large float lm_head in column slices
    (:func:`split_lm_head`; the exporter asks it for the ONNX-Runtime graphs).
    """
    shared: _SharedData | None = None
    try:
        for src, dst in pairs:
            model = _load_tidy(src)
            if dst in split_heads:
                split_lm_head(model, src.parent)
            if shared is None:
                shared = _SharedData(dst.parent / data_name, data_name).__enter__()
            shared.externalize(model, src.parent)
            onnx.save_model(model, str(dst))
            del model
    finally:
        if shared is not None:
            shared.__exit__()
    return data_name


def _load_tidy(src: Path) -> onnx.ModelProto:
    model = onnx.load(str(src), load_external_data=False)  # weights stay on disk until streamed
    for t in _attribute_tensors(model):  # Constant nodes' values (RoPE tables): small, inline
        if t.data_location == onnx.TensorProto.EXTERNAL:
            load_external_data_for_tensor(t, str(src.parent))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
    rename_matmul_weights(model)
    drop_unused_norm_statistics(model)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    model.producer_name = "llama-export"
    return model


def _attribute_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for node in model.graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors


def _external(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _nbytes(t: onnx.TensorProto, base: Path) -> int:
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return len(t.raw_data) or t.ByteSize()
    ext = _external(t)
    return int(ext["length"]) if "length" in ext else (base / ext["location"]).stat().st_size


def _read(t: onnx.TensorProto, base: Path) -> bytes:
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return t.raw_data or numpy_helper.from_array(numpy_helper.to_array(t)).raw_data
    ext = _external(t)
    with open(base / ext["location"], "rb") as f:
        f.seek(int(ext.get("offset", 0)))
        return f.read(int(ext["length"])) if "length" in ext else f.read()


ALIGN = 4096  # page-aligned offsets: ONNX Runtime can map them without copying


class _SharedData:
    """One data file for several graphs: every initializer of ``size_threshold`` bytes or more
    moves into it, each distinct byte string once (the same weight in two graphs gets one
    offset)."""

    def __init__(self, path: Path, location: str, size_threshold: int = 1024) -> None:
        self.path, self.location, self.size_threshold = path, location, size_threshold
        self.written: dict[bytes, tuple[int, int]] = {}

    def __enter__(self) -> _SharedData:
        self.f = open(self.path, "wb")
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()

    def externalize(self, model: onnx.ModelProto, base: Path) -> None:
        for t in model.graph.initializer:
            if _nbytes(t, base) < self.size_threshold:
                if t.data_location == onnx.TensorProto.EXTERNAL:  # small: back inline
                    raw = _read(t, base)
                    del t.external_data[:]
                    t.data_location = onnx.TensorProto.DEFAULT
                    t.raw_data = raw
                continue
            raw = _read(t, base)
            key = hashlib.sha256(raw).digest()
            if key not in self.written:
                self.f.write(b"\0" * (-self.f.tell() % ALIGN))
                self.written[key] = (self.f.tell(), len(raw))
                self.f.write(raw)
            del raw
            offset, length = self.written[key]
            dims, dtype, name = list(t.dims), t.data_type, t.name
            t.Clear()
            t.name, t.data_type = name, dtype
            t.dims.extend(dims)
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", self.location), ("offset", str(offset)),
                         ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
