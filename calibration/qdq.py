"""Rewrite an fp32 decoder into explicit W8A8 Q/DQ form (TensorRT's placement rules).

Only the projection MatMuls are quantized; ``lm_head``, norms, softmax, RoPE and the attention
MatMuls stay float. Zero-points are 0 (symmetric), activations per-tensor, weights per output
channel. ONNX Runtime CPU fuses each pattern into ``MatMulIntegerToFloat``; TensorRT builds it
as an INT8 GEMM in a strongly typed network.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper

from .graph import GraphIndex, fresh_name, set_initializer
from .quant import QMAX, quantize_blocked, quantize_weight
from .smoothquant import GroupPlan, Tensors, weight_slot


class NodeInserter:
    """Collects new nodes to place right after a producer (or first) and re-sorts the graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.prefix: list[onnx.NodeProto] = []
        self.after: dict[str, list[onnx.NodeProto]] = {}

    def add(self, node: onnx.NodeProto, after: str | None = None) -> None:
        (self.prefix if after is None else self.after.setdefault(after, [])).append(node)

    def commit(self) -> None:
        nodes = list(self.prefix)
        for n in self.model.graph.node:
            nodes.append(n)
            nodes.extend(self.after.get(n.name, []))
        del self.model.graph.node[:]
        self.model.graph.node.extend(nodes)


#        ┌─► QuantizeLinear(s_x, 0) ──► DequantizeLinear(s_x, 0) ──► MatMul(q) ◄── W_dq(q)
#   X ───┼─► QuantizeLinear(s_x, 0) ──► DequantizeLinear(s_x, 0) ──► MatMul(k) ◄── W_dq(k)
#        └─► QuantizeLinear(s_x, 0) ──► DequantizeLinear(s_x, 0) ──► MatMul(v) ◄── W_dq(v)
#   W_dq = DequantizeLinear(W_q int8 (K,N), s_w (N,), axis=1)
#
# One Q/DQ pair per consumer (same scale): ONNX Runtime fuses a Q→DQ→MatMul unit into
# MatMulIntegerToFloat only when the pair feeds that MatMul alone (measured: a shared pair is
# left unfused); TensorRT accepts both forms and folds duplicates.
# Excluded projections of the group keep reading X (and their float, possibly smoothed, W).
def insert_w8a8(model: onnx.ModelProto, plans: list[GroupPlan], tensors: Tensors,
                exclude: Iterable[str] = (), excluded_block: int | None = None) -> list[str]:
    """Quantize every projection of ``plans`` except labels in ``exclude``; returns labels done.

    ``excluded_block``: the excluded projections keep float activations but get int8 weights
    in blocks of this size along K (weight-only, opset 21; ONNX Runtime runs them as 8-bit
    MatMulNBits) instead of float weights. None: they stay entirely float.
    """
    skip = set(exclude)
    idx = tensors.idx
    ins = NodeInserter(model)
    done: list[str] = []
    for plan in plans:
        if excluded_block is not None:
            for p in plan.group.projections:
                if p.label in skip:
                    w = tensors.get(weight_slot(p.node))
                    tensors.edits.pop(weight_slot(p.node), None)
                    q, scale = quantize_blocked(w, 8, excluded_block)
                    idx.nodes[p.node].input[1] = weight_dq(model, ins, p.weight, q, scale, axis=0,
                                                           block_size=excluded_block)
        projs = [p for p in plan.group.projections if p.label not in skip]
        if not projs:
            continue
        x_q = _ActivationQ(model, ins, idx, plan.group.input, plan.act_amax / QMAX)
        for p in projs:
            node = idx.nodes[p.node]
            w = tensors.get(weight_slot(p.node))
            tensors.edits.pop(weight_slot(p.node), None)
            node.input[0] = x_q.dequantized(p.label)
            node.input[1] = weight_dq(model, ins, p.weight, *quantize_weight(w), axis=1)
            done.append(p.label)
    tensors.apply(model)  # before commit: commit copies the node protos the index points at
    ins.commit()
    prune_initializers(model)
    return done


class _ActivationQ:
    """Shared scale of ``x``; a Q/DQ pair placed after its producer for each consumer."""

    def __init__(self, model: onnx.ModelProto, ins: NodeInserter, idx: GraphIndex, x: str,
                 scale: float) -> None:
        self.model, self.ins, self.x = model, ins, x
        self.scale = np.float32(scale)
        self.z = fresh_name(model, x + ".act_zp")
        set_initializer(model, self.z, np.array(0, dtype=np.int8))
        prod = idx.producer.get(x)
        self.after = prod.name if prod is not None else None

    def dequantized(self, consumer: str) -> str:
        # Each pair gets its own scale, one float32 ulp apart (a 1e-7 relative change): identical
        # pairs would be merged back into one by ONNX Runtime's common-subexpression elimination
        # and constant sharing, which then leaves them unfused (measured).
        s = fresh_name(self.model, f"{self.x}.act_scale.{consumer}")
        set_initializer(self.model, s, np.array(self.scale, dtype=np.float32))
        self.scale = np.nextafter(self.scale, np.float32(np.inf))
        q = fresh_name(self.model, f"{self.x}.q.{consumer}")
        dq = fresh_name(self.model, f"{self.x}.dq.{consumer}")
        self.ins.add(helper.make_node("QuantizeLinear", [self.x, s, self.z], [q],
                                      name=q + "_node"), self.after)
        self.ins.add(helper.make_node("DequantizeLinear", [q, s, self.z], [dq],
                                      name=dq + "_node"), self.after)
        return dq


def pack_int4(q: np.ndarray) -> bytes:
    """ONNX INT4 / UINT4 raw data: two values per byte, the first in the low nibble."""
    flat = (q.astype(np.int8 if q.dtype.kind == "i" else np.uint8).ravel().view(np.uint8)
            & 0x0F).astype(np.uint8)
    if len(flat) % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def weight_dq(model: onnx.ModelProto, ins: NodeInserter, base: str, q: np.ndarray,
              scale: np.ndarray, *, axis: int, block_size: int | None = None,
              bits: int = 8, zero_point: np.ndarray | None = None) -> str:
    """Add ``q`` + scales (+ zero-point) and a DequantizeLinear; returns its output.

    ``bits=8``: ``q`` int8. ``bits=4``: ``q`` held in int8 (signed, INT4) or uint8 (UINT4, with
    a UINT4 ``zero_point``).
    """
    qname = fresh_name(model, base + ".quant")
    sname = fresh_name(model, base + ".scale")
    signed = q.dtype.kind == "i"
    if bits == 8:
        set_initializer(model, qname, q.astype(np.int8))
    else:
        kind = TensorProto.INT4 if signed else TensorProto.UINT4
        model.graph.initializer.append(helper.make_tensor(qname, kind, q.shape, pack_int4(q),
                                                          raw=True))
    set_initializer(model, sname, scale.astype(np.float32))
    inputs = [qname, sname]
    if zero_point is not None:
        zname = fresh_name(model, base + ".zero_point")
        model.graph.initializer.append(helper.make_tensor(
            zname, TensorProto.UINT4, zero_point.shape, pack_int4(zero_point), raw=True))
        inputs.append(zname)
    out = fresh_name(model, base + ".dq")
    # Symmetric: no zero-point input (0), its absence keeps the weight type the only type.
    node = helper.make_node("DequantizeLinear", inputs, [out], name=out + "_node", axis=axis)
    if block_size is not None:
        node.attribute.append(helper.make_attribute("block_size", block_size))
    ins.add(node)
    return out


def prune_initializers(model: onnx.ModelProto) -> None:
    """Drop initializers no node (or graph output) reads any more: the replaced fp32 weights.
    Deleted in place: rebuilding the list (``del`` + ``extend``) copied every kept tensor, a
    transient second copy of a model's weights."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    inits = model.graph.initializer
    for i in reversed(range(len(inits))):
        if inits[i].name not in used:
            del inits[i]
