"""Find the quantizable projections of an exported decoder by graph structure, not by name.

A *projection* is a ``MatMul`` whose second input is a 2-D float initializer. Projections that
read the same activation form a *group* (q/k/v share the attention RMSNorm output; gate/up share
the MLP RMSNorm output). A group is *smoothable* when its input is produced by

* an RMSNorm scale ``Mul(x, w)`` with ``w`` a 1-D constant (q/k/v, gate/up): fold ``1/s`` into
  ``w``; or
* an elementwise ``Mul(a, MatMul(h, W_up) [+ b])`` (down_proj reads ``silu(gate) * up``): fold
  ``1/s`` into the columns of ``W_up`` (and ``b``).

``lm_head`` (the projection producing a graph output) is never a target: it stays in float.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from llama_export.runtime.manifest import SLICE_SUFFIX, slice_suffix

# onnxruntime 1.31 accepts IR <= 13 while onnx 1.23 writes 14 (shared/DESIGN.md §9).
MAX_IR_VERSION = 10
PROTO_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class Projection:
    node: str       # MatMul node name
    weight: str     # initializer name, shape (K, N)
    input: str      # activation tensor (…, K)
    output: str

    @property
    def label(self) -> str:
        """``layers.3.mlp.down_proj`` (readable weight names from the exporter) or node name."""
        base = self.weight.split(".smoothed")[0]  # smoothquant.Tensors.apply renames edits
        return base.removesuffix(".weight_t").removesuffix(".weight")


@dataclass(frozen=True)
class Fold:
    kind: str                 # "norm" (RMSNorm Mul) | "matmul" (producer projection's columns)
    node: str                 # the Mul (norm) or the producer MatMul
    tensor: str               # 1-D norm weight or 2-D producer weight
    bias_node: str | None = None  # Add carrying the producer's bias, if any
    bias: str | None = None


@dataclass
class Group:
    input: str
    projections: list[Projection] = field(default_factory=list)
    fold: Fold | None = None

    @property
    def label(self) -> str:
        return "+".join(p.label.rsplit(".", 1)[-1] for p in self.projections)

    @property
    def layer_label(self) -> str:
        return self.projections[0].label.rsplit(".", 1)[0] + "." + self.label


class GraphIndex:
    """Producer/consumer maps and constant lookup (through ``Identity`` nodes) for one graph."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path | None = None) -> None:
        self.model = model
        self.base_dir = base_dir  # where external data is read from (never into the proto)
        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.nodes = {n.name: n for n in g.node}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.graph_outputs = {o.name for o in g.output}

    def const_name(self, name: str) -> str | None:
        """The initializer behind ``name`` (following Identity chains), or None."""
        while name not in self.inits:
            p = self.producer.get(name)
            if p is None or p.op_type != "Identity":
                return None
            name = p.input[0]
        return name

    def array(self, name: str) -> np.ndarray:
        t = self.inits[name]
        if t.data_location == onnx.TensorProto.EXTERNAL and self.base_dir is not None:
            return read_external(t, self.base_dir)
        return numpy_helper.to_array(t)

    def is_float_const(self, name: str, ndim: int) -> bool:
        c = self.const_name(name)
        if c is None:
            return False
        t = self.inits[c]
        return len(t.dims) == ndim and t.data_type == onnx.TensorProto.FLOAT


def find_projections(model: onnx.ModelProto) -> list[Projection]:
    idx = GraphIndex(model)
    out = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and idx.is_float_const(n.input[1], 2):
            out.append(Projection(n.name, str(idx.const_name(n.input[1])), n.input[0], n.output[0]))
    return out


def is_lm_head(idx: GraphIndex, proj: Projection) -> bool:
    """The projection whose result leaves the graph (possibly through a reshape / slice)."""
    name = proj.output
    for _ in range(3):
        if name in idx.graph_outputs:
            return True
        cons = idx.consumers.get(name, [])
        if len(cons) != 1 or cons[0].op_type not in ("Reshape", "Slice", "Identity", "Add"):
            return False
        name = cons[0].output[0]
    return name in idx.graph_outputs


def merge_lm_head_slices(model: onnx.ModelProto, base_dir: Path | None = None) -> int:
    """Undo the exporter's column-sliced lm_head (exporter/onnx_tidy.py: ``split_lm_head``):
    the MatMuls over ``<weight>.cols<a>_<b>`` slices and their Concat become one MatMul over
    ``<weight>`` (inline; the same values), so every pass here sees the lm_head it knows and
    quantized graphs slice it by their own rule (nbits.py). Returns the count of slices merged
    (0: the graph has none). ``base_dir``: where external slices are read from."""
    idx = GraphIndex(model, base_dir)
    for concat in model.graph.node:
        if concat.op_type != "Concat" or not is_lm_head(idx, Projection("", "", "", concat.output[0])):
            continue
        parts = [idx.producer.get(i) for i in concat.input]
        if any(p is None or p.op_type != "MatMul" for p in parts):
            continue
        matmuls = [p for p in parts if p is not None]
        weights = [p.input[1] for p in matmuls]
        base = _sliced_weight(weights)
        if base is None or len({p.input[0] for p in matmuls}) != 1:
            continue
        merged = np.concatenate([idx.array(w) for w in weights], axis=1)
        head = onnx.helper.make_node("MatMul", [matmuls[0].input[0], base], [concat.output[0]],
                                     name=SLICE_SUFFIX.sub("", matmuls[0].name))
        gone = {id(p) for p in matmuls}
        nodes = [head if n is concat else n for n in model.graph.node if id(n) not in gone]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        sliced = set(weights)
        inits = [t for t in model.graph.initializer if t.name not in sliced]
        del model.graph.initializer[:]
        model.graph.initializer.extend([*inits, numpy_helper.from_array(merged, base)])
        return len(matmuls)
    return 0


def _sliced_weight(names: list[str]) -> str | None:
    """``<weight>`` when ``names`` are its slices ``<weight>.cols<a>_<b>`` tiling its columns
    from 0, in order (runtime/manifest.py: the slice convention); else None."""
    found = [SLICE_SUFFIX.search(n) for n in names]
    if not all(found):
        return None
    base = SLICE_SUFFIX.sub("", names[0])
    spans = [(int(m.group(1)), int(m.group(2))) for m in found if m]
    if spans[0][0] != 0 or any(b != a for (_, b), (a, _) in itertools.pairwise(spans)):
        return None
    return base if all(n == base + slice_suffix(a, b) for n, (a, b) in zip(names, spans,
                                                                          strict=True)) else None


def find_groups(model: onnx.ModelProto) -> list[Group]:
    """Target projections (everything but lm_head) grouped by shared input, in graph order."""
    idx = GraphIndex(model)
    groups: dict[str, Group] = {}
    for p in find_projections(model):
        if is_lm_head(idx, p):
            continue
        groups.setdefault(p.input, Group(p.input)).projections.append(p)
    for g in groups.values():
        g.fold = _find_fold(idx, g.input)
    return list(groups.values())


def _find_fold(idx: GraphIndex, tensor: str) -> Fold | None:
    mul = idx.producer.get(tensor)
    if mul is None or mul.op_type != "Mul" or len(idx.consumers.get(tensor, [])) == 0:
        return None
    # The activation must reach nothing but projections, or folding 1/s would change others.
    if any(c.op_type not in ("MatMul", "Shape") for c in idx.consumers[tensor]):
        return None
    for i in (0, 1):
        c = idx.const_name(mul.input[i])
        if c is not None and idx.is_float_const(mul.input[i], 1):
            return Fold("norm", mul.name, c)
    for i in (0, 1):
        fold = _matmul_fold(idx, mul.input[i])
        if fold is not None:
            return fold
    return None


def _matmul_fold(idx: GraphIndex, tensor: str) -> Fold | None:
    """``tensor`` = MatMul(h, W) or Add(MatMul(h, W), b), consumed only by the Mul."""
    if len(idx.consumers.get(tensor, [])) != 1:
        return None
    node = idx.producer.get(tensor)
    bias_node = bias = None
    if node is not None and node.op_type == "Add":
        for i in (0, 1):
            if idx.is_float_const(node.input[i], 1):
                bias_node, bias = node.name, idx.const_name(node.input[i])
                mm_out = node.input[1 - i]
                if len(idx.consumers.get(mm_out, [])) != 1:
                    return None
                node = idx.producer.get(mm_out)
                break
        else:
            return None
    if node is None or node.op_type != "MatMul" or not idx.is_float_const(node.input[1], 2):
        return None
    return Fold("matmul", node.name, str(idx.const_name(node.input[1])), bias_node, bias)


# ---- sessions and saving -------------------------------------------------------------------
def set_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    """Replace (or add) initializer ``name``."""
    g = model.graph
    for i, t in enumerate(g.initializer):
        if t.name == name:
            g.initializer[i].CopyFrom(numpy_helper.from_array(array, name))
            return
    g.initializer.append(numpy_helper.from_array(array, name))


def fresh_name(model: onnx.ModelProto, base: str) -> str:
    taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node
                                                          for o in n.output}
    name, k = base, 1
    while name in taken:
        name, k = f"{base}.{k}", k + 1
    return name


def fits_protobuf(model: onnx.ModelProto) -> bool:
    """Whether ``model`` serializes as one protobuf (< 2 GB); protobuf itself refuses to even
    size a larger message (``EncodeError``), which is the answer too."""
    from google.protobuf.message import EncodeError

    try:
        return bool(model.ByteSize() < PROTO_LIMIT)
    except EncodeError:
        return False


PAGE = 4096
EXTERNAL_MIN_BYTES = 1024


def save_model(model: onnx.ModelProto, path: Path) -> str:
    """Save with every initializer of 1 KiB or more in ``<name>.data``; returns that name.

    Weights inside the protobuf cost twice their size in RAM at load (the protobuf bytes and the
    tensors ONNX Runtime builds from them: SmolLM2 int8, 266 MB of weights, took 532 MB).
    External data at page-aligned offsets is read (or mapped) once. ``model`` is not touched:
    the file is written from a copy whose large tensors carry only their external-data entries,
    their bytes written from ``model`` one at a time. (Moving the bytes out and back held a
    second copy of every weight during the write and left a third in ``model``, as protobuf
    frees none of a message's bytes before the whole message: the 1.5B calibration ran out of
    memory writing its variant.)
    """
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    data = path.name + ".data"
    big = frozenset(t.name for t in model.graph.initializer
                    if t.data_location != onnx.TensorProto.EXTERNAL and
                    len(t.raw_data) >= EXTERNAL_MIN_BYTES)
    out = lean_copy(model, big)
    slots = {t.name: t for t in out.graph.initializer if t.name in big}
    with open(path.parent / data, "wb") as f:
        for t in model.graph.initializer:
            if t.name not in big:
                continue
            raw = t.raw_data
            f.write(b"\0" * (-f.tell() % PAGE))
            offset = f.tell()
            f.write(raw)
            dst = slots[t.name]
            dst.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data), ("offset", str(offset)),
                               ("length", str(len(raw)))):
                entry = dst.external_data.add()
                entry.key, entry.value = key, value
            del raw
    onnx.save_model(out, str(path))
    return data


@contextmanager
def ort_session(model: onnx.ModelProto | Path, threads: int = 0) -> Iterator[object]:
    """An ONNX Runtime CPU session on an in-memory model (via a temp file past 2 GB) or on a
    model file (its weights are never held twice: no proto in memory)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if isinstance(model, Path):
        yield ort.InferenceSession(os.fspath(model), so, providers=["CPUExecutionProvider"])
        return
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    if fits_protobuf(model):
        yield ort.InferenceSession(model.SerializeToString(), so,
                                   providers=["CPUExecutionProvider"])
        return
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.onnx"
        save_model(model, path)  # leaves `model` as it was: callers keep using it
        yield ort.InferenceSession(os.fspath(path), so, providers=["CPUExecutionProvider"])


def lean_copy(model: onnx.ModelProto, without: frozenset[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers named in ``without`` carry no data (name, type
    and shape only): placeholders for weights about to be replaced, never serialized."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip={"graph"})
    _copy_fields(model.graph, out.graph, skip={"initializer"})
    for t in model.graph.initializer:
        if t.name in without:
            out.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
        else:
            out.graph.initializer.add().CopyFrom(t)
    return out


def _copy_fields(src: Any, dst: Any, skip: set[str]) -> None:
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        field_ = getattr(dst, fd.name)
        if hasattr(field_, "extend"):
            field_.extend(value)
        elif hasattr(field_, "CopyFrom"):
            field_.CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def read_external(t: onnx.TensorProto, base_dir: Path) -> np.ndarray:
    """An external-data tensor's values read from its file, the tensor left as it is (onnx's
    own loader writes the bytes into the proto, where protobuf keeps them until the whole
    model is freed, deleted or not)."""
    info = {e.key: e.value for e in t.external_data}
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    count = int(info["length"]) // dtype.itemsize if "length" in info else -1
    a = np.fromfile(base_dir / info["location"], dtype=dtype, count=count,
                    offset=int(info.get("offset", 0)))
    return a.reshape(tuple(t.dims))
