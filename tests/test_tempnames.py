"""Temp names carry their writer's PID; a later run removes those of dead writers only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama_export.runtime.tempnames import (
    LEGACY_MIN_AGE_S,
    leftovers,
    sweep_leftovers,
    temp_dir,
    temp_file,
)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _fake(folder: Path, name: str, size: int = 1000) -> Path:
    d = folder / name
    d.mkdir()
    (d / "model.onnx.data").write_bytes(b"\0" * size)
    return d


def test_only_dead_writers_temp_names_are_swept(tmp_path: Path) -> None:
    dead = _dead_pid()
    gone = _fake(tmp_path, f".int8.{dead}.abcd1234.tmp", 5000)
    gone_file = tmp_path / f".calibrate.{dead}.x1y2z3.tmp"
    gone_file.write_bytes(b"graph")
    mine = temp_dir(tmp_path, "int4")           # this process: alive
    mine_file = temp_file(tmp_path, "calibrate")
    assert f".int4.{os.getpid()}." in mine.name and mine_file.name.endswith(".tmp")
    keep = [tmp_path / "model.onnx", tmp_path / ".manifest.json.k2j3h4g5.tmp"]
    for p in keep:
        p.write_text("x")
    msgs: list[str] = []
    freed = sweep_leftovers(tmp_path, msgs.append)
    assert not gone.exists() and not gone_file.exists()
    assert mine.is_dir() and mine_file.is_file() and all(p.exists() for p in keep)
    assert freed == 5005
    assert len(msgs) == 2 and any(m.startswith(f"removed .int8.{dead}.") for m in msgs)


def test_label_limits_the_sweep_to_one_output(tmp_path: Path) -> None:
    dead = _dead_pid()
    other = _fake(tmp_path, f".other.{dead}.abcd1234.tmp")
    ours = _fake(tmp_path, f".bundle.{dead}.abcd1234.tmp")
    # an export killed between its two renames leaves the previous bundle under this name
    previous = _fake(tmp_path, f".bundle.old-{dead}")
    assert leftovers(tmp_path, label="bundle") == [ours]
    sweep_leftovers(tmp_path, lambda _: None, label="bundle")
    assert other.exists() and not ours.exists() and previous.exists()


def test_legacy_names_only_when_old(tmp_path: Path) -> None:
    """Names without a PID (written before it was added) cannot be checked: removed only after
    LEGACY_MIN_AGE_S, when no run can still be writing them."""
    young = _fake(tmp_path, ".int8.abcd1234.tmp")
    old = _fake(tmp_path, ".int4.wxyz5678.tmp")
    old_graph = tmp_path / ".calibrate-q1w2e3r4.onnx"
    old_graph.write_bytes(b"g")
    past = time.time() - LEGACY_MIN_AGE_S - 60
    for p in (old, old_graph):
        os.utime(p, (past, past))
    assert leftovers(tmp_path) == sorted([old, old_graph])
    assert leftovers(tmp_path, label="int4") == []  # a labelled sweep touches PID names only
    assert young.exists()


@pytest.mark.parametrize("step", ["quantize", "export"])
def test_runs_sweep_what_a_killed_run_left(step: str, tiny_bundle: Path, tiny_source: Path,
                                           tmp_path: Path) -> None:
    """A quantize in a bundle (or an export to the same output) removes the temp folder of a
    SIGKILLed earlier run; the result is complete."""
    from llama_export.calibration.accuracy import Gate
    from llama_export.calibration.pipeline import EvalOptions, QuantizeOptions, quantize
    from llama_export.exporter.export import ExportOptions, export_bundle
    from llama_export.runtime.manifest import Manifest

    dead = _dead_pid()
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    if step == "quantize":
        left = _fake(bundle, f".int4.{dead}.abcd1234.tmp")
        quantize(bundle, QuantizeOptions(bits=4, block_size=32, eval=EvalOptions(
            samples=2, seq_len=32, gate=Gate(max_ppl_increase=1.0, min_top1=0.0))))
        assert "int4" in Manifest.load(bundle).variants
    else:
        left = _fake(tmp_path, f".bundle.{dead}.abcd1234.tmp")
        export_bundle(tiny_source, bundle, ExportOptions(max_seq_len=64, force=True,
                                                         verify=False), progress=lambda _: None)
    assert not left.exists()
    assert not [p for p in (bundle.iterdir()) if p.name.endswith(".tmp")]
    Manifest.load(bundle).verify_files(bundle)
