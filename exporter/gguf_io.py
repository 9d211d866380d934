"""GGUF reading: metadata, lazily dequantized tensors, and a self-contained ``tokenizer.json``.

Dequantization uses the ``gguf`` package, so every quant type it supports (F32, F16, BF16,
Q8_0, Q4_0, Q4_1, K-quants, ...) works. The tokenizer is rebuilt from the GGUF vocabulary with
transformers' GGUF tokenizer builders (the same ones its ``from_pretrained(gguf_file=...)`` uses),
so the bundle's tokenizer and the PyTorch reference's tokenizer agree.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llama_export.runtime.errors import UnsupportedModelError, WeightsError


class TensorLoader:
    """One GGUF tensor: ``shape`` (HF orientation) and ``qtype`` from the header; calling it
    dequantizes to float32 (so facts can be checked before any weight is read)."""

    def __init__(self, load: Callable[[], np.ndarray], shape: tuple[int, ...], qtype: str) -> None:
        self._load, self.shape, self.qtype = load, shape, qtype

    def __call__(self) -> np.ndarray:
        return self._load()


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Sequential little-endian reads over the GGUF header bytes.

    gguf-py's ``GGUFReader`` builds a numpy memmap view per array element, which costs ~10 s
    for SmolLM2's 49k-token vocabulary; plain ``struct`` over bytes reads the same in < 0.3 s.
    """

    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.scalar("<Q")
        s = self.buf[self.pos:self.pos + n]
        if len(s) != n:
            raise EOFError("string past end of header")
        self.pos += n
        return s.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype in _SCALARS and etype != 7:  # numeric arrays in one call
                fmt = _SCALARS[etype]
                vals = struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.pos)
                self.pos += count * struct.calcsize(fmt)
                return list(vals)
            return [self.value(etype) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return self.scalar(_SCALARS[vtype])


def _parse_header(path: Path) -> tuple[dict[str, Any], list[tuple[str, list[int], int, int]], int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(min(size, 64 << 20))  # metadata + tensor infos live at the front
    cur = _Cursor(head)
    if head[:4] != b"GGUF":
        raise ValueError("bad magic (not a GGUF file)")
    cur.pos = 4
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    fields: dict[str, Any] = {"GGUF.version": version}
    for _ in range(n_kv):
        key = cur.string()
        fields[key] = cur.value(cur.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
        infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
    align = int(fields.get("general.alignment", 32))
    data_start = (cur.pos + align - 1) // align * align
    return fields, infos, data_start


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, TensorLoader]]:
    """``(metadata, {tensor name: loader})``; loaders dequantize to float32 in HF orientation."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    def corrupt(why: object) -> WeightsError:
        return WeightsError(f"{path} is not a readable GGUF file ({why}): it is truncated or "
                            "corrupt, download it again")

    try:
        fields, infos, data_start = _parse_header(path)
    except (ValueError, EOFError, struct.error, OverflowError, MemoryError) as e:
        raise corrupt(e) from None
    size = path.stat().st_size
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    loaders: dict[str, TensorLoader] = {}
    for name, dims, ttype, offset in infos:
        try:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise corrupt(f"tensor {name} has unknown type {ttype}") from None
        row_bytes = dims[0] // block * type_size
        rows = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
        begin = data_start + offset
        if begin + rows * row_bytes > size:
            raise corrupt(f"tensor {name} extends past the end of the file")
        loaders[name] = TensorLoader(_loader(mm, begin, rows, row_bytes, dims, qtype, dequantize),
                                     tuple(reversed(dims)), qtype.name)
    return fields, loaders


def _loader(mm: np.ndarray, begin: int, rows: int, row_bytes: int, dims: list[int], qtype: Any,
            dequantize: Callable[[np.ndarray, Any], np.ndarray]) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        raw = mm[begin:begin + rows * row_bytes].reshape(rows, row_bytes)
        out = np.empty((rows, dims[0]), dtype=np.float32)
        # Row chunks of ~32 MB: gguf-py's temporaries are several times their input, which for
        # a 150k-token embedding would otherwise cost GBs of transient memory.
        step = max(1, (32 << 20) // (4 * dims[0]))
        try:
            for a in range(0, rows, step):
                out[a:a + step] = dequantize(raw[a:a + step], qtype).reshape(-1, dims[0])
        except NotImplementedError:
            raise WeightsError(f"GGUF quant type {qtype.name} cannot be dequantized by the gguf "
                               "package: upgrade gguf or convert the file to another type") from None
        return out.reshape(tuple(reversed(dims)))
    return load


def tokenizer_from_gguf(fields: dict[str, Any]) -> tuple[dict[str, bytes], dict[str, Any]]:
    """``({file name: bytes}, tokenizer info)`` for the bundle, built from GGUF metadata."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    tokens = fields.get("tokenizer.ggml.tokens")
    if not tokens:
        raise UnsupportedModelError("the GGUF file has no tokenizer vocabulary: use a GGUF with "
                                    "tokenizer.ggml.* metadata, or export from a HF folder")
    tok_dict = {name: fields[f"tokenizer.{key}"]
                for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
                if f"tokenizer.{key}" in fields}
    try:
        backend, _ = convert_gguf_tokenizer(str(fields.get("general.architecture")), tok_dict)
    except (KeyError, ValueError, NotImplementedError) as e:
        raise UnsupportedModelError(
            f"GGUF tokenizer '{tok_dict.get('tokenizer_type')}' cannot be converted ({e}): "
            "export from a HF folder with tokenizer.json instead") from None

    def tok(key: str) -> int | None:
        v = fields.get(f"tokenizer.ggml.{key}")
        return int(v) if v is not None else None

    bos, eos, pad = tok("bos_token_id"), tok("eos_token_id"), tok("padding_token_id")
    add_bos = fields.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:  # llama.cpp adds BOS to sentencepiece vocabularies that do not say
        add_bos = tok_dict.get("tokenizer_type") == "llama"
    if add_bos and bos is not None:
        from tokenizers import processors

        backend.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B",
            special_tokens=[(tokens[bos], bos)])
    template = fields.get("tokenizer.chat_template")

    def name(i: int | None) -> str | None:
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(bos),
          "eos_token": name(eos), "pad_token": name(pad if pad is not None else eos),
          "unk_token": name(tok("unknown_token_id")), "add_bos_token": bool(add_bos),
          "chat_template": template}
    files = {"tokenizer.json": backend.to_str().encode("utf-8"),
             "tokenizer_config.json": (json.dumps(tc, indent=2) + "\n").encode("utf-8")}
    info = {"bos_token_id": bos, "eos_token_ids": [eos] if eos is not None else [],
            "pad_token_id": pad if pad is not None else eos, "add_bos_token": bool(add_bos),
            "chat_template": template}
    return files, info
