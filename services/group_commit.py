"""Group commit: concurrent callers' items sent to the store in one batched call.

While one batch is in flight, new items queue up and go together in the next one, so a
service with many concurrent workers pays one round trip per batch rather than per item (the
technique databases use to amortise log flushes). With one caller it adds no waiting: an item
is sent as soon as nothing else is in flight.

A batch that fails fails every item in it, except for errors listed in ``isolate``: those name
one bad item (an event too large to store, say), so the batch's items are then sent again one
by one and each caller gets its own result or error. Only errors of a flush that wrote nothing
belong there (the store validates a whole batch before writing).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import anyio
from anyio.abc import TaskStatus

In = TypeVar("In")
Out = TypeVar("Out")


class _Slot(Generic[Out]):
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.result: Out | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[In, Out]):
    """Runs ``flush(items) -> results`` (one result per item, in order) over batches of the
    items submitted concurrently through :meth:`submit`. :meth:`run` must be running."""

    def __init__(
        self,
        flush: Callable[[Sequence[In]], Awaitable[Sequence[Out]]],
        *,
        max_batch: int = 512,
        isolate: tuple[type[Exception], ...] = (),
    ) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._isolate = isolate
        self._queue: list[tuple[In, _Slot[Out]]] = []
        self._wake = anyio.Event()

    async def submit(self, item: In) -> Out:
        """Queue ``item`` and wait for its result (or the batch's error)."""
        slot: _Slot[Out] = _Slot()
        self._queue.append((item, slot))
        self._wake.set()
        await slot.done.wait()
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Flush batches until cancelled; a cancel finishes the batch in flight first."""
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                with anyio.CancelScope(shield=True):
                    await self._send(batch)

    async def _send(self, batch: list[tuple[In, _Slot[Out]]]) -> None:
        try:
            results = await self._flush([item for item, _ in batch])
        except Exception as exc:
            if len(batch) > 1 and isinstance(exc, self._isolate):
                for one in batch:
                    await self._send([one])
                return
            for _, slot in batch:
                slot.error = exc
                slot.done.set()
            return
        for (_, slot), result in zip(batch, results, strict=True):
            slot.result = result
            slot.done.set()
