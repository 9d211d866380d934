"""`llama-export serve --ray`: two Ray Serve replicas of the SmolLM2 bundle on loopback, driven
like a user would (official `openai` client, httpx), then one replica killed mid-load.

The driver (the CLI) runs in its own session: Ray's node processes and replica workers all stay
in it, so the module ends by checking that SIGTERM leaves no process of that session behind.
Tests run in file order and share one Ray instance (startup ~10-30 s here).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

pytest.importorskip("ray", reason="ray is not installed: pip install 'llama-export[ray]'")
psutil = pytest.importorskip("psutil")

from llama_export.runtime import load_bundle  # noqa: E402

HEADER = "x-llama-export-replica"
# per replica / in Ray's proxy: 2 x 4 running + 16 queued = 24 at most. Ray's admission is
# approximate under load (seen: a 503 with 16 streams against a nominal 20), so the 16-stream
# test keeps a margin of 8 and the overload test sends well past the nominal bound.
SLOTS, QUEUE = 4, 16
OVERLOAD = 56
PROMPTS = ["The history of the Roman Empire", "Hello, my name is", "def fibonacci(n):",
           "Paris is the capital of", "Once upon a time", "The best way to learn Python is",
           "List three colors:", "In 1969, astronauts"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RayDriver:
    """`llama-export serve BUNDLE --ray` in its own session, on a free loopback port."""

    def __init__(self, bundle: Path, timeout: float = 150.0) -> None:
        self.port, self.metrics_port = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in stop()
        exe = Path(sys.executable).with_name("llama-export")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [str(exe), "serve", str(bundle), "--ray", "--replicas", "2", "--replica-cpus", "0.5",
             "--slots", str(SLOTS), "--max-queue", str(QUEUE), "--port", str(self.port),
             "--drain-timeout", "5", "--ray-metrics-port", str(self.metrics_port)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while "Ray Serve replica(s) of" not in self.output():
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"the Ray driver did not come up:\n{self.output()[-3000:]}")
            time.sleep(0.5)
        self.startup = time.monotonic() - t0

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def session(self) -> list[Any]:
        out = []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getsid(p.pid) == self.proc.pid:
                    out.append(p)
            except (ProcessLookupError, PermissionError):
                pass
        return out

    def replica_pids(self) -> list[int]:
        """Ray titles replica workers ``ray::ServeReplica:<app>:<deployment>``."""
        out = []
        for p in self.session():
            with contextlib.suppress(psutil.Error):
                if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::ServeReplica"):
                    out.append(p.pid)
        return out

    def stop(self, timeout: float = 60.0) -> list[str]:
        """SIGTERM the driver and wait for it; whatever of its session is still alive a few
        seconds later gets SIGKILL and is named in the result (which must be empty)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        deadline = time.monotonic() + 5
        while (left := [p for p in self.session() if p.pid != self.proc.pid]) and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        names = []
        for p in left:
            with contextlib.suppress(psutil.Error):
                names.append(f"{p.pid} {p.name()}")
                p.kill()
        if self.proc.poll() is None:
            names.append(f"{self.proc.pid} the driver")
            self.proc.kill()
        self.proc.wait()
        self.log.close()
        return names


@pytest.fixture(scope="module")
def ray_server(smollm2_bundle: Path) -> Any:
    driver = RayDriver(smollm2_bundle)
    yield driver
    driver.stop()


@pytest.fixture(scope="module")
def model(smollm2_bundle: Path) -> Any:
    with load_bundle(smollm2_bundle, verify=False) as m:
        yield m


def _client(server: RayDriver) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                              timeout=120)


async def _stream(client: openai.AsyncOpenAI, prompt: str, max_tokens: int,
                  stop_after: int | None = None,
                  started: list[str] | None = None) -> tuple[str, str]:
    """(replica, text) of one streamed greedy chat; ``stop_after`` chunks: drop the stream;
    ``started``: gets the replica appended when the first chunk arrives."""
    async with client.chat.completions.with_streaming_response.create(
            model="bundle", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=0, stream=True) as resp:
        replica, text, n = resp.headers[HEADER], "", 0
        async for chunk in await resp.parse():
            if n == 0 and started is not None:
                started.append(replica)
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            n += 1
            if stop_after is not None and n >= stop_after:
                break
    return replica, text


def _metrics(server: RayDriver) -> tuple[str, dict[str, float]]:
    """One replica's /metrics (Ray routes the scrape to either replica) and which one."""
    r = httpx.get(f"{server.url}/metrics", timeout=30)
    values = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return r.headers[HEADER], values


def test_16_concurrent_streams_equal_runtime_on_both_replicas(ray_server: RayDriver,
                                                              model: Any) -> None:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    want = {q: model.chat([{"role": "user", "content": q}], max_new_tokens=12).text
            for q in PROMPTS}

    async def run() -> list[tuple[str, str]]:
        client = _client(ray_server)
        return await asyncio.wait_for(asyncio.gather(*(_stream(client, q, 12) for q in prompts)),
                                      120)

    try:
        got = asyncio.run(run())
    except openai.APIStatusError as e:  # say which 503 (Ray's backpressure or the app's)
        raise AssertionError(f"{e.status_code}: {e.response.text}") from e
    assert [text for _, text in got] == [want[q] for q in prompts]
    served = Counter(replica for replica, _ in got)
    assert len(served) == 2, f"one replica served everything: {served}"
    print(f"\n[ray] startup to ready {ray_server.startup:.1f} s; replicas served {dict(served)}")


def test_each_replicas_engine_metrics_reach_rays_export(ray_server: RayDriver) -> None:
    """After the 16 streams: Ray's Prometheus endpoint has generated tokens per replica.

    Each replica served at least one whole 12-token stream. Ray exports every few seconds and
    a series can first appear with part of its count (seen: 6 of 12 on both replicas), so the
    check polls until every replica's count is complete, within a bounded time."""
    deadline, series = time.monotonic() + 60, {}
    while not (len(series) == 2 and all(n >= 12 for n in series.values())):
        assert time.monotonic() < deadline, f"per-replica series in Ray's export: {series}"
        text = httpx.get(f"http://127.0.0.1:{ray_server.metrics_port}/metrics", timeout=10).text
        series = {line.split('replica="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                  for line in text.splitlines()
                  if line.startswith("ray_llama_export_generation_tokens") and 'replica="' in line}
        time.sleep(1)


def test_overload_is_503_and_the_app_keeps_serving(ray_server: RayDriver) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True,
            "temperature": 0}

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=ray_server.url, timeout=120) as c:
            return await asyncio.wait_for(asyncio.gather(
                *(c.post("/v1/completions", json=body) for _ in range(OVERLOAD))), 150)

    responses = asyncio.run(run())
    codes = Counter(r.status_code for r in responses)
    # 2 replicas x 4 slots run, Ray's proxy queues up to QUEUE, the rest are refused at once.
    # Ray's admission is approximate under load (seen: 19 served of a nominal 20; 25 and, in a
    # full suite run, 43 of 44 sent against a nominal 24), so the check is that more than the
    # running capacity was served (queueing happened) and that Ray refused some, not how many.
    assert set(codes) == {200, 503} and codes[200] > 2 * SLOTS, codes
    refused = next(r for r in responses if r.status_code == 503)
    assert "backpressure" in refused.text.lower(), refused.text
    ok = httpx.post(f"{ray_server.url}/v1/completions", timeout=60,
                    json={"prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200


def test_client_disconnect_cancels_on_its_replica(ray_server: RayDriver) -> None:
    async def drop() -> str:
        replica, _ = await _stream(_client(ray_server), "Tell me a long story.", 400,
                                   stop_after=3)
        return replica

    replica = asyncio.run(asyncio.wait_for(drop(), 60))
    deadline = time.monotonic() + 60
    while True:  # scrape until Ray routes /metrics to the replica that served the stream
        seen, m = _metrics(ray_server)
        if seen == replica and m.get('llama_export_requests_total{finish_reason="cancelled"}', 0) \
                >= 1 and m["llama_export_requests_running"] == 0:
            break
        assert time.monotonic() < deadline, f"the dropped stream was not cancelled on {replica}"
        time.sleep(0.2)


def test_killed_replica_loses_only_its_requests_and_comes_back(ray_server: RayDriver,
                                                                model: Any) -> None:
    pids = ray_server.replica_pids()
    assert len(pids) == 2, ray_server.output()[-2000:]
    want = model.chat([{"role": "user", "content": PROMPTS[0]}], max_new_tokens=40).text

    async def load() -> list[tuple[str, str] | BaseException]:
        client = _client(ray_server)
        started: list[str] = []
        tasks = [asyncio.ensure_future(_stream(client, PROMPTS[0], 40, started=started))
                 for _ in range(8)]
        # kill once every stream produced its first chunk (running on both replicas): a fixed
        # 1.5 s wait under a loaded machine killed a replica before Ray had routed to it, and
        # the survivor then served all 8
        deadline = time.monotonic() + 60
        while len(started) < len(tasks) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert len(set(started)) == 2, f"streams did not start on both replicas: {started}"
        os.kill(pids[0], signal.SIGKILL)
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)

    results = asyncio.run(load())
    done = [r for r in results if isinstance(r, tuple) and r[1] == want]
    survivors = {replica for replica, _ in done}
    # 8 streams fill both replicas' 4 slots: the killed one's 4 are lost, the other's 4 finish.
    assert len(done) == SLOTS and len(survivors) == 1, results
    assert all(r[0] not in survivors for r in results if isinstance(r, tuple) and r not in done), \
        f"a request on the surviving replica was cut: {results}"
    deadline, seen = time.monotonic() + 120, set()
    while len(seen - survivors) == 0:  # the survivor keeps serving; Ray brings a new replica
        assert time.monotonic() < deadline, f"no replacement replica within 2 min: {seen}"
        r = httpx.post(f"{ray_server.url}/v1/completions", timeout=60,
                       json={"prompt": "Hi", "max_tokens": 2})
        if r.status_code == 200:
            seen.add(r.headers[HEADER])
        time.sleep(0.3)
    assert len(ray_server.replica_pids()) == 2 and pids[0] not in ray_server.replica_pids()


def test_sigterm_leaves_no_process(ray_server: RayDriver) -> None:
    left = ray_server.stop()
    assert not left, f"processes of the Ray session left after SIGTERM: {left}"
    assert ray_server.proc.returncode == 0, ray_server.proc.returncode


# ---- without a Ray instance: options, the application builder, the example configs -----------
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "ray"


def test_deployment_options_follow_the_engine_and_the_machine() -> None:
    from llama_export.runtime.serve.app import ServeSettings
    from llama_export.runtime.serve.engine import EngineOptions
    from llama_export.runtime.serve.ray import RayOptions, deployment_options, replica_settings

    s = ServeSettings(bundle="b", engine=EngineOptions(slots=6, max_queue=20))
    fixed = deployment_options(s, RayOptions(replicas=4), local_cpus=2)
    assert fixed["num_replicas"] == 4 and "autoscaling_config" not in fixed
    assert (fixed["max_ongoing_requests"], fixed["max_queued_requests"]) == (6, 20)
    assert fixed["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    scaled = deployment_options(s, RayOptions(replicas=1, autoscale=(2, 8), replica_gpus=1),
                                local_cpus=None)  # a cluster: Ray's 1 CPU per replica
    assert scaled["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 8,
                                            "initial_replicas": 2, "target_ongoing_requests": 4}
    assert scaled["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1}
    assert "num_replicas" not in scaled
    assert replica_settings(s, 0.5).threads == 1
    assert replica_settings(s, 4).threads == 4


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"replicas": 0}, "--replicas must be >= 1, got 0"),
    ({"autoscale": (3, 1)}, "--autoscale 3:1 is not a range"),
    ({"replica_cpus": 0}, "--replica-cpus must be > 0, got 0"),
    ({"replica_gpus": -1}, "--replica-gpus must be >= 0, got -1"),
])
def test_ray_options_refuse_bad_values(kwargs: dict[str, Any], message: str) -> None:
    from llama_export.runtime.errors import InputError
    from llama_export.runtime.serve.ray import RayOptions, parse_autoscale

    with pytest.raises(InputError, match=message):
        RayOptions(**kwargs)
    assert parse_autoscale("1:4") == (1, 4)
    with pytest.raises(InputError, match=re.escape("'4' is not MIN:MAX: use e.g. 1:4")):
        parse_autoscale("4")


def test_app_builder_args(tiny_bundle: Path, tmp_path: Path) -> None:
    from llama_export.runtime.errors import BundleError, InputError
    from llama_export.runtime.serve.ray import app

    built = app({"bundle": str(tiny_bundle), "slots": "2", "replicas": "2", "api_keys": "a,b"})
    assert type(built).__name__ == "Application"
    settings = built._bound_deployment.init_args[0]  # what every replica is constructed with
    assert settings.api_keys == ("a", "b") and settings.engine.slots == 2
    with pytest.raises(InputError, match="unknown application args slot: use "):
        app({"bundle": str(tiny_bundle), "slot": 2})
    with pytest.raises(InputError, match=re.escape("the bundle arg is missing: serve run ... bundle=PATH")):
        app({})
    with pytest.raises(BundleError, match="does not exist"):
        app({"bundle": str(tmp_path / "nope")})


def test_example_configs_name_real_fields(tiny_bundle: Path) -> None:
    """Both examples validate as Ray Serve configs, name our deployment, and build with their
    own args (the bundle swapped for the tiny one) into the options they promise."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from llama_export.runtime.serve import ray as serve_ray

    single = yaml.safe_load((EXAMPLES / "serve_config.yaml").read_text())
    kube = yaml.safe_load((EXAMPLES / "rayservice-gpu.yaml").read_text())
    assert kube["kind"] == "RayService" and kube["apiVersion"] == "ray.io/v1"
    cluster = yaml.safe_load(kube["spec"]["serveConfigV2"])
    for cfg in (single, cluster):
        ServeDeploySchema.model_validate(cfg)
        for a in cfg["applications"]:
            assert a["import_path"] == "llama_export.runtime.serve.ray:app"
            serve_ray.app({**a["args"], "bundle": str(tiny_bundle)})
            for d in a.get("deployments", []):
                assert d["name"] == serve_ray.LlamaExportReplica.name
    args = cluster["applications"][0]["args"]
    assert args["backend"] == "trt" and args["replica_gpus"] == 1
    groups = kube["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert {g["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] for g in groups} == \
        {"NVIDIA-L4", "NVIDIA-A10G"}


def test_cli_ray_errors_are_one_line(tiny_bundle: Path) -> None:
    cli = Path(sys.executable).with_name("llama-export")
    r = subprocess.run([str(cli), "serve", str(tiny_bundle), "--replicas", "2"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: --replicas only applies with --ray: add --ray"]
    r = subprocess.run([str(cli), "serve", str(tiny_bundle), "--ray", "--autoscale", "x"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.stderr.strip().splitlines() == ["error: --autoscale 'x' is not MIN:MAX: use e.g. 1:4"]
    no_ray = ("import sys; sys.modules['ray'] = None\n"
              "from llama_export.runtime.cli import main\n"
              f"main(['serve', {str(tiny_bundle)!r}, '--ray'])")
    r = subprocess.run([sys.executable, "-c", no_ray], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.stderr.strip().splitlines() == [
        "error: `llama-export serve --ray` (module 'ray' not found) needs the 'ray' extra: "
        "pip install 'llama-export[ray]'"]
