"""fp32 ONNX graph → fp16 graph without torch (``quantize --fp16``, ``trt --fp16``).

The exporter's fp16 graph (``onnx --dtype fp16``) needs torch; a Jetson has none. This rewrite
reproduces its placement on the fp32 graph: everything runs in fp16 except

* RMSNorm: the sum of squares overflows fp16 (a known TensorRT failure). Forward from each
  ``Pow``/``ReduceMean`` up to the next MatMul, in fp32.
* softmax with its scale and additive mask: backward from each ``Softmax`` down to the
  ``MatMul`` that makes the scores (the mask's large negative constant stays fp32).
* the RoPE angles: backward from each ``Cos``/``Sin`` (position x frequency needs fp32
  precision past a few hundred positions); the tables are cast to fp16 after.

Contrib ops (``GroupQueryAttention``, ``SkipSimplifiedLayerNormalization``) take fp16 and
accumulate in fp32 themselves, as in the exporter's fp16 ONNX-Runtime graph. Float graph IO (KV
cache, logits) becomes fp16, the fp16 variant's contract. Constants are clamped to fp16's range
(a mask of ``finfo(fp32).min`` becomes ``finfo(fp16).min``, what the exporter writes)::

    x16 ─Cast─► Pow ─► ReduceMean ─► Add(eps) ─► Sqrt ─► Div ─► Mul(x32) ─► Mul(w32) ─Cast─► MatMul16
    MatMul16 ─Cast─► Mul(scale) ─► Add(mask32) ─► Softmax ─Cast─► MatMul16
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llama_export.runtime.errors import CalibrationError
from llama_export.runtime.tokenizer import Tokenizer

from .accuracy import Gate, GenreAccuracy
from .bundle_io import (
    base_entry,
    load_fp32,
    load_ort_graph,
    model_opset,
    ort_graph_entry,
    write_variant,
)
from .graph import fresh_name
from .pipeline import EvalOptions, Evaluator, eval_segments, log

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
BACKWARD_SEEDS = frozenset({"Softmax", "Cos", "Sin"})
FORWARD_SEEDS = frozenset({"Pow", "ReduceMean"})
STOPS = frozenset({"MatMul", "Gemm", "Gather", "GroupQueryAttention",
                   "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"})
NON_FLOAT_OUT = frozenset({"Shape", "Size", "Equal", "Less", "Greater", "LessOrEqual",
                           "GreaterOrEqual", "Not", "And", "Or", "ArgMax", "NonZero"})
FP16_MAX = float(np.finfo(np.float16).max)
FP16_GATE = Gate(max_ppl_increase=0.01, min_top1=0.97)


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the fp32 tensors (inputs, initializers, node outputs), by dtype propagation."""
    g = model.graph
    floats = {v.name for v in g.input if v.type.tensor_type.elem_type == FLOAT}
    floats |= {t.name for t in g.initializer if t.data_type == FLOAT}
    for n in g.node:
        if n.op_type in NON_FLOAT_OUT:
            continue
        if n.op_type == "Cast":
            is_float = any(a.name == "to" and a.i == FLOAT for a in n.attribute)
        elif n.op_type in ("Constant", "ConstantOfShape"):
            vals = [helper.get_attribute_value(a) for a in n.attribute if a.name == "value"]
            is_float = vals[0].data_type == FLOAT if vals else n.op_type == "ConstantOfShape"
        elif n.op_type == "Where":
            is_float = len(n.input) > 1 and n.input[1] in floats
        else:
            is_float = bool(n.input) and n.input[0] in floats
        if is_float:
            floats.update(o for o in n.output if o)
    return floats


def fp32_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes that stay fp32 (see the module docstring)."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    floats = _float_tensors(model)
    keep: set[str] = set()
    todo = [n for n in g.node if n.op_type in BACKWARD_SEEDS]
    while todo:  # backward: producers of float inputs, down to a MatMul or a graph input
        n = todo.pop()
        if n.name in keep:
            continue
        keep.add(n.name)
        todo += [p for i in n.input if i in floats and (p := producer.get(i)) is not None
                 and p.op_type not in STOPS]
    todo = [n for n in g.node if n.op_type in FORWARD_SEEDS]
    seen: set[str] = set()
    while todo:  # forward: consumers of float outputs, up to the next MatMul
        n = todo.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        keep.add(n.name)
        todo += [c for o in n.output if o in floats for c in consumers.get(o, [])
                 if c.op_type not in STOPS]
    # Constants only fp32 nodes read (eps, the mask's fill) stay fp32, and so do Identity views
    # of a weight: the exporter shares equal weights that way (a model whose norm weights are
    # all ones keeps one initializer), and a shared norm weight must stay fp32 too.
    inits = {t.name for t in g.initializer}
    for n in reversed(g.node):
        const = not n.input or (n.op_type == "Identity" and n.input[0] in inits)
        if const and all(c.name in keep for o in n.output for c in consumers.get(o, [])):
            keep.add(n.name)
    return keep


def _half(t: TensorProto) -> TensorProto:
    arr = np.clip(numpy_helper.to_array(t), -FP16_MAX, FP16_MAX).astype(np.float16)
    return numpy_helper.from_array(arr, t.name)


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fp16 graph of fp32 ``model`` (a new proto; ``model`` is not changed)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    floats = _float_tensors(out)
    keep = fp32_nodes(out)
    dtype = _retype_initializers_and_io(out, floats, keep)  # float tensor -> its new dtype
    casts: dict[tuple[str, int], str] = {}
    nodes: list[onnx.NodeProto] = []
    for n in g.node:
        want = FLOAT if n.name in keep else HALF
        for k, i in enumerate(n.input):
            if i in dtype and dtype[i] != want:
                n.input[k] = _cast(out, nodes, casts, i, want)
        if want == HALF:
            _retype_attributes(n)
        nodes.append(n)
        dtype.update({o: want for o in n.output if o in floats})
    for v in g.output:  # graph outputs made by fp32 nodes: cast at the end
        if dtype.get(v.name) == FLOAT:
            src = fresh_name(out, v.name + ".fp32")
            for n in nodes:
                n.output[:] = [src if o == v.name else o for o in n.output]
                n.input[:] = [src if i == v.name else i for i in n.input]
            nodes.append(helper.make_node("Cast", [src], [v.name], to=HALF,
                                          name=v.name + ".to_fp16"))
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]  # ONNX Runtime infers the new types
    return out


def _retype_initializers_and_io(model: onnx.ModelProto, floats: set[str],
                                keep: set[str]) -> dict[str, int]:
    """Float initializers read only by fp32 nodes stay fp32, the others become fp16; float
    graph inputs and outputs become fp16. Returns ``{tensor: new dtype}`` for them."""
    g = model.graph
    fp32_only: dict[str, bool] = {}
    for n in g.node:
        for i in n.input:
            fp32_only[i] = fp32_only.get(i, True) and n.name in keep
    dtype: dict[str, int] = {}
    for t in g.initializer:
        if t.name in floats:
            if not fp32_only.get(t.name, False):
                t.CopyFrom(_half(t))
            dtype[t.name] = t.data_type
    for v in [*g.input, *g.output]:
        if v.type.tensor_type.elem_type == FLOAT:
            v.type.tensor_type.elem_type = HALF
            dtype.setdefault(v.name, HALF)
    return dtype


def _cast(model: onnx.ModelProto, nodes: list[onnx.NodeProto],
          casts: dict[tuple[str, int], str], name: str, to: int) -> str:
    if (name, to) not in casts:
        cast = fresh_name(model, f"{name}.to_{'fp32' if to == FLOAT else 'fp16'}")
        nodes.append(helper.make_node("Cast", [name], [cast], to=to, name=cast + "_node"))
        casts[(name, to)] = cast
    return casts[(name, to)]


def _retype_attributes(n: onnx.NodeProto) -> None:
    """Float constants and casts to float inside an fp16 node become fp16."""
    if n.op_type == "ConstantOfShape" and not n.attribute:  # the default value is fp32 0
        n.attribute.append(helper.make_attribute("value", numpy_helper.from_array(
            np.zeros(1, np.float16))))
    for a in n.attribute:
        if n.op_type == "Cast" and a.name == "to" and a.i == FLOAT:
            a.i = HALF
        elif a.name == "value" and a.type == onnx.AttributeProto.TENSOR and \
                a.t.data_type == FLOAT:
            a.t.CopyFrom(_half(a.t))


def half_io(specs: Iterable[dict[str, object]]) -> list[dict[str, object]]:
    """Manifest IO entries of the fp16 variant: float32 entries become float16."""
    return [{**s, "dtype": "float16"} if s.get("dtype") == "float32" else dict(s) for s in specs]


def make_fp16(bundle: Path, ev_opts: EvalOptions | None = None) -> dict[str, Any]:
    """Write the ``fp16`` variant converted from the fp32 graphs; returns its manifest entry.

    Gated like every variant: perplexity and top-1 agreement against fp32 on held-out text
    (default gate: +1 % perplexity, 97 % top-1), nothing written when a graph fails.
    """
    opts = ev_opts or EvalOptions(gate=FP16_GATE)
    manifest, fp32 = load_fp32(bundle)
    held, held_src = eval_segments(Tokenizer.from_bundle(bundle, manifest.tokenizer), opts, None)
    ev = Evaluator(manifest, held).start(fp32)
    model = convert_to_fp16(fp32)
    acc = ev.score(model)
    log(f"fp16: {acc.line()}")
    _refuse_if_failing("fp16", acc, opts.gate)
    entry = base_entry(manifest, "model.fp16.onnx", None, "fp16", "fp16-from-fp32-onnx",
                       model_opset(model))
    entry["inputs"], entry["outputs"] = half_io(entry["inputs"]), half_io(entry["outputs"])
    entry["conversion"] = {"from": "the fp32 ONNX graphs (no torch)",
                           "fp32": ["rmsnorm", "softmax with scale and mask", "rope angles"]}
    entry["accuracy"] = {**acc.to_dict(), "data": held_src.origin, "data_sha256": held_src.sha256,
                         "gate": {"max_ppl_increase": opts.gate.max_ppl_increase,
                                  "min_top1": opts.gate.min_top1}}
    ort_model = None
    fp32_ort = load_ort_graph(bundle, manifest, merge_head=False)  # its slices cast one by one
    if fp32_ort is not None:
        ort_model = convert_to_fp16(fp32_ort)
        ort_acc = ev.score(ort_model)
        log(f"fp16 (ort graph): {ort_acc.line()}")
        _refuse_if_failing("fp16 (ort graph)", ort_acc, opts.gate)
        entry["ort_graph"] = {**ort_graph_entry(manifest, "model.fp16.ort.onnx"),
                              "accuracy": {**ort_acc.to_dict(), "data": held_src.origin}}
    write_variant(bundle, manifest, "fp16", model, entry, ort_model=ort_model)
    return entry


def _refuse_if_failing(name: str, acc: GenreAccuracy, gate: Gate) -> None:
    failures = gate.failures(acc)
    if failures:
        raise CalibrationError(
            f"{name} variant fails the accuracy gate ({'; '.join(failures)}); nothing was "
            "written. Export fp16 from the model with torch (`llama-export onnx --dtype fp16`), "
            "or loosen --max-ppl-increase / --min-top1")
