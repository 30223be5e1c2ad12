"""Settings, read once at the entry point and passed down.

Environment variables use the prefix ``FLOWLOG_`` and ``__`` as the nested delimiter, e.g.
``FLOWLOG_REDIS_URL``, ``FLOWLOG_STORE__PARTITIONS``; a ``.env`` file in the working directory
is read too. Secrets are ``SecretStr`` and never logged.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from eventstore.store import StoreConfig


class StoreSettings(BaseModel):
    """The event log (see DESIGN.md "The event log")."""

    prefix: str = "flowlog"
    partitions: int = Field(16, ge=1, le=1024)
    dedup_ttl_s: float = Field(24 * 3600, gt=0)
    retention_s: float = Field(7 * 24 * 3600, gt=0)
    claim_idle_s: float = Field(30.0, gt=0)
    claim_scan_s: float = Field(1.0, ge=0)
    max_deliveries: int = Field(5, ge=1)
    max_event_bytes: int = Field(1024 * 1024, ge=1024)
    spool_path: Path = Path(".flowlog/spool.log")

    def to_config(self) -> StoreConfig:
        return StoreConfig(
            prefix=self.prefix,
            partitions=self.partitions,
            dedup_ttl_ms=int(self.dedup_ttl_s * 1000),
            retention_ms=int(self.retention_s * 1000),
            claim_idle_ms=int(self.claim_idle_s * 1000),
            claim_scan_ms=int(self.claim_scan_s * 1000),
            max_deliveries=self.max_deliveries,
            max_event_bytes=self.max_event_bytes,
        )


class RunnerSettings(BaseModel):
    """The agent runner."""

    queues: list[str] = ["default"]
    concurrency: int = Field(32, ge=1)
    heartbeat_s: float = Field(5.0, gt=0)
    #: Feed entries fetched per idle worker (most are not this runner's steps); 1 keeps a
    #: runner from taking steps it cannot start yet while another runner is idle.
    prefetch: int = Field(4, ge=1)
    breaker_failures: int = Field(5, ge=1)
    breaker_reset_s: float = Field(30.0, gt=0)
    bulkhead: dict[str, int] = {}


class CheckpointSettings(BaseModel):
    """The checkpointer."""

    every_events: int = Field(100, ge=1)
    #: A completed DAG level is snapshotted when at least this many events came since the
    #: last checkpoint (1: every level).
    level_min_events: int = Field(1, ge=1)
    #: A due snapshot is written this long after its run became due, of the run's state
    #: then (0: as soon as it is due).
    interval_s: float = Field(1.0, ge=0)
    #: Seconds between retention passes (archive nothing, trim feeds below the horizon);
    #: 0 turns the periodic pass off (run ``flowlog retention run`` from cron instead).
    retention_interval_s: float = Field(300.0, ge=0)
    #: Where the periodic retention pass archives feed entries before trimming them
    #: (gzipped JSON lines, one file per partition per pass); unset: trim without archive.
    archive_dir: Path | None = None


def checkpoint_interval_fits(interval_s: float, claim_idle_s: float) -> bool:
    """Whether the checkpointer may hold a due run's feed entries for ``interval_s``: held that
    long, they must not look abandoned (idle for ``claim_idle_s``), so under half of it."""
    return interval_s * 2 < claim_idle_s


class Settings(BaseSettings):
    """Everything a flowlog process is configured with."""

    model_config = SettingsConfigDict(
        env_prefix="FLOWLOG_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    redis_url: SecretStr | None = None
    #: Redis Cluster is not supported yet (a subscription reads every partition's feed in one
    #: command, which a cluster refuses across slots): setting this is refused, not ignored.
    redis_cluster: bool = False
    instance: str = ""
    http_host: str = "127.0.0.1"
    http_port: int = Field(9400, ge=0, le=65535)
    log_level: str = "INFO"
    audit_key: SecretStr | None = None
    store: StoreSettings = StoreSettings()
    runner: RunnerSettings = RunnerSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()

    @model_validator(mode="after")
    def _standalone_redis(self) -> Settings:
        if self.redis_cluster:
            raise ValueError(
                "FLOWLOG_REDIS_CLUSTER: Redis Cluster is not supported yet; point"
                " FLOWLOG_REDIS_URL at a standalone Redis (a primary, with replicas if wanted)"
            )
        return self

    @model_validator(mode="after")
    def _checkpoint_hold_below_claim_idle(self) -> Settings:
        interval, idle = self.checkpoint.interval_s, self.store.claim_idle_s
        if not checkpoint_interval_fits(interval, idle):
            raise ValueError(
                f"FLOWLOG_CHECKPOINT__INTERVAL_S ({interval:g}) must be under half of"
                f" FLOWLOG_STORE__CLAIM_IDLE_S ({idle:g}): the checkpointer holds a due run's feed"
                " entries that long, and entries idle for claim_idle are claimed from it"
            )
        return self
