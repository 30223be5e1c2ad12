"""The compose stack's flowlog services, run as real processes exactly as compose configures them.

Every service built from the flowlog image is started with its ``command`` and ``environment``
as ``docker-compose config`` resolves them, as many times as its ``deploy.replicas``, running
the image's entrypoint ``flowlog``. Only what names the surroundings is rewritten: the Redis URL
(a private redis-server), the HTTP port (a free one) and the OTLP endpoint (a gRPC receiver of
the test, the protocol compose sets). Each replica gets its own working directory, as each
container has its own filesystem.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.compose_model import built_services, resolved_compose
from support.otlp_receiver import SpanSink, otlp_grpc_receiver
from support.processes import REPO
from support.prometheus import wait_until
from support.redis_server import RedisServer

from services.bench.redis_launcher import free_port

pytestmark = [pytest.mark.redis, pytest.mark.slow]

FLOWLOG = str(Path(sys.executable).parent / "flowlog")
DOCKERFILE = "compose/Dockerfile"


class ComposeProcess:
    """One replica of a compose service: ``flowlog <command>`` with its log in a file."""

    def __init__(self, name: str, command: list[str], env: Mapping[str, str], workdir: Path):
        self.name = name
        self.port = int(env["FLOWLOG_HTTP_PORT"])
        workdir.mkdir(parents=True)
        self.log_path = workdir / "service.log"
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                [FLOWLOG, *command], env=dict(env), cwd=workdir, stdout=log, stderr=log
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def ready(self) -> bool | None:
        if self.popen.poll() is not None:
            raise AssertionError(f"{self.name} exited {self.popen.returncode}:\n{self.log()}")
        try:
            response = httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1)
        except httpx.TransportError:
            return None
        return True if response.status_code == 200 else None

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text

    def stop(self) -> int:
        """SIGTERM, as ``docker compose stop`` does; the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        return self.popen.returncode


def sample(text: str, name: str, labels: Mapping[str, str]) -> float | None:
    """The value of the sample ``name{labels}`` of a Prometheus exposition, if present."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == dict(labels):
                return float(found.value)
    return None


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[list[ComposeProcess], str, SpanSink]]:
    """Every flowlog service of the compose file running as configured; yields the processes,
    the Redis URL and the sink of the OTLP receiver."""
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    model = resolved_compose(REPO / "compose" / "compose.yaml", base)
    services = built_services(model, DOCKERFILE)
    assert set(services) == {"scheduler", "runner", "checkpointer", "metrics"}
    processes: list[ComposeProcess] = []
    with RedisServer() as redis, otlp_grpc_receiver() as (endpoint, sink):
        try:
            for name, service in services.items():
                for replica in range((service.get("deploy") or {}).get("replicas", 1)):
                    env = {
                        **base,
                        **{k: v for k, v in service["environment"].items() if v is not None},
                        "FLOWLOG_REDIS_URL": redis.url,
                        "FLOWLOG_HTTP_PORT": str(free_port()),
                        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                    }
                    workdir = tmp_path / f"{name}-{replica + 1}"
                    processes.append(ComposeProcess(name, service["command"], env, workdir))
            for proc in processes:
                wait_until(proc.ready, timeout_s=30, what=f"{proc.name} ready")
            yield processes, redis.url, sink
        finally:
            for proc in processes:
                proc.stop()


def test_compose_services_run_a_workflow_to_completion(
    stack: tuple[list[ComposeProcess], str, SpanSink], tmp_path: Path
) -> None:
    processes, redis_url, sink = stack
    assert [p.name for p in processes].count("runner") == 2
    done = subprocess.run(
        [FLOWLOG, "submit", str(REPO / "examples" / "retry.yaml"), "--wait", "-o", "json"],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "FLOWLOG_REDIS_URL": redis_url},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, Any] = msgspec.json.decode(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "completed"

    (metrics,) = [p for p in processes if p.name == "metrics"]
    finished = {"workflow": "retry", "status": "completed"}
    wait_until(
        lambda: sample(metrics.metrics(), "flowlog_runs_finished_total", finished) == 1 or None,
        timeout_s=30,
        what="the run counted on the metrics service's /metrics",
    )
    retried = {"workflow": "retry", "step": "unreliable"}
    assert sample(metrics.metrics(), "flowlog_step_retries_total", retried) == 2

    for proc in processes:
        assert proc.stop() == 0, f"{proc.name} did not stop cleanly on SIGTERM:\n{proc.log()}"
    spans = [s for s in sink.spans() if s.attributes.get("flowlog.run_id") == result["run_id"]]
    assert {s.service for s in spans} == {"flowlog-scheduler", "flowlog-runner"}
    assert len({s.trace_id for s in spans}) == 1
