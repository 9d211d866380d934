"""`llama-export serve` as a process on the tiny bundle: the example client and
`llama-export bench-serve` against it, and the CLI's one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from llama_export.runtime import load_bundle

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CLI = Path(sys.executable).with_name("llama-export")


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, start_server: Any) -> Any:
    # --speculative: a request alone drafts by prompt lookup; the answers below stay greedy's
    return start_server(tiny_bundle, "--slots", "4", "--speculative", "lookup")


def test_example_client(server: Any, tiny_bundle: Path) -> None:
    out = subprocess.run([sys.executable, str(EXAMPLES / "serve_client.py"), f"{server.url}/v1",
                          "hello?", "--also", "a", "b", "--max-tokens", "6"],
                         capture_output=True, text=True, check=True, timeout=120)
    with load_bundle(tiny_bundle) as m:
        want = [m.chat([{"role": "user", "content": q}], max_new_tokens=6).text
                for q in ("hello?", "a", "b")]
    lines = out.stdout.split("\n")
    assert lines[:2] == ["Q: hello?", f"A: {want[0]}"]  # greedy: the runtime's answer
    assert f"Q: a\nA: {want[1]}\nQ: b\nA: {want[2]}\n[2 concurrent answers in" in out.stdout
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert "llama_export_draft_tokens_total" in metrics
    assert "llama_export_draft_accepted_tokens_total" in metrics


def test_bench_serve_reports_each_level(server: Any) -> None:
    out = subprocess.run([str(CLI), "bench-serve", server.url, "--concurrency", "1,3",
                          "--prompt-len", "12", "--gen-len", "5", "--requests", "3", "--json",
                          "--pid", str(server.proc.pid)],
                         capture_output=True, text=True, check=True, timeout=300)
    levels = json.loads(out.stdout)["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 3]
    for lv in levels:
        assert lv["errors"] == 0 and lv["requests"] == 3 and lv["aggregate_tok_s"] > 0
        assert 0 < lv["ttft_p50"] <= lv["ttft_p95"] and lv["server_peak_rss_mb"] > 0
    table = subprocess.run([str(CLI), "bench-serve", server.url, "--concurrency", "2",
                            "--prompt-len", "12", "--gen-len", "3", "--requests", "2"],
                           capture_output=True, text=True, check=True, timeout=300).stdout
    assert table.splitlines()[0].split()[:4] == ["conc", "reqs", "errors", "agg"]


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    r = subprocess.run([str(CLI), "serve", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: bundle {tmp_path / 'nope'} does not exist: "
                                             f"run `llama-export onnx -o {tmp_path / 'nope'}`"]
    r = subprocess.run([str(CLI), "bench-serve", "http://127.0.0.1:9", "--concurrency", "1,x"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "is not a list of integers" in r.stderr
