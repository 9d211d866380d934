"""Weight-only INT4 / INT8: blocked ``DequantizeLinear`` on the weights feeding MatMul.

``DequantizeLinear(W_q, scale, axis=0, block_size=B)`` (opset 21) with ``W_q`` int4/int8
``(K, N)`` and ``scale`` ``(ceil(K/B), N)``: TensorRT builds it as weight-only INT4/INT8 and
ONNX Runtime CPU fuses it with the MatMul into ``MatMulNBits`` (shared/DESIGN.md §9).

Three INT4 formats (``FORMATS``):

* ``offset`` (default): ``w = s * q + o`` per block, ``q`` signed INT4 with no zero-point and a
  float offset ``o`` per block and column, applied as ``(X @ P) @ O`` where ``P`` (K, K/B) sums
  each block of ``X``. Asymmetric accuracy in a form TensorRT accepts (its DequantizeLayer
  rejects non-zero zero-points), and exact for weights that came from a GGUF ``Q4_1`` file
  (``d * q + m`` per block of 32): SmolLM2 +0.2 % perplexity (ONNX-Runtime graph +0.6 %)
  instead of +22.6 % (zero-point, every projection 4-bit).
* ``zero-point``: UINT4 with a UINT4 zero-point per block, MatMulNBits' asymmetric form.
  ONNX Runtime only (TensorRT rejects the zero-point).
* ``symmetric``: INT4 alone, the smallest, fastest form (what onnxruntime-genai writes), the
  least accurate. The ONNX-Runtime graph uses ONNX Runtime's rule (a block's extreme on -8,
  negative scales allowed); the standard graph keeps scales positive for TensorRT.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Container, Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, version_converter
from onnx.external_data_helper import load_external_data_for_model

from .graph import (
    GraphIndex,
    Projection,
    find_projections,
    fresh_name,
    is_lm_head,
    lean_copy,
    set_initializer,
)
from .qdq import NodeInserter, prune_initializers, weight_dq
from .quant import quantize_blocked

BLOCK_OPSET = 21
BLOCK_SIZES = (32, 64, 128)
MIN_FITTED_BLOCK = 32
SCALE_GRID = np.linspace(0.85, 1.1, 11)


def fitted_block(k: int, largest: int) -> int:
    """The block for a weight of ``k`` input rows: the largest power of two from ``largest``
    down to 32 that divides ``k`` (no padded block: a padded row is bytes read and multiplied
    for nothing), or ``largest`` when none does. SmolLM2: K 576 -> 64, K 1536 -> 128."""
    b = largest
    while b > MIN_FITTED_BLOCK and k % b:
        b //= 2
    return b if k % b == 0 else largest


def quantize_blocked_asym(w: np.ndarray, block: int,
                          bits: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric blocked quantization (``uint4`` + ``uint4`` zero-point per block, the format
    MatMulNBits runs natively), scale and zero-point searched per block for the least squared
    error: ``(q (K, N) uint8 holding 0..15, scale (nb, N), zero_point (nb, N))``.

    Why search: min/max rounding leaves ~20 % more weight error than the best grid, and the
    source weights are often already 4-bit (GGUF Q4_1), where a mis-aligned grid hurts most.
    """
    k, n = w.shape
    nb = -(-k // block)
    pad = np.repeat(w[-1:], nb * block - k, axis=0)  # repeat a real row: keeps min/max honest
    blocks = np.concatenate([w, pad]).reshape(nb, block, n).astype(np.float32)
    levels = float(2**bits - 1)
    lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
    best_err = np.full(lo.shape, np.inf, dtype=np.float32)
    best_s, best_z = np.ones_like(lo), np.zeros_like(lo)
    for f in SCALE_GRID:
        s = np.maximum((hi - lo) / levels * f, 1e-12)
        for shift in (-1.0, 0.0, 1.0):
            z = np.clip(np.rint(-lo / s) + shift, 0, levels)
            r = (np.clip(np.rint(blocks / s) + z, 0, levels) - z) * s
            err = ((r - blocks) ** 2).sum(axis=1, keepdims=True)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s, best_z = np.where(better, s, best_s), np.where(better, z, best_z)
    q = np.clip(np.rint(blocks / best_s) + best_z, 0, levels).reshape(nb * block, n)[:k]
    return q.astype(np.uint8), best_s[:, 0].astype(np.float32), best_z[:, 0].astype(np.uint8)


OFFSET_LEVELS = (15, 14, 13, 12, 11, 10, 9, 8)


def quantize_blocked_offset(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray,
                                                                 np.ndarray]:
    """``w ≈ s * q + o`` per block along K: ``(q (K, N) int8 in -8..7, s (nb, N), o (nb, N))``.

    Candidate steps ``(max - min) / L`` for ``L`` in :data:`OFFSET_LEVELS` with the grid
    anchored at the block minimum; the least squared error wins. A block that uses ``L + 1``
    levels of a 4-bit grid (a GGUF ``Q4_1`` block spanning levels 1..14, say) is reproduced
    exactly. A last partial block is padded with copies of the last row (keeps min/max honest).
    """
    k, n = w.shape
    nb = -(-k // block)
    pad = np.repeat(w[-1:], nb * block - k, axis=0)
    blocks = np.concatenate([w, pad]).reshape(nb, block, n).astype(np.float32)
    lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
    best_err = np.full(lo.shape, np.inf, dtype=np.float32)
    best = np.ones_like(lo)
    for levels in OFFSET_LEVELS:
        s = np.maximum((hi - lo) / levels, 1e-12)
        r = np.clip(np.rint((blocks - lo) / s), 0, 15) * s + lo
        err = ((r - blocks) ** 2).sum(axis=1, keepdims=True)
        better = err < best_err
        best_err, best = np.where(better, err, best_err), np.where(better, s, best)
    q = np.clip(np.rint((blocks - lo) / best), 0, 15) - 8
    offset = lo + 8 * best
    return (q.reshape(nb * block, n)[:k].astype(np.int8), best[:, 0].astype(np.float32),
            offset[:, 0].astype(np.float32))


def quantize_blocked_symmetric(w: np.ndarray, block: int,
                               negative_scales: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT4 using the full -8..7 range: each block's extreme lands exactly on -8.

    With ``negative_scales`` (ONNX Runtime's own rule, MatMulNBits accepts them) a positive
    extreme takes a negative scale; without (TensorRT-safe), it lands on 7 instead.
    Measured on SmolLM2, every projection and lm_head at 4 bits: +27.1 % perplexity with
    negative scales, +40.6 % without, +45.6 % for ``max|w| / 7`` (:func:`quantize_blocked`).
    """
    k, n = w.shape
    nb = -(-k // block)
    pad = np.zeros((nb * block, n), dtype=np.float32)
    pad[:k] = w
    blocks = pad.reshape(nb, block, n)
    ext = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None, :], axis=1)[:, 0]
    if negative_scales:
        scale = np.where(ext == 0, 1e-12, ext / -8)                            # (nb, N)
    else:
        scale = np.maximum(np.where(ext < 0, -ext / 8, ext / 7), 1e-12)
    q = np.clip(np.rint(blocks / scale[:, None, :]), -8, 7)
    return q.reshape(nb * block, n)[:k].astype(np.int8), scale.astype(np.float32)


def upgrade_opset(model: onnx.ModelProto, opset: int = BLOCK_OPSET, *,
                  in_place: bool = False) -> onnx.ModelProto:
    """Blocked DequantizeLinear needs opset 21; converts e.g. ReduceMean's axes to an input.

    The converter serializes the model it is given (past 2 GB protobuf refuses), but needs no
    weight values: it converts a copy without the large initializers' data. ``in_place``:
    its graph then replaces ``model``'s, whose weights stay where they are (no copy; returns
    ``model``). Otherwise a new model gets copies of the weights and ``model`` stays intact;
    that took the weights three times over (Qwen2.5-1.5B: 7 GB each)."""
    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current >= opset:
        return model
    big = frozenset(t.name for t in model.graph.initializer
                    if t.data_location == onnx.TensorProto.DEFAULT and len(t.raw_data) > 1024)
    converted = version_converter.convert_version(lean_copy(model, big), opset)
    if not in_place:
        src = {t.name: t for t in model.graph.initializer if t.name in big}
        for t in converted.graph.initializer:
            if t.name in big:
                t.CopyFrom(src[t.name])
        return converted
    g, c = model.graph, converted.graph
    keep = {t.name for t in c.initializer}
    for i in reversed(range(len(g.initializer))):
        if g.initializer[i].name not in keep:
            del g.initializer[i]
    mine = {t.name: t for t in g.initializer}
    for t in c.initializer:
        if t.name not in big:  # small constants: the converter's version
            (mine[t.name] if t.name in mine else g.initializer.add()).CopyFrom(t)
    for name in ("node", "input", "output", "value_info"):
        g.ClearField(name)
        getattr(g, name).extend(getattr(c, name))
    model.ClearField("opset_import")
    model.opset_import.extend(converted.opset_import)
    model.ClearField("functions")
    model.functions.extend(converted.functions)
    model.ir_version = converted.ir_version
    return model


#   W (K,N) fp32  ══►  W_q int4/int8 (K,N) ──► DequantizeLinear(scale (K/B,N), axis=0,
#                                               block_size=B) ──► W_dq ──► MatMul(X, W_dq)
FORMATS = ("offset", "zero-point", "symmetric")


def quantize_weight_only(model: onnx.ModelProto, *, bits: int = 4, block: int = 32,
                         include_lm_head: bool = False, int8_labels: Container[str] = (),
                         fmt: str = "offset", negative_scales: bool = False,
                         only: Container[str] | None = None,
                         in_place: bool = False,
                         base_dir: Path | None = None,
                         int8_block: int | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """Return the rewritten model (opset 21) and the labels of the quantized projections.

    ``int8_labels``: projections given 8-bit blocks in a 4-bit variant (see
    :func:`eight_bit_labels`); an lm_head listed there is quantized too. ``fmt``: the INT4
    format (module docstring). ``negative_scales``: the symmetric format's ONNX Runtime
    rule (:func:`quantize_blocked_symmetric`), for graphs TensorRT never reads. ``only``: the
    labels to quantize (default: every projection). ``in_place``: ``model`` itself is rewritten
    (its float weights are dropped as replaced: no copy of them is ever made); otherwise it is
    left intact. ``base_dir``: ``model`` was loaded without its external data, which is read
    from there one weight at a time; the weights left in float are loaded at the end. A 1.5B
    model's 7 GB of fp32 weights are then never in memory (protobuf frees none of a loaded
    model's bytes until the whole model goes, pruned or not). ``int8_block``: 8-bit weights
    get blocks of :func:`fitted_block` ``(K, int8_block)`` instead of ``block``.
    """
    assert fmt in FORMATS, fmt
    model = upgrade_opset(model, in_place=in_place)
    idx = GraphIndex(model, base_dir)
    ins = NodeInserter(model)
    done: list[str] = []
    projs = find_projections(model)
    sums = BlockSums(model, idx, ins, block)
    for n, p in enumerate(projs):
        if is_lm_head(idx, p) and not (include_lm_head or p.label in int8_labels):
            continue
        if only is not None and p.label not in only:
            continue
        w = idx.array(p.weight)
        if bits == 4 and p.label not in int8_labels:
            if fmt == "offset":
                q, scale, offset = quantize_blocked_offset(w, block)
                out = weight_dq(model, ins, p.weight, q, scale, axis=0, block_size=block, bits=4)
                sums.add_offset(idx.nodes[p.node], p, offset, w.shape[0])
            elif fmt == "zero-point":
                q, scale, zp = quantize_blocked_asym(w, block)
                out = weight_dq(model, ins, p.weight, q, scale, axis=0, block_size=block, bits=4,
                                zero_point=zp)
            else:
                q, scale = quantize_blocked_symmetric(w, block, negative_scales)
                out = weight_dq(model, ins, p.weight, q, scale, axis=0, block_size=block, bits=4)
        else:
            b8 = block if int8_block is None else fitted_block(w.shape[0], int8_block)
            q, scale = quantize_blocked(w, 8, b8)
            out = weight_dq(model, ins, p.weight, q, scale, axis=0, block_size=b8, bits=8)
        idx.nodes[p.node].input[1] = out
        done.append(p.label)
        if (n + 1) % 50 == 0:
            print(f"[quantize] {n + 1}/{len(projs)} weights", file=sys.stderr, flush=True)
    ins.commit()
    prune_initializers(model)
    if base_dir is not None:
        load_external_data_for_model(model, str(base_dir))
    return model, done


def quantize_lm_head(model: onnx.ModelProto, block: int = 32, *,
                     in_place: bool = False) -> onnx.ModelProto:
    """``model`` (opset 21) with only the lm_head's weight in int8 blocks (weight-only)."""
    idx = GraphIndex(model)
    head = [p.label for p in find_projections(model) if is_lm_head(idx, p)]
    out, _ = quantize_weight_only(model, bits=8, block=block, include_lm_head=True, only=head,
                                  in_place=in_place)
    return out


class BlockSums:
    """The offset format's correction ``Y += (X @ P) @ O``: one block-sum ``X @ P`` per
    activation (q/k/v and gate/up share theirs), one small MatMul + Add per projection.

    ``P`` (K, K/B) is 0/1: MatMul keeps it rank-agnostic and TensorRT / ONNX Runtime run it as
    a GEMM of 1/B the projection's size. ``O`` is ``(K/B, N)`` float (1 bit per weight in fp32).
    """

    def __init__(self, model: onnx.ModelProto, idx: GraphIndex, ins: NodeInserter,
                 block: int) -> None:
        self.model, self.idx, self.ins, self.block = model, idx, ins, block
        self.sums: dict[str, str] = {}
        self.indicators: dict[int, str] = {}

    def _sum(self, x: str, k: int) -> str:
        if x in self.sums:
            return self.sums[x]
        if k not in self.indicators:
            nb = -(-k // self.block)
            p = np.zeros((k, nb), dtype=np.float32)
            p[np.arange(k), np.arange(k) // self.block] = 1.0  # a last partial block sums fewer
            name = fresh_name(self.model, f"block_sum.{k}x{nb}")
            set_initializer(self.model, name, p)
            self.indicators[k] = name
        out = fresh_name(self.model, x + ".block_sum")
        producer = self.idx.producer.get(x)
        self.ins.add(helper.make_node("MatMul", [x, self.indicators[k]], [out],
                                      name=out + "_node"), after=producer and producer.name)
        self.sums[x] = out
        return out

    def add_offset(self, node: onnx.NodeProto, p: Projection, offset: np.ndarray,
                   k: int) -> None:
        """Rewire ``node`` (the projection MatMul, weight ``(k, N)``) to add
        ``block_sum(X) @ offset``."""
        o = fresh_name(self.model, p.weight + ".offset")
        set_initializer(self.model, o, offset)
        raw = fresh_name(self.model, p.output + ".no_offset")
        corr = fresh_name(self.model, p.output + ".offset")
        node.output[0] = raw
        self.ins.add(helper.make_node("MatMul", [self._sum(p.input, k), o], [corr],
                                      name=corr + "_node"), after=node.name)
        self.ins.add(helper.make_node("Add", [raw, corr], [p.output], name=corr + "_add"),
                     after=node.name)


_EIGHT_BIT = re.compile(r"(?:^|\.)(?:v_proj|down_proj|lm_head)$")


def eight_bit_labels(labels: Iterable[str]) -> list[str]:
    """Projections a mixed 4-bit variant keeps at 8 bits: ``v_proj``, ``down_proj``, ``lm_head``.

    llama.cpp's Q4_K_M gives ``attn_v`` / ``ffn_down`` more bits for the same reason: they are
    the most sensitive to weight rounding. Measured on SmolLM2 (built-in held-out text,
    blocks of 32): all-4-bit +14.3 % perplexity, llama.cpp's every-third-layer rule +10.1 %,
    all v/down at 8 bits +7.2 % (the zero-point format; the default offset format needs no
    8-bit projection on this model: +0.2 %). ``lm_head`` at 8 bits changed perplexity by < 0.2 % while
    quartering its 113 MB read per token. Keyed on the exporter's readable weight names
    (a graph without them simply gets all-4-bit projections and a float lm_head).
    """
    return [label for label in labels if _EIGHT_BIT.search(label)]


# GGUF types of at most 4 bits whose blocks of 32 the offset format reproduces exactly: Q4_0
# (d*(q-8)), Q4_1 (d*q + m) and Q4_K (d*sc*q - dmin*m per sub-block of 32, the 6-bit sc/m
# folded into the block's float scale and offset).
EXACT_INT4_SOURCES = ("Q4_0", "Q4_1", "Q4_K")


def source_eight_bit_labels(labels: Iterable[str], tensor_types: Mapping[str, str]) -> list[str]:
    """Projections whose GGUF source held more than 4 bits per weight (Q5_0, Q6_K, Q8_0, F16,
    ...): the source's own bit allocation (llama.cpp's Q4_K_M gives v/down/output Q6_K), kept
    by giving them 8-bit blocks while 4-bit sources stay int4, exactly. ``tensor_types`` maps
    transformers weight names (``model.layers.0.mlp.down_proj.weight``) to GGUF types; a
    projection it does not name keeps 4 bits."""
    return [label for label in labels
            if tensor_types.get(label + ".weight", EXACT_INT4_SOURCES[0]) not in EXACT_INT4_SOURCES]


def packed_labels(labels: Iterable[str], chosen: Iterable[str]) -> list[str]:
    """``chosen`` mapped onto a graph with packed projections: ``X.qkv_proj`` is chosen when
    any of ``X.q_proj`` / ``X.k_proj`` / ``X.v_proj`` is (one weight, one bit width)."""
    chosen = set(chosen)
    out = []
    for label in labels:
        parts = [label.removesuffix("qkv_proj") + p for p in ("q_proj", "k_proj", "v_proj")] \
            if label.endswith(".qkv_proj") else [label]
        if any(p in chosen for p in parts):
            out.append(label)
    return out
