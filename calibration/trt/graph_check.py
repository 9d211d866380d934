"""Check that a variant's graph uses only ops TensorRT 10's ONNX parser builds natively.

JetPack 6 ships TensorRT 10.x, so its parser is the floor. ONNX Runtime contrib ops
(``com.microsoft``: ``MatMulNBits``, ``GroupQueryAttention``, ``SkipSimplifiedLayerNormalization``)
and the opset-23 fused ``Attention`` / ``RotaryEmbedding`` / ``RMSNormalization`` ops are refused:
the former do not exist in TensorRT, the latter are not in every 10.x parser, and a fused
Attention would hide the KV concatenation our cache plumbing relies on.
"""

from __future__ import annotations

from collections import Counter

import onnx

from llama_export.runtime.errors import BundleError

# Operators of onnx-tensorrt's operators.md (TensorRT 10.x) that a decoder plausibly uses,
# plus explicit quantization (Q/DQ, blocked DQ for INT4) and shape plumbing. Deliberately a
# subset: an op missing here fails loudly on CPU before anyone waits for a GPU build.
TRT10_OPS = frozenset({
    "Abs", "Add", "And", "ArgMax", "Cast", "CastLike", "Ceil", "Clip", "Concat", "Constant",
    "ConstantOfShape", "Cos", "CumSum", "Div", "DequantizeLinear", "Einsum", "Equal", "Erf", "Exp",
    "Expand", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm",
    "Greater", "GreaterOrEqual", "Identity", "If", "LayerNormalization", "Less", "LessOrEqual",
    "Log", "LogSoftmax", "MatMul", "Max", "Mean", "Min", "Mod", "Mul", "Neg", "Not", "Or", "Pad",
    "Pow", "QuantizeLinear", "Range", "Reciprocal", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "ScatterElements",
    "ScatterND", "Shape", "Sigmoid", "Sign", "Sin", "Size", "Slice", "Softmax", "Softplus",
    "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tanh", "Tile", "TopK", "Transpose", "Trilu",
    "Unsqueeze", "Where", "Xor",
})
STANDARD_DOMAINS = ("", "ai.onnx")


def op_types(model: onnx.ModelProto) -> Counter[tuple[str, str]]:
    """``(domain, op_type)`` counts over the graph and every subgraph (If/Loop bodies)."""
    counts: Counter[tuple[str, str]] = Counter()
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        for node in graph.node:
            counts[(node.domain or "", node.op_type)] += 1
            stack.extend(a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
            stack.extend(a.graphs for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS)
    return counts


def unsupported_ops(counts: Counter[tuple[str, str]]) -> list[str]:
    bad = []
    for (domain, op), n in sorted(counts.items()):
        if domain not in STANDARD_DOMAINS:
            bad.append(f"{domain}.{op} x{n}")
        elif op not in TRT10_OPS:
            bad.append(f"{op} x{n}")
    return bad


def check_graph_for_tensorrt(model: onnx.ModelProto, name: str,
                             input_names: list[str]) -> Counter[tuple[str, str]]:
    """The graph's op counts, or a one-line error naming every op TensorRT 10 cannot parse
    (or every input the manifest and the graph disagree on)."""
    graph_inputs = [i.name for i in model.graph.input]
    if sorted(graph_inputs) != sorted(input_names):
        diff = sorted(set(graph_inputs) ^ set(input_names))
        raise BundleError(f"{name} inputs and the manifest disagree ({', '.join(diff)}): the "
                          "bundle is inconsistent, re-export it")
    counts = op_types(model)
    shifted = nonzero_zero_points(model)
    if shifted:
        raise BundleError(
            f"{name} has {len(shifted)} DequantizeLinear nodes with non-zero zero-points "
            f"({shifted[0]}, ...), which TensorRT rejects: re-run `llama-export quantize --int4`"
            " with the default --format offset")
    bad = unsupported_ops(counts)
    if bad:
        raise BundleError(
            f"{name} uses ops TensorRT 10's ONNX parser does not build ({', '.join(bad)}): "
            "use a standard-op variant (llama-export's fp32/fp16 export, `llama-export calibrate`,"
            " `llama-export quantize`), not an ONNX-Runtime-optimized graph")
    return counts


def nonzero_zero_points(model: onnx.ModelProto) -> list[str]:
    """Q/DQ nodes whose constant zero-point is not all zeros (TensorRT requires zero)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    return [n.name or n.output[0] for n in model.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2
            and n.input[2] in inits and numpy_helper.to_array(inits[n.input[2]]).any()]


def dq_weight_types(model: onnx.ModelProto) -> Counter[str]:
    """Element types of the constant weights feeding DequantizeLinear (``INT4``, ``INT8``...)."""
    inits = {t.name: t.data_type for t in model.graph.initializer}
    return Counter(onnx.TensorProto.DataType.Name(inits[n.input[0]]) for n in model.graph.node
                   if n.op_type == "DequantizeLinear" and n.input[0] in inits)


def qdq_summary(model: onnx.ModelProto, counts: Counter[tuple[str, str]]) -> str:
    """``"0 QuantizeLinear, 14 DequantizeLinear (weights INT4 x14)"``: what Q/DQ carries."""
    q, dq = counts[("", "QuantizeLinear")], counts[("", "DequantizeLinear")]
    if not q and not dq:
        return "no Q/DQ"
    kinds = dq_weight_types(model)
    weights = ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())) or "none constant"
    return f"{q} QuantizeLinear, {dq} DequantizeLinear (weights {weights})"
