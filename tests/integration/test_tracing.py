"""Traces: configuration from OTEL_* variables, the spans of runs in one process, and one trace
per run across real scheduler, runner and CLI processes exporting to a real OTLP receiver."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from support.otlp_receiver import ReceivedSpan, otlp_http_receiver
from support.processes import REPO, Cluster
from support.waits import wait_for_event, wait_status

from eventstore.events import (
    Envelope,
    ErrorInfo,
    EventData,
    RunStarted,
    StepFailed,
    StepScheduled,
    StepStarted,
    StepSucceeded,
)
from eventstore.keys import Keys
from eventstore.memory import MemoryStore
from eventstore.redis_store import RedisStore
from eventstore.store import AppendRequest, AppendResult, Delivery, Outcome, StoreConfig, Timer
from services import commands
from services.agents.resilience import AgentExecutor
from services.observability.tracing import (
    RunTracer,
    TracingConfigError,
    format_traceparent,
    new_tracer_provider,
    parse_traceparent,
    span_exporters,
)
from services.producer import Producer
from services.runner.service import RunnerService
from services.scheduler.service import SchedulerService
from services.settings import RunnerSettings
from services.workflow.loader import load_definition

EXAMPLES = REPO / "examples"
CONFIG = StoreConfig(prefix="trace-test", partitions=4)
KEYS = Keys(CONFIG.prefix, CONFIG.partitions)
A_TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
B_TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"


@pytest.fixture
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """An environment without any OTEL_* variable."""
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def recorded() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """A provider exporting every ended span at once to memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        yield provider, exporter
    finally:
        provider.shutdown()


def event(data: EventData, traceparent: str = "", run_id: str = "run-1") -> Envelope:
    return Producer("test", "t").envelope(run_id, data, traceparent=traceparent)


def appended(request: AppendRequest, outcome: Outcome = Outcome.APPENDED) -> list[AppendResult]:
    return [AppendResult(event_id=e.event_id, outcome=outcome) for e in request.events]


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.usefixtures("no_otel_env")
def test_without_otel_variables_tracing_is_off() -> None:
    assert span_exporters() == []
    assert new_tracer_provider("flowlog-test") is None
    assert not RunTracer(CONFIG).enabled


@pytest.mark.usefixtures("no_otel_env")
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, [HttpSpanExporter]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://h:4318/v1/traces"}, [HttpSpanExporter]),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            [GrpcSpanExporter],
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            },
            [HttpSpanExporter],
        ),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, [HttpSpanExporter]),
        ({"OTEL_TRACES_EXPORTER": "console,otlp"}, [ConsoleSpanExporter, HttpSpanExporter]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318"}, []),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318"}, []),
    ],
)
def test_otel_variables_choose_the_exporters(
    env: dict[str, str], expected: list[type], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    exporters = span_exporters()
    try:
        assert [type(e) for e in exporters] == expected
    finally:
        for exporter in exporters:
            exporter.shutdown()


@pytest.mark.usefixtures("no_otel_env")
@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
        },
    ],
)
def test_an_exporter_flowlog_lacks_is_a_named_error(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(TracingConfigError, match=r"zipkin|http/json"):
        span_exporters()


@pytest.mark.usefixtures("no_otel_env")
@pytest.mark.parametrize(
    ("env", "service"),
    [
        ({}, "flowlog-test"),
        ({"OTEL_SERVICE_NAME": "scheduler-eu"}, "scheduler-eu"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "deployment=x, service.name=from-attrs"}, "from-attrs"),
    ],
)
def test_service_name_is_the_default_unless_otel_names_one(
    env: dict[str, str], service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    provider = new_tracer_provider("flowlog-test")
    assert provider is not None
    try:
        assert provider.resource.attributes["service.name"] == service
    finally:
        provider.shutdown()


def test_traceparent_round_trips_and_rejects_garbage() -> None:
    context = parse_traceparent(A_TRACEPARENT)
    assert context.is_valid
    assert context.is_remote
    assert format_traceparent(context) == A_TRACEPARENT
    for bad in ("", "garbage", "00-00000000000000000000000000000000-b7ad6b7169203331-01"):
        assert not parse_traceparent(bad).is_valid
        assert format_traceparent(parse_traceparent(bad)) == ""


# --- spans in one process ---------------------------------------------------------------------


def test_tracing_off_opens_no_span_and_forwards_context() -> None:
    tracer = RunTracer(CONFIG, trace.NoOpTracerProvider())
    assert not tracer.enabled
    submitted = event(RunStarted())
    with tracer.sending("run w", submitted) as sent:
        assert sent is submitted
    with tracer.sending("cancel w", submitted, A_TRACEPARENT) as sent:
        assert sent.traceparent == A_TRACEPARENT
    causes = [event(RunStarted(), A_TRACEPARENT), event(RunStarted())]
    spans = tracer.decisions("scheduler", {"run-1": causes})
    assert spans.start("run-1", "w", 2, [RunStarted()]) == A_TRACEPARENT
    assert spans.traceparent("run-1") == A_TRACEPARENT
    timer = Timer(run_id="run-2", timer_id="wake", due_ms=1, payload=B_TRACEPARENT.encode())
    assert tracer.decisions("scheduler", {"run-2": [timer]}).start("run-2", "w", 3, []) == (
        B_TRACEPARENT
    )
    scheduled = event(StepScheduled(step="s", attempt=1, agent="noop"), A_TRACEPARENT)
    with tracer.step(Delivery(envelope=scheduled, partition=0, entry_id="1-0"), "runner:default"):
        assert not trace.get_current_span().get_span_context().is_valid
        fact = StepStarted(step="s", attempt=1, agent="noop")
        assert tracer.fact_traceparent(fact, A_TRACEPARENT) == A_TRACEPARENT


def test_submission_span_is_a_producer_root_whose_context_the_event_carries(
    recorded: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = recorded
    store = MemoryStore(CONFIG)
    definition = load_definition(EXAMPLES / "sequential.yaml")

    async def submit() -> str:
        result = await commands.submit(
            store, Producer("cli", "t"), definition, tracer_provider=provider
        )
        (first,) = [e async for e in store.read_run(result.run_id)]
        return first.traceparent

    traceparent = anyio.run(submit)
    (span,) = exporter.get_finished_spans()
    assert span.name == f"run {definition.name}"
    assert span.kind is SpanKind.PRODUCER
    assert span.parent is None
    assert format_traceparent(span.context) == traceparent
    attributes = dict(span.attributes or {})
    run_id = attributes["flowlog.run_id"]
    assert isinstance(run_id, str)
    assert attributes["messaging.system"] == "redis"
    assert attributes["messaging.operation.type"] == "send"
    assert attributes["messaging.destination.name"] == KEYS.feed(KEYS.partition(run_id))
    assert attributes["messaging.message.id"]
    assert attributes["flowlog.event_type"] == "run_submitted"


def test_decision_span_is_a_child_of_its_trigger_and_links_other_causes(
    recorded: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = recorded
    tracer = RunTracer(CONFIG, provider)
    first = event(StepSucceeded(step="a", attempt=1, agent="noop"), A_TRACEPARENT)
    untraced = event(StepStarted(step="b", attempt=1, agent="noop"))
    last = event(StepSucceeded(step="b", attempt=1, agent="noop"), B_TRACEPARENT)
    spans = tracer.decisions("scheduler", {"run-1": [first, untraced, last]})
    decisions: list[EventData] = [StepScheduled(step="c", attempt=1, agent="echo")]
    traceparent = spans.start("run-1", "wf", 7, decisions)
    decision = event(decisions[0], traceparent)
    request = AppendRequest(run_id="run-1", events=[decision], expected_seq=7)
    spans.end(request, appended(request))
    (span,) = exporter.get_finished_spans()
    assert span.name == "decide wf"
    assert span.kind is SpanKind.CONSUMER
    assert span.parent is not None
    assert format_traceparent(span.parent) == B_TRACEPARENT
    assert [format_traceparent(link.context) for link in span.links] == [A_TRACEPARENT]
    assert format_traceparent(span.context) == traceparent
    assert dict(span.attributes or {}) == {
        "messaging.system": "redis",
        "messaging.operation.type": "process",
        "messaging.consumer.group.name": "scheduler",
        "messaging.destination.name": KEYS.feed(KEYS.partition("run-1")),
        "messaging.message.id": last.event_id,
        "messaging.batch.message_count": 3,
        "flowlog.run_id": "run-1",
        "flowlog.workflow": "wf",
        "flowlog.seq": 7,
        "flowlog.decisions": ("step_scheduled",),
        "flowlog.appended": 1,
    }
    assert spans.next_causes() == {"run-1": [decision]}


def test_timer_decision_is_a_child_of_the_payload_and_a_conflict_keeps_the_causes(
    recorded: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = recorded
    tracer = RunTracer(CONFIG, provider)
    timer = Timer(run_id="run-1", timer_id="wake", due_ms=5, payload=A_TRACEPARENT.encode())
    spans = tracer.decisions("scheduler", {"run-1": [timer]})
    decisions: list[EventData] = [StepScheduled(step="a", attempt=2, agent="flaky")]
    traceparent = spans.start("run-1", "wf", 3, decisions)
    assert spans.traceparent("run-1") == traceparent
    request = AppendRequest(run_id="run-1", events=[event(decisions[0], traceparent)])
    spans.end(request, appended(request, Outcome.CONFLICT))
    (span,) = exporter.get_finished_spans()
    assert span.parent is not None
    assert format_traceparent(span.parent) == A_TRACEPARENT
    attributes = dict(span.attributes or {})
    assert attributes["messaging.destination.name"] == KEYS.timers(KEYS.partition("run-1"))
    assert attributes["messaging.message.id"] == "wake"
    assert attributes["flowlog.conflict"] is True
    assert attributes["flowlog.appended"] == 0
    assert spans.next_causes() == {"run-1": [timer]}


def test_step_span_is_current_while_the_step_runs_and_carries_its_outcome(
    recorded: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = recorded
    tracer = RunTracer(CONFIG, provider)
    scheduled = event(
        StepScheduled(step="each", attempt=2, agent="echo", item=3, iteration=1), A_TRACEPARENT
    )
    delivery = Delivery(envelope=scheduled, partition=1, entry_id="5-0", deliveries=2)
    error = ErrorInfo(type="ValueError", message="bad input")
    with tracer.step(delivery, "runner:default"):
        current = trace.get_current_span().get_span_context()
        started = tracer.fact_traceparent(StepStarted(step="each", attempt=2, agent="echo"), "")
        failed = tracer.fact_traceparent(
            StepFailed(step="each", attempt=2, agent="echo", error=error), ""
        )
    (span,) = exporter.get_finished_spans()
    assert started == failed == format_traceparent(current) == format_traceparent(span.context)
    assert span.name == "step each"
    assert span.kind is SpanKind.CONSUMER
    assert span.parent is not None
    assert format_traceparent(span.parent) == A_TRACEPARENT
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "bad input"
    assert dict(span.attributes or {}) == {
        "messaging.system": "redis",
        "messaging.operation.type": "process",
        "messaging.destination.name": KEYS.work(KEYS.partition("run-1"), "default"),
        "messaging.consumer.group.name": "runner:default",
        "messaging.message.id": scheduled.event_id,
        "flowlog.run_id": "run-1",
        "flowlog.step": "each",
        "flowlog.attempt": 2,
        "flowlog.agent": "echo",
        "flowlog.queue": "default",
        "flowlog.fallback_index": 0,
        "flowlog.deliveries": 2,
        "flowlog.item": 3,
        "flowlog.iteration": 1,
        "error.type": "ValueError",
    }


def _ancestors(span_id: int, parents: dict[int, int | None]) -> list[int]:
    chain: list[int] = []
    parent = parents.get(span_id)
    while parent is not None:
        chain.append(parent)
        parent = parents.get(parent)
    return chain


@pytest.mark.anyio
async def test_services_in_one_process_build_one_trace_per_run(
    recorded: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = recorded
    store = MemoryStore(CONFIG)
    scheduler = SchedulerService(
        store, Producer("scheduler", "t"), consumer="s", block_ms=20, tracer_provider=provider
    )
    runner = RunnerService(
        store,
        Producer("runner", "t"),
        AgentExecutor.from_settings(RunnerSettings()),
        consumer="r",
        block_ms=20,
        tracer_provider=provider,
    )
    definition = load_definition(EXAMPLES / "retry.yaml")
    async with anyio.create_task_group() as tg:
        await tg.start(scheduler.run)
        await tg.start(runner.run)
        submitted = await commands.submit(
            store, Producer("cli", "t"), definition, tracer_provider=provider
        )
        final = await commands.wait(store, submitted.run_id, timeout_s=30)
        scheduler.stop()
        runner.stop()
    assert final.status == "completed"
    events = [e async for e in store.read_run(submitted.run_id)]
    spans: list[ReadableSpan] = list(exporter.get_finished_spans())
    by_id = {span.context.span_id: span for span in spans}
    parents = {span.context.span_id: span.parent.span_id if span.parent else None for span in spans}
    (root,) = [span for span in spans if span.parent is None]
    assert root.name == "run retry"
    assert {span.context.trace_id for span in spans} == {root.context.trace_id}
    decides = [span for span in spans if span.name == "decide retry"]
    steps = [span for span in spans if span.name.startswith("step ")]
    assert len(steps) == 4  # unreliable: 3 attempts, after: 1
    assert {span.kind for span in decides + steps} == {SpanKind.CONSUMER}
    for span in steps:
        parent = by_id[parents[span.context.span_id] or 0]
        assert parent.name == "decide retry"
    for span in decides:
        assert root.context.span_id in _ancestors(span.context.span_id, parents)
    failed = [s for s in steps if s.status.status_code is StatusCode.ERROR]
    assert len(failed) == 2
    assert {dict(s.attributes or {})["flowlog.attempt"] for s in failed} == {1, 2}
    woken = [
        span
        for span in decides
        if dict(span.attributes or {})["messaging.destination.name"]
        == KEYS.timers(KEYS.partition(submitted.run_id))
    ]
    assert woken, "a retry after backoff is decided on a timer"
    for span in woken:
        assert by_id[parents[span.context.span_id] or 0].name == "decide retry"
    spans_by_traceparent = {format_traceparent(span.context): span for span in spans}
    for envelope in events:
        span = spans_by_traceparent[envelope.traceparent]
        if isinstance(envelope.data, StepStarted | StepSucceeded | StepFailed):
            assert span.name == f"step {envelope.data.step}"
        elif envelope.type != "run_submitted":
            assert span.name == "decide retry"


# --- across processes -----------------------------------------------------------------------


def cli_json(cluster: Cluster, *args: str, **env: str) -> Any:
    """``flowlog ARGS -o json`` with ``env`` added to the cluster's environment."""
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", *args, "-o", "json"],
        env={**cluster.env, **env},
        cwd=cluster.workdir,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode in (0, 1), f"flowlog {args} exited {done.returncode}\n{done.stderr}"
    return msgspec.json.decode(done.stdout.strip().splitlines()[-1])


def without_otel(cluster: Cluster) -> None:
    for name in [n for n in cluster.env if n.startswith("OTEL_")]:
        del cluster.env[name]


def run_spans(spans: Sequence[ReceivedSpan], run_id: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.attributes.get("flowlog.run_id") == run_id]


def assert_one_trace(spans: Sequence[ReceivedSpan], root_name: str) -> dict[str, ReceivedSpan]:
    """Checks the trace shape of one run; returns its spans by span id."""
    by_id = {s.span_id: s for s in spans}
    (root,) = [s for s in spans if s.parent_span_id == ""]
    assert (root.name, root.kind, root.service) == (root_name, "PRODUCER", "flowlog-cli")
    assert {s.trace_id for s in spans} == {root.trace_id}
    for span in spans:
        chain = [span]
        while chain[-1].parent_span_id:
            chain.append(by_id[chain[-1].parent_span_id])
        assert chain[-1] is root, f"{span.name} does not descend from the run's root"
        if span.name.startswith("step "):
            assert (span.kind, span.service) == ("CONSUMER", "flowlog-runner")
            parent = by_id[span.parent_span_id]
            assert parent.name.startswith("decide "), f"{span.name} has parent {parent.name}"
            assert parent.service == "flowlog-scheduler"
        elif span.name.startswith("decide "):
            assert (span.kind, span.service) == ("CONSUMER", "flowlog-scheduler")
    return by_id


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines a service wrote (other output, if any, is skipped)."""
    lines = []
    for raw in path.read_text().splitlines():
        if raw.startswith("{"):
            lines.append(msgspec.json.decode(raw))
    return lines


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_one_trace_per_run_across_processes(
    services: Cluster, store: RedisStore, tmp_path: Path
) -> None:
    with otlp_http_receiver() as (endpoint, sink):
        without_otel(services)
        services.env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
        scheduler = services.start("scheduler")
        runner = services.start("runner")
        done = cli_json(services, "submit", str(EXAMPLES / "retry.yaml"), "--wait")
        assert done["status"] == "completed"
        endless = tmp_path / "endless.yaml"
        endless.write_text(
            "name: endless\nsteps:\n  - {id: wait, agent: sleep, with: {seconds: 300}}\n"
        )
        cancelled = cli_json(services, "submit", str(endless))["run_id"]
        await wait_for_event(store, cancelled, StepStarted)
        cli_json(services, "runs", "cancel", cancelled)
        await wait_status(store, cancelled, "cancelled")
        services.stop_all()
        spans = sink.spans()

    retry = run_spans(spans, done["run_id"])
    assert_one_trace(retry, "run retry")
    trace_ids = {s.trace_id for s in retry}
    # The services' JSON log lines carry the run, step, event and the run's trace.
    step_lines = [
        line for line in json_lines(runner.log_path) if line.get("run_id") == done["run_id"]
    ]
    assert {line["step"] for line in step_lines} == {"unreliable", "after"}
    assert all(line["event_id"] and line["trace_id"] in trace_ids for line in step_lines)
    decided = [
        line for line in json_lines(scheduler.log_path) if line.get("run_id") == done["run_id"]
    ]
    assert {line["msg"] for line in decided} >= {"decided run_started", "decided run_completed"}
    assert all(line["event_id"] and line["trace_id"] in trace_ids for line in decided)
    names = sorted(s.name for s in retry)
    assert names.count("step unreliable") == 3
    assert names.count("step after") == 1
    assert {s.service for s in retry} == {"flowlog-cli", "flowlog-scheduler", "flowlog-runner"}
    feed = Keys(services.prefix, 4).feed(Keys(services.prefix, 4).partition(done["run_id"]))
    assert {s.attributes["messaging.destination.name"] for s in retry if s.kind == "PRODUCER"} == {
        feed
    }

    by_id = assert_one_trace(run_spans(spans, cancelled), "run endless")
    (cancel,) = [s for s in by_id.values() if s.name == "cancel endless"]
    assert (cancel.kind, cancel.service) == ("PRODUCER", "flowlog-cli")
    assert by_id[cancel.parent_span_id].name == "run endless"
    after_cancel = [s for s in by_id.values() if s.parent_span_id == cancel.span_id]
    assert {s.name for s in after_cancel} == {"decide endless"}
    assert any("run_cancelled" in s.attributes["flowlog.decisions"] for s in after_cancel)
    (step,) = [s for s in by_id.values() if s.name == "step wait"]
    assert step.status == "UNSET"


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_without_otel_variables_services_export_nothing_and_forward_context(
    services: Cluster, store: RedisStore
) -> None:
    with otlp_http_receiver() as (endpoint, sink):
        without_otel(services)
        services.start("scheduler")
        services.start("runner")
        untraced = cli_json(services, "submit", str(EXAMPLES / "parallel.yaml"), "--wait")
        traced = cli_json(
            services,
            "submit",
            str(EXAMPLES / "parallel.yaml"),
            "--wait",
            OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        )
        assert untraced["status"] == traced["status"] == "completed"
        for proc in services.processes:
            assert proc.stop() == 0
        spans = sink.spans()
        requests = sink.requests

    # the CLI run with OTEL_EXPORTER_OTLP_ENDPOINT exported its root span: the receiver works
    (root,) = spans
    assert requests == 1
    assert (root.name, root.service, root.attributes["flowlog.run_id"]) == (
        "run parallel",
        "flowlog-cli",
        traced["run_id"],
    )
    # nothing else created a span: the untraced run has no trace context at all, and the
    # services forwarded the root's context of the traced run unchanged
    untraced_events = [e async for e in store.read_run(untraced["run_id"])]
    assert {e.traceparent for e in untraced_events} == {""}
    traced_events = [e async for e in store.read_run(traced["run_id"])]
    assert len(traced_events) > 5
    assert {tuple(e.traceparent.split("-")[1:3]) for e in traced_events} == {
        (root.trace_id, root.span_id)
    }
