"""``export_bundle``: model source → verified ONNX bundle, written atomically.

    source ──load──► LlamaConfig + state dict ──► LlamaDecoder ──torch.onnx.export──► raw ONNX
        ──tidy (readable weight names, one external-data file past 2 GB)──► BUNDLE.tmp/
        ──verify vs transformers (ONNX Runtime CPU)──► manifest.json (last) ──rename──► BUNDLE

Each variant gets two graphs of the same weights and IO: the *standard* graph (plain ONNX ops,
what TensorRT builds and any ONNX consumer reads) and, unless ``ort_graph=False``, the
*ONNX Runtime* graph (contrib ops, see ``ort_ops.py``) the runtime prefers on CPU. Both are
verified against transformers; they share one weights file.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from llama_export.runtime.backends.base import logits_window
from llama_export.runtime.errors import BundleError, InputError
from llama_export.runtime.manifest import FORMAT_VERSION, Manifest, kv_io_entries
from llama_export.runtime.tempnames import sweep_leftovers, temp_dir

from .config import LlamaConfig
from .hf_compat import check_transformers
from .hf_files import hf_config_files
from .model import Flavor, LlamaDecoder
from .onnx_tidy import tidy_onnx_graphs
from .ort_ops import CONTRIB_OPS, MS_DOMAIN, ort_graph_unsupported
from .sources import Progress, Source, load_source

VARIANT_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx"}
ORT_GRAPH_FILES = {"fp32": "model.ort.onnx", "fp16": "model.fp16.ort.onnx"}
ORT_UNPADDED_FILES = {"fp32": "model.ort.unpadded.onnx", "fp16": "model.fp16.ort.unpadded.onnx"}


@dataclass(frozen=True)
class ExportOptions:
    dtype: Literal["fp32", "fp16"] = "fp32"
    max_seq_len: int | None = None  # default: the model's max positions, capped at 4096
    max_batch: int = 8
    opset: int = 17
    logits: str = "all"  # all | last | tail:N (the last min(seq, N) positions)
    force: bool = False
    verify: bool = True
    ort_graph: bool = True  # also write the ONNX-Runtime-optimized graph (contrib ops)
    references: bool = True  # save the original's answers for `llama-export parity`
    reference_prompts: str | None = None  # extra reference prompts (.txt / .jsonl)


_T0 = time.perf_counter()


def _stderr_progress(msg: str) -> None:
    print(f"[llama-export {time.perf_counter() - _T0:6.1f}s {peak_rss_mb() / 1024:5.1f} GiB peak] "
          f"{msg}", file=sys.stderr, flush=True)


def _check_options(opts: ExportOptions) -> None:
    if opts.dtype not in VARIANT_FILES:
        raise InputError(f"--dtype {opts.dtype} is not supported: use fp32 or fp16")
    try:
        logits_window(opts.logits)
    except BundleError:
        raise InputError(f"--logits {opts.logits} is not supported: use all, last or tail:N "
                         "(N >= 1, e.g. tail:16)") from None
    if not 14 <= opts.opset <= 21:
        raise InputError(f"--opset {opts.opset} is not supported: use an opset between 14 and 21")
    if opts.max_seq_len is not None and opts.max_seq_len < 2:
        raise InputError(f"--max-seq-len {opts.max_seq_len} is too small: use at least 2")
    if opts.max_batch < 1:
        raise InputError(f"--max-batch {opts.max_batch} is invalid: use at least 1")
    if opts.reference_prompts is not None:
        if not opts.references:
            raise InputError("--reference-prompts needs references: drop --no-references")
        from .references import read_prompts_file
        read_prompts_file(opts.reference_prompts)  # a bad file fails before the long export


def export_bundle(model: str | os.PathLike[str] | None, out: str | os.PathLike[str],
                  options: ExportOptions | None = None,
                  progress: Progress = _stderr_progress) -> Path:
    """Export ``model`` (HF folder, .gguf, or None for the built-in SmolLM2) to bundle ``out``."""
    opts = options or ExportOptions()
    _check_options(opts)
    check_transformers()  # before any work: a too-old transformers fails only at verification
    out = Path(out)
    if out.exists() and not opts.force:
        raise InputError(f"{out} already exists: pass --force to overwrite it, or choose another -o")
    t0 = time.perf_counter()
    src = load_source(model, progress)
    skipped = ort_graph_unsupported(src.config.head_dim) if opts.ort_graph else None
    if skipped:
        progress(f"skipping the ONNX-Runtime graph: {skipped} (the standard graph is complete)")
        opts = replace(opts, ort_graph=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(out.parent, progress, label=out.name)  # an earlier export killed hard
    tmp = temp_dir(out.parent, out.name)
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be copied and shared
    try:
        manifest = _build(src, tmp, opts, progress)
        if skipped:
            manifest.data["variants"][opts.dtype]["ort_graph_skipped"] = skipped
        t_verify = time.perf_counter()  # references + verify: the time spent on the original
        if opts.verify or opts.references:
            from .reference import reference_from_state_dict
            ref = reference_from_state_dict(src.config, src.state_dict)
        if opts.references:
            from .references import write_references
            write_references(tmp, manifest, ref, opts.reference_prompts, progress)
        if opts.verify:
            from .verify import verify_bundle
            entry = manifest.data["variants"][opts.dtype]
            ref_cache: dict[bytes, Any] = {}  # both graphs are checked on the same inputs
            for graph in ("standard", "ort") if opts.ort_graph else ("standard",):
                report = verify_bundle(tmp, model, manifest=manifest, reference=ref,
                                       graph=graph, progress=progress,
                                       reference_cache=ref_cache)
                (entry if graph == "standard" else entry["ort_graph"])["parity"] = report.to_dict()
            if entry.get("ort_graph", {}).get("unpadded_file"):
                report = verify_bundle(tmp, model, manifest=manifest, reference=ref, graph="ort",
                                       unpadded=True, progress=progress,
                                       reference_cache=ref_cache)
                entry["ort_graph"]["unpadded_parity"] = report.to_dict()
        cost = {"export_seconds": round(t_verify - t0, 2),
                "verify_seconds": round(time.perf_counter() - t_verify, 2),
                "peak_rss_mb": round(peak_rss_mb())}
        manifest.data["provenance"].update(cost)
        manifest.save(tmp)  # the manifest is written last: its presence marks a complete bundle
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"bundle written to {out}: export {cost['export_seconds']:.1f} s, verify "
             f"{cost['verify_seconds']:.1f} s, peak RSS {cost['peak_rss_mb'] / 1024:.2f} GiB")
    return out


def peak_rss_mb() -> float:
    """This process's high-water resident memory so far (MiB; Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**2 if sys.platform == "darwin" else peak / 1024


def _replace_dir(tmp: Path, out: Path) -> None:
    """Swap ``tmp`` into place; an existing bundle is removed only after the new one is ready."""
    if not out.exists():
        os.replace(tmp, out)
        return
    # not a sweepable temp name: killed between the two renames, this is the user's bundle
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _build(src: Source, tmp: Path, opts: ExportOptions, progress: Progress) -> Manifest:
    cfg = src.config
    max_seq = opts.max_seq_len or min(cfg.max_position_embeddings, 4096)
    dtype = torch.float16 if opts.dtype == "fp16" else torch.float32
    files = {"standard": VARIANT_FILES[opts.dtype]}
    if opts.ort_graph:
        files["ort"] = ORT_GRAPH_FILES[opts.dtype]
        # the same graph without the attention bias only left padding needs (the runtime runs
        # it while no batch is left-padded; calibration/unpadded.py)
        files["ort-unpadded"] = ORT_UNPADDED_FILES[opts.dtype]
    raw_dir = tmp / "raw"
    raw_dir.mkdir()
    _check_names(cfg, src)

    def traced() -> Iterator[tuple[Path, Path]]:
        """Each graph traced when the tidy loop asks for it; its raw trace deleted once tidied
        (a > 2 GB trace is a file per weight, named by trace order: one folder per graph, and
        the disk holds one raw trace at a time beside the shared data file)."""
        for graph, file in files.items():
            flavor: Flavor = "standard" if graph == "standard" else "ort"
            module = LlamaDecoder.from_state_dict(cfg, src.state_dict, flavor=flavor,
                                                  logits_tail=logits_window(opts.logits),
                                                  max_positions=max_seq,
                                                  attention_bias=graph != "ort-unpadded")
            module = module.to(dtype).eval()
            progress(f"tracing {cfg.num_layers}-layer decoder ({opts.dtype}, opset "
                     f"{opts.opset}, {graph} graph)")
            (raw_dir / graph).mkdir()
            _trace(module, raw_dir / graph / file, opts.opset, dtype)
            del module
            progress(f"saving ONNX ({graph} graph)")
            yield raw_dir / graph / file, tmp / file
            shutil.rmtree(raw_dir / graph)

    data_file = tidy_onnx_graphs(traced(), files["standard"] + ".data",
                                 split_heads={tmp / f for g, f in files.items() if g != "standard"})
    shutil.rmtree(raw_dir)
    side_files = {**src.tokenizer_files,
                  **hf_config_files(src.config, src.tokenizer_info, opts.dtype)}
    for name, blob in side_files.items():
        (tmp / name).write_bytes(blob)
    manifest = Manifest(_manifest_dict(src, opts, max_seq, files, data_file))
    for rel in [*files.values(), data_file, *side_files]:
        if rel:
            manifest.record_file(tmp, rel)
    return manifest


def _check_names(cfg: LlamaConfig, src: Source) -> None:
    with torch.device("meta"):  # names only: no memory, no init
        own = {k for k in LlamaDecoder(cfg).state_dict()
               if k != "lm_head.weight" or not cfg.tie_word_embeddings}
    missing = own - set(src.state_dict)
    if missing:  # sources.py validated shapes; this guards against a name-mapping bug
        raise RuntimeError(f"state dict lacks {sorted(missing)[:3]}")


def _trace(module: LlamaDecoder, path: Path, opset: int, dtype: torch.dtype) -> None:
    """The one ``torch.onnx.export`` call site (TorchScript exporter; dynamic batch/seq/past)."""
    cfg = module.cfg
    B, T, P = 2, 3, 2  # non-trivial sizes so no dim is specialised to 1
    ids = torch.randint(0, cfg.vocab_size, (B, T), dtype=torch.int64)
    mask = torch.ones(B, P + T, dtype=torch.int64)
    pos = torch.arange(P, P + T, dtype=torch.int64).expand(B, T).contiguous()
    past = [torch.zeros(B, cfg.num_kv_heads, P, cfg.head_dim, dtype=dtype)
            for _ in range(2 * cfg.num_layers)]
    in_names = ["input_ids", "attention_mask", "position_ids"]
    out_names = ["logits"]
    axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "seq"},
                                       "attention_mask": {0: "batch", 1: "total"},
                                       "position_ids": {0: "batch", 1: "seq"},
                                       "logits": _logits_axes(module.logits_tail)}
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            in_names.append(f"past_key_values.{i}.{kind}")
            out_names.append(f"present.{i}.{kind}")
            axes[in_names[-1]] = {0: "batch", 2: "past"}
            axes[out_names[-1]] = {0: "batch", 2: "total"}
    with warnings.catch_warnings(), torch.no_grad(), lean_shape_inference():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (ids, mask, pos, *past), str(path), input_names=in_names,
                          output_names=out_names, dynamic_axes=axes, opset_version=opset,
                          do_constant_folding=True, dynamo=False,
                          custom_opsets={MS_DOMAIN: 1} if module.flavor == "ort" else None)
    if module.flavor == "ort" and not module.attention_bias:
        _declare_unread_inputs(path, in_names, axes)


def _declare_unread_inputs(path: Path, names: list[str], axes: dict[str, dict[int, str]]) -> None:
    """Keep the IO contract when the trace dropped an input no node reads (the unpadded ``ort``
    graph never reads ``position_ids``): declare it again, in the contract's order."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    have = {i.name: i for i in model.graph.input}
    if all(n in have for n in names):
        return
    for name in names:
        if name not in have:  # only the int64 (batch, seq|total) inputs can go unread
            dims = [axes[name][d] for d in sorted(axes[name])]
            have[name] = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, dims)
    inputs = [have[n] for n in names]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    onnx.save_model(model, str(path))


# Parameters larger than this are hidden from the exporter's whole-graph shape inference.
SHAPE_DATA_MAX_NUMEL = 4096


@contextmanager
def lean_shape_inference() -> Iterator[None]:
    """The TorchScript exporter's whole-graph ONNX shape inference (run twice per export) hands
    every parameter's *values* to ONNX's inference, which copies each weight into a proto per
    node: 37 of the 54 s of tracing Qwen2.5-0.5B, growing with the model. Shapes need only
    small constant inputs (Reshape/Expand targets); a weight's shape is already on the graph.
    Inside this context the inference sees parameters of at most ``SHAPE_DATA_MAX_NUMEL``
    elements. Measured: the exported graphs are identical (nodes, attributes, value_info,
    initializer bytes; tested), 0.5B ORT-graph trace 38.9 → 14.5 s. A torch without this
    internal pass is left untouched."""
    name = "_jit_pass_onnx_graph_shape_type_inference"
    real = getattr(torch._C, name, None)
    if real is None:
        yield
        return

    def lean(graph: Any, params: dict[str, torch.Tensor], opset: int) -> Any:
        return real(graph, {k: v for k, v in params.items()
                            if v.numel() <= SHAPE_DATA_MAX_NUMEL}, opset)

    setattr(torch._C, name, lean)
    try:
        yield
    finally:
        setattr(torch._C, name, real)


def _logits_axes(tail: int | None) -> dict[int, str]:
    """``tail``: min(seq, N) positions, named apart from ``seq`` (they differ past N)."""
    if tail == 1:
        return {0: "batch"}
    return {0: "batch", 1: "seq" if tail is None else "tail"}


def _manifest_dict(src: Source, opts: ExportOptions, max_seq: int, files: dict[str, str],
                   data_file: str | None) -> dict[str, Any]:
    import onnx
    import transformers

    cfg = src.config
    fdtype = "float16" if opts.dtype == "fp16" else "float32"
    past, present = kv_io_entries(fdtype, cfg.num_kv_heads, cfg.head_dim)
    inputs = [{"name": "input_ids", "dtype": "int64", "dims": ["batch", "seq"]},
              {"name": "attention_mask", "dtype": "int64", "dims": ["batch", "total"]},
              {"name": "position_ids", "dtype": "int64", "dims": ["batch", "seq"]}, *past]
    window = logits_window(opts.logits)
    logits_dims = ["batch", "seq" if window is None else 1 if window == 1 else "tail",
                   cfg.vocab_size]
    outputs = [{"name": "logits", "dtype": fdtype, "dims": logits_dims}, *present]
    from importlib.metadata import version

    variant: dict[str, Any] = {
        "file": files["standard"], "data_file": data_file, "precision": opts.dtype,
        "scheme": opts.dtype, "logits": opts.logits, "opset": opts.opset, "inputs": inputs,
        "outputs": outputs}
    if "ort" in files:
        variant["ort_graph"] = {**ort_graph_entry(files["ort"]),
                                "unpadded_file": files["ort-unpadded"]}
    return {
        "format_version": FORMAT_VERSION,
        "model": cfg.to_manifest(),
        "dims": {"batch": {"min": 1, "opt": 1, "max": opts.max_batch},
                 "seq": {"min": 1, "opt": min(128, max_seq), "max": max_seq},
                 "past": {"min": 0, "opt": min(128, max_seq - 1), "max": max_seq - 1},
                 "total": {"min": 1, "opt": min(256, max_seq), "max": max_seq}},
        "tokenizer": {"files": sorted(src.tokenizer_files), **src.tokenizer_info},
        "variants": {opts.dtype: variant},
        "engines": [],
        "provenance": {"source": src.origin, "source_kind": src.kind,
                       "source_fingerprint": src.fingerprint, "tool": "llama-export",
                       "tool_version": version("llama-export"), "torch_version": torch.__version__,
                       "transformers_version": transformers.__version__,
                       "onnx_version": onnx.__version__, **src.extra},
        "files": {},
    }


def ort_graph_entry(file: str) -> dict[str, Any]:
    """Manifest entry of a variant's ONNX-Runtime graph (same IO as the variant's standard graph).

    ``kv_buffer: shared``: past and present of a layer may be one preallocated buffer of the
    cache's capacity (GroupQueryAttention then writes the new K/V in place). ``rope_positions:
    slots``: RoPE uses slot indices, equal to the standard graph when ``position_ids`` follow
    the manifest's contract (``cumsum(attention_mask) - 1``); see ``ort_ops.py``. ``seqlens:
    last_one``: each row's length is the index of the last 1 in its mask row, so rows of one
    batch may have different lengths (right padding; the server's KV slots).
    """
    return {"file": file, "contrib_ops": [f"{MS_DOMAIN}.{op}" for op in CONTRIB_OPS],
            "kv_buffer": "shared", "rope_positions": "slots", "seqlens": "last_one"}
