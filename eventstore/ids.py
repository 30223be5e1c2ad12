"""Event identifiers: time-ordered UUIDv7 strings, or deterministic ids for idempotent producers."""

from __future__ import annotations

import hashlib

import uuid_utils


def new_event_id() -> str:
    """A fresh, time-ordered UUIDv7 string."""
    return str(uuid_utils.uuid7())


def derived_event_id(*parts: str | int) -> str:
    """A deterministic id derived from ``parts``.

    Producers that may repeat an action (a redelivered step, a re-run decision) derive the
    event id from what identifies the action, so the store's dedup turns the repeat into a
    reported ``duplicate`` instead of a second event.
    """
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=16)
    return digest.hexdigest()
