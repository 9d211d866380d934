"""TensorRT backend: one engine from ``BUNDLE/engines/``, KV cache kept on the device.

    manifest.engines ──select_engine (GPU, TensorRT version)──► plan ──deserialize──► context
    step:  ids/pos/mask ─H2D─►  [profile 0 prefill | 1 decode]  ─► present.* (device)
                                      ▲ past.* = last step's present.* (same pointers, no copy)
           logits[:, -1, :] ─D2H (one strided copy)─► host float32 [batch, vocab]

The cache is two device buffers per K/V tensor, sized for ``batch x capacity``. Each step reads
past from one and writes present into the other, then they swap: ``present`` of step t *is*
``past`` of step t+1 (both dense ``[batch, kv_heads, length, head_dim]``), so nothing crosses
PCIe but token ids in and last-position logits out. Reading and writing the same buffer would
race inside the engine's concatenation, hence two. A rollback (speculative decoding) copies the
kept prefix into the other buffer with the shorter pitch (one 2-D device copy per tensor).

GPU code stays thin; the layout arithmetic is in :class:`IoPlan` (pure, tested on CPU).
tensorrt and cuda-python (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6) are
imported when a backend is created, never at module import: ``llama-export --help`` and the
ORT backend do not need them.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llama_export.runtime.backends.base import Backend, KVCache, logits_positions
from llama_export.runtime.engines import GpuInfo, Limits, engine_view, select_engine, select_profile
from llama_export.runtime.errors import BundleError, HardwareError, InputError, MissingDependencyError
from llama_export.runtime.manifest import Manifest, sha256_file

NP_DTYPES: dict[str, type[np.generic]] = {"float32": np.float32, "float16": np.float16,
                                          "int64": np.int64}
ALIGN = 256  # cudaMalloc's own alignment; sub-buffers of one allocation keep it


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class IoPlan:
    """Names, dtypes and byte layout of the engine's IO (pure: no GPU needed)."""

    past: tuple[str, ...]
    present: tuple[str, ...]
    kv_heads: int
    head_dim: int
    kv_itemsize: int
    vocab: int
    logits_dtype: str
    logits_mode: str  # the manifest's all | last | tail:N
    limits: Limits

    @classmethod
    def from_manifest(cls, manifest: Manifest, variant: str, limits: Limits) -> IoPlan:
        spec = manifest.variant(variant)
        logits = next(o for o in spec["outputs"] if o["name"] == "logits")
        return cls(
            past=tuple(s.name for s in manifest.inputs(variant) if s.name.startswith("past_")),
            present=tuple(s.name for s in manifest.outputs(variant)
                          if s.name.startswith("present.")),
            kv_heads=manifest.num_kv_heads, head_dim=manifest.head_dim,
            kv_itemsize=np.dtype(NP_DTYPES[manifest.kv_dtype(variant)]).itemsize,
            vocab=manifest.vocab_size, logits_dtype=str(logits["dtype"]),
            logits_mode=str(spec.get("logits", "all")), limits=limits)

    def kv_tensor_bytes(self, batch: int, capacity: int) -> int:
        return _align(batch * self.kv_heads * capacity * self.head_dim * self.kv_itemsize)

    def static_layout(self) -> dict[str, tuple[int, int]]:
        """``name -> (offset, bytes)`` of the step buffers in one device allocation."""
        lim = self.limits
        itemsize = np.dtype(NP_DTYPES[self.logits_dtype]).itemsize
        positions = logits_positions(self.logits_mode, lim.max_prompt)
        sizes = {"input_ids": lim.max_batch * lim.max_prompt * 8,
                 "position_ids": lim.max_batch * lim.max_prompt * 8,
                 "attention_mask": lim.max_batch * lim.max_context * 8,
                 "logits": lim.max_batch * positions * self.vocab * itemsize}
        layout, offset = {}, 0
        for name, size in sizes.items():
            layout[name] = (offset, size)
            offset += _align(size)
        return layout

    def tail_logits_copy(self, batch: int, seq: int, tail: int) -> tuple[int, int, int, int]:
        """``(src_offset, src_pitch, row_bytes, rows)`` of a 2-D copy of ``logits[:, -tail:, :]``
        (one row per sequence, each ``tail`` positions long)."""
        pos = self.vocab * np.dtype(NP_DTYPES[self.logits_dtype]).itemsize
        returned = logits_positions(self.logits_mode, seq)  # positions per sequence in the output
        return (returned - tail) * pos, returned * pos, tail * pos, batch


    def truncate_copy(self, batch: int, length: int, keep: int) -> tuple[int, int, int, int]:
        """``(src_pitch, dst_pitch, row_bytes, rows)`` of the 2-D copy that re-lays one dense
        ``[batch, kv_heads, length, head_dim]`` tensor as ``[batch, kv_heads, keep, head_dim]``
        (its first ``keep`` positions): one row per (sequence, kv head)."""
        pos = self.head_dim * self.kv_itemsize
        return length * pos, keep * pos, keep * pos, batch * self.kv_heads


@dataclass(frozen=True)
class TrtOptions:
    device: int = 0
    verify_plan: bool = True  # sha256 of the .plan against the manifest before loading


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise MissingDependencyError("the TensorRT backend (module 'tensorrt' not found)",
                                     "gpu") from None
    return tensorrt


def import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise MissingDependencyError("the TensorRT backend (module 'cuda' of cuda-python "
                                         "not found)", "gpu") from None
    return cudart


def cuda_call(cudart: Any, result: Any) -> Any:
    """Unwrap cuda-python's ``(error, value...)`` tuples; raise on error."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise HardwareError(f"CUDA call failed ({err}): check the GPU and driver with nvidia-smi")
    return rest[0] if len(rest) == 1 else tuple(rest)


def cuda_gpu(device: int = 0) -> GpuInfo | None:
    """The GPU as CUDA sees it, or None (no cuda-python, no driver, or no such device)."""
    try:
        cudart = import_cudart()
    except MissingDependencyError:
        return None
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count <= device:
        return None
    err, prop = cudart.cudaGetDeviceProperties(device)
    if err != cudart.cudaError_t.cudaSuccess:
        return None
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return GpuInfo(name.split("\x00")[0].strip(), (int(prop.major), int(prop.minor)),
                   int(prop.totalGlobalMem))


class DeviceMemory:
    """One cudaMalloc block, freed on :meth:`free` or when garbage-collected."""

    def __init__(self, cudart: Any, nbytes: int) -> None:
        self.nbytes = max(nbytes, ALIGN)
        self.ptr = int(cuda_call(cudart, cudart.cudaMalloc(self.nbytes)))
        self._finalizer = weakref.finalize(self, cudart.cudaFree, self.ptr)

    def free(self) -> None:
        self._finalizer()


class TrtKVCache(KVCache):
    """Two device buffers per past/present tensor; ``flip`` says which one holds the past."""

    def __init__(self, batch_size: int, capacity: int, memory: DeviceMemory, count: int,
                 tensor_bytes: int) -> None:
        super().__init__(batch_size, capacity)
        self.memory = memory
        base = memory.ptr
        self.buffers = ([base + i * tensor_bytes for i in range(count)],
                        [base + (count + i) * tensor_bytes for i in range(count)])
        self.flip = 0

    def reset(self) -> None:
        super().reset()
        self.flip = 0

    def halves(self) -> tuple[list[int], list[int]]:
        """(past pointers, present pointers) for the next step."""
        return self.buffers[self.flip], self.buffers[1 - self.flip]


class TrtBackend(Backend):
    def __init__(self, bundle: str | os.PathLike[str], manifest: Manifest, variant: str,
                 options: TrtOptions | None = None) -> None:
        opts = options or TrtOptions()
        trt, cudart = import_tensorrt(), import_cudart()
        gpu = cuda_gpu(opts.device)
        if gpu is None:
            raise HardwareError(f"no NVIDIA GPU {opts.device} visible to CUDA: run on the machine "
                                "the engine was built for, or use --backend ort")
        entry = select_engine(manifest.engines, variant, gpu, trt.__version__, str(bundle))
        plan = _checked_plan(Path(bundle), manifest, entry, opts.verify_plan)
        limits = Limits(**{k: int(v) for k, v in entry["limits"].items()})
        self.manifest, self.variant, self.engine_entry = engine_view(manifest, limits), variant, entry
        self.io = IoPlan.from_manifest(manifest, variant, limits)
        self.logits_mode = self.io.logits_mode
        self._cudart = cudart
        cuda_call(cudart, cudart.cudaSetDevice(opts.device))
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if entry.get("version_compatible"):
            self._runtime.engine_host_code_allowed = True  # VC plans embed their lean runtime
        self._engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if self._engine is None:
            raise HardwareError(f"TensorRT {trt.__version__} could not load {plan.name}: rebuild "
                                f"it here with `llama-export trt {bundle} --{variant}`")
        self._context = self._engine.create_execution_context()
        self._stream = cuda_call(cudart, cudart.cudaStreamCreate())
        self._layout = self.io.static_layout()
        self._static = DeviceMemory(cudart, sum(_align(n) for _, n in self._layout.values()))
        self._profile = -1

    def close(self) -> None:
        for name in ("_context", "_engine", "_runtime"):  # TensorRT objects, in this order
            self.__dict__.pop(name, None)
        if "_static" in self.__dict__:
            self.__dict__.pop("_static").free()
        if "_stream" in self.__dict__:
            self._cudart.cudaStreamDestroy(self.__dict__.pop("_stream"))

    def _new_cache_impl(self, batch_size: int, capacity: int) -> TrtKVCache:
        count = len(self.io.past)
        tensor = self.io.kv_tensor_bytes(batch_size, capacity)
        return TrtKVCache(batch_size, capacity, DeviceMemory(self._cudart, 2 * count * tensor),
                          count, tensor)

    def _forward_impl(self, input_ids: np.ndarray, position_ids: np.ndarray,
                      attention_mask: np.ndarray, cache: KVCache, tail: int) -> np.ndarray:
        if not isinstance(cache, TrtKVCache):
            raise InputError("this cache was made by another backend: use backend.new_cache()")
        batch, seq = input_ids.shape
        profile = select_profile(self.io.limits, batch, seq, cache.length)
        ctx, stream = self._context, self._stream
        if profile != self._profile:
            ctx.set_optimization_profile_async(profile, int(stream))
            self._profile = profile
        for name, arr in (("input_ids", input_ids), ("position_ids", position_ids),
                          ("attention_mask", attention_mask)):
            self._bind_host_input(name, arr)
        past, present = cache.halves()
        kv_shape = (batch, self.io.kv_heads, cache.length, self.io.head_dim)
        for name, ptr in zip(self.io.past, past, strict=True):
            self._set_shape(name, kv_shape)
            ctx.set_tensor_address(name, ptr)
        for name, ptr in zip(self.io.present, present, strict=True):
            ctx.set_tensor_address(name, ptr)
        ctx.set_tensor_address("logits", self._static.ptr + self._layout["logits"][0])
        if not ctx.execute_async_v3(int(stream)):
            raise HardwareError("TensorRT failed to run the engine (see its log above): check "
                                "GPU memory with nvidia-smi, or rebuild the engine")
        logits = self._tail_logits(batch, seq, tail)
        cache.flip ^= 1
        return logits

    def _truncate_impl(self, cache: KVCache, length: int) -> None:
        if not isinstance(cache, TrtKVCache):
            raise InputError("this cache was made by another backend: use backend.new_cache()")
        # The cache is dense for its current length, so keeping a prefix changes every row's
        # pitch: copy into the other ping-pong buffer with the new pitch, then make it the past.
        src_pitch, dst_pitch, row, rows = self.io.truncate_copy(cache.batch_size, cache.length,
                                                                length)
        cudart = self._cudart
        past, other = cache.halves()
        if row:
            for src, dst in zip(past, other, strict=True):
                cuda_call(cudart, cudart.cudaMemcpy2DAsync(
                    dst, dst_pitch, src, src_pitch, row, rows,
                    cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self._stream))
        cache.flip ^= 1

    def _bind_host_input(self, name: str, arr: np.ndarray) -> None:
        cudart = self._cudart
        ptr = self._static.ptr + self._layout[name][0]
        cuda_call(cudart, cudart.cudaMemcpyAsync(
            ptr, arr.ctypes.data, arr.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
            self._stream))
        self._set_shape(name, arr.shape)
        self._context.set_tensor_address(name, ptr)

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        # select_profile already checked the limits; a refusal here means engine and manifest
        # entry disagree (a plan replaced by hand).
        if not self._context.set_input_shape(name, shape):
            raise BundleError(f"the engine refuses shape {shape} for {name}, which its manifest "
                              "entry allows: rebuild the engine with `llama-export trt`")

    def _tail_logits(self, batch: int, seq: int, tail: int) -> np.ndarray:
        cudart = self._cudart
        offset, pitch, row, rows = self.io.tail_logits_copy(batch, seq, tail)
        host = np.empty((batch, tail, self.io.vocab), dtype=NP_DTYPES[self.io.logits_dtype])
        src = self._static.ptr + self._layout["logits"][0] + offset
        cuda_call(cudart, cudart.cudaMemcpy2DAsync(
            host.ctypes.data, row, src, pitch, row, rows,
            cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream))
        cuda_call(cudart, cudart.cudaStreamSynchronize(self._stream))
        return np.ascontiguousarray(host, dtype=np.float32)


def _checked_plan(bundle: Path, manifest: Manifest, entry: dict[str, Any], verify: bool) -> Path:
    plan = bundle / str(entry["path"])
    if not plan.is_file():
        raise BundleError(f"{plan} is listed in the manifest but missing: copy it again or "
                          f"rebuild it with `llama-export trt {bundle} --{entry['variant']}`")
    source = manifest.variant(entry["variant"]).get("file")
    if source and manifest.data["files"].get(source) not in (None, entry.get("source_sha256")):
        raise BundleError(f"{plan.name} was built from an older {source}: rebuild it with "
                          f"`llama-export trt {bundle} --{entry['variant']}`")
    if verify and sha256_file(plan) != entry.get("sha256"):
        raise BundleError(f"{plan} does not match its sha256 in the manifest (altered or "
                          "truncated copy): copy it again or rebuild it with `llama-export trt`")
    return plan
