"""Settings that cannot work together are refused with the variables to change."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from eventstore.memory import MemoryStore
from eventstore.store import StoreConfig
from services.checkpointer import Checkpointer
from services.producer import Producer
from services.settings import Settings


def test_a_checkpoint_interval_near_the_claim_idle_time_is_refused() -> None:
    with pytest.raises(ValidationError) as refused:
        Settings.model_validate({"checkpoint": {"interval_s": 1}, "store": {"claim_idle_s": 1.5}})
    message = str(refused.value)
    assert "FLOWLOG_CHECKPOINT__INTERVAL_S (1)" in message
    assert "FLOWLOG_STORE__CLAIM_IDLE_S (1.5)" in message
    fits = Settings.model_validate(
        {"checkpoint": {"interval_s": 0.5}, "store": {"claim_idle_s": 1.5}}
    )
    assert fits.checkpoint.interval_s == 0.5


def test_a_checkpointer_refuses_to_hold_entries_for_half_the_claim_idle_time() -> None:
    store = MemoryStore(StoreConfig(claim_idle_ms=1000))
    with pytest.raises(ValueError, match="under half of the store's claim idle time"):
        Checkpointer(store, Producer("checkpointer"), consumer="c1", interval_s=0.5)
    assert Checkpointer(store, Producer("c"), consumer="c1", interval_s=0.4).interval_s == 0.4
