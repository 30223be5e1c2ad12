"""The metrics model: a pure fold of the log into the counts and histograms flowlog exports.

:func:`apply` folds one envelope into a :class:`MetricsModel`, **mutating it in place** and
returning it (copying the model per event would cost more than the fold). The fold is
deterministic: it reads nothing but the model and the envelope, and durations are differences
of event ``ts`` values (run: submitted -> finished; step: started, else scheduled -> succeeded
or failed), never a clock.

Idempotency: every run remembers the last ``seq`` applied, and an envelope whose ``seq`` is not
above it is ignored (so is one with ``seq`` 0: it never came from the log). Runs that finished
are kept, without their step details, only in a bounded set of the most recently touched ones
(``keep_finished``); so are runs whose submission the model has not seen. That is safe because
the projector saves the model *before* it acknowledges the entries folded into it, and only
unacknowledged entries are ever delivered again: a redelivery can only repeat the entries of
the last batches before a crash, whose runs are among the most recently touched. An event for
a run the model no longer knows (say, a step result that arrives long after its run was
cancelled) is counted under the workflow ``"unknown"``.

The model is encoded with msgpack (:func:`encode_model`) and saved as the projector's snapshot;
:data:`MODEL_VERSION` changes whenever that encoding does, and a snapshot of another version is
discarded and rebuilt from the log.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable
from typing import Final, TypeVar

import msgspec

from eventstore.codec import encode_value
from eventstore.events import (
    Envelope,
    FallbackStarted,
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
from eventstore.store import STATUS_BY_EVENT_TYPE, TERMINAL_STATUSES

MODEL_VERSION: Final = 1

#: Upper bounds (seconds, inclusive) of the duration histogram buckets; +Inf follows.
DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip
_BUCKET_BOUNDS_MS: Final = tuple(round(bound * 1000) for bound in DURATION_BUCKETS)

#: Statuses of runs that have not finished: the ``runs_active`` gauge counts runs per status.
OPEN_STATUSES: Final[tuple[str, ...]] = ("submitted", "running", "paused")

#: The workflow label of events of a run whose submission the model has not seen.
UNKNOWN_WORKFLOW: Final = "unknown"

#: How many finished runs the model keeps by default (see the module docstring).
KEEP_FINISHED_RUNS: Final = 10_000

_FINAL_STATUSES: Final = tuple(sorted(TERMINAL_STATUSES))

#: A unit of step work: step id, ``for_each`` item, ``loop`` iteration.
UnitKey = tuple[str, int | None, int | None]

_K = TypeVar("_K")


class Histogram(msgspec.Struct, kw_only=True):
    """Observations per bucket of :data:`DURATION_BUCKETS` (the last one is +Inf; counts are
    per bucket, not cumulative) and their sum. Durations are whole milliseconds, so the sum
    is exact and does not depend on the order of observations."""

    counts: list[int] = msgspec.field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    sum_ms: int = 0

    def observe(self, millis: int) -> None:
        self.counts[bisect_left(_BUCKET_BOUNDS_MS, millis)] += 1
        self.sum_ms += millis

    @property
    def count(self) -> int:
        return sum(self.counts)

    @property
    def sum_seconds(self) -> float:
        return self.sum_ms / 1000


class StepTrack(msgspec.Struct, kw_only=True):
    """What the model remembers of a unit of step work in flight."""

    agent: str
    scheduled_ts: int
    started_ts: int = 0
    cache_enabled: bool = False
    cache_hit: bool = False


class RunTrack(msgspec.Struct, kw_only=True):
    """What the model remembers of one run: labels, timing, and the last seq applied."""

    workflow: str
    status: str = ""
    submitted_ts: int = 0
    last_seq: int = 0
    steps: dict[UnitKey, StepTrack] = {}


class MetricsModel(msgspec.Struct, kw_only=True):
    """Counts, gauges and histograms folded from the log.

    Label tuples: ``runs_finished`` and ``run_duration`` are keyed by (workflow, status);
    ``step_duration`` by (workflow, step, agent, status) where status is ``succeeded``,
    ``cached`` (a success served from the result cache) or ``failed``; ``step_attempts``,
    ``step_fallbacks``, ``cache_hits`` and ``cache_misses`` by (workflow, step, agent) (for
    fallbacks, the fallback agent); ``step_retries`` and ``step_skips`` by (workflow, step);
    ``events`` by event type. ``applied`` counts every event folded in.

    An attempt is a ``step_started``. A cache hit is a ``step_cache_hit``, or a cached
    ``step_succeeded`` of a unit that had none; a miss is an uncached success of a step
    scheduled with a cache TTL.

    Series a dashboard divides by are created at zero as soon as they can occur: every final
    status of a submitted workflow, and hits and misses of a step scheduled with a cache TTL
    (so a failure or hit ratio is 0, not missing).
    """

    open_runs: dict[str, RunTrack] = {}
    finished_runs: dict[str, RunTrack] = {}
    keep_finished: int = KEEP_FINISHED_RUNS
    runs_submitted: dict[str, int] = {}
    runs_finished: dict[tuple[str, str], int] = {}
    run_duration: dict[tuple[str, str], Histogram] = {}
    step_duration: dict[tuple[str, str, str, str], Histogram] = {}
    step_attempts: dict[tuple[str, str, str], int] = {}
    step_retries: dict[tuple[str, str], int] = {}
    step_fallbacks: dict[tuple[str, str, str], int] = {}
    step_skips: dict[tuple[str, str], int] = {}
    cache_hits: dict[tuple[str, str, str], int] = {}
    cache_misses: dict[tuple[str, str, str], int] = {}
    events: dict[str, int] = {}
    applied: int = 0

    def runs_active(self) -> dict[str, int]:
        """Runs not yet finished, per status (every status of :data:`OPEN_STATUSES` present)."""
        counts = Counter(track.status for track in self.open_runs.values())
        return {status: counts[status] for status in OPEN_STATUSES}


_DECODER: Final = msgspec.msgpack.Decoder(MetricsModel)


def encode_model(model: MetricsModel) -> bytes:
    """The msgpack bytes of ``model`` (the projector's snapshot state)."""
    return encode_value(model)


def decode_model(data: bytes) -> MetricsModel:
    """The model encoded by :func:`encode_model` (same :data:`MODEL_VERSION`)."""
    return _DECODER.decode(data)


def fold(envelopes: Iterable[Envelope], model: MetricsModel | None = None) -> MetricsModel:
    """Apply every envelope in order to ``model`` (a new empty one if not given)."""
    result = MetricsModel() if model is None else model
    for envelope in envelopes:
        apply(result, envelope)
    return result


def apply(model: MetricsModel, envelope: Envelope) -> MetricsModel:
    """Fold one envelope into ``model`` in place and return it; a repeat is a no-op."""
    run_id = envelope.run_id
    track = model.open_runs.get(run_id) or model.finished_runs.get(run_id)
    if track is None:
        track = RunTrack(workflow=UNKNOWN_WORKFLOW)
    if envelope.seq <= track.last_seq:
        return model
    track.last_seq = envelope.seq
    model.applied += 1
    kind = envelope.type
    _inc(model.events, kind)
    _fold_run(model, track, envelope, kind)
    _fold_step(model, track, envelope)
    _place(model, run_id, track)
    return model


def _inc(counts: dict[_K, int], key: _K) -> None:
    counts[key] = counts.get(key, 0) + 1


def _observe(histograms: dict[_K, Histogram], key: _K, millis: int) -> None:
    histogram = histograms.get(key)
    if histogram is None:
        histogram = histograms[key] = Histogram()
    histogram.observe(millis)


def _millis(start_ms: int, end_ms: int) -> int:
    """Milliseconds between two event timestamps; clock skew between producers clamps to 0."""
    return max(0, end_ms - start_ms)


def _fold_run(model: MetricsModel, track: RunTrack, envelope: Envelope, kind: str) -> None:
    data = envelope.data
    if isinstance(data, RunSubmitted):
        track.workflow = data.workflow
        track.submitted_ts = envelope.ts
        _inc(model.runs_submitted, data.workflow)
        for final in _FINAL_STATUSES:
            model.runs_finished.setdefault((data.workflow, final), 0)
    status = STATUS_BY_EVENT_TYPE.get(kind)
    if status is None:
        return
    track.status = status
    if status in TERMINAL_STATUSES:
        _inc(model.runs_finished, (track.workflow, status))
        if track.submitted_ts:
            duration = _millis(track.submitted_ts, envelope.ts)
            _observe(model.run_duration, (track.workflow, status), duration)


def _fold_step(model: MetricsModel, track: RunTrack, envelope: Envelope) -> None:
    workflow = track.workflow
    ts = envelope.ts
    match envelope.data:
        case StepScheduled(step=step, agent=agent, item=item, iteration=iteration) as data:
            cache_enabled = bool(data.cache_ttl_s)
            track.steps[(step, item, iteration)] = StepTrack(
                agent=agent, scheduled_ts=ts, cache_enabled=cache_enabled
            )
            if cache_enabled:
                model.cache_hits.setdefault((workflow, step, agent), 0)
                model.cache_misses.setdefault((workflow, step, agent), 0)
        case StepStarted(step=step, agent=agent, item=item, iteration=iteration):
            unit = _unit(track, (step, item, iteration), agent, ts)
            unit.started_ts = ts
            _inc(model.step_attempts, (workflow, step, agent))
        case StepCacheHit(step=step, agent=agent, item=item, iteration=iteration):
            _unit(track, (step, item, iteration), agent, ts).cache_hit = True
            _inc(model.cache_hits, (workflow, step, agent))
        case StepSucceeded(step=step, agent=agent, item=item, iteration=iteration) as data:
            ended = track.steps.pop((step, item, iteration), None)
            if data.cached and not (ended and ended.cache_hit):
                _inc(model.cache_hits, (workflow, step, agent))
            if not data.cached and ended and ended.cache_enabled:
                _inc(model.cache_misses, (workflow, step, agent))
            status = "cached" if data.cached else "succeeded"
            duration = _step_millis(ended, ts, data.duration_ms)
            _observe(model.step_duration, (workflow, step, agent, status), duration)
        case StepFailed(step=step, agent=agent, item=item, iteration=iteration) as data:
            ended = track.steps.pop((step, item, iteration), None)
            duration = _step_millis(ended, ts, data.duration_ms)
            _observe(model.step_duration, (workflow, step, agent, "failed"), duration)
        case StepCancelled(step=step, item=item, iteration=iteration):
            track.steps.pop((step, item, iteration), None)
        case StepRetryScheduled(step=step):
            _inc(model.step_retries, (workflow, step))
        case FallbackStarted(step=step, agent=agent):
            _inc(model.step_fallbacks, (workflow, step, agent))
        case StepSkipped(step=step):
            _inc(model.step_skips, (workflow, step))


def _unit(track: RunTrack, key: UnitKey, agent: str, ts: int) -> StepTrack:
    unit = track.steps.get(key)
    if unit is None:
        unit = track.steps[key] = StepTrack(agent=agent, scheduled_ts=ts)
    return unit


def _step_millis(unit: StepTrack | None, end_ts: int, reported_ms: float) -> int:
    """Started -> end, else scheduled -> end; the event's own duration if the unit is unknown."""
    if unit is None:
        return round(max(0.0, reported_ms))
    return _millis(unit.started_ts or unit.scheduled_ts, end_ts)


def _place(model: MetricsModel, run_id: str, track: RunTrack) -> None:
    """Keep ``track`` among open runs, or among the most recently touched finished ones."""
    if track.status in OPEN_STATUSES:
        if model.open_runs.get(run_id) is not track:
            model.finished_runs.pop(run_id, None)
            model.open_runs[run_id] = track
        return
    model.open_runs.pop(run_id, None)
    model.finished_runs.pop(run_id, None)
    if track.status in TERMINAL_STATUSES:
        track.steps.clear()
    model.finished_runs[run_id] = track
    while len(model.finished_runs) > model.keep_finished:
        del model.finished_runs[next(iter(model.finished_runs))]
