"""Serve benchmark: our server (one or more variants / prefill chunks) against llama.cpp's
llama-server, interleaved in one run, each level driven by `llama-export bench-serve`'s load
generator (streaming /v1/completions, fixed lengths, temperature 0, EOS ignored).

    python benchmarks/compare_servers.py BUNDLE --variants fp32,int8 --rounds 3 \\
        [--llama-server PATH --gguf MODEL.gguf] [--chunks 64] [--json OUT]

Each round starts every server once (fresh process, free loopback port), runs every level, and
stops it; the table shows medians over rounds, the server's peak RSS (VmHWM) and, for ours at
concurrency 1, `llama-export bench`'s end-to-end single-stream tok/s measured in the same run.
Run it under /work/locks/run-exclusive on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from llama_export.runtime.serve.loadgen import LoadOptions, run_load

CLI = str(Path(sys.executable).with_name("llama-export"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(cmd: list[str], url: str, timeout: float = 300) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} did not become healthy")


def servers(args: argparse.Namespace) -> dict[str, list[str]]:
    """name -> command line with a {port} placeholder."""
    out = {}
    for variant in args.variants.split(","):
        for chunk in args.chunks.split(","):
            name = f"ours-{variant}" + (f"-chunk{chunk}" if "," in args.chunks else "")
            out[name] = [CLI, "serve", args.bundle, "--variant", variant, "--port", "{port}",
                         "--slots", str(args.slots), "--prefill-chunk", chunk,
                         "--context", str(args.prompt_len + args.gen_len + 64),
                         "--log-level", "warning"]
    if args.llama_server:  # the same KV positions per slot as ours (-c is shared by -np slots)
        out["llama-server"] = [args.llama_server, "-m", args.gguf, "--host", "127.0.0.1",
                               "--port", "{port}", "-np", str(args.slots), "-t", "2",
                               "-c", str(args.slots * (args.prompt_len + args.gen_len + 64)),
                               "--no-webui"]
    return out


def step_times(url: str) -> dict[str, float]:
    """Mean engine step time without / with a prompt chunk (ms) over the whole run, from
    /metrics: the difference is how long a running stream stalls while a request joins."""
    sums: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        for kind in ("decode_step", "prefill_step"):
            for part in ("sum", "count"):
                if line.startswith(f"llama_export_{kind}_seconds_{part} "):
                    sums[f"{kind}_{part}"] = float(line.split()[1])
    return {f"{kind}_ms": 1000 * sums[f"{kind}_sum"] / max(sums[f"{kind}_count"], 1)
            for kind in ("decode_step", "prefill_step")}


def bench_single(bundle: str, variant: str, prompt_len: int, gen_len: int) -> float:
    """`llama-export bench`'s end-to-end single-stream tok/s (prefill + decode of gen_len)."""
    out = subprocess.run([CLI, "bench", bundle, "--variant", variant, "--prompt-len",
                          str(prompt_len), "--gen-len", str(gen_len), "--runs", "3", "--json"],
                         capture_output=True, text=True, check=True).stdout
    r = json.loads(out)["results"][0]
    return gen_len / (prompt_len / r["prefill_tok_s"] + (gen_len - 1) / r["decode_tok_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--variants", default="fp32,int8")
    ap.add_argument("--chunks", default="64", help="--prefill-chunk values (comma-separated)")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--llama-server")
    ap.add_argument("--gguf")
    ap.add_argument("--single", action="store_true", help="also run `llama-export bench`")
    ap.add_argument("--json")
    args = ap.parse_args()
    levels = tuple(int(c) for c in args.concurrency.split(","))
    samples: dict[str, list[list[dict[str, Any]]]] = {}
    for r in range(args.rounds):
        for name, template in servers(args).items():
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = start([a.replace("{port}", str(port)) for a in template], url)
            try:
                res = run_load(LoadOptions(url=url, concurrency=levels, prompt_len=args.prompt_len,
                                           gen_len=args.gen_len, pid=proc.pid))
                steps = step_times(url) if name.startswith("ours") else {}
            finally:
                proc.terminate()
                proc.wait(60)
            samples.setdefault(name, []).append([{**asdict(lv), **steps} for lv in res])
            print(f"[round {r + 1}] {name}: {steps} " + ", ".join(
                f"c{lv.concurrency} {lv.aggregate_tok_s:.0f} tok/s p95 {lv.ttft_p95:.2f}s "
                f"err {lv.errors}" for lv in res), file=sys.stderr, flush=True)
        if args.single:
            for variant in args.variants.split(","):
                samples.setdefault(f"bench-{variant}", []).append(
                    [{"tok_s": bench_single(args.bundle, variant, args.prompt_len, args.gen_len)}])
    report(samples, levels)
    if args.json:
        Path(args.json).write_text(json.dumps(samples, indent=2))


def report(samples: dict[str, list[list[dict[str, Any]]]], levels: tuple[int, ...]) -> None:
    print(f"{'server':24s} {'conc':>4s} {'agg tok/s':>10s} {'stream tok/s':>12s} "
          f"{'TTFT p50':>9s} {'TTFT p95':>9s} {'errors':>6s} {'peak RSS MB':>11s}")
    for name, rounds in samples.items():  # engine step times, whole run (ours only)
        if "decode_step_ms" in rounds[0][0]:
            dec = statistics.median(x[0]["decode_step_ms"] for x in rounds)
            pre = statistics.median(x[0]["prefill_step_ms"] for x in rounds)
            print(f"{name}: mean step {dec:.1f} ms, with a prompt chunk {pre:.1f} ms")
    for name, rounds in samples.items():
        if name.startswith("bench-"):
            print(f"{name:24s} {1:4d} {statistics.median(x[0]['tok_s'] for x in rounds):10.1f}"
                  "   (llama-export bench, prefill + decode)")
            continue
        for i, c in enumerate(levels):
            rows = [rnd[i] for rnd in rounds]

            def med(key: str, rows: list[dict[str, Any]] = rows) -> float:
                return statistics.median(float(x[key] or 0) for x in rows)

            errors = sum(x["errors"] for x in rows)
            rss = max(x["server_peak_rss_mb"] or 0 for x in rows)
            print(f"{name:24s} {c:4d} {med('aggregate_tok_s'):10.1f} {med('stream_tok_s'):12.1f} "
                  f"{med('ttft_p50'):9.3f} {med('ttft_p95'):9.3f} {errors:6d} {rss:11.0f}")


if __name__ == "__main__":
    main()
