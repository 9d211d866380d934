"""ONNX Runtime backend (Polygraphy's ONNX Runtime runner, plus a KV cache kept in OrtValues).

The KV cache never goes through numpy. With the variant's ONNX-Runtime graph (``ort_graph``,
``kv_buffer: shared``; the default on CPU) each layer's past and present are *one* buffer of the
cache's capacity, bound once per cache: GroupQueryAttention writes the new K/V in place, so a
step copies no cache at all. With the standard graph each step binds the previous step's
``present.*`` OrtValues as this step's ``past_key_values.*`` inputs and lets ONNX Runtime
allocate the new ``present.*`` (past + new) on the provider's device. Only the last-position
logits come back to the host.

The ONNX-Runtime graph's attention bias only matters for left padding (a mask row with a 0
before a 1). A bundle whose ``ort_graph`` has an ``unpadded_file`` (calibration/unpadded.py:
the same graph without the bias, sharing its weights file) runs that one until a left-padded
batch arrives, then loads the full graph in its place and keeps it: one session at a time.
Batch-1 decoding, speculative verification and the server's right-padded slots never switch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llama_export.runtime.backends.base import Backend, KVCache
from llama_export.runtime.errors import (
    BundleError,
    HardwareError,
    InputError,
    MissingDependencyError,
)
from llama_export.runtime.manifest import Manifest

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}
GRAPH_CHOICES = ("auto", "standard", "ort")
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass(frozen=True)
class OrtOptions:
    """Session settings. ``provider``: cpu | cuda | tensorrt; ``threads`` None = ORT's default."""

    provider: str = "cpu"
    threads: int | None = None
    # Busy-waiting worker threads (ONNX Runtime's and onnxruntime-genai's default) win on an
    # otherwise idle machine and lose badly when cores are shared. SmolLM2 decode here,
    # interleaved: idle-ish 39.8 tok/s spinning vs 30.4 not; contended 14.7 vs 21.4.
    spin: bool = True
    device_id: int = 0
    trt_cache_dir: str | None = None  # TensorRT EP engine cache (default: BUNDLE/engines/ort-trt)
    extra_provider_options: dict[str, str] = field(default_factory=dict)
    # auto: the ONNX-Runtime graph on CPU when the variant has one, else the standard graph.
    graph: str = "auto"
    # ONNX-Runtime graph only. auto: its unpadded form (no attention bias) until a batch is
    # left-padded; always: the full graph from the start (module docstring).
    attention_bias: str = "auto"


def select_graph(manifest: Manifest, variant: str, provider: str, graph: str = "auto") -> str:
    """Which of the variant's graphs to run: ``standard`` or ``ort``.

    ``auto`` takes the ONNX-Runtime graph on the CPU provider (measured faster there; its
    GroupQueryAttention has CUDA kernels for fp16 only, and the TensorRT provider cannot take
    contrib ops at all), the standard graph otherwise.
    """
    if graph not in GRAPH_CHOICES:
        raise InputError(f"--graph {graph} is unknown: use one of {', '.join(GRAPH_CHOICES)}")
    if graph == "auto":
        return "ort" if provider == "cpu" and "ort" in manifest.graphs(variant) else "standard"
    manifest.graph(variant, graph)  # a clear error when the variant lacks it
    return graph


class OrtKVCache(KVCache):
    """Per-layer past K/V as OrtValues, in the graph's input order."""

    def __init__(self, batch_size: int, capacity: int, empty: list[Any], shared: bool) -> None:
        super().__init__(batch_size, capacity)
        self._empty = empty
        self.shared = shared  # values are capacity-sized buffers, bound as past AND present
        self.values: list[Any] = list(empty)
        self.host: list[np.ndarray] = []  # caller-owned arrays behind ``values`` (cache_over)

    def reset(self) -> None:
        super().reset()
        self.values = list(self._empty)  # shared: the same buffers, overwritten from slot 0


class OrtBackend(Backend):
    def __init__(self, bundle: str | os.PathLike[str], manifest: Manifest, variant: str,
                 options: OrtOptions | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("the ONNX Runtime backend", "ort") from None
        self.manifest, self.variant = manifest, variant
        self.options = opts = options or OrtOptions()
        self.graph = select_graph(manifest, variant, opts.provider, opts.graph)
        spec = manifest.graph(variant, self.graph)
        self.logits_mode = str(spec.get("logits", "all"))
        self._shared_kv = spec.get("kv_buffer") == "shared"
        # Each row's length is the index of its mask's last 1 (ort_ops.py): per-row lengths.
        self.row_lengths = self.graph == "ort" and spec.get("seqlens") == "last_one"
        self._past_names = [s.name for s in manifest.inputs(variant) if s.name.startswith("past_")]
        self._present_names = [s.name for s in manifest.outputs(variant)
                               if s.name.startswith("present.")]
        self._kv_dtype = _NP_DTYPES[manifest.kv_dtype(variant)]
        self._device = "cpu" if opts.provider == "cpu" else "cuda"
        if opts.attention_bias not in ("auto", "always"):
            raise InputError(f"attention_bias {opts.attention_bias!r} is unknown: use auto or "
                             "always")
        self._ort = ort
        self._full_path = Path(bundle) / spec["file"]
        self._session_args = (_session_options(ort, opts),
                              _providers(ort, opts, manifest, variant, bundle))
        unpadded = spec.get("unpadded_file") if self.graph == "ort" else None
        # False while the session is the unpadded graph (exact without left padding)
        self.attention_bias = not (unpadded and opts.attention_bias == "auto")
        self._load(self._full_path if self.attention_bias else Path(bundle) / str(unpadded))
        self._c_cpu = ort.OrtDevice.make("cpu", 0)._get_c_device()
        self._c_device = ort.OrtDevice.make(self._device, opts.device_id)._get_c_device()
        self.engine_seconds = 0.0  # time inside run_with_iobinding, for the bench's overhead share

    def _load(self, path: Path) -> None:
        so, providers = self._session_args
        try:
            self.session = self._ort.InferenceSession(str(path), sess_options=so,
                                                      providers=providers)
        except Exception as e:  # onnxruntime raises its own non-RuntimeError exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BundleError(f"ONNX Runtime cannot load {path} ({first}): copy the bundle "
                              "again or re-export it") from None
        self._io = self._ort.capi._pybind_state.SessionIOBinding(self.session._sess)
        self._bound: OrtKVCache | None = None  # the shared cache whose buffers are bound now

    def _need_attention_bias(self) -> None:
        """Replace the unpadded session by the full graph's (first left-padded batch)."""
        self.__dict__.pop("_io", None)
        self.__dict__.pop("session", None)  # its weights go before the full graph's load
        self._load(self._full_path)
        self.attention_bias = True

    def close(self) -> None:
        self.__dict__.pop("session", None)
        self.__dict__.pop("_io", None)

    def _new_cache_impl(self, batch_size: int, capacity: int) -> OrtKVCache:
        m, ov, dev = self.manifest, self._ort.OrtValue, (self._device, self.options.device_id)
        if self._shared_kv:  # one capacity-sized buffer per past/present pair
            shape = [batch_size, m.num_kv_heads, capacity, m.head_dim]
            bufs = [ov.ortvalue_from_shape_and_type(shape, self._kv_dtype, *dev)._ortvalue
                    for _ in self._past_names]
            return OrtKVCache(batch_size, capacity, bufs, shared=True)
        empty = np.zeros((batch_size, m.num_kv_heads, 0, m.head_dim), dtype=self._kv_dtype)
        value = ov.ortvalue_from_numpy(empty, *dev)
        return OrtKVCache(batch_size, capacity, [value._ortvalue] * len(self._past_names),
                          shared=False)

    def cache_over(self, arrays: list[np.ndarray]) -> OrtKVCache:
        """A shared cache over caller-owned host arrays, one per past/present pair, each
        ``[batch, kv_heads, capacity, head_dim]`` C-contiguous (e.g. leading rows of a larger
        buffer): ONNX Runtime reads and writes them in place, no copy (the server's KV slots).
        CPU provider and the ONNX-Runtime graph only."""
        if not (self._shared_kv and self._device == "cpu"):
            raise InputError("host-array KV caches need the ONNX-Runtime graph on the CPU "
                             "provider: use --provider cpu and --graph ort (or auto)")
        if len(arrays) != len(self._past_names) or not all(
                a.flags.c_contiguous and a.dtype == self._kv_dtype for a in arrays):
            raise InputError(f"pass {len(self._past_names)} C-contiguous {self._kv_dtype} arrays "
                             "(one per past/present pair)")
        from_numpy = self._ort.OrtValue.ortvalue_from_numpy
        values = [from_numpy(a)._ortvalue for a in arrays]
        cache = OrtKVCache(arrays[0].shape[0], arrays[0].shape[2], values, shared=True)
        cache.host = list(arrays)  # the C values do not keep the arrays alive
        return cache

    def _forward_impl(self, input_ids: np.ndarray, position_ids: np.ndarray,
                      attention_mask: np.ndarray, cache: KVCache, tail: int) -> np.ndarray:
        assert isinstance(cache, OrtKVCache), "cache from another backend"  # programming error
        batch, seq = input_ids.shape
        if not self.attention_bias and left_padded(attention_mask):
            self._need_attention_bias()
        if self.graph == "ort" and batch > 1 and seq > 1 and cache.length > 0:
            if self.row_lengths and not attention_mask[:, cache.length:].all():
                # One token at a time, a masked one would be written at its row's last 1.
                raise InputError("a batched chunk on top of a past holds masked tokens: this "
                                 "ONNX-Runtime graph takes each row's length from its mask's "
                                 "last 1, so feed left padding in the first forward (or use "
                                 "--graph standard)")
            # GroupQueryAttention takes several new tokens on top of a past only for batch 1
            # (ONNX Runtime 1.32); a batched chunked prefill goes one token at a time.
            c = np.ascontiguousarray
            rows = []
            for t in range(seq):
                rows.append(self._step(c(input_ids[:, t:t + 1]), c(position_ids[:, t:t + 1]),
                                       c(attention_mask[:, :cache.length + t + 1]), cache, 1))
            return np.concatenate(rows[seq - tail:], axis=1)
        return self._step(input_ids, position_ids, attention_mask, cache, tail)

    def verifies_in_one_forward(self, batch: int) -> bool:
        return not (self.graph == "ort" and batch > 1)  # see _forward_impl

    def _step(self, input_ids: np.ndarray, position_ids: np.ndarray,
              attention_mask: np.ndarray, cache: OrtKVCache, tail: int) -> np.ndarray:
        # The C-level binding (what onnxruntime.IOBinding wraps): the Python wrapper's per-call
        # checks cost ~1 ms per step for 60 KV tensors, the C calls ~0.2 ms.
        io = self._io
        if not (cache.shared and cache is self._bound):
            self._bind_cache(cache)
        # Binding a name again replaces its value: per step only these change.
        io.bind_input("input_ids", input_ids)
        io.bind_input("position_ids", position_ids)
        io.bind_input("attention_mask", attention_mask)
        io.bind_output("logits", self._c_cpu)
        t0 = time.perf_counter()
        self.session._sess.run_with_iobinding(io, None)
        self.engine_seconds += time.perf_counter() - t0
        outputs = io.get_outputs()
        if not cache.shared:
            cache.values = [outputs[i] for i in range(1, len(outputs))]
        logits = outputs[0].numpy()
        return np.ascontiguousarray(logits[:, logits.shape[1] - tail:, :], dtype=np.float32)

    def _truncate_impl(self, cache: KVCache, length: int) -> None:
        assert isinstance(cache, OrtKVCache), "cache from another backend"  # programming error
        if cache.shared:
            # GroupQueryAttention reads the first `total - seq` slots of the buffer and writes
            # the new tokens after them (total = attention_mask width): the stale slots past
            # `length` are never read and the next forward overwrites them.
            return
        if length == 0:
            cache.values = list(cache._empty)
            return
        # The standard graph's present is a fresh (batch, kv, old_length, hd) tensor per step:
        # keep a contiguous copy of its first `length` positions (one copy per layer, the same
        # bytes a decode step's concatenation moves anyway).
        ov, dev = self._ort.OrtValue, (self._device, self.options.device_id)
        kept = []
        for value in cache.values:
            part = np.ascontiguousarray(value.numpy()[:, :, :length])
            new = ov.ortvalue_from_shape_and_type(list(part.shape), part.dtype, *dev)
            new.update_inplace(part)  # ORT-owned memory: no numpy array to keep alive
            kept.append(new._ortvalue)
        cache.values = kept

    def _bind_cache(self, cache: OrtKVCache) -> None:
        """Bind the cache's buffers: once per cache when shared, else every step."""
        io = self._io
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        for name, value in zip(self._past_names, cache.values, strict=True):
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits", self._c_cpu)  # output 0; rebinding it later keeps its place
        for name, value in zip(self._present_names, cache.values, strict=True):
            if cache.shared:
                io.bind_ortvalue_output(name, value)
            else:
                io.bind_output(name, self._c_device)
        self._bound = cache if cache.shared else None


def left_padded(mask: np.ndarray) -> bool:
    """Whether some row of a ``[batch, total]`` 0/1 mask has a 0 before a 1 (left padding, or
    a hole): what the ONNX-Runtime graph's attention bias exists for."""
    return bool((mask[:, 1:] > mask[:, :-1]).any())


def _session_options(ort: Any, opts: OrtOptions) -> Any:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # warnings about unused initializers etc. are noise for users
    if opts.threads is not None:
        if opts.threads < 1:
            raise InputError(f"--threads {opts.threads} is invalid: use 1 or more")
        so.intra_op_num_threads = opts.threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if opts.spin else "0")
    return so


def _providers(ort: Any, opts: OrtOptions, manifest: Manifest, variant: str,
               bundle: str | os.PathLike[str]) -> list[Any]:
    if opts.provider not in PROVIDERS:
        raise InputError(f"--provider {opts.provider} is unknown: use one of {', '.join(PROVIDERS)}")
    name = PROVIDERS[opts.provider]
    if name not in ort.get_available_providers():
        raise HardwareError(
            f"ONNX Runtime here has no {name} (available: "
            f"{', '.join(ort.get_available_providers())}): use --provider cpu, or install "
            "onnxruntime-gpu (pip install 'llama-export[gpu]') on a machine with an NVIDIA GPU")
    cpu: tuple[str, dict[str, str]] = ("CPUExecutionProvider", {})
    cuda = ("CUDAExecutionProvider", {"device_id": str(opts.device_id)})
    if opts.provider == "cpu":
        return [cpu]
    if opts.provider == "cuda":
        return [(cuda[0], {**cuda[1], **opts.extra_provider_options}), cpu]
    trt = {**trt_provider_options(manifest, variant, bundle, opts),
           **opts.extra_provider_options}
    return [("TensorrtExecutionProvider", trt), cuda, cpu]


def trt_provider_options(manifest: Manifest, variant: str, bundle: str | os.PathLike[str],
                         opts: OrtOptions) -> dict[str, str]:
    """TensorRT EP options: optimisation profile min/opt/max shapes from the manifest's dims."""
    d = manifest.dims
    kv = f"{manifest.num_kv_heads}x{{past}}x{manifest.head_dim}"

    def shapes(pick: str) -> str:
        b, s = getattr(d["batch"], pick), getattr(d["seq"], pick)
        past, total = getattr(d["past"], pick), getattr(d["total"], pick)
        parts = [f"input_ids:{b}x{s}", f"position_ids:{b}x{s}", f"attention_mask:{b}x{total}"]
        parts += [f"past_key_values.{i}.{kind}:{b}x" + kv.format(past=past)
                  for i in range(manifest.num_layers) for kind in ("key", "value")]
        return ",".join(parts)

    cache_dir = opts.trt_cache_dir or str(Path(bundle) / "engines" / "ort-trt")
    return {"device_id": str(opts.device_id), "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": cache_dir, "trt_timing_cache_enable": "True",
            "trt_fp16_enable": str(manifest.kv_dtype(variant) == "float16"),
            "trt_profile_min_shapes": shapes("min"), "trt_profile_opt_shapes": shapes("opt"),
            "trt_profile_max_shapes": shapes("max")}
