"""Every Redis key name flowlog uses, built in one place.

All keys of one partition share the hash tag ``{prefix:p}``, so one Lua script can touch them
atomically, also on Redis Cluster.
"""

from __future__ import annotations

import zlib

#: Runs whose keys :meth:`Keys.for_run` keeps built (a run is appended to many times).
_RUN_KEYS_KEPT = 10_000


class Keys:
    """Key names for one ``prefix`` and number of ``partitions``."""

    __slots__ = ("_run_keys", "partitions", "prefix")

    def __init__(self, prefix: str = "flowlog", partitions: int = 16) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        self.prefix = prefix
        self.partitions = partitions
        self._run_keys: dict[str, RunKeys] = {}

    def partition(self, run_id: str) -> int:
        """The partition of a run: a stable hash of its id, mod the partition count."""
        return zlib.crc32(run_id.encode()) % self.partitions

    def tag(self, partition: int) -> str:
        return f"{{{self.prefix}:{partition}}}"

    def run(self, run_id: str) -> str:
        return f"{self.tag(self.partition(run_id))}:run:{run_id}"

    def head(self, run_id: str) -> str:
        return f"{self.tag(self.partition(run_id))}:head:{run_id}"

    def snap(self, run_id: str) -> str:
        return f"{self.tag(self.partition(run_id))}:snap:{run_id}"

    def dedup(self, run_id: str, event_id: str) -> str:
        return f"{self.tag(self.partition(run_id))}:dedup:{event_id}"

    def feed(self, partition: int) -> str:
        return f"{self.tag(partition)}:feed"

    def work(self, partition: int, queue: str) -> str:
        """The partition's work stream of ``queue``: its ``step_scheduled`` events."""
        return f"{self.tag(partition)}:work:{queue}"

    def queues(self, partition: int) -> str:
        """Set of the queues that have a work stream in the partition."""
        return f"{self.tag(partition)}:queues"

    def runs(self, partition: int) -> str:
        """Sorted set of the partition's run ids, scored by first-append time (ms)."""
        return f"{self.tag(partition)}:runs"

    def timers(self, partition: int) -> str:
        return f"{self.tag(partition)}:timers"

    def timer_payloads(self, partition: int) -> str:
        """Hash timer id -> payload for the partition's timers."""
        return f"{self.tag(partition)}:timerdata"

    def dead(self, partition: int) -> str:
        return f"{self.tag(partition)}:dead"

    def for_run(self, run_id: str) -> RunKeys:
        """Every key of one run and of its partition, the partition computed once (built
        once per run while the last ``_RUN_KEYS_KEPT`` runs are kept)."""
        found = self._run_keys.get(run_id)
        if found is None:
            if len(self._run_keys) >= _RUN_KEYS_KEPT:
                self._run_keys.clear()
            found = self._run_keys[run_id] = RunKeys(self, run_id)
        return found


class RunKeys:
    """The keys of one run and of its partition (see :meth:`Keys.for_run`)."""

    __slots__ = (
        "_dedup_prefix",
        "_work_prefix",
        "feed",
        "head",
        "partition",
        "queues",
        "run",
        "runs",
        "snap",
    )

    def __init__(self, keys: Keys, run_id: str) -> None:
        self.partition = keys.partition(run_id)
        tag = keys.tag(self.partition)
        self.run = f"{tag}:run:{run_id}"
        self.head = f"{tag}:head:{run_id}"
        self.snap = f"{tag}:snap:{run_id}"
        self.feed = keys.feed(self.partition)
        self.runs = keys.runs(self.partition)
        self.queues = keys.queues(self.partition)
        self._dedup_prefix = f"{tag}:dedup:"
        self._work_prefix = f"{tag}:work:"

    def dedup(self, event_id: str) -> str:
        return self._dedup_prefix + event_id

    def work(self, queue: str) -> str:
        return self._work_prefix + queue
