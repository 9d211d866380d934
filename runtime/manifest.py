"""``manifest.json``: the one contract between exporter, calibration, runtime and parity.

The manifest is the only place IO names, shapes and dtypes live; nothing is inferred from file
names. Readers refuse ``format_version`` values they do not know (llama2.c's rule).

Layout (``format_version`` 1)::

    {
      "format_version": 1,
      "model":     {num_layers, num_heads, num_kv_heads, head_dim, hidden_size, intermediate_size,
                    vocab_size, max_position_embeddings, rope_theta, rope_scaling, rms_norm_eps,
                    tie_word_embeddings, qkv_bias, o_bias, mlp_bias, family, name},
      "dims":      {"batch": {min, opt, max}, "seq": ..., "past": ..., "total": ...},
      "tokenizer": {files, bos_token_id, eos_token_ids, pad_token_id, add_bos_token, chat_template},
      "variants":  {"fp32": {file, data_file, precision, logits, inputs, outputs, parity,
                             ort_graph: {file, contrib_ops, kv_buffer, rope_positions, parity,
                                         unpadded_file, unpadded_parity}},
                    ...},
      "engines":   [ {path, precision, variant, tensorrt_version, gpu, compute_capability, ...} ],
      "provenance": {source, source_sha256, tool_version, opset, torch_version, ...},
      "files":     {"model.onnx": "<sha256>", ...}
    }

A variant's ``file`` is its *standard* graph (plain ONNX ops: TensorRT, any ONNX consumer). Its
optional ``ort_graph`` is the same model as an ONNX-Runtime-optimized graph (contrib ops) with
the same IO, sharing the variant's ``data_file``; old readers simply ignore it. Its optional
``unpadded_file`` is that graph without the attention bias only left padding needs, sharing
its data file too (calibration/unpadded.py); the runtime runs it while no batch is left-padded.

IO entries are ``{name, dtype, dims}``; KV entries use templates (``past_key_values.{i}.key``,
``present.{i}.value``) expanded per layer by :func:`expand_io`. Dims are named (``batch``,
``seq``, ``past``, ``total`` = past + seq) or integers. A variant's ``logits`` says which
positions its ``logits`` output holds: ``all`` (dim ``seq``), ``last`` (dim 1) or ``tail:N``
(dim ``tail`` = min(seq, N)); ``backends.base.logits_window`` reads it.

A graph may store a large weight as column slices: one MatMul per slice of ``<weight>.cols<a>_<b>``
(columns ``[a, b)``, each starting on a multiple of 16) and one Concat. The exporter does so
for a large float lm_head in the ONNX-Runtime graphs, calibration for large packed weights;
:func:`column_slices`, :func:`slice_suffix` and :data:`SLICE_SUFFIX` are that convention.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BundleError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
KNOWN_VERSIONS = (1,)

PAST_KEY = "past_key_values.{i}.key"
PAST_VALUE = "past_key_values.{i}.value"
PRESENT_KEY = "present.{i}.key"
PRESENT_VALUE = "present.{i}.value"

_REQUIRED = ("model", "dims", "tokenizer", "variants", "files")
GRAPHS = ("standard", "ort")


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    dims: tuple[str | int, ...]


SLICE_ALIGN = 16  # column slices start on multiples of 16 columns (the GEMM kernels' tiles)
SLICE_SUFFIX = re.compile(r"\.cols(\d+)_(\d+)$")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def slice_suffix(a: int, b: int) -> str:
    """The name suffix of the slice holding columns ``[a, b)``."""
    return f".cols{a}_{b}"


def column_slices(n: int, nbytes: int, max_bytes: int) -> list[tuple[int, int]]:
    """``[start, stop)`` column ranges splitting a weight of ``nbytes`` over ``n`` columns into
    parts of at most ~``max_bytes`` (one part when it already fits)."""
    parts = max(1, _ceil_div(nbytes, max_bytes))
    width = _ceil_div(_ceil_div(n, parts), SLICE_ALIGN) * SLICE_ALIGN
    return [(a, min(a + width, n)) for a in range(0, n, width)]



def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def expand_io(entries: Iterable[Mapping[str, Any]], num_layers: int) -> list[TensorSpec]:
    """Expand ``{i}`` templates into one spec per layer.

    Consecutive templated entries are interleaved layer-major (``past.0.key, past.0.value,
    past.1.key, ...``), the order Optimum's exports and our graphs use.
    """
    out: list[TensorSpec] = []
    group: list[Mapping[str, Any]] = []

    def flush() -> None:
        for i in range(num_layers):
            out.extend(TensorSpec(e["name"].format(i=i), e["dtype"], tuple(e["dims"]))
                       for e in group)
        group.clear()

    for e in entries:
        if "{i}" in e["name"]:
            group.append(e)
            continue
        flush()
        out.append(TensorSpec(e["name"], e["dtype"], tuple(e["dims"])))
    flush()
    return out


class Manifest:
    """Typed, validated view over the manifest dict. ``data`` stays the JSON source of truth."""

    def __init__(self, data: dict[str, Any]) -> None:
        version = data.get("format_version")
        if version not in KNOWN_VERSIONS:
            raise BundleError(
                f"manifest format_version {version!r} is not supported by this llama-export "
                f"(knows {list(KNOWN_VERSIONS)}): upgrade llama-export or re-export the bundle"
            )
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise BundleError(
                f"manifest is missing {', '.join(missing)}: the bundle is incomplete, re-export it"
            )
        self.data = data

    # ---- reading -----------------------------------------------------------------------------
    @classmethod
    def load(cls, bundle: str | os.PathLike[str]) -> Manifest:
        path = Path(bundle) / MANIFEST_NAME
        if not Path(bundle).is_dir():
            raise BundleError(f"bundle {bundle} does not exist: run `llama-export onnx -o {bundle}`")
        if not path.is_file():
            raise BundleError(
                f"{path} not found: {bundle} is not a llama-export bundle (or its export did not "
                "finish); re-export it"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{path} is not valid JSON ({e}): re-export the bundle") from None
        if not isinstance(data, dict):
            raise BundleError(f"{path} is not a JSON object: re-export the bundle")
        return cls(data)

    @property
    def model(self) -> dict[str, Any]:
        return dict(self.data["model"])

    @property
    def num_layers(self) -> int:
        return int(self.data["model"]["num_layers"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.data["model"]["num_kv_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.data["model"]["head_dim"])

    @property
    def vocab_size(self) -> int:
        return int(self.data["model"]["vocab_size"])

    @property
    def dims(self) -> dict[str, DimRange]:
        return {k: DimRange(int(v["min"]), int(v["opt"]), int(v["max"]))
                for k, v in self.data["dims"].items()}

    @property
    def max_context(self) -> int:
        """Largest past + seq the graph was exported for."""
        return self.dims["total"].max

    @property
    def tokenizer(self) -> dict[str, Any]:
        return dict(self.data["tokenizer"])

    @property
    def variants(self) -> dict[str, dict[str, Any]]:
        return dict(self.data["variants"])

    @property
    def engines(self) -> list[dict[str, Any]]:
        return list(self.data.get("engines", []))

    def variant(self, name: str) -> dict[str, Any]:
        variants = self.data["variants"]
        if name not in variants:
            have = ", ".join(sorted(variants)) or "none"
            raise BundleError(
                f"bundle has no '{name}' variant (has: {have}): create it first "
                f"(`llama-export calibrate` for int8, `llama-export quantize --int4` for int4)"
            )
        return dict(variants[name])

    def default_variant(self) -> str:
        variants = self.data["variants"]
        for name in ("fp32", "fp16"):
            if name in variants:
                return name
        return str(next(iter(variants)))

    def inputs(self, variant: str) -> list[TensorSpec]:
        return expand_io(self.variant(variant)["inputs"], self.num_layers)

    def outputs(self, variant: str) -> list[TensorSpec]:
        return expand_io(self.variant(variant)["outputs"], self.num_layers)

    def kv_dtype(self, variant: str) -> str:
        for spec in self.variant(variant)["inputs"]:
            if spec["name"] == PAST_KEY:
                return str(spec["dtype"])
        raise BundleError(f"variant '{variant}' has no KV-cache inputs: re-export the bundle")

    # ---- integrity ---------------------------------------------------------------------------
    def verify_files(self, bundle: str | os.PathLike[str],
                     only: Iterable[str] | None = None) -> None:
        """Check that listed files exist and match their sha256 (``only``: a subset)."""
        files: dict[str, str] = self.data["files"]
        names = list(files) if only is None else list(only)
        for rel in names:
            if rel not in files:
                raise BundleError(f"{rel} is not listed in the manifest: re-export the bundle")
            path = Path(bundle) / rel
            if not path.is_file():
                raise BundleError(f"{path} is missing from the bundle: re-export or copy it again")
            if sha256_file(path) != files[rel]:
                raise BundleError(
                    f"{path} does not match its sha256 in the manifest (altered or truncated "
                    "copy): copy the bundle again or re-export it"
                )

    def graph(self, variant: str, graph: str = "standard") -> dict[str, Any]:
        """The variant entry with ``file`` (and ``data_file``) of ``graph``: standard | ort."""
        v = self.variant(variant)
        if graph == "standard":
            return v
        if graph != "ort":
            raise BundleError(f"graph {graph!r} is unknown: use one of {', '.join(GRAPHS)}")
        g = v.get("ort_graph")
        if not g:
            raise BundleError(
                f"variant '{variant}' has no ONNX Runtime graph: re-export it with "
                "`llama-export onnx` (without --no-ort-graph), or use the standard graph "
                "(--graph standard)")
        return {**v, **g}

    def graphs(self, variant: str) -> list[str]:
        """The graphs a variant has, standard first."""
        return ["standard", *(["ort"] if self.variant(variant).get("ort_graph") else [])]

    def files_of_variant(self, name: str, graph: str | None = None) -> list[str]:
        """Files of one graph of a variant, or of all its graphs (``graph=None``)."""
        out: list[str] = []
        for g in self.graphs(name) if graph is None else [graph]:
            spec = self.graph(name, g)
            out += [f for f in (spec.get("file"), spec.get("unpadded_file"), spec.get("data_file"))
                    if f and f not in out]
        return out

    # ---- writing -----------------------------------------------------------------------------
    def record_file(self, bundle: str | os.PathLike[str], rel: str) -> None:
        self.data["files"][rel] = sha256_file(Path(bundle) / rel)

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2, sort_keys=False) + "\n"

    def save(self, bundle: str | os.PathLike[str]) -> None:
        """Write ``manifest.json`` atomically (temp file in the same folder, then rename)."""
        atomic_write_text(Path(bundle) / MANIFEST_NAME, self.to_json())


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; manifests are shared with the bundle
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def kv_io_entries(dtype: str, num_kv_heads: int, head_dim: int) -> tuple[list[dict[str, Any]],
                                                                          list[dict[str, Any]]]:
    """Template IO entries for the KV cache (layout ``[batch, kv_heads, past, head_dim]``)."""
    past = [{"name": n, "dtype": dtype, "dims": ["batch", num_kv_heads, "past", head_dim]}
            for n in (PAST_KEY, PAST_VALUE)]
    present = [{"name": n, "dtype": dtype, "dims": ["batch", num_kv_heads, "total", head_dim]}
               for n in (PRESENT_KEY, PRESENT_VALUE)]
    return past, present
