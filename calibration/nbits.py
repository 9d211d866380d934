"""Blocked ``DequantizeLinear`` + ``MatMul`` → ONNX Runtime's ``MatMulNBits``, ahead of time.

ONNX Runtime fuses this pair by itself when it loads a graph (shared/DESIGN.md §9), but it does
so on loaded weights: the int8/int4 initializer is read, then re-laid out into the kernel's
``[N, blocks, blob]`` form, and both copies are resident while the session starts. Measured on
SmolLM2's int8 ONNX-Runtime graph in a bare session: 360 MB peak (333 MB after load), against
onnxruntime-genai's 280 MB (253 MB) for the same weights; the graph this module writes: 268 MB
(241 MB). So the ONNX-Runtime graphs of quantized variants are stored fused.
The standard graphs (TensorRT's) keep the portable Q/DQ form.

The fused node computes what ONNX Runtime's own fusion computes (same kernel, same
``accuracy_level``, checked bitwise in the tests), so the accuracy gate measured on the Q/DQ
form holds for the stored graph.

A large weight is stored as several MatMulNBits over column slices + one Concat. ONNX Runtime
prepacks each weight at load, holding the stored and the packed copy of that one tensor at
once, so the session's load peak sits one largest tensor above its resident size. Measured on
SmolLM2's int4 ONNX-Runtime graph (bare session): one 28 MB lm_head, peak 232 MB (206 MB
after load); in 4 slices of 7 MB, 210 MB (204 MB). A 1.5B model's 8-bit lm_head is 233 MB.
Each output column is the same dot product either way: the split is exact (tested).

Slices cost decode time, though: each one is its own kernel call (thread-pool dispatch, the
activation quantized again at accuracy level 4) and the Concat copies the result. On the
Qwen2.5-1.5B int8 graph with every weight above 8 MB sliced (gate/up/down in 2, the lm_head
in 28), a decode step took 110.7 ms against 101.5 ms with none sliced (medians of 5
interleaved runs; onnxruntime-genai's unsliced graph 103.0 ms). So the slice size scales with
the model: a weight is split only above 1/16 of all packed weights (at least 8 MB), which
bounds the load peak to ~6 % above the resident size and leaves every per-layer weight of a
0.5–8B model whole; in practice only a large-vocabulary lm_head is split, into a few slices.
That still costs something: the 1.5B int4 lm_head (genai's form) in 3 slices made a decode
step 38.7 ms against 37.5 ms whole (interleaved medians), and whole it raised the load peak
from 1480 to 1577 MB, above onnxruntime-genai's 1530 MB. The slices stay: memory is the
stricter budget there. (Halving the fp32 token table would not pay for it: ONNX Runtime maps
the page-aligned external data and a Gather touches only the rows it reads, so the table costs
almost no resident memory either way.)
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llama_export.runtime.manifest import column_slices, slice_suffix

from .graph import GraphIndex, fresh_name, set_initializer

MS_DOMAIN = "com.microsoft"
# What ONNX Runtime's DQ+MatMul fusion gives the node on CPU unless the session config
# `session.qdq_matmulnbits_accuracy_level` says otherwise: int8 activations inside the kernel.
DEFAULT_ACCURACY_LEVEL = 4
_BITS: dict[int, int] = {TensorProto.INT8: 8, TensorProto.INT4: 4, TensorProto.UINT4: 4}
# A packed weight above max(MAX_PACKED_BYTES, all packed weights / SLICE_SHARE) is split by
# columns (docstring: the load peak against the decode cost of slices).
MAX_PACKED_BYTES = 8 << 20
SLICE_SHARE = 16


def pack_nbits(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, bits: int,
               block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``DequantizeLinear(q [K, N], scale [nb, N], zero_point, axis=0, block_size=block)`` as
    MatMulNBits inputs: ``(B uint8 [N, nb, block*bits/8], scales [N*nb], zero_points)``.

    MatMulNBits stores unsigned values with a default zero point of ``2**(bits-1)``: signed
    ``q`` (no zero point) shifts by it and needs none; unsigned ``q`` keeps its own zero
    point (zeros when DequantizeLinear had none), packed like the weights.
    """
    k, n = q.shape
    nb = -(-k // block)
    mid = 1 << (bits - 1)
    if q.dtype.kind == "i":
        qu, zp = (q.astype(np.int16) + mid).astype(np.uint8), None
    else:
        qu = q.astype(np.uint8)
        zp = np.zeros((nb, n), np.uint8) if zero_point is None else zero_point.astype(np.uint8)
    if nb * block != k:  # pad K: padded weights meet padded (zero) activations, never used
        qu = np.concatenate([qu, np.full((nb * block - k, n), mid, np.uint8)])
    cols = np.ascontiguousarray(qu.T.reshape(n, nb, block))
    if bits == 4:
        cols = (cols[..., 0::2] | (cols[..., 1::2] << 4)).astype(np.uint8)
    scales = np.ascontiguousarray(scale.T).reshape(-1)
    zps = None
    if zp is not None:
        zt = np.ascontiguousarray(zp.T)  # [N, nb]
        if bits == 4:
            if nb % 2:
                zt = np.concatenate([zt, np.zeros((n, 1), np.uint8)], axis=1)
            zt = (zt[:, 0::2] | (zt[:, 1::2] << 4)).astype(np.uint8)
        zps = zt.reshape(-1)
    return cols, scales, zps


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def slice_limit(total_packed_bytes: int) -> int:
    """The largest packed weight kept in one MatMulNBits for a model whose packed weights
    total ``total_packed_bytes`` (module docstring)."""
    return max(MAX_PACKED_BYTES, total_packed_bytes // SLICE_SHARE)


def _fusable(idx: GraphIndex, mm: onnx.NodeProto) -> tuple[onnx.NodeProto, onnx.TensorProto,
                                                            int] | None:
    """``(DequantizeLinear, weight, block)`` when ``mm`` is a MatMul this module fuses."""
    if mm.op_type != "MatMul" or mm.domain not in ("", "ai.onnx"):
        return None
    dq = idx.producer.get(mm.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or len(idx.consumers[dq.output[0]]) != 1:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    block = int(attrs.get("block_size", 0))
    if int(attrs.get("axis", 1)) != 0 or block < 16 or block & (block - 1):
        return None
    w = idx.inits.get(dq.input[0])
    if w is None or w.data_type not in _BITS or len(w.dims) != 2 or \
            any(idx.const_name(i) is None for i in dq.input[1:]):
        return None
    return dq, w, block


def fuse_matmul_nbits(model: onnx.ModelProto, accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
                      max_bytes: int | None = None) -> tuple[onnx.ModelProto, int]:
    """Replace every ``MatMul(X, DequantizeLinear(W, scale[, zp]))`` with constant, 2-D,
    blocked (``axis=0``) int8/int4/uint4 weights by ``MatMulNBits`` (in place; returns the
    model and the count of fused MatMuls): one node, or one per column slice + ``Concat`` when
    the packed weight exceeds ``max_bytes`` (default: :func:`slice_limit` of this model's
    packed weights). Anything else is left as it is."""
    idx = GraphIndex(model)
    position = {o: i for i, nd in enumerate(model.graph.node) for o in nd.output}
    found = [(pos, mm, hit) for pos, mm in enumerate(model.graph.node)
             if (hit := _fusable(idx, mm)) is not None]
    if max_bytes is None:
        max_bytes = slice_limit(sum(
            int(w.dims[1]) * _ceil_div(int(w.dims[0]), block) * block * _BITS[w.data_type] // 8
            for _, _, (_, w, block) in found))
    dead: set[int] = set()  # positions of the fused DequantizeLinear nodes
    fused: dict[int, list[onnx.NodeProto]] = {}
    for pos, mm, (dq, w, block) in found:
        bits = _BITS[w.data_type]
        # int4/uint4 arrive as ml_dtypes' 4-bit types: plain int8/uint8 from here on
        q = numpy_helper.to_array(w).astype(np.uint8 if w.data_type == TensorProto.UINT4
                                            else np.int8)
        scale = idx.array(idx.const_name(dq.input[1]) or "")
        zp = idx.array(idx.const_name(dq.input[2]) or "").astype(np.uint8) \
            if len(dq.input) > 2 and dq.input[2] else None
        fused[pos] = _nbits_nodes(model, mm, dq.input[0].removesuffix(".quant"),
                                  pack_nbits(q, scale, zp, bits, block), q.shape, bits, block,
                                  accuracy_level, max_bytes)
        dead.add(position[dq.output[0]])
    if not fused:
        return model, 0
    nodes = [x for i, nd in enumerate(model.graph.node) if i not in dead
             for x in fused.get(i, [nd])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for nd in model.graph.node for i in nd.input}
    inits = model.graph.initializer
    for i in reversed(range(len(inits))):  # in place: del + extend copied every kept weight
        if inits[i].name not in used:
            del inits[i]
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model, len(fused)


def _nbits_nodes(model: onnx.ModelProto, mm: onnx.NodeProto, base: str,
                 packed: tuple[np.ndarray, np.ndarray, np.ndarray | None], shape: tuple[int, ...],
                 bits: int, block: int, accuracy_level: int,
                 max_bytes: int) -> list[onnx.NodeProto]:
    """The MatMulNBits node(s) replacing ``mm`` (+ their initializers, added to ``model``)."""
    blob, scales, zps = packed
    k, n = shape
    slices = column_slices(n, blob.nbytes, max_bytes)
    scales2 = scales.reshape(n, -1)
    zps2 = None if zps is None else zps.reshape(n, -1)
    name = (mm.name or mm.output[0]) + "_nbits"
    nodes: list[onnx.NodeProto] = []
    for i, (a, b) in enumerate(slices):
        part = "" if len(slices) == 1 else slice_suffix(a, b)
        names = [fresh_name(model, base + part + s)
                 for s in (".nbits", ".nbits_scales", ".nbits_zp")]
        set_initializer(model, names[0], np.ascontiguousarray(blob[a:b]))
        set_initializer(model, names[1], np.ascontiguousarray(scales2[a:b]).reshape(-1))
        inputs = [mm.input[0], names[0], names[1]]
        if zps2 is not None:
            set_initializer(model, names[2], np.ascontiguousarray(zps2[a:b]).reshape(-1))
            inputs.append(names[2])
        out = list(mm.output) if len(slices) == 1 else [fresh_name(model, mm.output[0] + part)]
        nodes.append(helper.make_node(
            "MatMulNBits", inputs, out, name=name + (f"_{i}" if part else ""),
            domain=MS_DOMAIN, K=k, N=b - a, bits=bits, block_size=block,
            accuracy_level=accuracy_level))
    if len(slices) > 1:
        nodes.append(helper.make_node("Concat", [nd.output[0] for nd in nodes], list(mm.output),
                                      name=name + "_concat", axis=-1))
    return nodes
