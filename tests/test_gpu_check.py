"""``make gpu-check`` on CPU: without a GPU it stops at once with one line; its plan, folder
layout and summary (fed by the real ``parity --json`` / ``bench --json`` output) are pure."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


gc = _load()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_make_gpu_check_stops_at_once_without_gpu() -> None:
    t0 = time.perf_counter()
    out = subprocess.run(["make", "-s", "gpu-check"], cwd=ROOT, capture_output=True, text=True,
                         check=False, timeout=60)
    assert time.perf_counter() - t0 < 10  # before any setup or export
    assert out.returncode == 2 and out.stdout == ""
    ours = [ln for ln in out.stderr.splitlines() if not re.match(r"make(\[\d+\])?:", ln)]
    assert ours == ["gpu-check: no NVIDIA GPU found (nvidia-smi sees none): run `make gpu-check` "
                    "on the machine with the GPU"]


def test_script_preflight(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gc.preflight(lambda: None, lambda: True) == gc.NO_GPU
    assert gc.preflight(object, lambda: False) == gc.NO_TRT
    assert gc.preflight(object, lambda: True) is None
    if shutil.which("nvidia-smi") is None:  # the real detection on this machine
        assert gc.main(["--out", str(tmp_path / "o")]) == 2
        assert capsys.readouterr().err == gc.NO_GPU + "\n"
        assert not (tmp_path / "o").exists()


def test_plan_and_layout(tmp_path: Path) -> None:
    layout = gc.Layout(tmp_path / "out")
    steps = gc.plan(layout, None, None)
    names = [s.name for s in steps]
    assert names[:8] == ["export-fp32", "export-fp16", "trt-fp16", "parity-trt-fp16", "trt-int8",
                         "parity-trt-int8", "trt-int4", "parity-trt-int4"]
    assert names[8] == "parity-ort-cuda" and len(names) == 9 + 3 * 4
    by = {s.name: s for s in steps}
    bundle = str(layout.bundle)
    assert by["trt-int8"].argv == ("trt", bundle, "--int8", "--max-batch", "1", "--max-prompt",
                                   "512", "--max-context", "1024", "--timing-cache",
                                   str(layout.out / "timing.cache"))
    assert by["parity-trt-int4"].argv == ("parity", bundle, "--backend", "trt", "--variant",
                                          "int4", "--json", "--report",
                                          str(layout.out / "parity-report-int4"))
    assert by["trt-fp16"].argv[1] == str(layout.fp16_bundle)
    assert by["bench-int4-ort-tensorrt"].argv == (
        "bench", bundle, "--variant", "int4", "--backend", "ort", "--provider", "tensorrt",
        "--prompt-len", "128", "--gen-len", "128", "--runs", "3", "--json")
    assert by["bench-fp16-trt"].needs == ("trt-fp16",)
    own = gc.plan(layout, tmp_path / "mine", "model.gguf", skip_bench=True)
    assert own[0].name == "export-fp16" and not [s for s in own if s.kind == "bench"]
    assert own[0].argv[:2] == ("onnx", "model.gguf")
    assert {s.argv[1] for s in own if s.kind == "engine"} == {str(tmp_path / "mine"),
                                                              str(layout.fp16_bundle)}
    assert layout.log(by["trt-int8"]) == layout.out / "logs" / "trt-int8.log"


def test_blocked_steps() -> None:
    steps = {s.name: s for s in gc.plan(gc.Layout(Path("o")), None, None)}
    done = [gc.Outcome(steps["export-fp32"], 0), gc.Outcome(steps["export-fp16"], 0),
            gc.Outcome(steps["trt-fp16"], 1)]
    assert gc.blocked(steps["parity-trt-fp16"], done)
    assert not gc.blocked(steps["trt-int8"], done)
    assert gc.blocked(steps["parity-ort-cuda"], [gc.Outcome(steps["trt-int8"], None)])


def test_summary_reads_the_real_json(tiny_bundle: Path, tmp_path: Path) -> None:
    exe = str(Path(sys.executable).with_name("llama-export"))
    layout = gc.Layout(tmp_path)
    layout.logs.mkdir()
    steps = {s.name: s for s in gc.plan(layout, tiny_bundle, None)}
    parity = gc.Step("parity-trt-fp32", ("parity", str(tiny_bundle), "--json"), "parity",
                     "fp32", json_out=True)
    bench = gc.Step("bench-fp32-ort-cpu", ("bench", str(tiny_bundle), "--prompt-len", "8",
                                           "--gen-len", "4", "--runs", "1", "--json"),
                    "bench", "fp32", json_out=True)
    outcomes = [gc.run_step(parity, layout, exe), gc.run_step(bench, layout, exe),
                gc.Outcome(steps["trt-int8"], 3, 1.5), gc.Outcome(steps["parity-trt-int8"], None)]
    assert outcomes[0].ok and outcomes[1].ok
    assert json.loads((tmp_path / "parity-trt-fp32.json").read_text())["passed"] is True
    assert (tmp_path / "logs" / "bench-fp32-ort-cpu.log").read_text().startswith(
        f"$ llama-export bench {tiny_bundle} ")
    text = gc.summary(outcomes, {"gpu": "test"})
    assert "| trt-int8 | FAILED (3) | 1.5 | logs/trt-int8.log |" in text
    assert "| parity-trt-int8 | skipped |" in text
    assert "| fp32 | standard | ort:cpu |" in text and "| 64/64 |" in text
    assert "| fp32 | ort-cpu |" in text
