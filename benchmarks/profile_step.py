"""Development script: where a decode step's time goes, our graph beside onnxruntime-genai's.

    python benchmarks/profile_step.py --bundle BUNDLE [--variant int8] [--genai GENAI_DIR] \
        [--prompt-len 128] [--steps 48] [--threads 2]

Runs a ``--prompt-len`` prefill and ``--steps`` greedy decode steps in one ONNX Runtime session
with its profiler on (``SessionOptions.enable_profiling``), for our bundle's variant (the
runtime's own backend and KV cache: the ONNX-Runtime graph on CPU) and, with ``--genai``, for
an onnxruntime-genai model folder fed the way genai feeds it (past and present bound to one
buffer per layer, ``attention_mask`` of the total length). Prints, per graph, the median wall
time of a decode step, the mean kernel time per op type, MatMulNBits per weight shape (the
kernels that read the weights), and each process's peak RSS (each graph runs in its own;
compare_peers.py is the memory comparison of record). The first quarter of the decode
steps is left out (warm-up). Profiling adds a little time to every node; compare the
breakdowns, and time the engines with compare_peers.py.

This is how the column-sliced MatMulNBits were found to cost the 1.5B int8 step ~9 %
(calibration/nbits.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def profiled(so: Any, prefix: str) -> Any:
    """``so`` (the runtime's own session settings: optimization level, sequential execution,
    spinning threads) with ONNX Runtime's profiler on."""
    so.enable_profiling, so.profile_file_prefix = True, prefix
    return so


def prompt_ids(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(100, 20000, (1, n)).astype(np.int64)


def ours(bundle: Path, variant: str, prompt_len: int, steps: int, threads: int,
         prefix: str) -> tuple[str, list[float]]:
    from llama_export.runtime import load_bundle
    from llama_export.runtime.backends import ort as ort_backend

    runtime_options = ort_backend._session_options
    ort_backend._session_options = lambda o, opts: profiled(runtime_options(o, opts), prefix)
    backend = load_bundle(bundle, variant, threads=threads, verify=False).backend
    cache = backend.new_cache(1, prompt_len + steps + 1)
    logits = backend.forward(prompt_ids(prompt_len), np.arange(prompt_len)[None], None, cache)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        logits = backend.forward(np.array([[int(logits.argmax())]]),
                                 np.array([[prompt_len + i]]), None, cache)
        times.append(time.perf_counter() - t0)
    return backend.session.end_profiling(), times  # type: ignore[attr-defined]


def genai(folder: Path, prompt_len: int, steps: int, threads: int,
          prefix: str) -> tuple[str, list[float]]:
    import onnxruntime as ort

    from llama_export.runtime.backends.ort import OrtOptions, _session_options

    so = profiled(_session_options(ort, OrtOptions(threads=threads)), prefix)
    cfg = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    sess = ort.InferenceSession(str(folder / cfg["filename"]), so,
                                providers=["CPUExecutionProvider"])
    io = sess.io_binding()
    shape = [1, cfg["num_key_value_heads"], prompt_len + steps + 1, cfg["head_size"]]
    buffers = []
    for i in range(cfg["num_hidden_layers"]):
        for kind in ("key", "value"):
            buf = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cpu", 0)
            io.bind_ortvalue_input(cfg["inputs"][f"past_{kind}_names"] % i, buf)
            io.bind_ortvalue_output(cfg["outputs"][f"present_{kind}_names"] % i, buf)
            buffers.append(buf)

    def step(ids: np.ndarray, total: int) -> int:
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        io.bind_output("logits", "cpu")
        sess.run_with_iobinding(io)
        return int(io.get_outputs()[0].numpy()[0, -1].argmax())

    token = step(prompt_ids(prompt_len), prompt_len)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        token = step(np.array([[token]]), prompt_len + i + 1)
        times.append(time.perf_counter() - t0)
    return sess.end_profiling(), times


def report(label: str, profile: str, times: list[float]) -> None:
    events = json.loads(Path(profile).read_text())
    runs = [e for e in events if e.get("name") == "model_run"][1:]  # the prefill left out
    skip = len(runs) // 4
    since, n = runs[skip]["ts"], len(runs) - skip
    by_op: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    by_shape: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < since:
            continue
        op = e["args"].get("op_name", "?")
        by_op[op] += e["dur"]
        count[op] += 1
        if op == "MatMulNBits":
            # the float inputs' shapes: A, the scales (N x blocks), the bias when fused
            key = " ".join(str(next(iter(d.values())))
                           for d in e["args"].get("input_type_shape", []))
            by_shape[key][0] += 1
            by_shape[key][1] += e["dur"]
    run_ms = statistics.median(r["dur"] for r in runs[skip:]) / 1e3
    print(f"== {label}: decode step median {statistics.median(times[skip:]) * 1e3:.2f} ms "
          f"(ONNX Runtime's run {run_ms:.2f} ms, kernels {sum(by_op.values()) / n / 1e3:.2f} "
          f"ms mean) over {n} steps")
    for op, us in by_op.most_common(20):
        print(f"   {op:34s} {us / n / 1e3:8.3f} ms  x{count[op] // n}")
    for key, (c, us) in sorted(by_shape.items(), key=lambda kv: -kv[1][1]):
        print(f"   MatMulNBits x{c // n:<4d} {us / n / 1e3:8.3f} ms  {us / c:8.1f} us/node  {key}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--variant", default="int8")
    ap.add_argument("--genai", type=Path, default=None, help="onnxruntime-genai model folder")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--side", choices=("ours", "genai"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 8:
        sys.exit("--steps must be at least 8")
    if args.side is None:  # each graph in a process of its own: its own peak RSS
        for side in ("genai",) * (args.genai is not None) + ("ours",):
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", side], check=True)
        return
    from llama_export.runtime.bench import peak_rss_mb

    with tempfile.TemporaryDirectory() as tmp:
        if args.side == "genai":
            report(f"genai {args.genai.name}", *genai(args.genai, args.prompt_len, args.steps,
                                                      args.threads, f"{tmp}/genai"))
        else:
            report(f"ours {args.bundle.name} {args.variant}",
                   *ours(args.bundle, args.variant, args.prompt_len, args.steps, args.threads,
                         f"{tmp}/ours"))
    print(f"   peak RSS {peak_rss_mb():.0f} MB (both processes import our runtime)", flush=True)


if __name__ == "__main__":
    main()
