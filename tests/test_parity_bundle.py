"""``llama-export parity`` on tiny bundles over ONNX Runtime: every variant passes against the
references saved at export, a damaged variant fails on its own row, a tampered reference file
fails its sha256 check, the report has its plots, and the command never imports torch.

Tiny random models have near-uniform next-token distributions (top-2 logits often within
0.01), so quantization flips their argmax far more often than on a trained model: their int8 /
int4 rows are judged with a lower top-1 limit (``TINY``), stated here; SmolLM2 runs with the
defaults in ``test_parity_smollm2.py``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from llama_export.runtime.cli import main
from llama_export.runtime.errors import InputError
from llama_export.runtime.manifest import Manifest
from llama_export.runtime.parity.references import FILE, load_references
from llama_export.runtime.parity.run import ParityOptions, run_parity
from llama_export.runtime.parity.tolerances import parse_overrides

TINY = ("int8.top1=0.8", "int4.top1=0.75")


@pytest.fixture(scope="module")
def tiny_variants(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle plus its int8 (W8A8 Q/DQ) and int4 variants (fast calibration)."""
    from llama_export.calibration.accuracy import Gate
    from llama_export.calibration.pipeline import (
        CalibrateOptions,
        EvalOptions,
        QuantizeOptions,
        calibrate,
        quantize,
    )

    out = tmp_path_factory.mktemp("parity") / "bundle"
    shutil.copytree(tiny_bundle, out)
    loose = EvalOptions(samples=2, seq_len=32, gate=Gate(max_ppl_increase=1.0, min_top1=0.0))
    calibrate(out, CalibrateOptions(samples=4, seq_len=32, decode_steps=4, keep_float=0,
                                    eval=loose))
    quantize(out, QuantizeOptions(bits=4, block_size=32, eval=loose))
    return out


def _cli(*args: str) -> int:
    try:
        main(["parity", *args])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_every_tiny_variant_passes(tiny_variants: Path, tiny_fp16_bundle: Path) -> None:
    opts = ParityOptions(overrides=parse_overrides(TINY))
    rows = run_parity(tiny_variants, opts).rows + run_parity(tiny_fp16_bundle, opts).rows
    assert [(r.label.variant, r.label.graph) for r in rows] == [
        (v, g) for v in ("fp32", "int8", "int4", "fp16") for g in ("standard", "ort")]
    for r in rows:
        assert r.passed, (r.label, r.failures)
        assert r.positions == sum(it.positions for it in load_references(
            tiny_fp16_bundle, Manifest.load(tiny_fp16_bundle)).items)
    fp32 = [r for r in rows if r.label.variant == "fp32"]
    assert all(r.max_abs < 1e-4 and r.top1 == 1.0 for r in fp32)
    assert all(r.greedy == r.new_tokens for r in fp32)


def _damage_one_weight(bundle: Path, variant: str) -> None:
    """Scale one projection's dequantization scales by 3 (a conversion bug, not a corrupted
    copy: the manifest's sha256 is updated to match)."""
    m = Manifest.load(bundle)
    rel = m.variant(variant)["file"]
    model = onnx.load(str(bundle / rel))
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear"
              and "layers.1" in n.input[0] and "mlp" in n.input[0])
    init = next(i for i in model.graph.initializer if i.name == dq.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 3, init.name))
    onnx.save(model, str(bundle / rel))
    m.record_file(bundle, rel)
    m.save(bundle)


def test_damaged_variant_fails_its_row(tiny_variants: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_variants, bundle)
    _damage_one_weight(bundle, "int4")
    code = _cli(str(bundle), *[f"--tolerance={t}" for t in TINY])
    out, err = capsys.readouterr()
    assert code == 2
    verdicts = {tuple(line.split()[:2]): line.split()[-1] for line in out.splitlines()[1:7]}
    assert verdicts == {(v, g): "FAIL" if (v, g) == ("int4", "standard") else "pass"
                        for v in ("fp32", "int8", "int4") for g in ("standard", "ort")}
    assert "FAIL int4 (standard, ort:cpu): " in out
    assert err.strip().splitlines()[-1].startswith("error: parity failed for int4 (standard): ")


def test_tampered_references_fail_sha256(tiny_bundle: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    with np.load(bundle / FILE) as npz:
        arrays = dict(npz)
    arrays["topk_values.0"] = arrays["topk_values.0"] + 0.5  # "better" references
    np.savez_compressed(bundle / FILE, **arrays)
    assert _cli(str(bundle)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {bundle / FILE} does not match its sha256 in the manifest (altered "
                   "or truncated copy): copy the bundle again or re-export it")


def test_bundle_without_references_names_the_reexport(tiny_bundle: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "old"
    shutil.copytree(tiny_bundle, bundle)
    m = Manifest.load(bundle)
    del m.data["references"]
    m.save(bundle)
    assert _cli(str(bundle)) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {bundle} has no saved PyTorch references (exported before llama-export saved "
        f"them, or with --no-references): re-export it with `llama-export onnx [MODEL] -o "
        f"{bundle} --force`, then rebuild its variants")


def test_report_folder_has_plots(tiny_bundle: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "report"
    assert _cli(str(tiny_bundle), "--report", str(report), "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] and len(data["rows"]) == 2
    for name in ("error_by_position.png", "top1_ppl.png", "first_divergence.png"):
        blob = (report / name).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 10_000, name
        assert f"![{name}]({name})" in (report / "report.md").read_text()
    text = (report / "report.md").read_text()
    assert "| fp32 | standard | ort:cpu |" in text and "| fp32 | ort | ort:cpu |" in text
    assert not [p for p in report.iterdir() if p.name.startswith(".")]  # no temp files left


def test_report_without_matplotlib_is_one_line(tiny_bundle: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    assert _cli(str(tiny_bundle), "--report", str(tmp_path / "r")) == 2
    out, err = capsys.readouterr()
    assert out == "" and not (tmp_path / "r").exists()  # refused before any work
    assert err == ("error: `llama-export parity --report` (module 'matplotlib' not found) needs "
                   "the 'report' extra: pip install 'llama-export[report]'\n")


def test_parity_never_imports_torch(tiny_bundle: Path) -> None:
    code = ("import sys\n"
            "from llama_export.runtime.cli import main\n"
            f"try:\n    main(['parity', {str(tiny_bundle)!r}, '--json'])\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "heavy = [m for m in ('torch', 'transformers', 'onnx', 'llama_export.exporter',\n"
            "                     'llama_export.calibration') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd="/", capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["passed"] is True


def test_reference_prompts_file(tiny_source: Path, tmp_path: Path) -> None:
    from llama_export.exporter.export import ExportOptions, export_bundle

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"plain text prompt"\n\n'
                       '{"messages": [{"role": "user", "content": "Hi!"}]}\n')
    bundle = export_bundle(tiny_source, tmp_path / "b", ExportOptions(
        max_seq_len=128, verify=False, ort_graph=False, reference_prompts=str(prompts)),
        progress=lambda _: None)
    refs = load_references(bundle, Manifest.load(bundle))
    assert [(it.name, it.kind) for it in refs.items][-2:] == [("user-1", "prompt"),
                                                              ("user-2", "chat")]
    assert refs.items[-1].text == "<|user|>Hi!</s><|assistant|>"
    assert run_parity(bundle).passed
    prompts.write_text('{"prompt": 3}\n')
    with pytest.raises(InputError, match=r'prompts\.jsonl:1: write a string, \{"prompt"'):
        export_bundle(tiny_source, tmp_path / "c", ExportOptions(reference_prompts=str(prompts)))
    assert not (tmp_path / "c").exists()


def test_saved_continuation_is_transformers_generate(tiny_bundle: Path, tiny_source: Path) -> None:
    """The stored greedy continuation is what transformers' own generate() gives for the same
    prompt (loaded independently from the folder), and the stored top-k is its logits."""
    import torch

    from llama_export.exporter.reference import load_reference

    ref = load_reference(tiny_source)
    item = load_references(tiny_bundle, Manifest.load(tiny_bundle)).items[0]
    prompt = torch.tensor([item.ids[:item.prompt_tokens].tolist()])
    ref.generation_config.eos_token_id = None  # the continuation runs past EOS by design
    with torch.inference_mode():
        gen = ref.generate(prompt, do_sample=False, max_new_tokens=item.new_tokens,
                           pad_token_id=0, attention_mask=torch.ones_like(prompt))
        logits = ref(input_ids=torch.tensor([item.ids[:-1].tolist()])).logits[0].numpy()
    assert gen[0].tolist() == item.ids.tolist()
    got = np.take_along_axis(logits, item.topk_ids, axis=1)
    np.testing.assert_allclose(got, item.topk_values, atol=1e-5)
    assert (np.sort(logits, axis=1)[:, -1] - item.topk_values[:, 0]).max() < 1e-5  # truly top
