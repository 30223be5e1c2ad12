"""Fixtures shared by every test module."""

from __future__ import annotations

import pytest

#: Fixtures for tests that need a private redis-server (see tests/support/redis_server.py).
pytest_plugins = ("support.redis_server",)


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio (the backend the services use)."""
    return "asyncio"
