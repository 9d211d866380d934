"""The ONNX-Runtime graph without its attention bias: what batches with no left padding run.

The ``ort`` graph feeds every layer's GroupQueryAttention an ``attention_bias`` ``(B, 1, T, S)``
built from ``attention_mask`` (exporter/ort_ops.py). Only left padding needs it (a row whose
mask has a 0 before a 1): GroupQueryAttention masks causality itself, and a right-padded row
(``1…1 0…0``, a server slot) is cut at its own length, ``seqlens_k``. Batch-1 decoding, the
server's slots and speculative verification never left-pad, yet paid for the bias every layer
and for the ~20 small nodes that build it: on Qwen2.5-Coder-1.5B int4 (genai's form) a decode
step took 38.5 ms with the bias against 37.5 ms without (AMD EPYC, AVX2, 2 threads, medians of
interleaved runs; a 9-token verification 191.6 against 185.0 ms). SmolLM2 measured the same
either way.

So each ``ort`` graph gets a companion, ``<graph>.unpadded.onnx``: the same graph without the
bias, sharing the graph's external data file (its own file is 2 MB for the 1.5B: the nodes and
the RoPE tables). The manifest records it as the ``ort_graph``'s ``unpadded_file``; the runtime
runs it until a batch with left padding arrives, then loads the full graph in its place
(runtime/backends/ort.py). The exporter traces it (``LlamaDecoder(attention_bias=False)``)
and checks it against the PyTorch original on its own (exporter/verify.py); a quantized
variant's is derived here from its full graph (:func:`write_unpadded_graph`: the bias input
dropped, the nodes only it used pruned). Without the bias, GroupQueryAttention computes the
same scores (an unpadded row's bias is all zeros): the logits equal the full graph's (tested).
"""

from __future__ import annotations

from pathlib import Path

import onnx

MS_DOMAIN = "com.microsoft"
UNPADDED_SUFFIX = ".unpadded.onnx"
BIAS_INPUT = 10  # GroupQueryAttention's attention_bias (contrib op schema, ONNX Runtime >= 1.20)
# A graph holding its weights inline would be copied whole; such graphs keep only the full form.
MAX_INLINE_BYTES = 16 << 20


def unpadded_name(file: str) -> str:
    """``model.int8.ort.onnx`` -> ``model.int8.ort.unpadded.onnx``."""
    stem = file[:-len(".onnx")] if file.endswith(".onnx") else file
    return stem + UNPADDED_SUFFIX


def strip_attention_bias(model: onnx.ModelProto) -> int:
    """Drop every GroupQueryAttention's ``attention_bias`` in place and prune what only fed it
    (nodes, initializers, value_info); returns how many attention nodes changed."""
    g = model.graph
    changed = 0
    for node in g.node:
        if node.op_type == "GroupQueryAttention" and node.domain == MS_DOMAIN \
                and len(node.input) > BIAS_INPUT and node.input[BIAS_INPUT]:
            del node.input[BIAS_INPUT:]
            while node.input and not node.input[-1]:  # trailing absent optional inputs
                del node.input[-1]
            changed += 1
    if not changed:
        return 0
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input} | outputs
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    produced = {o for n in g.node for o in n.output}
    for vi in [vi for vi in g.value_info if vi.name not in produced]:
        g.value_info.remove(vi)
    return changed


def write_unpadded_graph(graph: Path) -> str | None:
    """Write ``graph``'s unpadded companion beside it (same external data file); returns its
    file name, or None when ``graph`` has no attention bias or holds its weights inline."""
    model = onnx.load(str(graph), load_external_data=False)
    if sum(len(t.raw_data) for t in model.graph.initializer) > MAX_INLINE_BYTES:
        return None
    if not strip_attention_bias(model):
        return None
    name = unpadded_name(graph.name)
    onnx.save_model(model, str(graph.with_name(name)))
    return name
