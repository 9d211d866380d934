"""head_dim not a multiple of 16 (issue #10): ONNX Runtime's GroupQueryAttention refuses it.

The export skips the ONNX-Runtime graph with a console line and a manifest note; the standard
graph is still written and verified. Whatever fails inside verification is one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_export.exporter.testing import make_tiny_hf_model
from llama_export.runtime.cli import main
from llama_export.runtime.errors import ParityError


@pytest.fixture(scope="module")
def head_dim_8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_hf_model(tmp_path_factory.mktemp("hd8") / "m", hidden_size=32)  # 4 heads


def test_ort_graph_skipped_with_a_note(head_dim_8: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b"
    main(["onnx", str(head_dim_8), "-o", str(out), "--max-seq-len", "64"])
    reason = ("head_dim 8 is not a multiple of 16, which ONNX Runtime's GroupQueryAttention "
              "requires")
    assert f"skipping the ONNX-Runtime graph: {reason}" in capsys.readouterr().err
    variant = json.loads((out / "manifest.json").read_text())["variants"]["fp32"]
    assert variant["ort_graph_skipped"] == reason
    assert "ort_graph" not in variant and not (out / "model.ort.onnx").exists()
    assert variant["parity"]["passed"] and variant["parity"]["max_abs_err"] < 1e-4
    from llama_export.runtime import load_bundle

    with load_bundle(out) as model:  # the runtime falls back to the standard graph
        assert len(model.generate("ab", max_new_tokens=3, eos_token_ids=()).tokens) == 3


def test_verification_failure_is_one_line(head_dim_8: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Forcing the ORT graph for head_dim 8 (what the export did before it skipped it): ONNX
    Runtime's own exception becomes one ParityError line, and no bundle is left behind."""
    from llama_export.exporter import export

    monkeypatch.setattr(export, "ort_graph_unsupported", lambda _: None)
    with pytest.raises(ParityError) as e:
        export.export_bundle(head_dim_8, tmp_path / "b", export.ExportOptions(max_seq_len=64),
                             progress=lambda _: None)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("ONNX Runtime cannot run the fp32 variant's ort graph (")
    assert "head_size shall be a multiple of 16" in msg
    assert msg.endswith("re-export with --no-ort-graph (the standard graph does not need it)")
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))
