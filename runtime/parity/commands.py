"""``llama-export parity`` (parse → :func:`.run.run_parity` → table / JSON / report)."""

from __future__ import annotations

import json
import sys

import click

from llama_export.runtime.errors import ParityError


def _stderr(msg: str) -> None:
    print(f"[parity] {msg}", file=sys.stderr, flush=True)


@click.command("parity")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=str))
@click.option("--variant", default="all", show_default=True,
              help="all, or one variant (fp32, fp16, int8, int4, ...).")
@click.option("--graph", type=click.Choice(["all", "standard", "ort"]), default="all",
              show_default=True, help="ONNX Runtime rows: which graphs of each variant.")
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True,
              help="ort: ONNX Runtime (--provider picks its device); trt: the bundle's TensorRT "
                   "engines for this GPU.")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu",
              show_default=True)
@click.option("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores).")
@click.option("--tolerance", "tolerances", multiple=True, metavar="[PRECISION.]KEY=VALUE",
              help="Override a limit (repeatable): max_abs, mean_abs, top1, kl, ppl, greedy, "
                   "tie; VALUE 'off' stops gating it. E.g. int8.top1=0.95, greedy=off.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=str),
              help="Write report.md and PNG plots into this folder (needs the [report] extra).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
def parity(bundle: str, variant: str, graph: str, backend: str, provider: str,
           threads: int | None, tolerances: tuple[str, ...], report_dir: str | None,
           as_json: bool) -> None:
    """Compare BUNDLE's variants with the PyTorch original's saved answers (no torch needed).

    Exits non-zero when any row fails its precision's tolerances."""
    from .run import ParityOptions, format_table, run_parity
    from .tolerances import parse_overrides

    opts = ParityOptions(variant=variant, graph=graph, backend=backend, provider=provider,
                         threads=threads, overrides=parse_overrides(tolerances))
    if report_dir is not None:
        from .report import require_matplotlib
        require_matplotlib()  # before minutes of work, not after
    result = run_parity(bundle, opts, progress=_stderr)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else format_table(result))
    if report_dir is not None:
        from .report import write_report
        _stderr(f"report written to {write_report(report_dir, result)}")
    if not result.passed:
        failed = [f"{r.label.variant} ({r.label.graph})" for r in result.rows if not r.passed]
        raise ParityError(f"parity failed for {', '.join(failed)}: see the table above; a "
                          "variant that drifts this far does not answer like the original "
                          "(re-make it, or loosen a limit with --tolerance if intended)")
