"""``llama-export calibrate`` / ``quantize``: parse → one library call → print (hatch style)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from llama_export.runtime.errors import InputError


def _alpha(value: str) -> float | str | None:
    v = value.strip().lower()
    if v in ("off", "none", "no"):
        return None
    if v == "auto":
        return "auto"
    try:
        a = float(v)
    except ValueError:
        raise InputError(f"--smoothquant {value} is not a number: pass an alpha in [0, 1], "
                         "'auto' or 'off'") from None
    if not 0.0 <= a <= 1.0:
        raise InputError(f"--smoothquant {value} is outside [0, 1]: pass an alpha such as 0.5, "
                         "'auto' to search it, or 'off'")
    return a


def _print_report(name: str, entry: dict[str, Any]) -> None:
    acc = entry["accuracy"]
    q = entry.get("quantization")
    click.echo(f"{name}: {entry['file']} ({entry['scheme']})")
    click.echo(f"  perplexity  fp32 {acc['ppl_fp32']:.3f}  {name} {acc['ppl']:.3f}  "
               f"({100 * (acc['ppl_ratio'] - 1):+.2f}%)")
    click.echo(f"  top-1 agreement {100 * acc['top1_agreement']:.1f}%  mean KL "
               f"{acc['mean_kl']:.4f}  ({acc['tokens']} held-out tokens, {acc['data']})")
    for genre, a in acc.get("genres", {}).items():
        click.echo(f"    {genre:10s} perplexity {100 * (a['ppl_ratio'] - 1):+.2f}%  top-1 "
                   f"{100 * a['top1_agreement']:.1f}%  mean KL {a['mean_kl']:.4f}  "
                   f"({a['tokens']} tokens)")
    ort = entry.get("ort_graph") or {}
    if "accuracy" in ort:
        a = ort["accuracy"]
        form = f", {ort['form']}" if "form" in ort else ""
        if "kept_float_as" in ort:
            form += f"; float-kept projections and lm_head as int8 {ort['kept_float_as']}"
        click.echo(f"  ONNX-Runtime graph ({ort['file']}{form}): perplexity "
                   f"{100 * (a['ppl_ratio'] - 1):+.2f}%, top-1 agreement "
                   f"{100 * a['top1_agreement']:.1f}%, mean KL {a['mean_kl']:.4f}")
    if q is None:  # fp16: a conversion, nothing quantized
        return
    kept = "kept out of W8A8" if "excluded_weights" in q else "kept float"
    if q.get("excluded_weights", "float") != "float":
        kept += f" ({q['excluded_weights']})"
    click.echo(f"  quantized projections {q['quantized']}; {kept}: "
               f"{', '.join(q['excluded']) or 'none'}")
    if q.get("eight_bit"):
        names = sorted({label.rsplit(".", 1)[-1] for label in q["eight_bit"]})
        click.echo(f"  8-bit weights: {len(q['eight_bit'])} projections ({', '.join(names)})")


_eval_options = [
    click.option("--eval-data", type=click.Path(path_type=Path), default=None,
                 help="Held-out .txt/.jsonl for the accuracy report (default: built-in)."),
    click.option("--eval-samples", type=int, default=6, show_default=True),
    click.option("--min-top1", type=float, default=None,
                 help="Gate: minimum top-1 agreement with fp32 (0-1)."),
    click.option("--max-ppl-increase", type=float, default=None,
                 help="Gate: maximum relative perplexity increase (0.03 = +3%)."),
]


def _with_eval(f: Any) -> Any:
    for opt in reversed(_eval_options):
        f = opt(f)
    return f


def _eval(eval_data: Path | None, eval_samples: int, min_top1: float | None,
          max_ppl: float | None, default: tuple[float, float]) -> Any:
    from .accuracy import Gate
    from .pipeline import EvalOptions

    gate = Gate(default[0] if max_ppl is None else max_ppl,
                default[1] if min_top1 is None else min_top1)
    return EvalOptions(data=eval_data, samples=eval_samples, gate=gate)


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Calibration text (.txt or .jsonl); default: the built-in text.")
@click.option("--samples", type=int, default=16, show_default=True)
@click.option("--seq-len", type=int, default=128, show_default=True)
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy"]),
              default="minmax", show_default=True)
@click.option("--percentile", type=float, default=99.99, show_default=True)
@click.option("--smoothquant", "alpha", default="auto", show_default=True,
              help="SmoothQuant alpha in [0, 1], 'auto' (searched per group), or 'off'.")
@click.option("--keep-float", type=int, default=None,
              help="Projection groups kept float (most sensitive first); default: searched.")
@click.option("--excluded-weights", type=click.Choice(["float", "int8"]), default="float",
              show_default=True,
              help="Weights of the projections kept out of W8A8: float, or int8 weight-only "
                   "blocks (smaller and faster on ONNX Runtime; TensorRT documents INT8 only "
                   "with quantized activations).")
@click.option("--lm-head", "lm_head", type=click.Choice(["float", "int8"]), default="float",
              show_default=True,
              help="lm_head weights in the W8A8 graph: float, or int8 weight-only blocks "
                   "(activations stay float; see --excluded-weights). The ONNX-Runtime graph's "
                   "lm_head is int8.")
@click.option("--ort-block-size", "ort_block", type=click.Choice(["32", "64", "128"]),
              default="128", show_default=True,
              help="Block size of the ONNX-Runtime graph's int8 weights (smaller where the "
                   "input width needs it). 128: faster and smaller (1.5B on one test machine: "
                   "decode step -15 %, peak RSS -18 %); 32: closest to fp32 (activations are "
                   "quantized per block too).")
@click.option("--ort-int8", "ort_int8", type=click.Choice(["weight-only", "w8a8", "w8a8-blocks"]),
              default="weight-only", show_default=True,
              help="Form of the ONNX-Runtime graph: weight-only int8 blocks (most accurate), "
                   "or this calibration's W8A8 (static int8 activations) with the projections "
                   "it keeps float and lm_head quantized per row at run time (int8 blocks if "
                   "that fails the gate), all on one int8 GEMM that tiles tokens: on CPUs "
                   "without VNNI, prefill and speculative verification cost far less (1.5B on "
                   "one AVX2 machine: 9-token verification 2.4 instead of 4.0-4.3 steps, "
                   "decode as fast; SmolLM2 decodes up to 12 % slower), accuracy about that "
                   "of the W8A8 graph. w8a8-blocks: those projections as int8 weight-only "
                   "blocks instead (fewer nodes: SmolLM2 decodes 7 % faster than with w8a8, "
                   "the 1.5B verifies 9 tokens in 3.1 instead of 2.4 steps).")
@_with_eval
@click.option("--json", "as_json", is_flag=True, help="Print the manifest entry as JSON.")
def calibrate(bundle: Path, data: Path | None, samples: int, seq_len: int, method: str,
              percentile: float, alpha: str, keep_float: int | None, excluded_weights: str,
              lm_head: str, ort_block: str, ort_int8: str, eval_data: Path | None,
              eval_samples: int, min_top1: float | None, max_ppl_increase: float | None,
              as_json: bool) -> None:
    """Calibrate BUNDLE's fp32 graph and write the INT8 (SmoothQuant W8A8 Q/DQ) variant."""
    from .pipeline import CalibrateOptions
    from .pipeline import calibrate as run

    opts = CalibrateOptions(
        data=data, samples=samples, seq_len=seq_len, method=method,  # type: ignore[arg-type]
        smoothquant=_alpha(alpha), percentile=percentile, keep_float=keep_float,
        excluded_weights=excluded_weights, lm_head=lm_head, ort_block=int(ort_block),
        ort_int8=ort_int8,
        eval=_eval(eval_data, eval_samples, min_top1, max_ppl_increase, (0.03, 0.90)))
    entry = run(bundle, opts)
    click.echo(json.dumps(entry, indent=2) if as_json else "", nl=as_json)
    if not as_json:
        _print_report("int8", entry)


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--int4", "bits", flag_value=4, default=True, help="INT4 weights (default).")
@click.option("--int8", "bits", flag_value=8, help="INT8 weight-only (variant 'int8wo').")
@click.option("--fp16", "bits", flag_value=16,
              help="fp16 variant converted from the fp32 graphs, no torch (norms, softmax and "
                   "RoPE angles kept fp32); --block-size/--format/--lm-head do not apply.")
@click.option("--block-size", type=click.Choice(["32", "64", "128"]), default="32",
              show_default=True)
@click.option("--lm-head/--no-lm-head", default=True, show_default=True,
              help="Quantize lm_head to 8 bits (a quarter of its fp32 read per token).")
@click.option("--format", "fmt", type=click.Choice(["offset", "zero-point", "symmetric"]),
              default="offset", show_default=True,
              help="INT4 form: 'offset' (int4 + float offset per block; TensorRT-buildable, "
                   "exact for GGUF Q4_1 weights), 'zero-point' (uint4 + zero-point; ONNX "
                   "Runtime only), 'symmetric' (int4 only: smallest, least accurate).")
@click.option("--lm-head-bits", type=click.Choice(["8", "4"]), default="8", show_default=True,
              help="INT4: lm_head width (8 keeps a GGUF Q8_0 embedding exact; 4 is smaller).")
@click.option("--mixed/--no-mixed", default=False, show_default=True,
              help="INT4: keep v_proj/down_proj at 8 bits (llama.cpp Q4_K_M's reasoning).")
@click.option("--follow-source", is_flag=True,
              help="INT4 from a GGUF bundle: projections whose GGUF type had more than 4 bits "
                   "(Q5_0, Q6_K, Q8_0, ...) get 8-bit blocks; Q4_0/Q4_1/Q4_K ones stay int4 "
                   "(exact in the offset format).")
@_with_eval
def quantize(bundle: Path, bits: int, block_size: str, lm_head: bool, fmt: str,
             lm_head_bits: str, mixed: bool, follow_source: bool, eval_data: Path | None,
             eval_samples: int, min_top1: float | None, max_ppl_increase: float | None) -> None:
    """Write a weight-only INT4 / INT8 variant (or fp16) of BUNDLE (no calibration data)."""
    from .pipeline import QuantizeOptions
    from .pipeline import quantize as run

    if bits == 16:
        from .fp16 import FP16_GATE, make_fp16

        g = (FP16_GATE.max_ppl_increase, FP16_GATE.min_top1)
        _print_report("fp16", make_fp16(bundle, _eval(eval_data, eval_samples, min_top1,
                                                      max_ppl_increase, g)))
        return

    opts = QuantizeOptions(bits=bits, block_size=int(block_size), lm_head=lm_head, mixed=mixed,
                           follow_source=follow_source, fmt=fmt, lm_head_bits=int(lm_head_bits),
                           eval=_eval(eval_data, eval_samples, min_top1, max_ppl_increase,
                                      (0.08, 0.0)))
    entry = run(bundle, opts)
    _print_report("int4" if bits == 4 else "int8wo", entry)
