"""CLI commands of the exporter: ``llama-export onnx`` and ``llama-export verify``.

Bodies stay short: parse → one library call → print. Heavy imports happen inside.
"""

from __future__ import annotations

import click


@click.command("onnx")
@click.argument("model", required=False, type=click.Path(path_type=str))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str),
              help="Bundle folder to write.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Weights/activations precision (fp16 keeps RMSNorm and softmax in fp32).")
@click.option("--max-seq-len", type=int, default=None,
              help="Largest past+seq the bundle declares (default: model max, capped at 4096).")
@click.option("--max-batch", type=int, default=8, show_default=True,
              help="Largest batch the bundle declares (TensorRT profiles, runtime checks).")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset.")
@click.option("--logits", default="all", show_default=True, metavar="all|last|tail:N",
              help="Logits for every position, the last one only (faster prefill), or the last "
                   "N (tail:16: a cheap prefill that still verifies up to 15 speculative drafts "
                   "in one forward).")
@click.option("--force", is_flag=True, help="Overwrite an existing bundle.")
@click.option("--no-verify", is_flag=True, help="Skip the parity check against transformers.")
@click.option("--no-ort-graph", is_flag=True,
              help="Skip the ONNX-Runtime-optimized graph (contrib ops; the runtime's default on "
                   "CPU): only the standard graph, e.g. for a TensorRT-only bundle.")
@click.option("--reference-prompts", type=click.Path(path_type=str), default=None,
              help="Extra prompts for the saved PyTorch references (.txt: one per line; .jsonl: "
                   "a string, {\"prompt\": ...} or {\"messages\": [...]} per line).")
@click.option("--no-references", is_flag=True,
              help="Do not save the PyTorch original's answers (references.npz) that "
                   "`llama-export parity` compares against on the target.")
def onnx(model: str | None, out: str, dtype: str, max_seq_len: int | None, max_batch: int,
         opset: int, logits: str, force: bool, no_verify: bool, no_ort_graph: bool,
         reference_prompts: str | None, no_references: bool) -> None:
    """Export MODEL (HF folder, .gguf file, or omitted: built-in SmolLM2-135M-Instruct)."""
    from .export import ExportOptions, export_bundle

    opts = ExportOptions(dtype=dtype, max_seq_len=max_seq_len, max_batch=max_batch,  # type: ignore[arg-type]
                         opset=opset, logits=logits, force=force, verify=not no_verify,  # type: ignore[arg-type]
                         ort_graph=not no_ort_graph, references=not no_references,
                         reference_prompts=reference_prompts)
    path = export_bundle(model, out, opts)
    click.echo(str(path))


@click.command("verify")
@click.argument("bundle", type=click.Path(path_type=str))
@click.option("--model", "model", default=None, type=click.Path(path_type=str),
              help="Source the bundle came from (default: recorded in the manifest).")
@click.option("--variant", default=None, help="Variant to check (default: fp32, else fp16).")
@click.option("--steps", default=6, show_default=True, help="Decode steps after the prefill.")
@click.option("--graph", type=click.Choice(["all", "standard", "ort"]), default="all",
              show_default=True, help="Which of the variant's graphs to check.")
def verify(bundle: str, model: str | None, variant: str | None, steps: int, graph: str) -> None:
    """Compare a bundle variant with the PyTorch original (transformers LlamaForCausalLM)."""
    from llama_export.runtime.manifest import Manifest

    from .verify import verify_bundle

    manifest = Manifest.load(bundle)
    if model is None:
        origin = str(manifest.data.get("provenance", {}).get("source", ""))
        model = None if origin.startswith("builtin:") else origin
    from .reference import load_reference

    name = variant or manifest.default_variant()
    graphs = manifest.graphs(name) if graph == "all" else [graph]
    reference = load_reference(model)
    runs = [(g, False) for g in graphs]
    if "ort" in graphs and manifest.graph(name, "ort").get("unpadded_file"):
        runs.append(("ort", True))  # its unpadded form (calibration/unpadded.py)
    for g, unpadded in runs:
        report = verify_bundle(bundle, model, manifest=manifest, variant=name, steps=steps,
                               reference=reference, graph=g, unpadded=unpadded,
                               progress=lambda m: click.echo(m, err=True))
        click.echo(report.summary())
