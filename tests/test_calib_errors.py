"""Bad input to `calibrate` / `quantize`: one-line errors, and the bundle stays as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llama_export.runtime.cli import main
from llama_export.runtime.manifest import sha256_file


@pytest.fixture
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    return int(e.value.code or 0), err


@pytest.mark.parametrize(("content", "expected"), [
    ("", "is empty: give it some text"),
    ("   \n\n", "is empty: give it some text"),
    ("Too short.", "is too short"),
])
def test_empty_or_short_calibration_file(bundle: Path, tmp_path: Path, content: str,
                                         expected: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "calib.txt"
    data.write_text(content)
    before = _snapshot(bundle)
    code, err = _run(["calibrate", str(bundle), "--data", str(data)], capsys)
    assert code == 2
    assert err.startswith("error: calibration data")
    assert expected in err
    assert "\n" not in err
    assert _snapshot(bundle) == before


def test_jsonl_without_text_field(bundle: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "calib.jsonl"
    data.write_text('{"prompt": "hello"}\n')
    code, err = _run(["calibrate", str(bundle), "--data", str(data)], capsys)
    assert code == 2
    assert err == f'error: {data}:1 has no "text" string: write {{"text": "..."}} per line'


@pytest.mark.parametrize("alpha", ["1.5", "-0.1", "abc"])
def test_alpha_outside_unit_interval(bundle: Path, alpha: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(bundle)
    code, err = _run(["calibrate", str(bundle), "--smoothquant", alpha], capsys)
    assert code == 2
    assert err.startswith(f"error: --smoothquant {alpha} ")
    assert "[0, 1]" in err
    assert "\n" not in err
    assert _snapshot(bundle) == before


def test_unsupported_ort_block_size(bundle: Path) -> None:
    """The API refuses what the CLI's choice list refuses, in one line naming the choices."""
    from llama_export.calibration.pipeline import CalibrateOptions, calibrate
    from llama_export.runtime.errors import InputError

    before = _snapshot(bundle)
    with pytest.raises(InputError, match=r"^--ort-block-size 48 is not supported: use 32, 64, "
                                         r"128$"):
        calibrate(bundle, CalibrateOptions(ort_block=48))
    assert _snapshot(bundle) == before


@pytest.mark.parametrize("command", [["calibrate"], ["quantize", "--int4"]])
def test_bundle_without_fp32_variant(bundle: Path, command: list[str],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["variants"] = {"fp16": manifest["variants"].pop("fp32")}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    before = _snapshot(bundle)
    code, err = _run([*command, str(bundle)], capsys)
    assert code == 2
    assert err == (f"error: bundle {bundle} has no fp32 variant (has: fp16): quantization starts "
                   "from fp32; re-export with `llama-export onnx --dtype fp32`")
    assert _snapshot(bundle) == before


@pytest.mark.parametrize("command", [["calibrate"], ["quantize", "--int4"], ["quantize", "--fp16"]])
def test_hard_linked_weights_are_refused_up_front(bundle: Path, tmp_path: Path,
                                                  command: list[str],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A bundle copied with `cp -al` shares its data file by hard link; onnx's weight reader
    refuses such a file (a traceback from deep inside the weight loop, seen on the 1.5B)."""
    data = bundle / "model.onnx.data"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "model.onnx.data").hardlink_to(data)
    before = _snapshot(bundle)
    code, err = _run([*command, str(bundle)], capsys)
    assert code == 2
    assert err == (f"error: {data} has 2 hard links and onnx refuses to read weights from a "
                   "hard-linked file: copy the bundle with `cp -r` (not `cp -al` or `ln`) and "
                   "quantize the copy")
    assert _snapshot(bundle) == before


def test_failed_gate_writes_nothing(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(bundle)
    code, err = _run(["calibrate", str(bundle), "--samples", "2", "--seq-len", "32",
                      "--keep-float", "0", "--eval-samples", "1", "--max-ppl-increase", "-1"],
                     capsys)
    assert code == 2
    lines = err.splitlines()
    assert lines[-1].startswith("error: int8 variant fails the accuracy gate")
    assert "nothing was written. Try" in lines[-1]
    assert "--method percentile" in lines[-1]
    assert _snapshot(bundle) == before


@pytest.mark.parametrize(("block", "advice"), [
    (128, "Try --ort-block-size 32, or loosen the gate"), (32, "Loosen the gate")])
def test_failed_ort_graph_gate_suggests_only_what_changes_it(block: int, advice: str) -> None:
    """The ONNX-Runtime graph is weight-only: calibration settings cannot fix its accuracy,
    its block size can (until it is 32)."""
    from llama_export.calibration.accuracy import Accuracy, Gate, GenreAccuracy
    from llama_export.calibration.pipeline import CalibrateOptions, refuse_if_failing
    from llama_export.runtime.errors import CalibrationError

    acc = GenreAccuracy({"code": Accuracy(10.0, 10.1, 0.95, 0.01, 500),
                         "dialogue": Accuracy(10.0, 10.1, 0.85, 0.02, 500)})
    refuse_if_failing(acc, Gate(0.03, 0.80), CalibrateOptions(ort_block=block), ort_graph=True)
    with pytest.raises(CalibrationError) as err:
        refuse_if_failing(acc, Gate(0.03, 0.90), CalibrateOptions(ort_block=block),
                          ort_graph=True)
    msg = str(err.value)
    assert msg.startswith("int8 variant's ONNX-Runtime graph (int8 weight-only) fails the "
                          "accuracy gate (dialogue: top-1 agreement 85.0% is below 90.0%)")
    assert f"nothing was written. {advice}" in msg and "--smoothquant" not in msg
    assert "\n" not in msg


@pytest.mark.parametrize(("fmt", "hint"), [("symmetric", True), ("offset", False)])
def test_failed_int4_gate_writes_nothing_and_suggests_what_is_left(
        bundle: Path, capsys: pytest.CaptureFixture[str], fmt: str, hint: bool) -> None:
    """The refusal names what to try, never the format already in use."""
    before = _snapshot(bundle)
    code, err = _run(["quantize", str(bundle), "--int4", "--format", fmt, "--block-size", "64",
                      "--eval-samples", "1", "--max-ppl-increase", "-1"], capsys)
    assert code == 2
    last = err.splitlines()[-1]
    assert last.startswith("error: int4 variant fails the accuracy gate")
    assert ("--format offset" in last) == hint
    assert "--block-size 32" in last and "--int8" in last
    assert _snapshot(bundle) == before
