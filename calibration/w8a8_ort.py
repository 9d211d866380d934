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
int8 weights and static per-tensor activation scales, so both graphs quantize identically (the
projections the calibration kept float, and lm_head: below). Static scales make every row's
result independent of the other rows in the forward, which keeps speculative decoding exact (a
verification computes each position as a decode step would). Dynamic per-tensor activation
quantization (ONNX Runtime's ``quantize_dynamic``) would not, and without SmoothQuant it
wrecked SmolLM2 (held-out perplexity x2000, measured).

The projections the calibration kept float (SiLU·up outliers keep most down_proj there) and
lm_head go to the same int8 GEMM, with activations quantized per row at run time
(:func:`row_quantized`): each row's own scale, so still independent of the other rows. Per
row alone lost too much (Qwen2.5-Coder-1.5B, with the u8 x s8 kernel below: +2.84 %, 91.1 %):
smoothing had moved the outliers into a few weight rows (138 against a median of 0.09 in
layer 1), so each projection's channels are re-balanced between activation and weight
(alpha 0.5, from activation maxima measured on the standard graph) and the few channels with
the largest activation x weight product stay float beside the GEMM: +1.05 % / 93.8 % (int8
blocks there: +1.26 % / 94.8 %), and a 9-token forward costs 2.4 decode steps instead of 3.1
(MatMulNBits' 8-bit kernel cost most of a step per extra row on this CPU). When that fails
the gate, or with ``--ort-int8 w8a8-blocks``, they get int8 weight-only blocks (MatMulNBits):
fewer nodes, a faster step on a model as small as SmolLM2 (README, "The bundle")."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from llama_export.runtime.errors import CalibrationError

from .graph import GraphIndex, fresh_name, read_external, set_initializer
from .nbits import fuse_matmul_nbits
from .qdq import NodeInserter, _ActivationQ, prune_initializers, weight_dq
from .quant import dequantize_blocked, quantize_blocked, quantize_weight
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
    input: str  # the float activation it reads (before its Q/DQ pair if it has one)


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
                out[_base(const)] = _Proj(idx.array(const), _norm_weight(idx, n.input[0]),
                                          n.input[0])
            continue
        dq = idx.producer.get(n.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or not _QUANT.search(dq.input[0]):
            continue
        name = _base(_QUANT.sub("", dq.input[0]))
        q, scale = idx.array(dq.input[0]), idx.array(dq.input[1])
        attrs = {a.name: a.i for a in dq.attribute}
        if "block_size" in attrs:  # weight-only blocks along K (--excluded-weights / --lm-head)
            out[name] = _Proj(dequantize_blocked(q, scale, attrs["block_size"]),
                              _norm_weight(idx, n.input[0]), n.input[0])
            continue
        act = idx.producer.get(n.input[0])
        quant = idx.producer.get(act.input[0]) if act is not None else None
        if act is None or act.op_type != "DequantizeLinear" or quant is None or \
                quant.op_type != "QuantizeLinear":
            raise CalibrationError(f"{n.name}: int8 weights without an activation Q/DQ pair; "
                                   "re-run `llama-export calibrate` on a fresh export")
        out[name] = _Proj(_W8A8(q, scale, float(idx.array(act.input[1]))),
                          _norm_weight(idx, quant.input[0]), quant.input[0])
    return out


def float_inputs(std: onnx.ModelProto, base_dir: Path) -> list[str]:
    """The standard graph's activations read by projections it keeps float (and lm_head): the
    tensors whose per-channel maxima :func:`w8a8_ort_graph` needs for :func:`row_quantized`."""
    return sorted({p.input for p in standard_weights(std, base_dir).values()
                   if not isinstance(p.weight, _W8A8)})


def _parts(name: str) -> list[str]:
    packed, singles = _PACKED
    if f".{packed}." in name:
        return [name.replace(packed, s) for s in singles]
    return [name]


def w8a8_ort_graph(fp32_ort: onnx.ModelProto, std: onnx.ModelProto, base_dir: Path,
                   block: int, act_amax: Mapping[str, np.ndarray] | None = None,
                   ) -> tuple[onnx.ModelProto, int, int]:
    """Rewrite ``fp32_ort`` (the fp32 ONNX-Runtime graph loaded without its external data,
    which is read from ``base_dir``) in place with ``std``'s W8A8 numbers (module docstring).
    Returns the model and the counts of W8A8 projections and of the others. The others (the
    float weights of ``std``): :func:`row_quantized` with ``act_amax`` (per-channel maxima of
    the :func:`float_inputs`), or, without it, int8 blocks of :func:`fitted_block`
    ``(K, block)`` (MatMulNBits)."""
    projections = standard_weights(std, base_dir)
    consts = _RowConsts(fp32_ort) if act_amax is not None else None
    model = upgrade_opset(fp32_ort, in_place=True)
    idx = GraphIndex(model, base_dir)
    ins = NodeInserter(model)
    activations: dict[str, _ActivationQ] = {}
    normed: set[str] = set()
    n_w8a8 = n_other = 0
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
            n_other += 1
            if act_amax is not None and consts is not None:
                amax = act_amax.get(parts[0].input)
                if amax is None:
                    raise CalibrationError(f"{wname}: no activation maxima for "
                                           f"{parts[0].input}; calibrate again")
                row_quantized(model, ins, idx, node, w, amax, consts)
                continue
            b = fitted_block(w.shape[0], block)
            qb, sb = quantize_blocked(w, 8, b)
            node.input[1] = weight_dq(model, ins, wname, qb, sb, axis=0, block_size=b)
    ins.commit()
    prune_initializers(model)
    fuse_matmul_nbits(model)  # the weight-only blocks, as the default graph stores them
    for t in model.graph.initializer:  # what stays float (embedding, norms, biases): in memory
        if t.data_location == TensorProto.EXTERNAL:
            t.CopyFrom(onnx.numpy_helper.from_array(read_external(t, base_dir), t.name))
    return model, n_w8a8, n_other


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


# row_quantized: channels kept float beside the int8 GEMM, K/100 of them within these bounds
# (Qwen2.5-Coder-1.5B: 89 of down_proj's 8960, 16 of lm_head's 1536: 23 MB of float weights read
# per token beside 1.6 GB of int8), and the re-balancing exponent (SmoothQuant's alpha). On that
# model's held-out text 8-32 / 8-64 / 16-128 channels gave perplexity +1.36 / +1.57 / +1.05 %
# at the same mean KL (0.0173-0.0175): the per-genre spread is noise of that size.
ROW_FLOAT_CHANNELS = (16, 128)
ROW_ALPHA = 0.5
_TINY = 1e-12


class _RowConsts:
    """The scalar constants every :func:`row_quantized` projection shares."""

    def __init__(self, model: onnx.ModelProto) -> None:
        def const(name: str, value: np.ndarray) -> str:
            full = fresh_name(model, f"rows.{name}")
            set_initializer(model, full, value)
            return full

        self.axis = const("axis", np.array([-1], np.int64))
        self.inv_qmax = const("inv_qmax", np.array(1 / 127, np.float32))
        self.tiny = const("tiny", np.array(1e-30, np.float32))
        self.offset = const("offset", np.array(128, np.float32))
        self.lo = const("lo", np.array(0, np.float32))
        self.hi = const("hi", np.array(255, np.float32))
        self.zero_point = const("zero_point", np.array(128, np.uint8))


def row_plan(w: np.ndarray, act_amax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ``x (.., K) @ w (K, N)`` with per-channel activation maxima ``act_amax (K,)``: the
    channels kept float (the largest activation max x weight-row max products, sorted) and the
    factors ``t (K,)`` that re-balance the rest (``x * t`` and ``w / t`` meet at the geometric
    mean of their maxima at alpha 0.5; 0 on the float channels)."""
    k = w.shape[0]
    if act_amax.shape != (k,):
        raise CalibrationError(f"activation maxima of shape {act_amax.shape} for a weight of "
                               f"{k} rows; calibrate again")
    w_amax = np.maximum(np.abs(w).max(axis=1), _TINY)
    act = np.maximum(act_amax.astype(np.float64), _TINY)
    lo, hi = ROW_FLOAT_CHANNELS
    n_float = min(k, max(lo, min(hi, k // 100)))
    kept = np.sort(np.argsort(-(act * w_amax), kind="stable")[:n_float])
    t = (w_amax / act) ** ROW_ALPHA
    t /= np.median(t)
    t[kept] = 0.0
    return kept, t.astype(np.float32)


def row_quantized(model: onnx.ModelProto, ins: NodeInserter, idx: GraphIndex,
                  node: onnx.NodeProto, w: np.ndarray, act_amax: np.ndarray,
                  consts: _RowConsts) -> None:
    """Turn ``node`` (``MatMul(x, W)``, ``w`` the float weight to use) into::

        xs = x * t                       re-balanced, float channels zeroed (row_plan)
        s  = max|xs| / 127 per row       the row's own scale: rows stay independent
        q  = uint8(clip(round(xs / s) + 128))
        y  = float(MatMulInteger(q, uint8(int8(w / t) + 128), 128, 128)) * s * w_scale
           + Gather(x, float channels) @ w[float channels]              float, a few channels

    ONNX Runtime runs MatMulInteger on MLAS's int8 GEMM. Both operands are uint8 with zero
    point 128 (U8U8): MLAS's AVX2 U8S8 kernel adds pairs of u8 x s8 products in 16 bits
    (vpmaddubsw) and saturates (max error 1.7-5 % of the output on Gaussian weights, measured
    against integer math), its U8U8 kernel widens first and is exact, 15-25 % slower at 9 rows;
    S8S8 runs a reference kernel 20-35x slower (AMD EPYC, AVX2, onnxruntime 1.2x)."""
    x, y = node.input[0], node.output[0]
    base = idx.const_name(node.input[1]) or node.name
    kept, t = row_plan(w, act_amax)
    keep = t > 0
    q, scale = quantize_weight(np.where(keep[:, None], w / np.where(keep, t, 1)[:, None], 0.0))
    prod = idx.producer.get(x)
    after = prod.name if prod is not None else None

    prefix = fresh_name(model, f"{base}.rows")  # pending nodes are not in the model yet:
    made: list[str] = []                        # names are numbered here

    def name(suffix: str) -> str:
        made.append(suffix)
        return f"{prefix}.{len(made)}.{suffix}"

    def init(suffix: str, value: np.ndarray) -> str:
        full = name(suffix)
        set_initializer(model, full, value)
        return full

    def add(op: str, inputs: list[str], **attrs: int) -> str:
        out = name(op.lower())
        node = helper.make_node(op, inputs, [out], name=out + "_node")
        node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
        ins.add(node, after)
        return out

    xs = add("Mul", [x, init("t", t)])
    s = add("Max", [add("Mul", [add("ReduceMax", [add("Abs", [xs]), consts.axis], keepdims=1),
                                consts.inv_qmax]), consts.tiny])
    shifted = add("Add", [add("Round", [add("Div", [xs, s])]), consts.offset])
    q8 = add("Cast", [add("Clip", [shifted, consts.lo, consts.hi])], to=TensorProto.UINT8)
    wq = (q.astype(np.int16) + 128).astype(np.uint8)
    i32 = add("MatMulInteger", [q8, init("weight", wq), consts.zero_point, consts.zero_point])
    yi = add("Mul", [add("Mul", [add("Cast", [i32], to=TensorProto.FLOAT), s]),
                     init("weight_scale", scale)])
    xf = add("Gather", [x, init("float_channels", kept.astype(np.int64))], axis=-1)
    yf = add("MatMul", [xf, init("float_weight", np.ascontiguousarray(w[kept], np.float32))])
    node.op_type, node.domain = "Add", ""
    del node.attribute[:]
    node.input[:] = [yi, yf]
    node.output[:] = [y]
