"""``make gpu-check``: the first thing to run on a new GPU machine (one go, every log kept).

    python benchmarks/gpu_check.py [--bundle BUNDLE] [--out build/gpu-check] [--skip-bench]

    preflight (GPU? TensorRT? else one line, exit 2, at once)
    ──► bundle: export the built-in SmolLM2 (or take --bundle), plus an fp16 export beside it
    ──► engines: llama-export trt --fp16 / --int8 / --int4 (int8/int4 variants made first)
    ──► parity:  llama-export parity --backend trt per precision (+ ONNX Runtime CUDA, all variants)
    ──► bench:   TensorRT backend vs ONNX Runtime CUDA / TensorRT providers / CPU, per precision
    ──► OUT/summary.md + summary.json; every command's stdout/stderr in OUT/logs/

Every step is a ``llama-export`` command line, run as a subprocess with its output kept, so a
failure is reproducible by pasting the logged line. A failed step does not stop the others that
do not depend on it; the exit status is non-zero when any step failed. Budget: 8 minutes on a
desktop GPU (the int8 calibration is the longest step; pass a calibrated --bundle to skip it).
The plan, the folder layout and the summary are pure functions tested on CPU
(tests/test_gpu_check.py); only :func:`run_step` touches the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRECISIONS = ("fp16", "int8", "int4")
# Bundle shape for the check: batch 1 (edge), a 1024-token context; engines get a 512 prompt.
EXPORT_ARGS = ("--max-seq-len", "1024", "--max-batch", "1")
ENGINE_ARGS = ("--max-batch", "1", "--max-prompt", "512", "--max-context", "1024")
BENCH_ARGS = ("--prompt-len", "128", "--gen-len", "128", "--runs", "3", "--json")
BENCH_TARGETS = (("trt", None), ("ort", "cuda"), ("ort", "tensorrt"), ("ort", "cpu"))
NO_GPU = ("gpu-check: no NVIDIA GPU found (CUDA and nvidia-smi see none): run `make gpu-check` "
          "on the machine with the GPU")
NO_TRT = ("gpu-check: TensorRT is not installed: pip install 'llama-export[gpu]' (on Jetson: "
          "apt install python3-libnvinfer, venv with --system-site-packages), then rerun")


@dataclass(frozen=True)
class Step:
    name: str                  # also the log file stem
    argv: tuple[str, ...]      # after `llama-export`
    kind: str                  # export | engine | parity | bench
    precision: str | None = None
    needs: tuple[str, ...] = ()  # steps that must have succeeded first
    json_out: bool = False     # stdout is JSON worth keeping as OUT/<name>.json


@dataclass(frozen=True)
class Layout:
    out: Path

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def bundle(self) -> Path:
        return self.out / "bundle"

    @property
    def fp16_bundle(self) -> Path:
        return self.out / "bundle-fp16"

    def log(self, step: Step) -> Path:
        return self.logs / f"{step.name}.log"

    def result(self, step: Step) -> Path:
        return self.out / f"{step.name}.json"

    def report(self, precision: str) -> Path:
        return self.out / f"parity-report-{precision}"


def preflight(detect_gpu: Callable[[], Any], have_tensorrt: Callable[[], bool]) -> str | None:
    """The one-line reason this machine cannot run the check, or None."""
    if detect_gpu() is None:
        return NO_GPU
    if not have_tensorrt():
        return NO_TRT
    return None


def plan(layout: Layout, bundle: Path | None, source: str | None,
         skip_bench: bool = False) -> list[Step]:
    """Every command of the check, in order (pure)."""
    steps: list[Step] = []
    main = bundle or layout.bundle
    src = [source] if source else []
    if bundle is None:
        steps.append(Step("export-fp32", ("onnx", *src, "-o", str(main), "--force", *EXPORT_ARGS),
                          "export"))
    steps.append(Step("export-fp16", ("onnx", *src, "-o", str(layout.fp16_bundle), "--force",
                                      "--dtype", "fp16", "--no-ort-graph", *EXPORT_ARGS),
                      "export"))
    base = ("export-fp32",) if bundle is None else ()
    for p in PRECISIONS:
        target = layout.fp16_bundle if p == "fp16" else main
        needs = ("export-fp16",) if p == "fp16" else base
        steps.append(Step(f"trt-{p}", ("trt", str(target), f"--{p}", *ENGINE_ARGS,
                                       "--timing-cache", str(layout.out / "timing.cache")),
                          "engine", p, needs))
        steps.append(Step(f"parity-trt-{p}", ("parity", str(target), "--backend", "trt",
                                              "--variant", p, "--json", "--report",
                                              str(layout.report(p))),
                          "parity", p, (f"trt-{p}",), json_out=True))
    steps.append(Step("parity-ort-cuda", ("parity", str(main), "--backend", "ort", "--provider",
                                          "cuda", "--json"), "parity", None,
                      ("trt-int8", "trt-int4"), json_out=True))
    if skip_bench:
        return steps
    for p in PRECISIONS:
        target = layout.fp16_bundle if p == "fp16" else main
        for backend, provider in BENCH_TARGETS:
            where = backend if provider is None else f"ort-{provider}"
            argv = ("bench", str(target), "--variant", p, "--backend", backend,
                     *(("--provider", provider) if provider else ()), *BENCH_ARGS)
            steps.append(Step(f"bench-{p}-{where}", argv, "bench", p, (f"trt-{p}",), True))
    return steps


@dataclass
class Outcome:
    step: Step
    code: int | None           # None: skipped (a step it needs failed)
    seconds: float = 0.0
    data: Any = field(default=None)

    @property
    def ok(self) -> bool:
        return self.code == 0


def blocked(step: Step, outcomes: list[Outcome]) -> bool:
    """A step is skipped when a step it needs failed or was skipped."""
    return any(o.step.name in step.needs and not o.ok for o in outcomes)


def run_step(step: Step, layout: Layout, exe: str) -> Outcome:
    """Run one command; stdout (JSON steps: OUT/<name>.json) and stderr go to its log."""
    t0 = time.perf_counter()
    with open(layout.log(step), "w", encoding="utf-8") as log:
        log.write("$ llama-export " + " ".join(step.argv) + "\n")
        log.flush()
        proc = subprocess.run([exe, *step.argv], stdout=subprocess.PIPE, stderr=log, text=True,
                              check=False, timeout=30 * 60)
        log.write(proc.stdout)
    data = None
    if step.json_out and proc.stdout.strip():
        try:
            data = json.loads(proc.stdout)
            layout.result(step).write_text(proc.stdout, encoding="utf-8")
        except json.JSONDecodeError:
            data = None
    return Outcome(step, proc.returncode, time.perf_counter() - t0, data)


def summary(outcomes: list[Outcome], env: dict[str, str]) -> str:
    """summary.md: environment, every step's status and time, parity rows, bench figures."""
    lines = ["# gpu-check", "", *[f"- {k}: {v}" for k, v in env.items()], "",
             "| step | status | seconds | log |", "| --- | --- | ---: | --- |"]
    for o in outcomes:
        status = "skipped" if o.code is None else "ok" if o.ok else f"FAILED ({o.code})"
        lines.append(f"| {o.step.name} | {status} | {o.seconds:.1f} | logs/{o.step.name}.log |")
    lines += ["", "## Parity against the PyTorch original's saved references", "",
              "| variant | engine / graph | backend | max abs dlogit | top-1 | greedy (worst) | "
              "ppl (original) | result |", "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for o in outcomes:
        if o.step.kind == "parity" and o.data:
            for r in o.data.get("rows", []):
                ppl = "-" if r["ppl"] is None else f"{r['ppl']:.3f} ({r['ppl_ref']:.3f})"
                lines.append(f"| {r['variant']} | {r['graph']} | {r['backend']} | "
                             f"{r['max_abs']:.2e} | {100 * r['top1']:.1f}% | {r['greedy_worst']} | {ppl} | "
                             f"{'pass' if r['passed'] else 'FAIL'} |")
    lines += ["", "## Speed (batch 1, 128-token prompt, 128 new tokens, medians of 3 runs)", "",
              "| variant | backend | prefill tok/s | decode tok/s | ms/token | peak RSS MB |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for o in outcomes:
        if o.step.kind == "bench" and o.data:
            for r in o.data.get("results", []):
                lines.append(f"| {o.step.precision} | {o.step.name.split('-', 2)[2]} | "
                             f"{r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
                             f"{r['ms_per_token']:.2f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", "Each bench row is its own process (one backend loaded at a time), run one "
              "after the other: compare rows of this table, not with other machines' runs.", ""]
    return "\n".join(lines)


def environment(gpu: Any) -> dict[str, str]:
    env = {"gpu": f"{gpu.name} (SM {gpu.sm})", "python": sys.version.split()[0]}
    for mod in ("tensorrt", "onnxruntime"):
        try:
            env[mod] = str(__import__(mod).__version__)
        except ImportError:
            env[mod] = "not installed"
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--bundle", type=Path, help="An exported bundle to use (engines are added "
                    "to it); default: export the built-in SmolLM2 into OUT/bundle")
    ap.add_argument("--source", help="Model to export (HF folder / .gguf; default built-in)")
    ap.add_argument("--out", type=Path, default=Path("build/gpu-check"))
    ap.add_argument("--skip-bench", action="store_true")
    a = ap.parse_args(argv)

    import importlib.util

    from llama_export.calibration.trt.gpu import detect_gpu

    reason = preflight(lambda: detect_gpu(0),
                       lambda: importlib.util.find_spec("tensorrt") is not None)
    if reason:
        print(reason, file=sys.stderr)
        return 2
    layout = Layout(a.out)
    layout.logs.mkdir(parents=True, exist_ok=True)
    exe = str(Path(sys.executable).with_name("llama-export"))
    outcomes: list[Outcome] = []
    t0 = time.perf_counter()
    for step in plan(layout, a.bundle, a.source, a.skip_bench):
        if blocked(step, outcomes):
            outcomes.append(Outcome(step, None))
            continue
        print(f"[gpu-check {time.perf_counter() - t0:6.1f}s] {step.name}", file=sys.stderr,
              flush=True)
        outcomes.append(run_step(step, layout, exe))
    (layout.out / "summary.md").write_text(summary(outcomes, environment(detect_gpu(0))),
                                           encoding="utf-8")
    (layout.out / "summary.json").write_text(json.dumps(
        [{"step": o.step.name, "argv": list(o.step.argv), "code": o.code,
          "seconds": round(o.seconds, 2)} for o in outcomes], indent=2), encoding="utf-8")
    failed = [o.step.name for o in outcomes if not o.ok]
    minutes = (time.perf_counter() - t0) / 60
    print(f"gpu-check: {len(outcomes) - len(failed)}/{len(outcomes)} steps ok in {minutes:.1f} "
          f"min; see {layout.out / 'summary.md'}" + (f"; failed: {', '.join(failed)}"
                                                     if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
