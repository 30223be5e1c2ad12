"""Prometheus for tests: the ``prometheus``/``promtool`` binaries, a real Prometheus server on a
free port, the queries of Grafana dashboards and their macro expansion, and a synthetic history
that gives every flowlog metric samples.

The binaries come from the Debian package ``prometheus`` (installed by the test setup script);
tests fail with a clear message, never skip, when they are missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
import yaml

from eventstore.events import (
    CheckpointTaken,
    Envelope,
    ErrorInfo,
    EventData,
    FallbackStarted,
    RunCancelled,
    RunCancelRequested,
    RunCompleted,
    RunFailed,
    RunPaused,
    RunResumed,
    RunStarted,
    RunSubmitted,
    StepCacheHit,
    StepCancelled,
    StepFailed,
    StepRetryScheduled,
    StepScheduled,
    StepSkipped,
    StepStarted,
    StepSucceeded,
)
from eventstore.ids import new_event_id
from eventstore.store import EventStore
from services.bench.redis_launcher import free_port
from services.observability.prometheus import ProcessMetrics

#: What Grafana substitutes for its interval macros when the tests evaluate a panel query.
GRAFANA_MACROS: Mapping[str, str] = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}
_T = TypeVar("_T")
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def binary(name: str) -> str:
    """The path of ``name`` on PATH; fails with the package that provides it."""
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(
            f"{name} is not on PATH: install the Debian package 'prometheus' "
            "(scripts/install-system-packages.sh does)"
        )
    return path


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``promtool args...`` and return the finished process (output as text)."""
    return subprocess.run(
        [binary("promtool"), *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def wait_until(
    probe: Callable[[], _T | None], *, timeout_s: float, what: str, interval_s: float = 0.1
) -> _T:
    """Call ``probe`` until it returns something other than None; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def expand_grafana(expr: str, variables: Mapping[str, str] | None = None) -> str:
    """``expr`` with Grafana's interval macros (:data:`GRAFANA_MACROS`) and the dashboard
    ``variables`` (``$name``, ``${name}``, ``${name:fmt}``, ``[[name]]``) substituted.

    Raises ``KeyError`` naming a variable that has no value.
    """
    values = {**GRAFANA_MACROS, **(variables or {})}

    def substitute(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group is not None)
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(substitute, expr)


def panel_queries(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL expression) of every target of every panel, rows included."""
    for panel in dashboard.get("panels", []):
        for target in panel.get("targets", []):
            yield panel.get("title", ""), target["expr"]
        yield from panel_queries(panel)


class PrometheusServer:
    """A real Prometheus on a free port of 127.0.0.1 scraping ``targets`` (``host:port``)
    every ``scrape_interval``, with its config and storage in a temporary directory."""

    def __init__(self, targets: list[str], *, scrape_interval: str = "1s") -> None:
        self.targets = targets
        self.scrape_interval = scrape_interval
        self.port = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the server and wait until it reports ready."""
        self._dir = tempfile.TemporaryDirectory(prefix="flowlog-prometheus-")
        root = Path(self._dir.name)
        config = {
            "global": {
                "scrape_interval": self.scrape_interval,
                "evaluation_interval": self.scrape_interval,
            },
            "scrape_configs": [
                {"job_name": "flowlog", "static_configs": [{"targets": self.targets}]}
            ],
        }
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        log = (root / "prometheus.log").open("wb")
        self._process = subprocess.Popen(
            [
                binary("prometheus"),
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_until(self._ready, timeout_s=timeout_s, what=f"prometheus ready on {self.url}")

    def _ready(self) -> bool | None:
        assert self._process is not None
        assert self._dir is not None
        if self._process.poll() is not None:
            log = (Path(self._dir.name) / "prometheus.log").read_text()
            raise RuntimeError(f"prometheus exited with {self._process.returncode}:\n{log}")
        try:
            response = httpx.get(f"{self.url}/-/ready", timeout=1.0)
        except httpx.TransportError:
            return None
        return True if response.status_code == 200 else None

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The result of an instant query at the current time (raises on a query error)."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10.0)
        body = response.json()
        if body.get("status") != "success":
            raise ValueError(f"query {expr!r} failed: {body.get('error', body)}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def targets_up(self) -> bool | None:
        """True once every scrape target was scraped successfully."""
        samples = self.query("up")
        if len(samples) == len(self.targets) and all(s["value"][1] == "1" for s in samples):
            return True
        return None

    def stop(self) -> None:
        """Stop the server and delete its directory."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def synthetic_runs(prefix: str, start_ms: int) -> dict[str, list[Envelope]]:
    """Seven runs of two workflows whose events give every metric of the metrics model
    samples: completed, failed, cancelled, running, paused and submitted runs; retries, a
    fallback, a skip, a cache miss and a cache hit. Events have seq 0 (the store assigns it);
    timestamps are ``start_ms`` plus fixed offsets."""
    err = ErrorInfo(type="TimeoutError", message="agent timed out")
    fatal = ErrorInfo(type="ValueError", message="bad template", retryable=False)

    def cached(step: str, agent: str) -> StepScheduled:
        return StepScheduled(step=step, attempt=1, agent=agent, cache_ttl_s=60.0)

    plans: dict[str, list[tuple[int, EventData]]] = {
        "completed": [
            (0, RunSubmitted(workflow="ingest", digest="d1", definition="{}")),
            (5, RunStarted()),
            (10, cached("fetch", "http")),
            (20, StepStarted(step="fetch", attempt=1, agent="http")),
            (270, StepSucceeded(step="fetch", attempt=1, agent="http")),
            (280, StepScheduled(step="parse", attempt=1, agent="python")),
            (290, StepStarted(step="parse", attempt=1, agent="python")),
            (1_290, StepFailed(step="parse", attempt=1, agent="python", error=err)),
            (1_300, StepRetryScheduled(step="parse", attempt=2, delay_s=1.0, due_ms=2_300)),
            (2_300, StepScheduled(step="parse", attempt=2, agent="python")),
            (2_310, StepStarted(step="parse", attempt=2, agent="python")),
            (2_810, StepSucceeded(step="parse", attempt=2, agent="python")),
            (2_820, StepSkipped(step="notify", reason="when is false")),
            (2_830, CheckpointTaken(covered_seq=13, snapshot_key="snap")),
            (2_840, RunCompleted()),
        ],
        "cache-hit": [
            (0, RunSubmitted(workflow="ingest", digest="d1", definition="{}")),
            (5, RunStarted()),
            (10, cached("fetch", "http")),
            (15, StepCacheHit(step="fetch", attempt=1, agent="http")),
            (16, StepSucceeded(step="fetch", attempt=1, agent="http", cached=True)),
            (20, StepScheduled(step="parse", attempt=1, agent="python")),
            (30, StepStarted(step="parse", attempt=1, agent="python")),
            (530, StepFailed(step="parse", attempt=1, agent="python", error=err)),
            (
                540,
                FallbackStarted(step="parse", attempt=1, fallback_index=1, agent="llm", reason=err),
            ),
            (550, StepScheduled(step="parse", attempt=1, agent="llm", fallback_index=1)),
            (560, StepStarted(step="parse", attempt=1, agent="llm", fallback_index=1)),
            (4_560, StepSucceeded(step="parse", attempt=1, agent="llm", fallback_index=1)),
            (4_570, RunCompleted(degraded=True)),
        ],
        "failed": [
            (0, RunSubmitted(workflow="report", digest="d2", definition="{}")),
            (5, RunStarted()),
            (10, StepScheduled(step="render", attempt=1, agent="shell")),
            (20, StepStarted(step="render", attempt=1, agent="shell")),
            (70, StepFailed(step="render", attempt=1, agent="shell", error=fatal)),
            (80, RunFailed(error=fatal, step="render")),
        ],
        "cancelled": [
            (0, RunSubmitted(workflow="report", digest="d2", definition="{}")),
            (5, RunStarted()),
            (10, RunPaused(reason="operator")),
            (20, RunResumed()),
            (30, StepScheduled(step="render", attempt=1, agent="shell")),
            (40, RunCancelRequested(reason="operator")),
            (50, StepCancelled(step="render", attempt=1, reason="run cancelled")),
            (60, RunCancelled(reason="operator")),
        ],
        "running": [
            (0, RunSubmitted(workflow="report", digest="d2", definition="{}")),
            (5, RunStarted()),
            (10, StepScheduled(step="render", attempt=1, agent="shell")),
            (20, StepStarted(step="render", attempt=1, agent="shell")),
        ],
        "paused": [
            (0, RunSubmitted(workflow="ingest", digest="d1", definition="{}")),
            (5, RunStarted()),
            (10, RunPaused(reason="operator")),
        ],
        "submitted": [(0, RunSubmitted(workflow="ingest", digest="d1", definition="{}"))],
    }
    return {
        f"{prefix}-{name}": [
            Envelope(
                event_id=new_event_id(),
                run_id=f"{prefix}-{name}",
                ts=start_ms + offset,
                producer="test-workload",
                data=data,
            )
            for offset, data in plan
        ]
        for name, plan in plans.items()
    }


async def append_synthetic(
    store: EventStore, metrics: ProcessMetrics, prefix: str, start_ms: int
) -> int:
    """Append :func:`synthetic_runs` to ``store`` (plus a repeat of one event, a dedup hit),
    count the outcomes in ``metrics``, and return the number of events appended."""
    runs = synthetic_runs(prefix, start_ms)
    for run_id, events in runs.items():
        metrics.count_appends(await store.append(run_id, events))
    first_run, first_events = next(iter(runs.items()))
    metrics.count_appends(await store.append(first_run, first_events[:1]))
    return sum(len(events) for events in runs.values())
