"""A quantized variant's ONNX-Runtime graph keeps its token embedding in fp16.

The embedding table is read one row per token (a Gather), yet in fp32 it is the largest tensor
a quantized variant holds: Qwen2.5-Coder-1.5B's 151,936 x 1,536 table is 934 MB of the int4
graph's 1.45 GB resident, more than all its 4-bit projections together. Stored in fp16 and
cast back after the Gather, it takes half (fp16 keeps 11 significant bits: the rounding is
~1e-3 of each value, far below the int8/int4 projections' own error, and every variant is
gated on held-out text after it). The halving pays for keeping large packed weights in one
piece (calibration/nbits.py: the lm_head split in slices to bound the load peak cost the 1.5B
int4 decode step 3 %).

The standard graphs (TensorRT builds them) keep the fp32 table; an fp16 variant's is fp16
already.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import fresh_name, read_external


def half_embedding(model: onnx.ModelProto, base_dir: Path) -> int:
    """Store each fp32 table read only by one ``Gather`` in fp16 (+ a Cast back to fp32 after
    the Gather), in place; ``base_dir`` resolves external data. Returns how many tables."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    changed = 0
    for idx in reversed(range(len(g.node))):
        node = g.node[idx]
        t = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        if t is None or t.data_type != TensorProto.FLOAT or len(t.dims) != 2 \
                or readers[t.name] != 1:
            continue
        table = (read_external(t, base_dir) if t.data_location == TensorProto.EXTERNAL
                 else numpy_helper.to_array(t))
        half = numpy_helper.from_array(table.astype(np.float16), fresh_name(model, t.name + ".fp16"))
        del table
        g.initializer.remove(t)
        g.initializer.append(half)
        rows = fresh_name(model, node.output[0] + ".fp16")
        cast = helper.make_node("Cast", [rows], [node.output[0]], name=node.name + "_to_fp32",
                                to=TensorProto.FLOAT)
        node.input[0], node.output[0] = half.name, rows
        g.node.insert(idx + 1, cast)
        changed += 1
    return changed
