"""``--report DIR``: report.md with the parity table and three PNG plots (matplotlib, optional).

    error_by_position.png   max |Δlogit| over the original's top-k at every position, one panel
                            per reference item, one line per row (dashed: continuation starts)
    top1_ppl.png            top-1 agreement and held-out perplexity by row (line: the original)
    first_divergence.png    greedy tokens reproduced before the first divergence, per prompt

matplotlib is used through its object API (Figure + the Agg canvas): no pyplot, no global
backend switch in the caller's process.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from llama_export.runtime.errors import MissingDependencyError

from .compare import Row
from .run import ParityResult, format_table
from .tolerances import KEYS

PLOTS = ("error_by_position.png", "top1_ppl.png", "first_divergence.png")


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependencyError("`llama-export parity --report` (module 'matplotlib' not "
                                     "found)", "report") from None


def write_report(folder: str | os.PathLike[str], result: ParityResult) -> Path:
    """Write report.md and the plots into ``folder`` (created); returns report.md's path."""
    require_matplotlib()
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, draw in zip(PLOTS, (_error_by_position, _top1_ppl, _first_divergence),
                          strict=True):
        fig = draw(result)
        _atomic(out / name, lambda p, f=fig: f.savefig(p, format="png", dpi=110))
    path = out / "report.md"
    text = markdown(result)
    _atomic(path, lambda p: Path(p).write_text(text, encoding="utf-8"))
    return path


def _atomic(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _name(r: Row) -> str:
    return f"{r.label.variant}/{r.label.graph}" + (
        "" if r.label.backend == "ort:cpu" else f" ({r.label.backend})")


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _error_by_position(result: ParityResult) -> Any:
    items = result.references.items
    cols = 2 if len(items) > 1 else 1
    rows = -(-len(items) // cols)
    fig = _figure(6.0 * cols, 2.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (i, item) in zip(axes, enumerate(items), strict=False):
        for r in result.rows:
            err = np.maximum(r.scores[i].error_by_position, 1e-8)  # log scale: no zeros
            ax.plot(np.arange(len(err)), err, lw=0.9, label=_name(r))
        if item.kind != "heldout":
            ax.axvline(item.prompt_tokens - 1, color="grey", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{item.name} ({item.kind}, {item.positions} positions)", fontsize=9)
        ax.set_xlabel("position")
        ax.set_ylabel("max |Δlogit| (top-k)")
    for ax in axes[len(items):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Logit error along each reference sequence (dashed: greedy continuation starts)",
                 fontsize=10)
    return fig


def _top1_ppl(result: ParityResult) -> Any:
    names = [_name(r) for r in result.rows]
    fig = _figure(11.0, 0.5 * len(names) + 1.6)
    ax1, ax2 = fig.subplots(1, 2)
    y = np.arange(len(names))
    ax1.barh(y, [100 * r.top1 for r in result.rows],
             color=["tab:green" if r.passed else "tab:red" for r in result.rows])
    ax1.set_yticks(y, names, fontsize=8)
    ax1.set_xlim(min(80.0, min(100 * r.top1 for r in result.rows) - 2), 100.5)
    ax1.set_xlabel("top-1 agreement with the original (%)")
    ax1.invert_yaxis()
    inc = [100 * r.ppl_increase if r.ppl_increase is not None else np.nan for r in result.rows]
    ax2.barh(y, inc, color="tab:blue")
    for yi, r in zip(y, result.rows, strict=True):
        if r.ppl is not None:
            ax2.annotate(f" {r.ppl:.3f}", (max(inc[yi], 0.0), yi), va="center", fontsize=7)
    ax2.axvline(0, color="black", lw=0.8)
    ref = next((r.ppl_ref for r in result.rows if r.ppl_ref is not None), None)
    ax2.set_yticks(y, [])
    ax2.invert_yaxis()
    ax2.set_xlabel("held-out perplexity vs the original (%)"
                   + (f", original {ref:.3f}" if ref is not None else ""))
    fig.suptitle("Top-1 agreement (red: row failed) and perplexity change by variant",
                 fontsize=10)
    return fig


def _first_divergence(result: ParityResult) -> Any:
    prompts = [it for it in result.references.items if it.kind != "heldout"]
    fig = _figure(max(7.5, 1.6 * len(prompts) + 4.5), 3.4)
    ax = fig.subplots()
    width = 0.8 / max(len(result.rows), 1)
    x = np.arange(len(prompts))
    for j, r in enumerate(result.rows):
        ax.bar(x + j * width - 0.4 + width / 2, [r.greedy.get(p.name, 0) for p in prompts],
               width, label=_name(r))
    for i, p in enumerate(prompts):
        ax.hlines(p.new_tokens, i - 0.45, i + 0.45, color="black", ls="--", lw=0.8)
    ax.set_xticks(x, [p.name for p in prompts])
    ax.set_ylabel("tokens before first divergence")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside, not on bars
    ax.set_title("Greedy continuation reproduced (dashed: the original's full continuation)",
                 fontsize=10)
    return fig


def markdown(result: ParityResult) -> str:
    refs = result.references
    lines = [f"# Parity report: `{result.bundle}`", "",
             f"**{'PASS' if result.passed else 'FAIL'}** — {len(result.rows)} rows against the "
             f"PyTorch original's saved answers ({refs.provenance.get('reference', 'original')}"
             f", transformers {refs.provenance.get('transformers_version', '?')}).", "",
             "| variant | graph / engine | backend | max \\|Δlogit\\| | mean \\|Δlogit\\| | top-1 | "
             "KL (top-k) | greedy (worst) | ppl (original) | result |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in result.rows:
        ppl = "-" if r.ppl is None else f"{r.ppl:.3f} ({r.ppl_ref:.3f})"
        verdict = "pass" if r.passed else "**FAIL**: " + "; ".join(r.failures)
        lines.append(f"| {r.label.variant} | {r.label.graph} | {r.label.backend} | "
                     f"{r.max_abs:.2e} | {r.mean_abs:.2e} | {100 * r.top1:.1f}% | {r.kl:.2e} | "
                     f"{r.greedy_worst} | {ppl} | {verdict} |")
    lines += ["", "## Reference items", "",
              "| item | kind | prompt tokens | continuation | " +
              " | ".join(_name(r) for r in result.rows) + " |",
              "| --- | --- | ---: | ---: |" + " ---: |" * len(result.rows)]
    for it in refs.items:
        cells = [str(r.greedy[it.name]) if it.name in r.greedy else "-" for r in result.rows]
        lines.append(f"| {it.name} | {it.kind} | {it.prompt_tokens} | {it.new_tokens} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Cells: greedy tokens reproduced before the first divergence.", "",
              "## Limits", "", "| precision | " + " | ".join(KEYS) + " |",
              "| --- |" + " ---: |" * len(KEYS)]
    for precision in dict.fromkeys(r.label.precision for r in result.rows):
        tol = next(r.tolerance for r in result.rows if r.label.precision == precision)
        cells = ["off" if getattr(tol, k) is None else f"{getattr(tol, k):g}" for k in KEYS]
        lines.append(f"| {precision} | " + " | ".join(cells) + " |")
    lines += ["", "KL is computed on the original's top-k tokens, both distributions "
              "renormalized to them (a truncated KL). `ppl` is the allowed relative perplexity "
              "increase on the held-out text; `tie` forgives a greedy divergence where the "
              "original's top-2 logits are closer than that.", "", "## Plots", ""]
    lines += [f"![{name}]({name})" for name in PLOTS]
    lines += ["", "## Plain-text table", "", "```", format_table(result), "```", ""]
    return "\n".join(lines)
