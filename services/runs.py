"""Loading a run's state the event-sourced way: cache, else latest snapshot + the events after it.

State is only ever derived from the log; the cache and snapshots are accelerators that are
checked against the log (every load catches up from the cached/snapshotted seq).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import msgspec

from eventstore.events import Envelope
from eventstore.store import EventStore, Snapshot
from projections.run_state import STATE_VERSION, RunState, evolve
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
    """Loads run states and their definitions, keeping a bounded LRU cache of both."""

    def __init__(self, store: EventStore, *, cache_size: int = 10_000) -> None:
        self.store = store
        self.cache_size = cache_size
        self._states: OrderedDict[str, RunState] = OrderedDict()
        self._definitions: dict[str, WorkflowDef] = {}
        self.events_read = 0

    def remember(self, state: RunState) -> None:
        self._states[state.run_id] = state
        self._states.move_to_end(state.run_id)
        while len(self._states) > self.cache_size:
            self._states.popitem(last=False)

    def forget(self, run_id: str) -> None:
        self._states.pop(run_id, None)

    async def load(self, run_id: str) -> RunState | None:
        """The run's current state: cached or snapshotted state, caught up from the log."""
        state = self._states.get(run_id)
        if state is None:
            snapshot = await self.store.get_snapshot(run_id)
            if snapshot is not None:
                state = state_from_snapshot(snapshot)
        after = state.seq if state is not None else 0
        async for event in self.store.read_run(run_id, after_seq=after):
            self.events_read += 1
            state = evolve(state, event)
        if state is not None:
            self.remember(state)
        return state

    async def advance(self, run_id: str, events: Iterable[Envelope]) -> RunState | None:
        """The run's state after ``events`` (delivered from a feed, in seq order): applied to
        the cached state when they are its next events, else loaded from the store."""
        state = self._states.get(run_id)
        if state is None:
            return await self.load(run_id)
        for event in events:
            if event.seq == state.seq + 1:
                state = evolve(state, event)
            elif event.seq > state.seq + 1:
                return await self.load(run_id)
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
