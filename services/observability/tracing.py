"""OpenTelemetry traces: one trace per run, carried between processes in the events'
``traceparent`` (W3C trace context).

The spans of a run:

- ``run <workflow>`` (PRODUCER), opened by :func:`services.commands.submit` around appending
  ``run_submitted``: the root of the run's trace. The control commands (pause, resume, cancel,
  retry) open ``<verb> <workflow>`` (PRODUCER) as children of that root.
- ``decide <workflow>`` (CONSUMER), one per scheduling decision that appends events: a child of
  the event (or wake-up timer) that triggered it, linked to the run's other events of the same
  batch. The decision events carry its context, so the scheduler's next decision on its own
  events is its child.
- ``step <step>`` (CONSUMER), one per step attempt in the runner: a child of the
  ``step_scheduled`` event, current while the agent runs (the JSON logs pick its ``trace_id``),
  ended with an error status when the attempt fails. The attempt's facts carry its context.

Attributes follow the OpenTelemetry messaging conventions (``messaging.system`` ``redis``,
``messaging.destination.name`` = the partition feed (for a step, the queue's work stream it
was read from), ``messaging.operation.type``
``send``/``process``, ``messaging.message.id`` = the event id, ``messaging.consumer.group.name``)
plus ``flowlog.*`` attributes (run id, workflow, step, attempt...).

Configuration is only by the standard ``OTEL_*`` variables: tracing is on when
``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``) or, when it is unset, when
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set;
``OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL`` picks ``http/protobuf`` (default) or ``grpc``;
``OTEL_SERVICE_NAME``/``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*`` and the
exporters' own variables apply as the OpenTelemetry SDK defines them; ``OTEL_SDK_DISABLED=true``
or ``OTEL_TRACES_EXPORTER=none`` turn tracing off. When it is off no provider is installed and
no exporter is imported: :class:`RunTracer` then opens no span and only forwards the incoming
``traceparent`` (a decision carries its trigger's, a step fact its ``step_scheduled``'s), so a
trace stays connected through a process that does not export.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Final

import msgspec
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from eventstore.errors import FlowlogError
from eventstore.events import (
    Envelope,
    EventData,
    StepCacheHit,
    StepFailed,
    StepScheduled,
    StepStarted,
    StepSucceeded,
)
from eventstore.keys import Keys
from eventstore.store import AppendRequest, AppendResult, Delivery, Outcome, StoreConfig, Timer

#: The instrumentation scope of every flowlog span.
SCOPE: Final = "flowlog"

MESSAGING_SYSTEM: Final = "messaging.system"
MESSAGING_DESTINATION: Final = "messaging.destination.name"
MESSAGING_OPERATION_TYPE: Final = "messaging.operation.type"
MESSAGING_MESSAGE_ID: Final = "messaging.message.id"
MESSAGING_CONSUMER_GROUP: Final = "messaging.consumer.group.name"
MESSAGING_BATCH_COUNT: Final = "messaging.batch.message_count"
RUN_ID: Final = "flowlog.run_id"

_PROPAGATOR: Final = TraceContextTextMapPropagator()
_NO_SPAN: Final = nullcontext()
_MOVED: Final = frozenset({Outcome.CONFLICT, Outcome.MISMATCH})

#: What triggers a decision: a feed event, or a wake-up timer whose payload is a traceparent.
Cause = Envelope | Timer
StepFact = StepStarted | StepSucceeded | StepFailed | StepCacheHit


class TracingConfigError(FlowlogError):
    """The ``OTEL_*`` variables ask for an exporter or protocol flowlog cannot provide."""


def span_exporters() -> list[SpanExporter]:
    """The span exporters the ``OTEL_*`` environment variables ask for; empty when tracing
    is off (see the module docstring). Raises :class:`TracingConfigError` for an exporter or
    protocol flowlog does not provide."""
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names and (
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    ):
        names = ["otlp"]
    if "none" in names:
        return []
    return [_exporter(name) for name in names]


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    if name != "otlp":
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER={name!r}: flowlog exports traces with 'otlp' or 'console'"
        )
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol == "http/protobuf":
        # imported only when used: the exporters pull in requests or grpc
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    raise TracingConfigError(
        f"OTLP protocol {protocol!r}: flowlog exports traces over 'http/protobuf' or 'grpc'"
    )


def new_tracer_provider(service_name: str) -> TracerProvider | None:
    """A provider batching spans to :func:`span_exporters`, or None when tracing is off.

    The resource's ``service.name`` is ``OTEL_SERVICE_NAME`` (or the one in
    ``OTEL_RESOURCE_ATTRIBUTES``) when set, else ``service_name``.
    """
    exporters = span_exporters()
    if not exporters:
        return None
    named = os.environ.get("OTEL_SERVICE_NAME") or any(
        pair.split("=", 1)[0].strip() == SERVICE_NAME
        for pair in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")
    )
    resource = Resource.create({} if named else {SERVICE_NAME: service_name})
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def configure_tracing(service_name: str) -> TracerProvider | None:
    """Install :func:`new_tracer_provider` as the process's tracer provider (when tracing is
    on) and return it. Call once, at the entry point, before building services."""
    provider = new_tracer_provider(service_name)
    if provider is not None:
        trace.set_tracer_provider(provider)
    return provider


def flush_tracing(timeout_s: float = 10.0) -> None:
    """Export the spans still buffered by the process's provider (a no-op when tracing is
    off); waits at most ``timeout_s``."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.force_flush(int(timeout_s * 1000))


def shutdown_tracing() -> None:
    """Flush and stop the process's provider (a no-op when tracing is off)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()


def format_traceparent(context: SpanContext) -> str:
    """The W3C ``traceparent`` of ``context`` ("" for an invalid one)."""
    if not context.is_valid:
        return ""
    return (
        f"00-{trace.format_trace_id(context.trace_id)}-{trace.format_span_id(context.span_id)}"
        f"-{int(context.trace_flags):02x}"
    )


def parse_traceparent(traceparent: str) -> SpanContext:
    """The remote span context of a W3C ``traceparent`` (invalid when it is empty or
    malformed)."""
    if not traceparent:
        return trace.INVALID_SPAN_CONTEXT
    context = _PROPAGATOR.extract({"traceparent": traceparent})
    return trace.get_current_span(context).get_span_context()


def _parent(span_context: SpanContext) -> Context:
    """A context whose span is ``span_context``: empty (a new trace) when it is invalid."""
    if not span_context.is_valid:
        return Context()
    return trace.set_span_in_context(trace.NonRecordingSpan(span_context), Context())


def _cause_traceparent(cause: Cause) -> str:
    if isinstance(cause, Envelope):
        return cause.traceparent
    try:
        return cause.payload.decode("ascii")
    except UnicodeDecodeError:
        return ""


def _latest_traceparent(causes: Sequence[Cause]) -> str:
    for cause in reversed(causes):
        traceparent = _cause_traceparent(cause)
        if traceparent:
            return traceparent
    return ""


class RunTracer:
    """Opens the spans of runs (see the module docstring) for one store's key layout.

    Without ``provider`` it uses the process's provider (:func:`configure_tracing`); when that
    is none, tracing is off and every method only forwards trace context.
    """

    __slots__ = ("_keys", "_tracer")

    def __init__(self, config: StoreConfig, provider: trace.TracerProvider | None = None) -> None:
        self._keys = Keys(config.prefix, config.partitions)
        provider = provider or trace.get_tracer_provider()
        off = isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
        self._tracer = None if off else provider.get_tracer(SCOPE)

    @property
    def enabled(self) -> bool:
        """Whether spans are opened (a provider is configured)."""
        return self._tracer is not None

    def feed(self, run_id: str) -> str:
        """The partition feed the run's events go through."""
        return self._keys.for_run(run_id).feed

    @contextmanager
    def sending(self, name: str, event: Envelope, parent: str = "") -> Iterator[Envelope]:
        """A PRODUCER span ``name`` around appending ``event`` (a child of the ``parent``
        traceparent, else of the current span: a new trace when there is none); yields
        ``event`` carrying the span's traceparent. Off, it yields ``event`` carrying ``parent``
        (when given)."""
        if self._tracer is None:
            yield msgspec.structs.replace(event, traceparent=parent) if parent else event
            return
        attributes: dict[str, AttributeValue] = {
            MESSAGING_SYSTEM: "redis",
            MESSAGING_OPERATION_TYPE: "send",
            MESSAGING_DESTINATION: self.feed(event.run_id),
            MESSAGING_MESSAGE_ID: event.event_id,
            RUN_ID: event.run_id,
            "flowlog.event_type": event.type,
        }
        with self._tracer.start_as_current_span(
            name,
            context=_parent(parse_traceparent(parent)) if parent else None,
            kind=SpanKind.PRODUCER,
            attributes=attributes,
        ) as span:
            yield msgspec.structs.replace(
                event, traceparent=format_traceparent(span.get_span_context())
            )

    def decisions(self, group: str, causes: Mapping[str, Sequence[Cause]]) -> DecisionRound:
        """The spans of one round of scheduling decisions by consumer group ``group``;
        ``causes`` maps each run to what triggered its decision, oldest first."""
        return DecisionRound(self, group, causes)

    def decision_span(
        self,
        group: str,
        run_id: str,
        *,
        workflow: str,
        seq: int,
        causes: Sequence[Cause],
        decisions: Sequence[EventData],
    ) -> trace.Span | None:
        """Start the CONSUMER span of one decision (None when tracing is off): a child of the
        latest cause with trace context, linked to the other causes."""
        if self._tracer is None:
            return None
        contexts = [(cause, parse_traceparent(_cause_traceparent(cause))) for cause in causes]
        traced = [(cause, context) for cause, context in contexts if context.is_valid]
        parent = traced[-1][1] if traced else trace.INVALID_SPAN_CONTEXT
        links: list[Link] = []
        seen = {parent.span_id}
        for cause, context in traced[:-1]:
            if context.span_id not in seen:
                seen.add(context.span_id)
                links.append(Link(context, {MESSAGING_MESSAGE_ID: _message_id(cause)}))
        attributes: dict[str, AttributeValue] = {
            MESSAGING_SYSTEM: "redis",
            MESSAGING_OPERATION_TYPE: "process",
            MESSAGING_CONSUMER_GROUP: group,
            RUN_ID: run_id,
            "flowlog.workflow": workflow,
            "flowlog.seq": seq,
            "flowlog.decisions": [str(type(d).__struct_config__.tag) for d in decisions],
        }
        if causes:
            last = causes[-1]
            attributes[MESSAGING_MESSAGE_ID] = _message_id(last)
            attributes[MESSAGING_DESTINATION] = (
                self.feed(run_id)
                if isinstance(last, Envelope)
                else self._keys.timers(self._keys.partition(run_id))
            )
        if len(causes) > 1:
            attributes[MESSAGING_BATCH_COUNT] = len(causes)
        return self._tracer.start_span(
            f"decide {workflow}",
            context=_parent(parent),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
        )

    def step(self, delivery: Delivery, group: str) -> AbstractContextManager[object]:
        """The CONSUMER span of the step attempt ``delivery`` schedules, current while the
        attempt runs (a child of the ``step_scheduled`` event); a no-op when tracing is off."""
        envelope = delivery.envelope
        scheduled = envelope.data
        if self._tracer is None or not isinstance(scheduled, StepScheduled):
            return _NO_SPAN
        attributes: dict[str, AttributeValue] = {
            MESSAGING_SYSTEM: "redis",
            MESSAGING_OPERATION_TYPE: "process",
            MESSAGING_DESTINATION: self._keys.for_run(envelope.run_id).work(scheduled.queue),
            MESSAGING_CONSUMER_GROUP: group,
            MESSAGING_MESSAGE_ID: envelope.event_id,
            RUN_ID: envelope.run_id,
            "flowlog.step": scheduled.step,
            "flowlog.attempt": scheduled.attempt,
            "flowlog.agent": scheduled.agent,
            "flowlog.queue": scheduled.queue,
            "flowlog.fallback_index": scheduled.fallback_index,
            "flowlog.deliveries": delivery.deliveries,
        }
        if scheduled.item is not None:
            attributes["flowlog.item"] = scheduled.item
        if scheduled.iteration is not None:
            attributes["flowlog.iteration"] = scheduled.iteration
        return self._tracer.start_as_current_span(
            f"step {scheduled.step}",
            context=_parent(parse_traceparent(envelope.traceparent)),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )

    def fact_traceparent(self, fact: StepFact, scheduled_traceparent: str) -> str:
        """The traceparent a step fact carries: the current step span's, noting the fact on
        it (a failure sets the error status); without one, the ``step_scheduled`` event's."""
        if self._tracer is None:
            return scheduled_traceparent
        span = trace.get_current_span()
        context = span.get_span_context()
        if not context.is_valid:
            return scheduled_traceparent
        if isinstance(fact, StepFailed):
            span.set_attribute("error.type", fact.error.type)
            span.set_status(Status(StatusCode.ERROR, fact.error.message))
        elif isinstance(fact, StepCacheHit):
            span.set_attribute("flowlog.cache_hit", True)
        elif isinstance(fact, StepSucceeded):
            span.set_attribute("flowlog.cached", fact.cached)
        return format_traceparent(context)


class DecisionRound:
    """The decision spans of one scheduler round: one per run that decides something.

    :meth:`start` when a run's decision is made, :meth:`end` when its append returned, then
    :meth:`next_causes` for the round that decides again on the appended events.
    """

    __slots__ = ("_causes", "_group", "_next", "_spans", "_tracer")

    def __init__(
        self, tracer: RunTracer, group: str, causes: Mapping[str, Sequence[Cause]]
    ) -> None:
        self._tracer = tracer
        self._group = group
        self._causes = causes
        self._spans: dict[str, trace.Span] = {}
        self._next: dict[str, Sequence[Cause]] = {}

    def start(self, run_id: str, workflow: str, seq: int, decisions: Sequence[EventData]) -> str:
        """Open the span of the run's decision (made on ``seq``); return the traceparent its
        events carry (off: the latest cause's)."""
        causes = self._causes.get(run_id, ())
        span = self._tracer.decision_span(
            self._group, run_id, workflow=workflow, seq=seq, causes=causes, decisions=decisions
        )
        if span is None:
            return _latest_traceparent(causes)
        self._spans[run_id] = span
        return format_traceparent(span.get_span_context())

    def traceparent(self, run_id: str) -> str:
        """The run's latest trace context in this round: its decision's, else its cause's
        (what a wake-up timer armed now carries as its payload)."""
        span = self._spans.get(run_id)
        if span is not None:
            return format_traceparent(span.get_span_context())
        return _latest_traceparent(self._causes.get(run_id, ()))

    def end(self, request: AppendRequest, results: Sequence[AppendResult]) -> None:
        """End the span of ``request``'s decision with the append outcome. Appended events
        trigger the run's next decision; after a conflict the causes stay the same."""
        moved = any(result.outcome in _MOVED for result in results)
        causes = self._causes.get(request.run_id, ())
        self._next[request.run_id] = causes if moved else list(request.events[-1:])
        span = self._spans.pop(request.run_id, None)
        if span is None:
            return
        appended = sum(result.outcome is Outcome.APPENDED for result in results)
        span.set_attribute("flowlog.appended", appended)
        if moved:
            span.set_attribute("flowlog.conflict", True)
        span.end()

    def next_causes(self) -> dict[str, Sequence[Cause]]:
        """What triggers each ended run's decision in the next round."""
        return self._next


def _message_id(cause: Cause) -> str:
    return cause.event_id if isinstance(cause, Envelope) else cause.timer_id
