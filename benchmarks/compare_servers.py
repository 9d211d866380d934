"""Serve benchmark: our server (one or more variants / prefill chunks) against llama.cpp's
llama-server, interleaved in one run, each level driven by `llama-export bench-serve`'s load
generator (streaming /v1/completions, fixed lengths, temperature 0, EOS ignored).

    python benchmarks/compare_servers.py BUNDLE --variants fp32,int8 --rounds 3 \\
        [--llama-server PATH --gguf MODEL.gguf] [--chunks 64] [--ray 1,2] [--json OUT]

``--ray 1,2`` adds `llama-export serve --ray --replicas N` (this machine's cores split between
the N replicas) per variant: the overhead of Ray's proxy hop and the replicas' memory.

Each round starts every server once (fresh process, free loopback port), runs every level, and
stops it; the table shows medians over rounds, the server's peak RSS (VmHWM) and, for ours at
concurrency 1, `llama-export bench`'s end-to-end single-stream tok/s measured in the same run.
Run it under /work/locks/run-exclusive on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
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
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)
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
    per_slot = str(args.prompt_len + args.gen_len + 64)  # KV positions per slot, every server
    for variant in args.variants.split(","):
        for chunk in args.chunks.split(","):
            name = f"ours-{variant}" + (f"-chunk{chunk}" if "," in args.chunks else "")
            out[name] = [CLI, "serve", args.bundle, "--variant", variant, "--port", "{port}",
                         "--slots", str(args.slots), "--prefill-chunk", chunk,
                         "--context", per_slot,
                         "--log-level", "warning"]
    for n in [int(x) for x in args.ray.split(",") if x]:
        for variant in args.variants.split(","):
            out[f"ray{n}-{variant}"] = [
                CLI, "serve", args.bundle, "--variant", variant, "--port", "{port}", "--ray",
                "--replicas", str(n), "--replica-cpus", str((os.cpu_count() or 1) / n),
                "--slots", str(args.slots), "--prefill-chunk", args.chunks.split(",")[0],
                "--context", per_slot]
    if args.llama_server:  # the same KV positions per slot as ours (-c is shared by -np slots)
        out["llama-server"] = [args.llama_server, "-m", args.gguf, "--host", "127.0.0.1",
                               "--port", "{port}", "-np", str(args.slots), "-t", "2",
                               "-c", str(args.slots * int(per_slot)),
                               "--no-webui"]
    return out


def replica_rss_mb(driver: int) -> list[float]:
    """Peak RSS (VmHWM) of each Ray Serve replica process the driver's session started."""
    out = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            pid = int(status.parent.name)
            if os.getsid(pid) != driver:
                continue
            if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ServeReplica"):
                continue
            hwm = next(ln for ln in status.read_text().splitlines() if ln.startswith("VmHWM:"))
        except (OSError, StopIteration, ValueError):
            continue
        out.append(int(hwm.split()[1]) / 1024)
    return sorted(out)


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
    ap.add_argument("--ray", default="", help="Ray Serve replica counts (comma-separated)")
    ap.add_argument("--single", action="store_true", help="also run `llama-export bench`")
    ap.add_argument("--json")
    args = ap.parse_args()
    levels = tuple(int(c) for c in args.concurrency.split(","))
    samples: dict[str, list[list[dict[str, Any]]]] = {}
    for r in range(args.rounds):
        for name, template in servers(args).items():
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            t0 = time.monotonic()
            proc = start([a.replace("{port}", str(port)) for a in template], url)
            steps: dict[str, Any] = {"startup_s": time.monotonic() - t0}
            try:
                res = run_load(LoadOptions(url=url, concurrency=levels, prompt_len=args.prompt_len,
                                           gen_len=args.gen_len, pid=proc.pid))
                if name.startswith("ours"):
                    steps.update(step_times(url))
                if name.startswith("ray"):  # the driver holds no model: the replicas do
                    steps["replica_rss_mb"] = replica_rss_mb(proc.pid)
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
        if "startup_s" in rounds[0][0]:
            up = statistics.median(x[0]["startup_s"] for x in rounds)
            rss = [x[0].get("replica_rss_mb") for x in rounds]
            print(f"{name}: start to healthy {up:.1f} s" + (
                f", replica peak RSS MB {rss}" if rss[0] is not None else ""))
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
            rss = max((sum(x["replica_rss_mb"]) if "replica_rss_mb" in x else
                       x["server_peak_rss_mb"]) or 0 for x in rows)  # Ray: all replicas
            print(f"{name:24s} {c:4d} {med('aggregate_tok_s'):10.1f} {med('stream_tok_s'):12.1f} "
                  f"{med('ttft_p50'):9.3f} {med('ttft_p95'):9.3f} {errors:6d} {rss:11.0f}")


if __name__ == "__main__":
    main()
