"""Loading a run's state the event-sourced way: cache, else latest snapshot + the events after it.

State is only ever derived from the log; the cache and snapshots are accelerators that are
checked against the log (every load catches up from the cached/snapshotted seq).

A scheduler folds the decisions it appended into its cached state right away. A decision may
land after passive events it has not seen yet (``eventstore.store.PASSIVE_EVENT_TYPES``); the
loader remembers those seqs as *holes* and folds the passive events in when the feed delivers
them (:func:`projections.run_state.evolve_passed`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import msgspec

from eventstore.events import Envelope
from eventstore.store import EventStore, Snapshot
from projections.run_state import STATE_VERSION, RunState, evolve, evolve_passed
from services.workflow.loader import parse_definition
from services.workflow.model import WorkflowDef

_STATE_ENCODER = msgspec.msgpack.Encoder()
_STATE_DECODER = msgspec.msgpack.Decoder(RunState)


def snapshot_of(state: RunState) -> Snapshot:
    """The snapshot of ``state`` as the checkpointer stores it."""
    return Snapshot(
        run_id=state.run_id,
        seq=state.seq,
        version=STATE_VERSION,
        state=_STATE_ENCODER.encode(state),
    )


def state_from_snapshot(snapshot: Snapshot) -> RunState | None:
    """The state in ``snapshot``, or None when it was written by another state version."""
    if snapshot.version != STATE_VERSION:
        return None
    try:
        return _STATE_DECODER.decode(snapshot.state)
    except msgspec.DecodeError:
        return None


class RunLoader:
    """Loads run states and their definitions, keeping a bounded LRU cache of both.

    Services in one process (``flowlog up``) share one loader: whichever gets a run's events
    first folds them, and the others find the state ahead of their feed (``events_folded``
    counts the events folded, ``events_read`` those read from the store to do it).
    """

    def __init__(self, store: EventStore, *, cache_size: int = 10_000) -> None:
        self.store = store
        self.cache_size = cache_size
        self._states: OrderedDict[str, RunState] = OrderedDict()
        self._holes: dict[str, set[int]] = {}
        self._definitions: dict[str, WorkflowDef] = {}
        self.events_read = 0
        self.events_folded = 0

    def remember(self, state: RunState, *, passed: range = range(0)) -> None:
        """Cache ``state``; ``passed``: seqs of passive events it was moved past unseen."""
        run_id = state.run_id
        self._states[run_id] = state
        self._states.move_to_end(run_id)
        if passed:
            self._holes.setdefault(run_id, set()).update(passed)
        while len(self._states) > self.cache_size:
            evicted, _ = self._states.popitem(last=False)
            self._holes.pop(evicted, None)

    def cached(self, run_id: str) -> RunState | None:
        """The run's cached state, if it is in the cache and has every event up to its seq
        folded in (no passive event was moved past unseen)."""
        if run_id in self._holes:
            return None
        return self._states.get(run_id)

    def forget(self, run_id: str) -> None:
        self._states.pop(run_id, None)
        self._holes.pop(run_id, None)

    async def load(self, run_id: str) -> RunState | None:
        """The run's current state: cached or snapshotted state, caught up from the log."""
        if run_id in self._holes:
            self.forget(run_id)
        state = self._states.get(run_id)
        if state is None:
            snapshot = await self.store.get_snapshot(run_id)
            if snapshot is not None:
                state = state_from_snapshot(snapshot)
        after = state.seq if state is not None else 0
        async for event in self.store.read_run(run_id, after_seq=after):
            self.events_read += 1
            self.events_folded += 1
            state = evolve(state, event)
        if state is not None:
            self.remember(state)
        return state

    async def advance(self, run_id: str, events: Iterable[Envelope]) -> RunState | None:
        """The run's state after ``events`` (delivered from a feed, in seq order): applied to
        the cached state when they are its next events, else loaded from the store."""
        state = self._states.get(run_id)
        if state is None:
            events = list(events)
            if not events or events[0].seq != 1:
                return await self.load(run_id)
        holes = self._holes.get(run_id)
        for event in events:
            if state is None or event.seq == state.seq + 1:
                self.events_folded += 1
                state = evolve(state, event)
            elif event.seq > state.seq + 1:
                return await self.load(run_id)
            elif holes and event.seq in holes:
                self.events_folded += 1
                state = evolve_passed(state, event)
                holes.discard(event.seq)
        if holes is not None and not holes:
            del self._holes[run_id]
        if state is not None:
            self.remember(state)
        return state

    def definition(self, state: RunState) -> WorkflowDef:
        """The definition the run was submitted with (parsed once per digest)."""
        found = self._definitions.get(state.digest)
        if found is None:
            found = parse_definition(
                state.definition, source=f"run {state.run_id}", format=state.definition_format
            )
            self._definitions[state.digest] = found
        return found
