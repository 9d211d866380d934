"""Device-memory estimate for an engine at its max batch / context (pure apart from reading
the ONNX header).

    weights      bytes of every initializer and Constant tensor (external data counted from its
                 recorded length; INT4 packs two values per byte)
    KV cache     2 (K, V) x layers x B x kv_heads x C x head_dim x dtype size, twice: TrtBackend
                 ping-pongs between two buffers so this step's present never overwrites the past
                 it is reading
    logits       B x (P; 1 for logits="last"; min(P, N) for "tail:N") x vocab x dtype size
    IO           input_ids/position_ids (B x P) and attention_mask (B x C), int64

TensorRT's own activation workspace is not counted (known only after the build); the printed
figure is a floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from llama_export.runtime.backends.base import logits_positions
from llama_export.runtime.manifest import Manifest

from .profiles import Limits

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int8": 1}
_SUB_BYTE_BITS: dict[int, int] = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    logits: int
    io: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.logits + self.io

    def lines(self) -> list[str]:
        return [f"    weights   {mib(self.weights)}",
                f"    KV cache  {mib(self.kv_cache)} (2 buffers: present -> past by pointer)",
                f"    logits    {mib(self.logits)}",
                f"    IO        {mib(self.io)}",
                f"    total     {mib(self.total)} (+ TensorRT workspace, known after the build)"]


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Stored size of an initializer without loading external data."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        if "length" in info:
            return int(info["length"])
    count = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
    if t.data_type in _SUB_BYTE_BITS:
        return (count * _SUB_BYTE_BITS[t.data_type] + 7) // 8
    return count * int(np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize)


def weight_bytes(model: onnx.ModelProto) -> int:
    """Initializers and Constant tensors of a model loaded with ``load_external_data=False``."""
    total = sum(tensor_bytes(t) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            total += sum(tensor_bytes(a.t) for a in node.attribute if a.type == a.TENSOR)
    return total


def kv_cache_bytes(manifest: Manifest, variant: str, limits: Limits, buffers: int = 2) -> int:
    per_pos = manifest.num_kv_heads * manifest.head_dim * DTYPE_BYTES[manifest.kv_dtype(variant)]
    return 2 * manifest.num_layers * limits.max_batch * limits.max_context * per_pos * buffers


def logits_bytes(manifest: Manifest, variant: str, limits: Limits) -> int:
    spec = manifest.variant(variant)
    dtype = next(o["dtype"] for o in spec["outputs"] if o["name"] == "logits")
    positions = logits_positions(str(spec.get("logits", "all")), limits.max_prompt)
    return limits.max_batch * positions * manifest.vocab_size * DTYPE_BYTES[dtype]


def estimate_memory(manifest: Manifest, variant: str, limits: Limits, weights: int) -> MemoryEstimate:
    io = limits.max_batch * (2 * limits.max_prompt + limits.max_context) * 8
    return MemoryEstimate(weights, kv_cache_bytes(manifest, variant, limits),
                          logits_bytes(manifest, variant, limits), io)
