"""The int8 variant's ONNX-Runtime graph in W8A8 form (``calibrate --ort-int8 w8a8``).

The default int8 ONNX-Runtime graph is weight-only (MatMulNBits, 8-bit blocks): its kernel
quantizes the activations per block and row at run time. On CPUs without AVX-512 VNNI that
kernel's cost grows with every row: a speculative verification of 9 tokens cost 4.0-4.3 decode
steps on Qwen2.5-Coder-1.5B (AMD EPYC, AVX2 only), and prefill ran at 47 tok/s. ONNX Runtime's
int8 GEMM for static W8A8 (``MatMulIntegerToFloat``, what a Q→DQ→MatMul←DQ unit fuses into)
tiles rows: 9 tokens cost 2.6-2.9 steps, prefill 87 tok/s, a decode step as fast, on the same
machine (README, "The bundle"; on SmolLM2 its extra quantize nodes make decode 12 % slower).

This graph is the ONNX-Runtime graph (GroupQueryAttention, fused norms, packed q/k/v) carrying
the calibrated W8A8 standard graph's numbers: its SmoothQuant-folded norm weights, per-channel
int8 weights and static per-tensor activation scales, so both graphs quantize identically. The
projections the calibration kept float (and lm_head) get int8 weight-only blocks instead, as in
the default graph. Static scales make every row's result independent of the other rows in the
forward, which keeps speculative decoding exact (a verification computes each position as a
decode step would). Dynamic per-tensor activation quantization (ONNX Runtime's
``quantize_dynamic``) would not, and without SmoothQuant it wrecked SmolLM2 (held-out
perplexity x2000, measured).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from llama_export.runtime.errors import CalibrationError

from .graph import GraphIndex, fresh_name, read_external, set_initializer
from .nbits import fuse_matmul_nbits
from .qdq import NodeInserter, _ActivationQ, prune_initializers, weight_dq
from .quant import dequantize_blocked, quantize_blocked
from .weight_only import fitted_block, upgrade_opset

# smoothquant.Tensors.apply names an edited constant <name>.smoothed, graph.fresh_name numbers
# repeats (<name>.smoothed.1); qdq.weight_dq's int8 weight is <weight name>.quant
_SMOOTHED = re.compile(r"\.smoothed(\.\d+)?$")
_QUANT = re.compile(r"\.quant(\.\d+)?$")
_PACKED = ("qkv_proj", ("q_proj", "k_proj", "v_proj"))  # the ort graph's packed projection


@dataclass(frozen=True)
class _W8A8:
    """A projection of the W8A8 graph: per-channel int8 ``q`` (K, N), ``scale`` (N,), and the
    static scale of its input activation."""

    q: np.ndarray
    scale: np.ndarray
    act_scale: float


@dataclass(frozen=True)
class _Proj:
    """A projection's weight (:class:`_W8A8` or float (K, N)) and the weight of the RMSNorm
    that feeds it in the standard graph (SmoothQuant folded its factors there), or None."""

    weight: _W8A8 | np.ndarray
    norm: np.ndarray | None


def _base(name: str) -> str:
    return _SMOOTHED.sub("", name)


def _norm_weight(idx: GraphIndex, x: str) -> np.ndarray | None:
    """The 1-D float weight of the ``Mul`` producing ``x`` (the standard graph's RMSNorm)."""
    mul = idx.producer.get(x)
    if mul is None or mul.op_type != "Mul":
        return None
    for i in mul.input:
        if idx.is_float_const(i, 1):
            return idx.array(idx.const_name(i) or i)
    return None


def standard_weights(std: onnx.ModelProto, base_dir: Path) -> dict[str, _Proj]:
    """Every projection of the calibrated standard graph by its exporter weight name
    (``model.layers.0.self_attn.q_proj.weight_t``): a :class:`_W8A8`, or the float weight
    (possibly smoothed; int8 weight-only blocks are dequantized), with its norm's weight.
    Matched by structure, not names: identical constants may share one initializer (a tiny
    random model's norms are all ones)."""
    idx = GraphIndex(std, base_dir)
    out: dict[str, _Proj] = {}
    for n in std.graph.node:
        if n.op_type != "MatMul":
            continue
        const = idx.const_name(n.input[1])
        if const is not None:
            if len(idx.inits[const].dims) == 2:
                out[_base(const)] = _Proj(idx.array(const), _norm_weight(idx, n.input[0]))
            continue
        dq = idx.producer.get(n.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or not _QUANT.search(dq.input[0]):
            continue
        name = _base(_QUANT.sub("", dq.input[0]))
        q, scale = idx.array(dq.input[0]), idx.array(dq.input[1])
        attrs = {a.name: a.i for a in dq.attribute}
        if "block_size" in attrs:  # weight-only blocks along K (--excluded-weights / --lm-head)
            out[name] = _Proj(dequantize_blocked(q, scale, attrs["block_size"]),
                              _norm_weight(idx, n.input[0]))
            continue
        act = idx.producer.get(n.input[0])
        quant = idx.producer.get(act.input[0]) if act is not None else None
        if act is None or act.op_type != "DequantizeLinear" or quant is None or \
                quant.op_type != "QuantizeLinear":
            raise CalibrationError(f"{n.name}: int8 weights without an activation Q/DQ pair; "
                                   "re-run `llama-export calibrate` on a fresh export")
        out[name] = _Proj(_W8A8(q, scale, float(idx.array(act.input[1]))),
                          _norm_weight(idx, quant.input[0]))
    return out


def _parts(name: str) -> list[str]:
    packed, singles = _PACKED
    if f".{packed}." in name:
        return [name.replace(packed, s) for s in singles]
    return [name]


def w8a8_ort_graph(fp32_ort: onnx.ModelProto, std: onnx.ModelProto, base_dir: Path,
                   block: int) -> tuple[onnx.ModelProto, int, int]:
    """Rewrite ``fp32_ort`` (the fp32 ONNX-Runtime graph loaded without its external data,
    which is read from ``base_dir``) in place with ``std``'s W8A8 numbers (module docstring).
    Returns the model and the counts of W8A8 and weight-only projections. Float weights are
    quantized in blocks of :func:`fitted_block` ``(K, block)``."""
    projections = standard_weights(std, base_dir)
    model = upgrade_opset(fp32_ort, in_place=True)
    idx = GraphIndex(model, base_dir)
    ins = NodeInserter(model)
    activations: dict[str, _ActivationQ] = {}
    normed: set[str] = set()
    n_w8a8 = n_blocks = 0
    for node in list(model.graph.node):
        wname = idx.const_name(node.input[1]) if node.op_type == "MatMul" else None
        if wname is None:
            continue
        found = [projections.get(p) for p in _parts(wname)]
        parts = [p for p in found if p is not None]
        if len(parts) != len(found):
            raise CalibrationError(f"the calibrated int8 graph has no weight for {wname}: "
                                   "re-export the bundle and calibrate again")
        x = node.input[0]
        if x not in normed:  # gate and up read one norm: set it once
            _set_norm(model, idx, x, [p.norm for p in parts], wname)
            normed.add(x)
        weights = [p.weight for p in parts]
        w8 = [w for w in weights if isinstance(w, _W8A8)]
        if len(w8) == len(weights):
            q = np.concatenate([w.q for w in w8], axis=1)
            scale = np.concatenate([w.scale for w in w8])
            if q.shape[1] != int(idx.inits[wname].dims[1]):
                raise CalibrationError(f"{wname}: {q.shape[1]} int8 columns for "
                                       f"{idx.inits[wname].dims[1]}; re-export the bundle and "
                                       "calibrate again")
            if x not in activations:  # q/k/v parts share one input and scale: the largest
                activations[x] = _ActivationQ(model, ins, idx, x, max(w.act_scale for w in w8))
            node.input[0] = activations[x].dequantized(wname)
            node.input[1] = weight_dq(model, ins, wname, q, scale, axis=1)
            n_w8a8 += 1
        else:
            w = np.concatenate([v.q.astype(np.float32) * v.scale if isinstance(v, _W8A8) else v
                                for v in weights], axis=1)
            b = fitted_block(w.shape[0], block)
            qb, sb = quantize_blocked(w, 8, b)
            node.input[1] = weight_dq(model, ins, wname, qb, sb, axis=0, block_size=b)
            n_blocks += 1
    ins.commit()
    prune_initializers(model)
    fuse_matmul_nbits(model)  # the weight-only blocks, as the default graph stores them
    for t in model.graph.initializer:  # what stays float (embedding, norms, biases): in memory
        if t.data_location == TensorProto.EXTERNAL:
            t.CopyFrom(onnx.numpy_helper.from_array(read_external(t, base_dir), t.name))
    return model, n_w8a8, n_blocks


def _set_norm(model: onnx.ModelProto, idx: GraphIndex, x: str, norms: list[np.ndarray | None],
              wname: str) -> None:
    """Give the norm producing ``x`` in the ort graph the standard graph's (smoothed) weight, as
    a fresh initializer of that node alone (its old one may be shared)."""
    given = [n for n in norms if n is not None]
    if not given:
        return
    if len(given) != len(norms) or any(not np.array_equal(given[0], n) for n in given):
        raise CalibrationError(f"{wname}: its parts read differently smoothed norms; "
                               "re-export the bundle and calibrate again")
    prod = idx.producer.get(x)
    slot = None
    if prod is not None and prod.op_type == "SkipSimplifiedLayerNormalization" and \
            prod.output[0] == x:
        slot = 2
    elif prod is not None and prod.op_type == "Mul":
        slot = next((i for i, name in enumerate(prod.input) if idx.is_float_const(name, 1)),
                    None)
    if prod is None or slot is None:
        raise CalibrationError(f"{wname}: no RMSNorm weight feeds it in the ONNX-Runtime graph; "
                               "re-export the bundle")
    name = fresh_name(model, f"{idx.const_name(prod.input[slot]) or wname}.smoothed")
    set_initializer(model, name, given[0].astype(np.float32))
    prod.input[slot] = name
