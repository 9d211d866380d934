"""load_bundle validation and bad input: each a one-line LlamaExportError naming the fix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llama_export.runtime import load_bundle
from llama_export.runtime.cli import main
from llama_export.runtime.errors import BundleError, HardwareError, InputError, LlamaExportError


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(tiny_bundle, out)
    return out


def _one_line(err: pytest.ExceptionInfo[LlamaExportError]) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    assert ": " in msg  # "<problem>: <fix>"
    return msg


def test_unknown_manifest_version(bundle_copy: Path) -> None:
    path = bundle_copy / "manifest.json"
    data = json.loads(path.read_text())
    data["format_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_copy)
    assert "format_version 99 is not supported" in _one_line(err)
    assert "upgrade llama-export or re-export the bundle" in str(err.value)


# The file each graph runs: only the chosen graph's files are checked (and needed).
GRAPH_FILES = [("auto", "model.ort.unpadded.onnx"), ("standard", "model.onnx"),
               ("auto", "model.ort.onnx"), ("auto", "model.onnx.data"),
               ("standard", "model.onnx.data")]


@pytest.mark.parametrize(("graph", "file"), GRAPH_FILES)
def test_missing_model_file(bundle_copy: Path, graph: str, file: str) -> None:
    (bundle_copy / file).unlink()
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_copy, graph=graph)
    assert f"{file} is missing from the bundle: re-export or copy it again" in _one_line(err)


@pytest.mark.parametrize(("graph", "file"), GRAPH_FILES[:2])
def test_altered_file_fails_sha256(bundle_copy: Path, graph: str, file: str) -> None:
    with open(bundle_copy / file, "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_copy, graph=graph)
    assert "does not match its sha256" in _one_line(err)
    with pytest.raises(BundleError) as err:  # skipping the hash still fails cleanly
        load_bundle(bundle_copy, verify=False, graph=graph)
    assert "ONNX Runtime cannot load" in _one_line(err)


def test_altered_full_ort_graph_fails_sha256_or_at_the_first_left_padded_batch(
        bundle_copy: Path) -> None:
    """The full ONNX-Runtime graph loads only when a batch is left-padded (backends/ort.py)."""
    with open(bundle_copy / "model.ort.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_copy)
    assert "model.ort.onnx does not match its sha256" in _one_line(err)
    with load_bundle(bundle_copy, verify=False) as model:
        assert model.generate_ids([[5, 6, 7]], max_new_tokens=2, eos_token_ids=())[0].tokens
        with pytest.raises(BundleError) as err:  # skipping the hash still fails cleanly
            model.generate_ids([[5, 6, 7], [8]], max_new_tokens=2, eos_token_ids=())
    assert "ONNX Runtime cannot load" in _one_line(err) and "model.ort.onnx" in _one_line(err)


def test_standard_graph_runs_without_the_ort_graph(bundle_copy: Path) -> None:
    (bundle_copy / "model.ort.onnx").unlink()  # e.g. a TensorRT-only copy of the bundle
    with load_bundle(bundle_copy, graph="standard") as model:
        assert model.generate("hi", max_new_tokens=3).tokens


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError) as err:
        load_bundle(tmp_path / "nope")
    assert "does not exist: run `llama-export onnx" in _one_line(err)


def test_unknown_variant_and_backend(tiny_bundle: Path) -> None:
    with pytest.raises(BundleError, match="no 'int8' variant"):
        load_bundle(tiny_bundle, variant="int8")
    with pytest.raises(InputError, match="backend 'foo' is unknown: use one of ort, trt"):
        load_bundle(tiny_bundle, backend="foo")


def test_missing_provider_names_the_fix(tiny_bundle: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    with pytest.raises(HardwareError) as err:
        load_bundle(tiny_bundle, provider="cuda")
    assert "use --provider cpu, or install onnxruntime-gpu" in _one_line(err)


@pytest.fixture(scope="module")
def model(tiny_bundle: Path):  # type: ignore[no-untyped-def]
    with load_bundle(tiny_bundle) as m:
        yield m


def test_prompt_longer_than_context(model) -> None:  # type: ignore[no-untyped-def]
    ctx = model.manifest.max_context
    with pytest.raises(InputError) as err:
        model.generate("x" * (ctx + 5))
    assert f"prompt has {ctx + 5} tokens but the bundle's context is {ctx}" in _one_line(err)
    assert "re-export with a larger --max-seq-len" in str(err.value)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"top_p": 1.2}, "top_p must be in (0, 1], got 1.2"),
    ({"temperature": -1.0}, "temperature must be >= 0, got -1.0"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ({"stop": "x"}, "stop must be a list of strings"),
    ({"top_q": 0.5}, "unknown generation option(s) top_q: use any of"),
])
def test_invalid_generation_values(model, kwargs, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError) as err:
        model.generate("hello", **kwargs)
    assert message in _one_line(err)


def test_empty_prompt_and_wrong_types(model) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match="prompt is empty: pass some text"):
        model.generate("")
    with pytest.raises(InputError, match="use generate_batch"):
        model.generate(["a", "b"])
    with pytest.raises(InputError, match=r"batch size 9 is outside 1\.\.8"):
        model.generate_batch(["a"] * 9)


def test_cli_errors_are_one_line_with_exit_code_2(tiny_bundle: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["--prompt", "hi", "--top-p", "1.5"], "error: top_p must be in (0, 1], got 1.5: use 1.0"),
        (["--prompt", ""], "error: prompt is empty: pass some text"),
        ([], "error: pass exactly one of --prompt TEXT or --chat TEXT"),
    ]
    for args, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["generate", str(tiny_bundle), *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(expected), err
        assert err.count("\n") == 1


def test_cli_generate_streams_to_stdout(tiny_bundle: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "llama_export.runtime.cli", "generate",
                          str(tiny_bundle), "--chat", "hi", "--max-new-tokens", "8", "--seed", "1",
                          "--temperature", "0.7", "--top-k", "20"],
                         capture_output=True, text=True, check=True, timeout=120)
    with load_bundle(tiny_bundle) as m:
        expected = m.chat([{"role": "user", "content": "hi"}], max_new_tokens=8, seed=1,
                          temperature=0.7, top_k=20).text
    assert out.stdout == expected + "\n"


def test_cli_bench_json(tiny_bundle: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "llama_export.runtime.cli", "bench",
                          str(tiny_bundle), "--prompt-len", "8", "--gen-len", "8", "--runs", "1",
                          "--json"], capture_output=True, text=True, check=True, timeout=120)
    result = json.loads(out.stdout)["results"][0]
    assert result["name"] == "ours:ort"  # the graph ONNX Runtime ran
    assert result["decode_tok_s"] > 0
    assert 0 <= result["outside_share"] <= 1
    assert "[bench] ours:ort run 1/1" in out.stderr  # progress while it runs


def test_cli_bench_both_graphs_table(tiny_bundle: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "llama_export.runtime.cli", "bench",
                          str(tiny_bundle), "--prompt-len", "8", "--gen-len", "8", "--runs", "1",
                          "--graph", "both"], capture_output=True, text=True, check=True,
                         timeout=120)
    rows = [line.split()[0] for line in out.stdout.splitlines()[1:3]]
    assert rows == ["ours:ort", "ours:standard"]
    assert "ours:ort / ours:standard: prefill" in out.stdout
