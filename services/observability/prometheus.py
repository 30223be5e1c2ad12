"""Prometheus metrics of flowlog: every metric name is defined here.

Each service object owns a :class:`~prometheus_client.CollectorRegistry` (see
:func:`new_registry`); nothing registers on the global default registry, so tests and
``flowlog up`` (several services in one process) never collide. Names use the ``flowlog_``
prefix and base units (seconds); counters end in ``_total``.

- :class:`ProcessMetrics`: what every service process counts from its own work (appends by
  outcome, trimmed feed entries, timers due).
- :class:`ProjectorMetrics`: what the metrics projector exposes: the folded
  :class:`~projections.metrics_model.MetricsModel` (through :class:`MetricsModelCollector`),
  consumer-group and dead-letter gauges read from the store, and its own progress.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from eventstore.store import AppendResult, DeadLetter, GroupInfo, Outcome, TrimReport
from projections.metrics_model import DURATION_BUCKETS, Histogram, MetricsModel

_Labels = TypeVar("_Labels", bound=tuple[str, ...])


def new_registry() -> CollectorRegistry:
    """A fresh registry for one service object (or one process running several services)."""
    return CollectorRegistry(auto_describe=True)


class ProcessMetrics:
    """Metrics every service process exports from its own work; create one per registry.

    ``flowlog_appends_total{outcome}`` counts events this process offered to the store by
    outcome (``duplicate`` is a dedup hit); ``flowlog_feed_trimmed_entries_total`` counts feed
    entries its trims removed; ``flowlog_timers_due`` is the number of timers found due at the
    last poll.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.appends = Counter(
            "flowlog_appends_total",
            "Events offered to the store by this process, by outcome.",
            ["outcome"],
            registry=registry,
        )
        # Bound once: appends are counted on every store call, labels() is not free.
        self._appends_by_outcome = {
            outcome: self.appends.labels(outcome.value) for outcome in Outcome
        }
        self.feed_trimmed_entries = Counter(
            "flowlog_feed_trimmed_entries_total",
            "Feed entries removed by retention trims of this process.",
            registry=registry,
        )
        self.timers_due = Gauge(
            "flowlog_timers_due",
            "Timers found due at the last poll of this process.",
            registry=registry,
        )

    def count_appends(self, results: Iterable[AppendResult]) -> None:
        """Count the outcome of every event of an append (one increment per outcome seen)."""
        for outcome, count in Tally(result.outcome for result in results).items():
            self._appends_by_outcome[outcome].inc(count)

    def count_trim(self, report: TrimReport) -> None:
        """Count the entries a (not dry-run) trim removed."""
        if not report.dry_run:
            self.feed_trimmed_entries.inc(sum(report.trimmed.values()))


class ProjectorMetrics:
    """What the metrics projector exposes, registered on ``registry``.

    ``model`` returns the model to expose at each scrape; it must not be mutated while a
    scrape reads it (the projector hands out the last saved copy).
    """

    def __init__(self, registry: CollectorRegistry, model: Callable[[], MetricsModel]) -> None:
        registry.register(MetricsModelCollector(model))
        self.events_applied = Counter(
            "flowlog_projector_events_applied_total",
            "Events this metrics projector process folded into the metrics model.",
            registry=registry,
        )
        self.group_pending = Gauge(
            "flowlog_consumer_group_pending",
            "Feed entries delivered to a consumer group and not yet acknowledged.",
            ["group"],
            registry=registry,
        )
        self.group_lag = Gauge(
            "flowlog_consumer_group_lag",
            "Feed entries not yet delivered to a consumer group.",
            ["group"],
            registry=registry,
        )
        self.dead_letters = Gauge(
            "flowlog_dead_letters",
            "Entries in the dead-letter stream of a partition.",
            ["partition"],
            registry=registry,
        )
        self._groups: set[str] = set()

    def update_store_gauges(
        self, groups: Sequence[GroupInfo], dead: Sequence[DeadLetter], partitions: int
    ) -> None:
        """Set the group gauges (summed over partitions) and the dead letters per partition
        (every partition, zeros included); groups that disappeared are removed."""
        pending: Tally[str] = Tally()
        lag: Tally[str] = Tally()
        for info in groups:
            pending[info.group] += info.pending
            lag[info.group] += info.lag
        names = {info.group for info in groups}
        for group in self._groups - names:
            self.group_pending.remove(group)
            self.group_lag.remove(group)
        for group in names:
            self.group_pending.labels(group).set(pending[group])
            self.group_lag.labels(group).set(lag[group])
        self._groups = names
        per_partition = Tally(letter.partition for letter in dead)
        for partition in range(partitions):
            self.dead_letters.labels(str(partition)).set(per_partition[partition])


class MetricsModelCollector(Collector):
    """Exposes a :class:`MetricsModel` as Prometheus metric families at each scrape."""

    def __init__(self, model: Callable[[], MetricsModel]) -> None:
        self._model = model

    def describe(self) -> Iterable[Metric]:
        return list(_families(MetricsModel()))

    def collect(self) -> Iterable[Metric]:
        return list(_families(self._model()))


def _families(model: MetricsModel) -> Iterator[Metric]:
    yield _counter(
        "flowlog_runs_submitted_total",
        "Runs submitted.",
        ["workflow"],
        {(workflow,): count for workflow, count in model.runs_submitted.items()},
    )
    yield _counter(
        "flowlog_runs_finished_total",
        "Runs finished, by final status.",
        ["workflow", "status"],
        model.runs_finished,
    )
    active = GaugeMetricFamily(
        "flowlog_runs_active", "Runs not finished, by status.", labels=["status"]
    )
    for status, count in model.runs_active().items():
        active.add_metric([status], count)
    yield active
    yield _histogram(
        "flowlog_run_duration_seconds",
        "Run duration from submission to its final status.",
        ["workflow", "status"],
        model.run_duration,
    )
    yield _histogram(
        "flowlog_step_duration_seconds",
        "Step attempt duration from start (else schedule) to success or failure.",
        ["workflow", "step", "agent", "status"],
        model.step_duration,
    )
    step_agent = ["workflow", "step", "agent"]
    yield _counter(
        "flowlog_step_attempts_total", "Step attempts started.", step_agent, model.step_attempts
    )
    yield _counter(
        "flowlog_step_retries_total",
        "Step retries scheduled.",
        ["workflow", "step"],
        model.step_retries,
    )
    yield _counter(
        "flowlog_step_fallbacks_total",
        "Fallback agents started, by fallback agent.",
        step_agent,
        model.step_fallbacks,
    )
    yield _counter(
        "flowlog_step_skips_total", "Steps skipped.", ["workflow", "step"], model.step_skips
    )
    yield _counter(
        "flowlog_step_cache_hits_total",
        "Step results served from the result cache.",
        step_agent,
        model.cache_hits,
    )
    yield _counter(
        "flowlog_step_cache_misses_total",
        "Successes of cacheable steps computed by running the agent.",
        step_agent,
        model.cache_misses,
    )
    yield _counter(
        "flowlog_events_total",
        "Events in the log, by type.",
        ["type"],
        {(event_type,): count for event_type, count in model.events.items()},
    )


def _counter(
    name: str, documentation: str, labels: list[str], values: Mapping[_Labels, int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


def _histogram(
    name: str,
    documentation: str,
    labels: list[str],
    histograms: Mapping[_Labels, Histogram],
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    bounds = [*(repr(bound) for bound in DURATION_BUCKETS), "+Inf"]
    for key, histogram in sorted(histograms.items()):
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip(bounds, histogram.counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        family.add_metric(list(key), buckets, histogram.sum_seconds)
    return family
