"""Health/metrics endpoints, the Prometheus exposition of flowlog metrics, and JSON logs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import httpx
import msgspec
import pytest
from opentelemetry import trace
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support.prometheus import promtool, synthetic_runs

from eventstore.store import AppendResult, DeadLetter, GroupInfo, Outcome, TrimReport
from projections.metrics_model import DURATION_BUCKETS, fold
from services.observability.http import EndpointBindError, HealthServer
from services.observability.logs import (
    JsonLineFormatter,
    UnknownLogLevel,
    configure_logging,
    mask_secrets,
)
from services.observability.prometheus import ProcessMetrics, ProjectorMetrics, new_registry

T0 = 1_700_000_000_000


def exposition(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the registry's text exposition: (name, sorted labels) -> value."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def synthetic_model_registry() -> CollectorRegistry:
    runs = synthetic_runs("r", T0)
    feed = [
        msgspec.structs.replace(event, seq=index + 1)
        for events in runs.values()
        for index, event in enumerate(events)
    ]
    model = fold(feed)
    registry = new_registry()
    ProcessMetrics(registry)
    metrics = ProjectorMetrics(registry, lambda: model)
    metrics.update_store_gauges(
        [GroupInfo(group="scheduler", partition=0, pending=2, lag=5)], [], partitions=2
    )
    return registry


# --- HealthServer ------------------------------------------------------------------------------


@pytest.fixture
def health() -> Iterator[tuple[HealthServer, str]]:
    registry = new_registry()
    ProcessMetrics(registry).appends.labels("appended").inc(3)
    server = HealthServer("127.0.0.1", 0, registry)
    port = server.start()
    yield server, f"http://127.0.0.1:{port}"
    server.stop()


def test_healthz_answers_while_the_process_is_alive(health: tuple[HealthServer, str]) -> None:
    _, url = health
    response = httpx.get(f"{url}/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "alive"}


def test_readyz_follows_set_ready_with_the_reason(health: tuple[HealthServer, str]) -> None:
    server, url = health
    starting = httpx.get(f"{url}/readyz")
    assert starting.status_code == 503
    assert starting.json() == {"ready": False, "reason": "starting"}

    server.set_ready(True)
    assert httpx.get(f"{url}/readyz").status_code == 200

    server.set_ready(False, "store unavailable: connection refused")
    not_ready = httpx.get(f"{url}/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json()["reason"] == "store unavailable: connection refused"


def test_metrics_serves_the_registry_as_prometheus_text(health: tuple[HealthServer, str]) -> None:
    _, url = health
    response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'flowlog_appends_total{outcome="appended"} 3.0' in response.text


def test_unknown_path_is_404(health: tuple[HealthServer, str]) -> None:
    _, url = health
    assert httpx.get(f"{url}/nothing").status_code == 404


def test_stop_closes_the_port(health: tuple[HealthServer, str]) -> None:
    server, url = health
    server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz")


def test_a_port_in_use_is_reported_by_name(health: tuple[HealthServer, str]) -> None:
    _, url = health
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(EndpointBindError, match=f"127.0.0.1:{port}"):
        HealthServer("127.0.0.1", port, new_registry()).start()


# --- exposition --------------------------------------------------------------------------------


def test_exposition_passes_promtool_check_metrics() -> None:
    result = promtool("check", "metrics", stdin=generate_latest(synthetic_model_registry()))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


def test_exposition_shows_the_model_counts() -> None:
    samples = exposition(synthetic_model_registry())

    assert samples[("flowlog_runs_submitted_total", (("workflow", "ingest"),))] == 4
    finished = (("status", "failed"), ("workflow", "report"))
    assert samples[("flowlog_runs_finished_total", finished)] == 1
    assert samples[("flowlog_runs_active", (("status", "paused"),))] == 1
    hits = (("agent", "http"), ("step", "fetch"), ("workflow", "ingest"))
    assert samples[("flowlog_step_cache_hits_total", hits)] == 1
    assert samples[("flowlog_step_cache_misses_total", hits)] == 1
    assert samples[("flowlog_events_total", (("type", "run_submitted"),))] == 7
    assert samples[("flowlog_consumer_group_lag", (("group", "scheduler"),))] == 5
    assert samples[("flowlog_consumer_group_pending", (("group", "scheduler"),))] == 2
    assert samples[("flowlog_dead_letters", (("partition", "1"),))] == 0
    assert samples[("flowlog_appends_total", (("outcome", "duplicate"),))] == 0


def test_duration_histograms_are_cumulative_in_seconds() -> None:
    samples = exposition(synthetic_model_registry())
    labels = (("status", "completed"), ("workflow", "ingest"))

    def bucket(le: str) -> float:
        return samples[("flowlog_run_duration_seconds_bucket", (("le", le), *labels))]

    # the two completed ingest runs took 2.84 s and 4.57 s
    assert bucket("2.5") == 0
    assert bucket("5.0") == 2
    assert bucket("+Inf") == 2
    assert samples[("flowlog_run_duration_seconds_count", labels)] == 2
    assert samples[("flowlog_run_duration_seconds_sum", labels)] == pytest.approx(7.41)
    bounds = {key[1][0][1] for key in samples if key[0] == "flowlog_run_duration_seconds_bucket"}
    assert bounds == {*(repr(bound) for bound in DURATION_BUCKETS), "+Inf"}


def test_process_metrics_count_append_outcomes_and_trims() -> None:
    registry = new_registry()
    metrics = ProcessMetrics(registry)
    metrics.count_appends(
        [
            AppendResult(event_id="a", outcome=Outcome.APPENDED, seq=1),
            AppendResult(event_id="b", outcome=Outcome.APPENDED, seq=2),
            AppendResult(event_id="a", outcome=Outcome.DUPLICATE, seq=1),
            AppendResult(event_id="c", outcome=Outcome.CONFLICT, current_seq=2),
        ]
    )
    metrics.count_trim(TrimReport(trimmed={0: 4, 1: 3}, min_ids={}))
    metrics.count_trim(TrimReport(trimmed={0: 100}, min_ids={}, dry_run=True))

    samples = exposition(registry)
    assert samples[("flowlog_appends_total", (("outcome", "appended"),))] == 2
    assert samples[("flowlog_appends_total", (("outcome", "duplicate"),))] == 1
    assert samples[("flowlog_appends_total", (("outcome", "conflict"),))] == 1
    assert samples[("flowlog_appends_total", (("outcome", "mismatch"),))] == 0
    assert samples[("flowlog_feed_trimmed_entries_total", ())] == 7


def test_store_gauges_drop_vanished_groups_and_count_dead_letters_per_partition() -> None:
    registry = new_registry()
    metrics = ProjectorMetrics(registry, lambda: fold([]))
    metrics.update_store_gauges(
        [
            GroupInfo(group="runner", partition=0, pending=1, lag=2),
            GroupInfo(group="runner", partition=1, pending=3, lag=4),
            GroupInfo(group="old", partition=0, pending=9, lag=9),
        ],
        [],
        partitions=2,
    )
    letter = DeadLetter(
        partition=1, entry_id="1-0", group="runner", reason="x", deliveries=5, raw=b""
    )
    metrics.update_store_gauges(
        [GroupInfo(group="runner", partition=0, pending=0, lag=1)], [letter, letter], partitions=2
    )

    samples = exposition(registry)
    assert samples[("flowlog_consumer_group_lag", (("group", "runner"),))] == 1
    assert ("flowlog_consumer_group_lag", (("group", "old"),)) not in samples
    assert ("flowlog_consumer_group_pending", (("group", "old"),)) not in samples
    assert samples[("flowlog_dead_letters", (("partition", "0"),))] == 0
    assert samples[("flowlog_dead_letters", (("partition", "1"),))] == 2


# --- JSON logs ---------------------------------------------------------------------------------


def test_configured_process_logs_json_lines_with_context() -> None:
    script = textwrap.dedent(
        """
        import logging
        from services.observability.logs import configure_logging

        configure_logging("runner", "info")
        configure_logging("runner", "INFO")  # a second call replaces the first handler
        log = logging.getLogger("flowlog.runner")
        log.debug("not shown")
        log.info(
            "step %s done", "fetch",
            extra={
                "run_id": "r1", "step": "fetch", "event_id": "e1", "trace_id": "t1",
                "port": 9400, "url": "redis://:s3cret@redis:6379",
            },
        )
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("connecting to redis://app:hunter2@redis:6379/0 failed")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    lines = [json.loads(line) for line in result.stderr.splitlines()]

    assert len(lines) == 2
    first, second = lines
    assert first["level"] == "INFO"
    assert first["service"] == "runner"
    assert first["logger"] == "flowlog.runner"
    assert first["msg"] == "step fetch done"
    assert (first["run_id"], first["step"], first["event_id"], first["trace_id"]) == (
        "r1",
        "fetch",
        "e1",
        "t1",
    )
    assert first["ts"].endswith("Z")
    assert first["port"] == 9400
    assert first["url"] == "redis://:***@redis:6379"
    assert "s3cret" not in result.stderr
    assert second["level"] == "ERROR"
    assert "hunter2" not in result.stderr
    assert second["msg"] == "connecting to redis://app:***@redis:6379/0 failed"
    assert "RuntimeError: boom" in second["exc"]
    assert "run_id" not in second


def test_trace_id_comes_from_the_current_span_when_not_given() -> None:
    context = trace.SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=False,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )
    record = logging.LogRecord("flowlog.x", logging.INFO, __file__, 1, "hello", None, None)
    with trace.use_span(trace.NonRecordingSpan(context)):
        line = json.loads(JsonLineFormatter("scheduler").format(record))
    assert line["trace_id"] == "0af7651916cd43dd8448eb211c80319c"


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("redis://user:pw@host:6379/0", "redis://user:***@host:6379/0"),
        ("rediss://:secret@host", "rediss://:***@host"),
        ("password=abc token: xyz", "password=*** token: ***"),
        ("Authorization: Bearer abc.def", "Authorization: ***"),
        ("api_key=k1, next", "api_key=***, next"),
        ("redis://host:6379/0 and step=fetch", "redis://host:6379/0 and step=fetch"),
    ],
)
def test_mask_secrets(text: str, masked: str) -> None:
    assert mask_secrets(text) == masked


def test_unknown_log_level_is_refused() -> None:
    with pytest.raises(UnknownLogLevel, match="verbose"):
        configure_logging("scheduler", "verbose")
