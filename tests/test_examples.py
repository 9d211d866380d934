"""The examples run as tests (Polygraphy's test_examples.py): on the tiny bundle, torch-free."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from llama_export.runtime import load_bundle

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# Runs the example as __main__ and then checks torch stayed out of the process.
RUNNER = ("import runpy, sys\n"
          "script = sys.argv.pop(1)\n"
          "sys.argv[0] = script\n"
          "try:\n    runpy.run_path(script, run_name='__main__')\n"
          "except SystemExit as e:\n    assert not e.code, e.code\n"
          "assert 'torch' not in sys.modules, 'example imported torch'\n")


def _run(script: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", RUNNER, str(EXAMPLES / script), *args],
                          input=stdin, capture_output=True, text=True, check=True, timeout=180)


def test_embed_in_app_streams_each_answer(tiny_bundle: Path) -> None:
    out = _run("embed_in_app.py", str(tiny_bundle), "first?", "second?", "--max-new-tokens", "6")
    with load_bundle(tiny_bundle) as m:
        answers = [m.chat([{"role": "user", "content": q}], max_new_tokens=6).text
                   for q in ("first?", "second?")]
    assert out.stdout == "".join(f"Q: {q}\nA: {a}\n" for q, a in
                                 zip(("first?", "second?"), answers, strict=True))
    assert out.stderr.count(" s]") == 2


def test_chat_keeps_history_and_streams(tiny_bundle: Path) -> None:
    out = _run("chat.py", str(tiny_bundle), "--max-new-tokens", "5", "--system", "be brief",
               stdin="hello\n/reset\nagain\n/exit\n")
    replies = [line for line in out.stdout.split("assistant> ") if line]
    assert len(replies) == 2
    with load_bundle(tiny_bundle) as m:
        first = m.chat([{"role": "system", "content": "be brief"},
                        {"role": "user", "content": "hello"}], max_new_tokens=5).text
    assert replies[0] == first + "\n"
